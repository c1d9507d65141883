{{/* Name of the chart, or nameOverride. */}}
{{- define "audiotune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the chart's objects: fullnameOverride, else <release>-<name> (or <release> when it contains the name). */}}
{{- define "audiotune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "audiotune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "audiotune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "audiotune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "audiotune.labels" -}}
helm.sh/chart: {{ include "audiotune.chart" . }}
{{ include "audiotune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "audiotune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "audiotune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "audiotune.s3SecretName" -}}
{{- default (printf "%s-s3" (include "audiotune.fullname" .)) .Values.s3.existingSecret }}
{{- end }}

{{- define "audiotune.mlflowSecretName" -}}
{{- default (printf "%s-mlflow" (include "audiotune.fullname" .)) .Values.mlflow.client.existingSecret }}
{{- end }}

{{- define "audiotune.modelCacheClaim" -}}
{{- default (printf "%s-model-cache" (include "audiotune.fullname" .)) .Values.modelCache.existingClaim }}
{{- end }}

{{/* The audiotune CPU image: <registry>/<repository>:<tag or appVersion>. */}}
{{- define "audiotune.image" -}}
{{- printf "%s/%s:%s" (trimSuffix "/" .Values.image.registry) .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "audiotune.mlflowImage" -}}
{{- if .Values.mlflow.image.repository }}
{{- printf "%s:%s" .Values.mlflow.image.repository (default "latest" .Values.mlflow.image.tag) }}
{{- else }}
{{- include "audiotune.image" . }}
{{- end }}
{{- end }}

{{- define "audiotune.mlflowService" -}}
{{- printf "%s-mlflow" (include "audiotune.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The in-cluster URL of the MLflow server. */}}
{{- define "audiotune.mlflowUrl" -}}
{{- printf "http://%s.%s.svc.cluster.local:%v" (include "audiotune.mlflowService" .) .Release.Namespace .Values.mlflow.service.port }}
{{- end }}
