"""Local-runner tier: the pipeline end to end under ``kfp.local`` (subprocess runner) on tiny configs.

- ``mode: both`` with a short joint stage: ``make demo``'s pipeline (examples/demo.yaml, shortened), by the CLI;
- ``mode: llm`` then ``mode: flow`` in one folder, by the SDK: the single-model branches, and the second run takes
  convert and tokenize from the kfp.local cache.

Each test has its own folder (MLflow store, kfp.local root and cache), so that what it asserts does not depend on
which tests ran before it. Each asserts what a run leaves behind: the export (it exists and loads), and in MLflow
one parent run with a nested run per stage.
"""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from audiotune import cli, sdk, tracking
from audiotune.config import load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

TINY = [  # on top of examples/demo.yaml: the fewest steps that still exercise every stage
    "convert.val_fraction=0.25", "tokenize.vocab_size=128", "tokenize.audio_tokenizer.codebook_size=16",
    "tokenize.audio_tokenizer.fit_iters=5", "llm.max_seq_len=256", "llm.train.max_steps=2",
    "llm.train.eval_every=2", "llm.train.save_every=2", "llm.train.log_every=1",
    "flow.train.max_steps=2", "flow.train.eval_every=2", "flow.train.save_every=2", "flow.train.log_every=1",
    "flow.sample_every=2", "flow.num_samples=1", "flow.max_frames_in_batch=1500",
    "joint.train.max_steps=1", "joint.train.eval_every=1", "joint.train.save_every=1", "joint.train.log_every=1",
    # the evaluate task with its two cheapest metrics: the plug-ins themselves (ASR, speaker, DNSMOS models) are
    # tested in test_evaluate.py and test_evaluate_metrics.py
    "evaluate.metrics=[duration, mcd]", "evaluate.bootstrap=100",
    "pipeline.retries=0",  # a failure here is a bug, not a preempted node: no retry after a backoff
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small corpus of the demo's kind (2 speakers, 4 utterances each, a quarter edit rows); only read."""
    from examples.make_corpus import make_corpus

    return make_corpus(tmp_path_factory.mktemp("corpus"), n_speakers=2, utts_per_speaker=4, backend="synth",
                       edit_fraction=0.25)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """The test's own folder: the local MLflow store (./mlruns) and the kfp.local root with its cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _overrides(corpus: Path, mode: str, *extra: str) -> list[str]:
    return [f"convert.source={corpus}", f"pipeline.mode={mode}", "pipeline.root=kfp", *TINY, *extra]


def _config(corpus: Path, mode: str, *extra: str):
    return load_config(EXAMPLES / "demo.yaml", _overrides(corpus, mode, *extra))


def _mlflow(cfg):
    """The newest pipeline run's parent run and its nested runs (names without a " (cached)" suffix)."""
    client = MlflowClient(tracking.resolve_uri(cfg.tracking))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    every = client.search_runs([exp.experiment_id])
    parent = max((r for r in every if tracking.PARENT_TAG not in r.data.tags and "audiotune.stage" not in r.data.tags),
                 key=lambda r: r.info.start_time)
    children = [r for r in every if r.data.tags.get(tracking.PARENT_TAG) == parent.info.run_id]
    for child in children:
        if child.info.run_name.endswith(" (cached)"):  # served from the cache: it points at the earlier run
            earlier = client.get_run(child.data.tags["audiotune.cached_from"])
            assert earlier.data.tags[tracking.PARENT_TAG] != parent.info.run_id
    return parent, children


def _names(children) -> list[str]:
    return sorted(c.info.run_name.removesuffix(" (cached)") for c in children)


def _check_cache(children, cached: bool) -> None:
    """convert and tokenize came from the kfp.local cache (an earlier run of the same data and settings in this
    folder), or both ran."""
    served = {c.info.run_name for c in children if c.info.run_name.endswith(" (cached)")}
    assert served == ({"convert (cached)", "tokenize (cached)"} if cached else set())


class _ByCli:
    """``audiotune run --local examples/demo.yaml --set ...``, as ``make demo`` runs it."""

    def __init__(self, overrides: list[str], capsys):
        self.overrides, self.capsys = overrides, capsys

    def run(self) -> sdk.LocalRun:
        code = cli.main(["run", "--local", str(EXAMPLES / "demo.yaml"),
                         *[a for o in self.overrides for a in ("--set", o)]])
        out, err = self.capsys.readouterr()
        if code != 0:
            assert code == 1 and len(err.strip().splitlines()) == 1, err  # one line, no traceback
            raise sdk.PipelineFailed(err.strip())
        where = dict(line.strip().split(":", 1) for line in out.splitlines()[-5:] if ":" in line)
        assert where["MLflow"].strip().startswith("mlflow ui --backend-store-uri sqlite:///")
        return sdk.LocalRun(run_dir=where["task outputs"].strip(), parent_run_id=None,
                            export_uri=where["export"].strip(), samples_uri=where["samples"].strip(),
                            tracking_uri=None)


def _run_and_check(cfg, tasks: tuple[str, ...], by_cli: _ByCli | None = None, cached: bool = False):
    """Run the pipeline; check the export and MLflow (one parent run, a finished nested run per stage, the data
    stages from the cache when ``cached``)."""
    run = by_cli.run if by_cli else (lambda: sdk.run_local(cfg))
    result = run()
    parent, children = _mlflow(cfg)
    assert result.parent_run_id in (None, parent.info.run_id) and parent.info.status == "FINISHED"
    assert _names(children) == sorted(tasks)
    assert all(c.info.status == "FINISHED" for c in children)
    _check_cache(children, cached)
    export = Path(result.export_uri)
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["kind"] == "audiotune.export"
    assert parent.data.tags["audiotune.export_uri"] == result.export_uri
    if "llm" in tasks:  # the exported LLM loads with plain transformers
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(export / "llm")
    if "flow" in tasks:
        from audiotune.models.flow import load_flow

        load_flow(str(export / "flow"))
    if "llm" in tasks and "flow" in tasks:  # end to end: LLM codes -> flow -> vocoder
        assert list((export / "samples").glob("*.wav"))
    return result


def test_llm_then_flow_mode_the_second_with_the_data_from_the_cache(corpus, workdir):
    _run_and_check(_config(corpus, "llm"), ("convert", "tokenize", "llm", "export"))
    _run_and_check(_config(corpus, "flow"), ("convert", "tokenize", "flow", "export"), cached=True)


def test_demo_both_with_joint(corpus, workdir, capsys):
    """``make demo``'s pipeline through the CLI: mode both with a short joint stage."""
    overrides = _overrides(corpus, "both")
    cfg = load_config(EXAMPLES / "demo.yaml", overrides)
    _run_and_check(cfg, ("convert", "tokenize", "llm", "flow", "joint", "export", "evaluate"),
                   by_cli=_ByCli(overrides, capsys))
