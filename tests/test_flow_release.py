"""Release folders (CosyVoice-300M, CosyVoice2, Step-Audio-EditX: yaml + flow.pt + hift.pt) as base flows.

Loading is strict and refuses bad input with one line naming the file; a release flow fine-tunes
through ``audiotune train flow`` with the encoder frozen and comes back as ``flow.pt`` + yaml +
``hift.pt`` in the upstream layout; a mismatch with the Tokens names both values. The kit folders come
from ``AUDIOTUNE_UPSTREAM_FIXTURES`` (see tests/test_upstream_parity.py); the round trip over every kit
folder and the fine-tune against the kit's own keys live there too.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from audiotune.config import load_config
from audiotune.models.flow.native.release import ReleaseError, is_release_folder, load_release, save_release
from audiotune.stages.train_flow import TrainFlowError, train_flow
from tests.helpers import release_tokens

KIT = Path(os.environ.get("AUDIOTUNE_UPSTREAM_FIXTURES", Path(__file__).parent / "fixtures" / "upstream"))
FAST = ["tracking.enabled=false", "run.num_workers=1", "flow.train.log_every=1", "flow.train.eval_every=1000",
        "flow.train.save_every=1000", "flow.train.schedule=constant", "flow.train.warmup_ratio=0",
        "flow.train.lr=1e-2", "flow.max_frames_in_batch=400", "flow.num_samples=0"]

pytestmark = pytest.mark.usefixtures("one_thread")


def kit_folder(name: str) -> Path:
    folder = KIT / name
    if not folder.is_dir():
        pytest.skip(f"{name} is not in the parity kit {KIT}")
    return folder


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


# ---- loading: bad input ------------------------------------------------------------------------------------------
def test_a_folder_with_flow_pt_but_no_yaml_names_the_missing_file(tmp_path):
    folder = _copy(kit_folder("cosyvoice-300m"), tmp_path / "r")
    (folder / "cosyvoice.yaml").unlink()
    assert is_release_folder(folder)
    with pytest.raises(ReleaseError, match="no release yaml .*cosyvoice.yaml, cosyvoice2.yaml"):
        load_release(folder)
    (folder / "cosyvoice.yaml").write_text((kit_folder("cosyvoice-300m") / "cosyvoice.yaml").read_text())
    (folder / "flow.pt").unlink()
    with pytest.raises(ReleaseError, match="no flow.pt"):
        load_release(folder)


def test_python_tags_and_unsupported_classes_are_refused_by_name(tmp_path):
    folder = _copy(kit_folder("cosyvoice-300m"), tmp_path / "r")
    yaml = folder / "cosyvoice.yaml"
    text = yaml.read_text()
    yaml.write_text("evil: !!python/object/apply:os.system ['true']\n" + text)
    with pytest.raises(ReleaseError, match="python/object/apply:os.system.*not allowed"):
        load_release(folder)
    yaml.write_text(text.replace("cosyvoice.flow.flow.MaskedDiffWithXvec", "mypkg.flow.EvilFlow"))
    with pytest.raises(ReleaseError, match="mypkg.flow.EvilFlow.*not supported"):
        load_release(folder)
    yaml.write_text(text.replace("cosyvoice.flow.decoder.ConditionalDecoder", "mypkg.Decoder"))
    with pytest.raises(ReleaseError, match="mypkg.Decoder"):
        load_release(folder)


class NotATensor:
    pass


def test_flow_pt_with_objects_truncated_or_not_fitting_is_refused(tmp_path):
    folder = _copy(kit_folder("cosyvoice-300m"), tmp_path / "r")
    state = torch.load(folder / "flow.pt", weights_only=True)
    torch.save({**state, "extra": NotATensor()}, folder / "flow.pt")
    with pytest.raises(ReleaseError, match="refused, it holds objects other than tensors"):
        load_release(folder)
    torch.save({**state, "step": 3}, folder / "flow.pt")
    with pytest.raises(ReleaseError, match="entries that are not tensors: step"):
        load_release(folder)
    data = (kit_folder("cosyvoice-300m") / "flow.pt").read_bytes()
    (folder / "flow.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ReleaseError, match="truncated or damaged"):
        load_release(folder)
    bad = dict(state)
    bad.pop("encoder_proj.bias")
    bad["unexpected.weight"] = torch.zeros(1)
    bad["spk_embed_affine_layer.weight"] = torch.zeros(3, 3)
    torch.save(bad, folder / "flow.pt")
    with pytest.raises(ReleaseError) as err:
        load_release(folder)
    for expected in ("missing keys: encoder_proj.bias", "unexpected keys: unexpected.weight",
                     "shape mismatches: spk_embed_affine_layer.weight (checkpoint (3, 3), model (80, 192))"):
        assert expected in str(err.value)


def test_round_trip_writes_the_same_tensors_yaml_and_hift(tmp_path):
    folder = kit_folder("cosyvoice2")
    model, info = load_release(folder)
    written = save_release(model, info, tmp_path / "out")
    assert {"flow.pt", "cosyvoice2.yaml", "hift.pt", "model.safetensors"} <= set(written)
    ours, theirs = (torch.load(p / "flow.pt", weights_only=True) for p in (tmp_path / "out", folder))
    assert list(ours) == list(theirs)
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in theirs)
    assert all(v.is_contiguous() for v in ours.values())  # the kit stores overlapping views
    assert (tmp_path / "out" / "hift.pt").read_bytes() == (folder / "hift.pt").read_bytes()
    assert (tmp_path / "out" / "cosyvoice2.yaml").read_bytes() == (folder / "cosyvoice2.yaml").read_bytes()


# ---- the flow stage ----------------------------------------------------------------------------------------------
def test_tokens_that_do_not_fit_the_release_are_refused_naming_both_values(tmp_path):
    folder = kit_folder("cosyvoice-300m")
    tokens = release_tokens(tmp_path / "tok", folder, speaker_dim=16, token_rate=50.0)
    manifest = json.loads((tokens / "manifest.json").read_text())
    manifest["mel"]["fmax"] = 7600
    manifest["audio_tokenizer"]["codebook_size"] = 32
    (tokens / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(None, [*FAST, "flow.train.max_steps=1"])
    with pytest.raises(TrainFlowError) as err:
        train_flow(cfg, tokens=str(tokens), output=str(tmp_path / "out"), base_flow=str(folder))
    message = str(err.value)
    for expected in ("mel fmax: release 8000, Tokens 7600", "speech-token vocabulary: release 64, Tokens 32",
                     "token rate: release 25 Hz, Tokens 50 Hz", "speaker embedding size: release 192, Tokens 16"):
        assert expected in message, message
    assert not (tmp_path / "out").exists()
    with pytest.raises(TrainFlowError, match="flow.arch=cosyvoice2 but .* holds a cosyvoice-300m flow"):
        train_flow(load_config(None, [*FAST, "flow.arch=cosyvoice2"]), tokens=str(tokens),
                   output=str(tmp_path / "out"), base_flow=str(folder))
    with pytest.raises(TrainFlowError, match="flow.arch=cosyvoice2 takes its sizes .* there is no base_flow"):
        train_flow(load_config(None, [*FAST, "flow.arch=cosyvoice2"]), tokens=str(tokens),
                   output=str(tmp_path / "out"))


@pytest.mark.parametrize("name", ["cosyvoice2", "step-audio-editx-flow"])
def test_release_loss_draws_do_not_depend_on_the_batch(name):
    """Each example's draws (prompt, t, noise, CosyVoice2's streaming coin) come from its own seed: the batch's
    summed error is the sum of the examples' alone (eval mode: no dropout)."""
    from audiotune.models.flow.native.adapter import load_release_flow

    flow = load_release_flow(str(kit_folder(name))).eval()
    ratio, codebooks = int(flow.config.mel_frames_per_token), flow.config.num_codebooks
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([7, 5, 6])
    codes = torch.randint(0, 60, (3, codebooks, 7), generator=gen)
    mel = torch.randn(3, 80, 7 * ratio, generator=gen)
    emb, seeds = torch.randn(3, 192, generator=gen), torch.tensor([11, 12, 13])

    def summed(rows: list[int]) -> float:
        idx = torch.tensor(rows)
        loss = flow(codes[idx], lengths[idx], mel[idx], lengths[idx] * ratio, speaker_embedding=emb[idx],
                    noise_seed=seeds[idx])
        return float(loss) * float(lengths[idx].sum() * ratio * 80)

    with torch.no_grad():
        together = summed([0, 1, 2])
        alone = sum(summed([i]) for i in range(3))
    assert together == pytest.approx(alone, rel=1e-4)


def _fitted_release(folder: Path, tokens: Path, dest: Path) -> Path:
    """The kit's CosyVoice-300M folder resized to the Tokens' vocabulary and token rate (random flow.pt)."""
    from audiotune.models.flow.native.release import build_from_yaml

    audio = json.loads((tokens / "manifest.json").read_text())["audio_tokenizer"]
    dest.mkdir()
    text = (folder / "cosyvoice.yaml").read_text()
    text = text.replace("vocab_size: 64", f"vocab_size: {audio['codebook_size']}")
    text = text.replace("input_frame_rate: 25", f"input_frame_rate: {audio['token_rate']}")
    (dest / "cosyvoice.yaml").write_text(text)
    torch.manual_seed(0)
    torch.save(build_from_yaml(dest).state_dict(), dest / "flow.pt")
    shutil.copy2(folder / "hift.pt", dest / "hift.pt")
    return dest


def _with_xvectors(tokens: Path, dest: Path, dim: int = 192) -> Path:
    """A copy of a Tokens artifact whose rows carry an x-vector each (speaker type onnx)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(tokens, dest)
    rng = np.random.default_rng(0)
    for shard in dest.glob("*/part-*.parquet"):
        table = pq.read_table(shard)
        vectors = [rng.standard_normal(dim).astype(np.float32).tolist() for _ in range(len(table))]
        if "speaker_embedding" in table.schema.names:
            table = table.drop(["speaker_embedding"])
        pq.write_table(table.append_column("speaker_embedding", pa.array(vectors, pa.list_(pa.float32()))), shard)
    from safetensors.torch import save_file

    save_file({"spk0": torch.randn(dim)}, str(dest / "tokenizer" / "speaker_embeddings.safetensors"))
    from audiotune.artifacts import shard_files

    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["speaker_embedding"] = "onnx"
    manifest["shard_files"] = shard_files(dest)  # the rewritten shards, as a tokenize run would list them
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_a_release_flow_goes_through_the_flow_joint_and_export_stages(llm_tokens, llm_base, tmp_path):
    """Flow stage from a release folder → joint stage with a LoRA LLM → export: the flow stays in the upstream
    layout with the release's keys all the way, and the export synthesizes with it."""
    from audiotune.stages.export import export
    from audiotune.stages.train_joint import train_joint
    from audiotune.stages.train_llm import train_llm

    folder = kit_folder("cosyvoice-300m")
    tokens = _with_xvectors(llm_tokens, tmp_path / "tokens")
    release = _fitted_release(folder, tokens, tmp_path / "release")
    base = ["tracking.enabled=false", "run.num_workers=1", "flow.num_samples=0", "flow.max_frames_in_batch=3000",
            "llm.layout=tts", "llm.lora.dropout=0", "llm.train.max_steps=2", "flow.train.max_steps=2",
            "flow.freeze_encoder=true"]
    cfg = load_config(None, base)
    train_llm(cfg, tokens=str(tokens), output=str(tmp_path / "llm"), base_model=str(llm_base))
    train_flow(cfg, tokens=str(tokens), output=str(tmp_path / "flow"), base_flow=str(release))
    joint = load_config(None, [*base, "joint.train.epochs=1", "joint.train.max_steps=2", "flow.lora.enabled=true",
                               "flow.freeze_encoder=false", "flow.lora.r=2"])
    res = train_joint(joint, tokens=str(tokens), llm=str(tmp_path / "llm"), flow=str(tmp_path / "flow"),
                      llm_output=str(tmp_path / "joint" / "llm"), flow_output=str(tmp_path / "joint" / "flow"))
    assert res.metrics["final_loss_flow"] is not None
    theirs = torch.load(release / "flow.pt", weights_only=True)
    trained = torch.load(tmp_path / "flow" / "flow.pt", weights_only=True)
    ours = torch.load(tmp_path / "joint" / "flow" / "flow.pt", weights_only=True)
    assert list(ours) == list(theirs) and all(ours[k].shape == theirs[k].shape for k in theirs)
    changed = {k for k in theirs if not torch.equal(ours[k], trained[k])}  # LoRA merged: only its targets moved
    assert changed and all(k.startswith("decoder.estimator.") for k in changed)
    assert (tmp_path / "joint" / "flow" / "hift.pt").read_bytes() == (folder / "hift.pt").read_bytes()
    package = tmp_path / "export"
    export(load_config(None, ["tracking.enabled=false", "export.num_samples=1", "export.synthesis.max_audio_s=1"]),
           output=str(package), llm=str(tmp_path / "joint" / "llm"), flow=str(tmp_path / "joint" / "flow"),
           tokens=str(tokens))
    assert (package / "flow" / "flow.pt").read_bytes() == (tmp_path / "joint" / "flow" / "flow.pt").read_bytes()
    assert (package / "samples" / "sample-0.wav").is_file()


def _step_tokens(root: Path, folder: Path, n: int = 4) -> Path:
    """Tokens as Step-Audio-EditX's LLM gives them: one interleaved stream of LM ids per row (2 vq02 ids at
    65536 + c, then 3 vq06 ids at 66560 + c, per group; 125/3 ids/s, 25 pairs/s), x-vectors, CosyVoice2 mels."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from audiotune.artifacts import shard_files

    _, info = load_release(folder)
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", 1)):
        rows = []
        for i in range(count):
            groups = int(rng.integers(2, 4))
            ids = np.concatenate([np.concatenate([65536 + rng.integers(0, 1024, 2), 66560 + rng.integers(0, 4096, 3)])
                                  for _ in range(groups)])
            frames = groups * 3 * 2  # pairs × the encoder's up-sampling
            rows.append({"id": f"{split}{i}", "audio_codes": [ids.tolist()], "mel_frames": frames,
                         "mel": rng.standard_normal((frames, 80)).astype("<f4").tobytes(), "speaker_index": 0,
                         "repeat_count": 1, "speaker_embedding": rng.standard_normal(192).astype(np.float32).tolist()})
        (root / split).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), root / split / "part-00000.parquet")
    stream = {"codebook_offsets": [65536, 66560], "codebook_sizes": [1024, 4096], "interleave": [2, 3],
              "id_ranges": [[65536, 66560], [66560, 70656]], "frame_rate": 25.0}
    (root / "manifest.json").write_text(json.dumps({
        "kind": "audiotune.tokens", "schema_version": 1, "mel": {"format": "cosyvoice-log-mel", **info.mel},
        "speakers": 1, "speaker_embedding": "onnx", "audio_tokenizer": {
            "type": "precomputed", "num_codebooks": 1, "codebook_size": 5120, "token_rate": 125 / 3,
            "code_stream": stream}, "shard_files": shard_files(root)}))
    return root


def test_step_audio_editx_flow_reads_the_llms_interleaved_stream(tmp_path):
    """A Step-Audio-EditX release fine-tunes on Tokens holding the LLM's interleaved vq02/vq06 ids (paired as
    upstream ``_reshape`` does) and comes back with the release's keys; the trained flow keeps reading streams."""
    from audiotune.models.flow import load_flow

    folder = kit_folder("step-audio-editx-flow")
    tokens = _step_tokens(tmp_path / "tokens", folder)
    res = train_flow(load_config(None, [*FAST, "flow.train.max_steps=2", "flow.freeze_encoder=true"]),
                     tokens=str(tokens), output=str(tmp_path / "out"), base_flow=str(folder))
    assert res.manifest["arch"] == "step-audio-editx"
    theirs = torch.load(folder / "flow.pt", weights_only=True)
    ours = torch.load(tmp_path / "out" / "flow.pt", weights_only=True)
    assert list(ours) == list(theirs) and all(ours[k].shape == theirs[k].shape for k in theirs)
    assert any(not torch.equal(ours[k], theirs[k]) for k in theirs if k.startswith("decoder.estimator."))
    flow = load_flow(tmp_path / "out")
    assert flow.config.code_stream["interleave"] == [2, 3]
    mel = flow.eval().inference(torch.tensor([[65536, 65537, 66560, 66561, 66562]]), n_timesteps=2)
    assert mel.shape == (80, 6)  # one group → 3 pairs → 6 mel frames
    relative = flow.inference(torch.tensor([[0, 1, 1024, 1025, 1026]]), n_timesteps=2)  # as synthesis gives them
    assert torch.equal(relative, mel)
    manifest = json.loads((tokens / "manifest.json").read_text())
    manifest["audio_tokenizer"]["code_stream"].update(codebook_sizes=[1024, 2048], frame_rate=50.0)
    (tokens / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainFlowError) as err:
        train_flow(load_config(None, FAST), tokens=str(tokens), output=str(tmp_path / "refused"),
                   base_flow=str(folder))
    for expected in ("speech-token vocabulary: release 5121, Tokens' pair table 3073",
                     "token rate: release 25 pairs/s, Tokens 50 pairs/s"):
        assert expected in str(err.value), str(err.value)


def test_a_release_flow_resumes_exactly(tmp_path, caplog):
    """Steps 3-4 resumed from the step-2 checkpoint give the same flow.pt as four steps in one go (per-example
    draws from their seeds, the engine's RNG state for the encoder's dropout)."""
    folder = kit_folder("cosyvoice-300m")
    tokens = release_tokens(tmp_path / "tokens", folder)
    cfg = load_config(None, [*FAST, "flow.train.max_steps=4", "flow.train.save_every=2", "flow.ema.enabled=true",
                             "flow.ema.decay=0.5", "flow.max_frames_in_batch=120"])
    train_flow(cfg, tokens=str(tokens), output=str(tmp_path / "whole"), base_flow=str(folder))
    shutil.copytree(tmp_path / "whole.checkpoints" / "checkpoint-2", tmp_path / "resumed.checkpoints" / "checkpoint-2")
    with caplog.at_level("INFO", logger="audiotune.train.engine"):
        train_flow(cfg, tokens=str(tokens), output=str(tmp_path / "resumed"), base_flow=str(folder))
    assert "at step 2" in " ".join(r.getMessage() for r in caplog.records if "resumed from" in r.getMessage())
    whole = torch.load(tmp_path / "whole" / "flow.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "flow.pt", weights_only=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
