"""What the Kubeflow pipeline needs from the library, without importing ``kfp``.

- :mod:`~audiotune.orchestration.params`: the typed pipeline parameters and how they map onto the config.
- :mod:`~audiotune.orchestration.steps`: what each component does (the component bodies call these).
- :mod:`~audiotune.orchestration.training`: launching a training stage: torchrun in the task's pod, or a TrainJob /
  PyTorchJob through :mod:`audiotune.cluster`.
- :mod:`~audiotune.train.sizing`, :mod:`~audiotune.orchestration.plan`: sizing (``zero_stage: auto``) and
  ``audiotune plan``.
- :mod:`~audiotune.orchestration.runs`: the MLflow parent run of a pipeline run, nesting of stage runs, promotion.
- :mod:`~audiotune.orchestration.source_fingerprint`: a fingerprint of the source data for the cache keys.
- :mod:`~audiotune.orchestration.remote`: a Kubeflow host's reachability, a run's tasks and logs (for ``--wait``).
- :mod:`~audiotune.orchestration.local_run`: where a local run put the export, the samples and the MLflow runs.
"""
