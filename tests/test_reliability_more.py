"""More reliability faults (issue 14): each test injects one fault or hostile input, then checks the exit code,
the one-line message, and that nothing was lost or written where it must not be."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from audiotune.cli import main as cli_main

NO_TRACKING = ["--set", "tracking.enabled=false"]
TOKENIZE_FAST = ["tokenize.audio_tokenizer.codebook_size=16", "tokenize.audio_tokenizer.fit_max_frames=500",
                 "tokenize.text_tokenizer=char", "tokenize.vocab_size=300"]


def _sets(*sets: str) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _one_line_error(stderr: str) -> str:
    """The error line the CLI printed, after checking that no traceback reached stderr."""
    assert "Traceback" not in stderr, stderr[-4000:]
    lines = [line for line in stderr.splitlines() if line.startswith("audiotune")]
    assert len(lines) == 1, stderr[-4000:]
    return lines[0]


def _dataset(root: Path, n: int, seconds: float = 1.0, prompt_row: int | None = None) -> Path:
    """A Dataset artifact of ``n`` generated utterances, all in train (through the convert stage)."""
    from tests.helpers import write_audio, write_jsonl

    rows = []
    for i in range(n):
        write_audio(root / "src" / f"u{i}.wav", seconds=seconds, sr=16000, seed=i)
        row = {"id": f"u{i}", "audio": f"u{i}.wav", "text": f"row {i}"}
        if i == prompt_row:
            row.update(prompt_audio_path="u0.wav", prompt_text="row 0")
        rows.append(row)
    manifest = write_jsonl(root / "src" / "m.jsonl", rows)
    out = root / "ds"
    assert cli_main(["convert", "--source", str(manifest), "--output", str(out), *NO_TRACKING,
                     *_sets("run.num_workers=1", "convert.val_fraction=0", "convert.max_duration_s=600")]) == 0
    return out


def _rewrite_train_shard(art: Path, edit: Callable[[list[dict]], list[dict]]) -> None:
    """Replace the rows of a Dataset's or Tokens' one train shard by ``edit(rows)``, its manifest rewritten
    to match (row counts, and shard checksums where this audiotune lists them), as a stage would write it."""
    import pyarrow.parquet as pq

    from audiotune import artifacts
    from audiotune.data.schema import ShardWriter

    (shard,) = (art / "train").glob("part-*.parquet")
    table = pq.read_table(shard)
    rows = edit(table.to_pylist())
    shard.unlink()
    writer = ShardWriter(art / "train", 10_000, 2**30, schema=table.schema)
    for row in rows:
        writer.add(row)
    writer.flush()
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["splits"]["train"] = {"rows": writer.rows, "shards": writer.shards}
    fields = {k: v for k, v in manifest.items() if k not in ("kind", "schema_version", "created_at",
                                                              "audiotune_version", "shard_files")}
    artifacts.write_manifest(art, manifest["kind"], manifest["schema_version"], **fields)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


# ---------------------------------------------------------------------------- a corrupt FLAC inside a Dataset shard
@pytest.mark.parametrize("limit", ["0.5", "0.1"], ids=["quarantined", "too-many"])
def test_a_corrupt_flac_in_a_dataset_shard_is_quarantined_naming_shard_and_row(tmp_path, capsys, limit):
    ds = _dataset(tmp_path, 6, prompt_row=4)

    def corrupt(rows: list[dict]) -> list[dict]:
        for row in rows:
            if row["id"] == "u2":  # cut short: libsndfile loses sync, also while fitting the codebook on it
                row["audio"] = row["audio"][: len(row["audio"]) // 3]
            if row["id"] == "u4":  # a prompt that is no audio at all
                row["prompt_audio"] = b"fLaC" + bytes(300)
        return rows

    _rewrite_train_shard(ds, corrupt)
    before = _snapshot(ds)
    out = tmp_path / "tok"
    code = cli_main(["tokenize", "--dataset", str(ds), "--output", str(out), *NO_TRACKING,
                     *_sets(*TOKENIZE_FAST, "run.num_workers=2", f"tokenize.max_bad_fraction={limit}")])
    captured = capsys.readouterr()
    assert _snapshot(ds) == before  # the Dataset is read, never written
    if limit == "0.1":  # 2 of 6 rows: fails naming the count, the reasons and the setting, publishes nothing
        line = _one_line_error(captured.err)
        assert code == 1 and "2 of 6 rows were quarantined" in line and "undecodable_audio: 2" in line
        assert "tokenize.max_bad_fraction=0.1" in line and not out.exists()
        assert not list(tmp_path.glob(".tok.tmp-*"))
        return
    assert code == 0 and "Traceback" not in captured.err and "LibsndfileError" not in captured.err
    assert json.loads(captured.out.splitlines()[-1])["rows"] == {"train": 4, "val": 0, "quarantined": 2}
    bad = {q["id"]: q for q in map(json.loads, (out / "quarantine.jsonl").read_text().splitlines())}
    assert sorted(bad) == ["u2", "u4"]
    assert (bad["u2"]["field"], bad["u4"]["field"]) == ("audio", "prompt_audio")
    for row_id, why in (("u2", "flac decoder lost sync"), ("u4", "unimplemented format")):
        q = bad[row_id]
        assert q["reason"] == "undecodable_audio" and "\n" not in q["detail"]
        assert q["detail"].startswith(f"train/part-00000.parquet: {row_id}: stored audio") and why in q["detail"]
    import pyarrow.parquet as pq

    kept = [r["id"] for p in sorted((out / "train").glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted(kept) == ["u0", "u1", "u3", "u5"]


def test_decode_flac_errors_are_one_line_and_still_runtime_errors():
    import io

    import numpy as np
    import soundfile as sf

    from audiotune.data.audio import UndecodableAudio, decode_flac
    from audiotune.errors import DataError

    no_samples = io.BytesIO()
    sf.write(no_samples, np.zeros(0, dtype=np.float32), 16000, format="WAV")  # FLAC writes no bytes for none
    for data, reason in ((b"", "undecodable_audio"), (b"\0" * 64, "undecodable_audio"),
                         ("not bytes", "undecodable_audio"), (no_samples.getvalue(), "empty_audio")):
        with pytest.raises(UndecodableAudio) as err:
            decode_flac(data)
        assert isinstance(err.value, DataError) and isinstance(err.value, RuntimeError), err.value
        assert err.value.reason == reason and "\n" not in str(err.value) and "0x" not in str(err.value)


# ---------------------------------------------------------------------------- signals stop tokenize's worker pool
def _children(pid: int) -> set[int]:
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from /proc (Linux)")
def test_a_signal_stops_tokenize_and_its_workers_and_publishes_nothing(tmp_path):
    """SIGTERM (SIGINT takes the same path: data.workers.stop_on_signals, tested with convert)."""
    import os
    import subprocess
    import sys
    import time

    ds = _dataset(tmp_path, 1, seconds=15.0)  # one row, repeated: seconds of work for two workers
    # 240 copies: seconds of tokenizing for two workers even on an idle machine (24 took 0.5 s, done before the signal)
    _rewrite_train_shard(ds, lambda rows: [{**rows[0], "id": f"r{i:03d}"} for i in range(240)])
    before = _snapshot(tmp_path)
    argv = [sys.executable, "-m", "audiotune.cli", "tokenize", "--dataset", str(ds), "--output",
            str(tmp_path / "tok"), *NO_TRACKING, *_sets(*TOKENIZE_FAST, "run.num_workers=2")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    workers: set[int] = set()
    deadline = time.monotonic() + 90
    while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
        workers = _children(proc.pid)
        time.sleep(0.02)
    assert len(workers) == 2, "the pool did not start"
    time.sleep(0.5)  # mid-work
    signum = 15
    os.kill(proc.pid, signum)
    _, err = proc.communicate(timeout=60)
    line = _one_line_error(err)
    assert proc.returncode == 128 + signum and "tokenize was stopped by SIG" in line
    assert "nothing was published" in line
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers), "a pool worker outlived the stage"
    assert _snapshot(tmp_path) == before  # no Tokens, no staging folder, no lock; the Dataset untouched


# ------------------------------------------------------------------------------- models/ errors under the one root
def test_model_package_errors_share_the_root_and_the_cli_lists_none_of_them():
    import inspect

    from audiotune import cli
    from audiotune.errors import AudiotuneError, DataError, ModelLoadError, TrainingError
    from audiotune.models.families import ModelError
    from audiotune.models.flow import FlowConfigError, FlowLoadError, FlowModelError
    from audiotune.models.flow.native.hyperyaml import ReleaseYamlError
    from audiotune.models.flow.native.release import ReleaseError
    from audiotune.models.vocab import CodeStreamError as StreamError
    from audiotune.models.vocoder import VocoderError

    for cls in (ModelError, FlowLoadError, FlowConfigError, ReleaseError, ReleaseYamlError, VocoderError):
        assert issubclass(cls, ModelLoadError), cls
    assert issubclass(FlowModelError, TrainingError) and issubclass(StreamError, DataError)
    for cls in (FlowConfigError, ReleaseYamlError, StreamError):  # callers that caught ValueError still do
        assert issubclass(cls, ValueError), cls
    fallback = cli._failure_types()
    assert not [t for t in fallback if issubclass(t, AudiotuneError) or t.__module__.startswith("audiotune")]
    assert "audiotune.models" not in inspect.getsource(cli._failure_types)



# ------------------------------------------------------------------- training and export outputs: kind and inputs
_STAGES = {  # stage: (argv, the overwrite setting, the kind it writes)
    "llm": (["train", "llm", "--tokens", "{tokens}", "--output", "{output}", "--set", "llm.init=scratch"],
            "llm.overwrite", "audiotune.llm"),
    "flow": (["train", "flow", "--tokens", "{tokens}", "--output", "{output}"], "flow.overwrite", "audiotune.flow"),
    "joint": (["train", "joint", "--tokens", "{tokens}", "--llm", "{tokens}/l", "--flow", "{tokens}/f", "--output",
               "{work}/joint", "--llm-output", "{output}", "--flow-output", "{work}/joint/flow", "--set",
               "joint.train.epochs=1"], "joint.overwrite",
              "audiotune.llm"),
    "export": (["export", "--llm", "{tokens}", "--tokens", "{tokens}", "--output", "{output}"], "export.overwrite",
               "audiotune.export"),
}


@pytest.mark.parametrize("stage", sorted(_STAGES))
@pytest.mark.parametrize("fault", ["other-kind", "inside-an-input"])
def test_a_training_or_export_output_is_checked_before_any_work(tmp_path, capsys, stage, fault):
    argv, overwrite, kind = _STAGES[stage]
    tokens = tmp_path / "tokens"  # an input that exists but is no artifact: reading it would fail later
    tokens.mkdir()
    (tokens / "notes.txt").write_text("input")
    if fault == "other-kind":
        output = tmp_path / "out"
        output.mkdir()
        (output / "manifest.json").write_text('{"kind": "audiotune.dataset", "schema_version": 1}')
        (output / "train").mkdir()
        (output / "train" / "part-00000.parquet").write_bytes(b"rows")
    else:
        output = tokens / "out"
    before = _snapshot(tmp_path)
    full = [a.format(tokens=tokens, work=tmp_path, output=output) for a in argv]
    code = cli_main([*full, *NO_TRACKING, "--set", f"{overwrite}=true"])
    line = _one_line_error(capsys.readouterr().err)
    assert code == 2, line
    if fault == "other-kind":  # refused as the wrong kind, before the missing Tokens/LLM is even read
        assert f"output {output} holds a 'audiotune.dataset' artifact, not a '{kind}' one" in line
    else:
        assert f"output {output} is, contains or lies inside the input {tokens}" in line
    assert _snapshot(tmp_path) == before  # nothing replaced, no lock, staging folder or checkpoint left


# --------------------------------------------------------------- MLflow pre-check: a URI with credentials, from the SDK
SECRET = "hunter2-s3cr3t"


@pytest.mark.parametrize("uri", [f"http://bob:{SECRET}@mlflow", f"https://bob:{SECRET}@127.0.0.1:1/x"],
                         ids=["no-port", "port"])
def test_mlflow_precheck_refuses_credentials_in_the_uri_as_the_cli_does(tmp_path, capsys, monkeypatch, uri):
    from audiotune import sdk, tracking
    from audiotune.config import load_config
    from audiotune.credentials import CredentialsInURIError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert cli_main(["convert", "--source", "c", "--output", "ds"]) == 2
    cli_line = _one_line_error(capsys.readouterr().err)
    for call in (lambda: tracking.client_for(load_config(None, []).tracking),
                 lambda: sdk.promote({"export": {"registered_model_name": "m"}}, "some-run")):
        with pytest.raises(CredentialsInURIError) as err:
            call()
        message = str(err.value)
        assert err.value.exit_code == 2 and "\n" not in message and SECRET not in message
        assert message in cli_line and "://***@" in message and "MLFLOW_TRACKING_PASSWORD" in message
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(CredentialsInURIError, match=r"^tracking\.uri: http://\*\*\*@mlflow"):
        tracking.client_for(load_config(None, []).tracking.model_copy(update={"uri": f"http://bob:{SECRET}@mlflow"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no mlruns, nothing converted


def test_mlflow_precheck_on_a_malformed_uri_is_one_line():
    from audiotune import tracking
    from audiotune.config import load_config

    cfg = load_config(None, []).tracking.model_copy(update={"uri": "http://mlflow:notaport"})
    with pytest.raises(tracking.TrackingError, match="MLflow tracking server http://mlflow:notaport is unreachable"):
        tracking.client_for(cfg)


# ------------------------------------------------------------------------ codes outside the flow's codebook
def test_the_flow_stage_refuses_codes_outside_its_codebook_before_training(llm_tokens, tmp_path, capsys):
    import shutil

    tokens = tmp_path / "tokens"
    shutil.copytree(llm_tokens, tokens)
    size = json.loads((tokens / "manifest.json").read_text())["audio_tokenizer"]["codebook_size"]
    bad_id: list[str] = []

    def foreign(rows: list[dict]) -> list[dict]:  # one row from a tokenizer with a larger codebook
        row = next(r for r in rows if r["audio_codes"] and len(r["audio_codes"][0]) > 3)
        row["audio_codes"] = [[*c[:3], size + 7, *c[4:]] for c in row["audio_codes"]]
        bad_id.append(row["id"])
        return rows

    _rewrite_train_shard(tokens, foreign)
    out = tmp_path / "flow"
    code = cli_main(["train", "flow", "--tokens", str(tokens), "--output", str(out), *NO_TRACKING,
                     *_sets("flow.preset=tiny", "flow.num_samples=0", "flow.train.max_steps=2")])
    line = _one_line_error(capsys.readouterr().err)
    assert code == 1
    assert (f"train/part-00000.parquet: row {bad_id[0]!r}: code {size + 7} (codebook 0, frame 3) lies outside "
            f"[0, {size}) of the flow's codebook (flow.preset=tiny)") in line
    # no flow, no checkpoint (the output lease, taken before the check, is the lock's business: a lease a
    # stopped run left is taken over by the next)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "flow.lock") == ["tokens"]


def test_the_flow_encoder_raises_instead_of_clamping():
    import torch

    from audiotune.errors import DataError
    from audiotune.models.flow import PRESETS, FlowModel

    model = FlowModel(PRESETS["tiny"](n_mels=80, codebook_size=8, num_codebooks=1, mel_frames_per_token=2.0))
    codes = torch.tensor([[[1, 2, 3, 99]], [[1, 8, 0, 0]]])  # item 1: 8 at frame 1; the rest past its length
    lengths = torch.tensor([3, 2])
    with pytest.raises(DataError, match=r"code 8 \(batch item 1, codebook 0, frame 1\) lies outside the codebook"):
        model.encoder(codes, lengths, lengths * 2, 8)
    assert model.encoder(codes.clamp(max=7), torch.tensor([3, 1]), torch.tensor([6, 2]), 8).shape[-1] == 8


def _codes_tokens(root: Path, rows: list[tuple[str, list[list[int]]]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "train").mkdir(parents=True)
    pq.write_table(pa.table({"id": [r[0] for r in rows], "audio_codes": [r[1] for r in rows]}),
                   root / "train" / "part-00000.parquet")
    return root


def test_release_flows_are_checked_against_their_yaml_vocabulary_and_stream_layout(tmp_path):
    from types import SimpleNamespace

    from audiotune.data.codes import CodesOutOfRangeError, check_flow_codes

    # a single-codebook release (vocab_size from its yaml) and a dual-codebook one reading pairs of one table
    single = SimpleNamespace(codebook_size=4096, num_codebooks=1, code_stream=None)
    pairs = SimpleNamespace(codebook_size=5121, num_codebooks=2, code_stream=None)
    ok = _codes_tokens(tmp_path / "ok", [("a", [[0, 4095, 7], [5120, 1, 2]]), ("b", [[3, 3], [3, 3]])])
    assert check_flow_codes(ok, single, "release") == 2 and check_flow_codes(ok, pairs, "release") == 2
    with pytest.raises(CodesOutOfRangeError, match=r"row 'b': code 4096 \(codebook 0, frame 1\) lies outside "
                                                   r"\[0, 4096\) of the flow's codebook \(rel\)"):
        check_flow_codes(_codes_tokens(tmp_path / "big", [("a", [[1, 2]]), ("b", [[1, 4096]])]), single, "rel")
    # Step-Audio-EditX: the Tokens hold the LLM's interleaved ids; each must be its position's codebook's
    stream = {"codebook_offsets": [65536, 66560], "codebook_sizes": [1024, 4096], "interleave": [2, 3]}
    step = SimpleNamespace(codebook_size=5122, num_codebooks=1, code_stream=stream)
    good = [65536, 65537, 66560, 66561, 66562]
    assert check_flow_codes(_codes_tokens(tmp_path / "s", [("a", [good * 2])]), step, "step") == 1
    with pytest.raises(CodesOutOfRangeError, match=r"train/part-00000.parquet: row 'x': .*stream layout \(step\)"):
        check_flow_codes(_codes_tokens(tmp_path / "t", [("x", [[66560, *good[1:]]])]), step, "step")
