"""The pipeline's commands of the ``audiotune`` CLI: ``run --local``, ``compile``, ``submit``.

Exit codes: 0 success; 1 the run failed (or the host could not be used); 2 bad usage or config, and
for ``submit --wait --promote`` a run that succeeded but whose model did not beat the champion.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from audiotune.config import AudiotuneConfig

EXIT_OK, EXIT_FAILED, EXIT_NOT_PROMOTED = 0, 1, 2
TOKEN_ENV = "KF_PIPELINES_TOKEN"
HOST_ENV = "KF_PIPELINES_ENDPOINT"  # the variable kfp.Client reads too


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=v",
                   help="Override a config field by its dotted path (repeatable).")


def add_pipeline_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``run``, ``compile`` and ``submit`` on the CLI's subcommands."""
    p = sub.add_parser("run", help="Run the whole pipeline on this machine (kfp.local, a local MLflow store).")
    p.add_argument("--local", dest="config", metavar="CONFIG", required=True,
                   help="The pipeline's YAML config; the run uses Kubeflow's local subprocess runner.")
    p.add_argument("--root", help="Local pipeline root for the task outputs (default: pipeline.root, else "
                                  "./kfp-local).")
    _overrides(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compile", help="Compile the pipeline to YAML for upload in the Kubeflow UI.")
    p.add_argument("--output", default="audiotune-finetune.yaml", help="Output YAML (default: %(default)s).")
    p.add_argument("--config", help="Config whose values become the parameters' defaults and whose cluster "
                                    "settings the pods get (default: the schema defaults).")
    _overrides(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("submit", help="Submit a run to Kubeflow Pipelines; --wait follows it to the end.")
    p.add_argument("--config", required=True, help="The pipeline's YAML config.")
    p.add_argument("--host", default=os.environ.get(HOST_ENV),
                   help=f"Kubeflow Pipelines URL (default: ${HOST_ENV}).")
    p.add_argument("--experiment", help="Kubeflow experiment (default: tracking.experiment).")
    p.add_argument("--run-name", help="Display name of the run.")
    p.add_argument("--namespace", help="Kubernetes namespace (multi-user Kubeflow).")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"Bearer token (default: ${TOKEN_ENV}).")
    p.add_argument("--cookies", help="Session cookies, e.g. authservice_session=...")
    p.add_argument("--wait", action="store_true", help="Follow the run; exit 0 only if it succeeded.")
    p.add_argument("--timeout", type=float, default=24 * 3600, help="With --wait: seconds (default: 1 day).")
    p.add_argument("--poll", type=float, default=15.0, help="With --wait: seconds between polls.")
    p.add_argument("--promote", action="store_true",
                   help="With --wait: move the champion alias to the new model only if it beats the champion; "
                        "exit 2 when it does not.")
    p.add_argument("--metric", default="val_loss", help="With --promote: the metric compared (lower is better).")
    _overrides(p)
    p.set_defaults(func=cmd_submit)


def _err(command: str, message: str) -> None:
    print(f"audiotune {command}: {message}", file=sys.stderr)


def cmd_run(args: argparse.Namespace, cfg: AudiotuneConfig) -> int:
    """``audiotune run --local CONFIG``."""
    from audiotune import sdk

    try:
        result = sdk.run_local(cfg, root=args.root)
    except sdk.PipelineFailed as err:
        _err("run", f"the pipeline failed: {err}")
        return EXIT_FAILED
    lines = [
        "",
        "audiotune run: the pipeline finished",
        f"  task outputs: {result.run_dir}",
        f"  export:       {result.export_uri or '(none)'}",
        f"  samples:      {result.samples_uri or '(none)'}",
    ]
    if result.mlflow_ui:
        lines.append(f"  MLflow:       {result.mlflow_ui}")
    print("\n".join(lines))
    return EXIT_OK


def cmd_compile(args: argparse.Namespace, cfg: AudiotuneConfig) -> int:
    """``audiotune compile [--output PATH] [--config CONFIG]``."""
    from audiotune import sdk

    path = sdk.compile(args.output, cfg)
    print(json.dumps({"output": path}))
    return EXIT_OK


def cmd_submit(args: argparse.Namespace, cfg: AudiotuneConfig) -> int:
    """``audiotune submit --config CONFIG --host URL [--wait] [--promote]``."""
    from audiotune import sdk

    if not args.host:
        _err("submit", f"no Kubeflow host: pass --host or set ${HOST_ENV}")
        return EXIT_NOT_PROMOTED  # usage
    if args.promote and not args.wait:
        _err("submit", "--promote needs --wait")
        return EXIT_NOT_PROMOTED  # usage
    conn = sdk.Connection(args.host, args.namespace, args.token, args.cookies)
    try:
        run = sdk.submit(cfg, conn, experiment=args.experiment, run_name=args.run_name, namespace=args.namespace)
        print(json.dumps({"run_id": run.run_id, "url": run.url}), flush=True)
        if not args.wait:
            return EXIT_OK
        state = sdk.wait(run.run_id, timeout=args.timeout, host=conn, poll_s=args.poll,
                         progress=lambda line: print(line, flush=True))
        if state != "SUCCEEDED":
            _err("submit", f"run {run.run_id} {state.lower()}: {run.url}")
            for line in sdk.failure_report(run.run_id, conn):
                print(line, file=sys.stderr)
            return EXIT_FAILED
    except sdk.SubmitError as err:
        _err("submit", str(err))
        return EXIT_FAILED
    except TimeoutError as err:
        _err("submit", str(err))
        return EXIT_FAILED
    print(f"run {run.run_id} succeeded: {run.url}")
    if not args.promote:
        return EXIT_OK
    outcome = sdk.promote(cfg, run.run_id, metric=args.metric)
    print(outcome.message)
    return EXIT_OK if outcome.promoted else EXIT_NOT_PROMOTED
