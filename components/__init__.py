"""Kubeflow components: one thin lightweight Python component per stage, installed as ``audiotune.components``.

Each body validates the config it gets and calls its stage recipe through
:mod:`audiotune.orchestration.steps`; ``base_image`` is the project's image (CPU for the data
stages, CUDA for training), so the same definitions run under ``kfp.local`` and on a cluster.

- :func:`convert_data`, :func:`tokenize_data`: the data stages (cached by Kubeflow).
- :func:`plan_data`, :func:`convert_unit`, :func:`merge_data`: convert over work units (``pipeline.data_parallelism``).
- :func:`prepare_tokenizer`, :func:`tokenize_unit`, :func:`merge_tokens`: tokenize over the same units.
- :func:`train_llm`, :func:`train_flow`, :func:`train_joint`: training under ``torchrun``.
- :func:`export_model`: merge, package, upload (registers when nothing is evaluated after it).
- :func:`evaluate_model`: score the export on a fixed eval set, register it with the eval metrics.
- :func:`encode_acestep`, :func:`train_acestep`, :func:`export_acestep`: ACE-Step 1.5 LoRA (``mode: acestep``).
- :func:`prepare_run`, :func:`link_runs`, :func:`finish_run`: the run's config and MLflow parent run.
- :func:`apply_training_settings`, :func:`apply_common_settings`: cluster settings of a task.
"""

from audiotune.components.acestep import encode_acestep, export_acestep, train_acestep
from audiotune.components.cluster import apply_common_settings, apply_training_settings
from audiotune.components.convert import convert_data
from audiotune.components.evaluate import evaluate_model
from audiotune.components.export import export_model
from audiotune.components.fanout import (
    convert_unit,
    merge_data,
    merge_tokens,
    plan_data,
    prepare_tokenizer,
    tokenize_unit,
)
from audiotune.components.run import finish_run, link_runs, prepare_run
from audiotune.components.tokenize import tokenize_data
from audiotune.components.train_flow import train_flow
from audiotune.components.train_joint import train_joint
from audiotune.components.train_llm import train_llm

__all__ = [
    "encode_acestep", "export_acestep", "train_acestep",
    "apply_common_settings", "apply_training_settings", "convert_data", "evaluate_model", "export_model", "finish_run",
    "link_runs", "prepare_run", "tokenize_data", "train_flow", "train_joint", "train_llm",
    "plan_data", "convert_unit", "merge_data", "prepare_tokenizer", "tokenize_unit", "merge_tokens",
]
