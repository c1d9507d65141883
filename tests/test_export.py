"""The export stage: exact LoRA merges (Qwen2, Llama, new audio rows), refusals, S3, the MLflow registry, synthesis."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import soundfile as sf
import torch

from audiotune import storage
from audiotune.config import load_config
from audiotune.export.merge import ExportError, merge_llm, peft_layers
from audiotune.stages.export import export
from audiotune.stages.train_flow import train_flow
from audiotune.stages.train_llm import train_llm
from tests.helpers import save_tiny_base

TRAIN = ["tracking.enabled=false", "run.num_workers=1", "llm.layout=tts", "llm.train.lr=1e-2",
         "llm.train.log_every=5", "flow.preset=tiny", "flow.num_samples=0", "flow.max_frames_in_batch=3000",
         "flow.train.log_every=5", "flow.train.lr=1e-3"]
QUICK = ["tracking.enabled=false", "export.num_samples=0"]


@pytest.fixture(scope="module")
def trained(llm_tokens, llm_base, tmp_path_factory) -> SimpleNamespace:
    """LoRA adapters on an untied Qwen2 and a tied Llama base (new audio rows), and a tiny flow."""
    root = tmp_path_factory.mktemp("export-inputs")
    llama = save_tiny_base(llm_tokens, root / "llama-base", arch="llama", tie=True)
    cfg = load_config(None, [*TRAIN, "llm.train.max_steps=12", "flow.train.max_steps=8"])
    train_llm(cfg, tokens=str(llm_tokens), output=str(root / "qwen2"), base_model=str(llm_base))
    train_llm(cfg, tokens=str(llm_tokens), output=str(root / "llama"), base_model=str(llama))
    train_flow(cfg, tokens=str(llm_tokens), output=str(root / "flow"))
    return SimpleNamespace(tokens=llm_tokens, qwen2=root / "qwen2", llama=root / "llama", flow=root / "flow",
                           qwen2_base=llm_base, llama_base=llama, root=root)


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``audiotune <argv>`` in this process: its exit code, stdout and stderr."""
    from audiotune.cli import main as cli_main

    capsys.readouterr()
    code = cli_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _unmerged_logits(adapter: Path, base: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    rows = json.loads((adapter / "manifest.json").read_text())["embedding_rows"]
    model.resize_token_embeddings(rows, mean_resizing=False)
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_merged_export_equals_base_plus_adapter_and_reloads_with_plain_transformers(trained, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export"
    res = export(load_config(None, QUICK), str(out), llm=str(getattr(trained, arch)))
    verification = res.manifest["verification"]
    assert verification["passed"] and verification["max_abs_diff"] <= verification["tolerance"]
    assert verification["reload_max_abs_diff"] is not None and verification["peft_layers_left"] == []
    merged = AutoModelForCausalLM.from_pretrained(str(out / "llm")).eval()
    assert peft_layers(merged) == []
    vocab = json.loads((out / "llm" / "vocab.json").read_text())
    new_audio = torch.arange(vocab["audio_offset"], vocab["audio_offset"] + 8)  # rows the base never had
    ids = torch.cat([torch.tensor([vocab["special_ids"]["<|task_tts|>"], 5, 6, 7]), new_audio])[None]
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    want = _unmerged_logits(getattr(trained, arch), getattr(trained, f"{arch}_base"), ids)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    base = AutoModelForCausalLM.from_pretrained(str(getattr(trained, f"{arch}_base"))).eval()
    base.resize_token_embeddings(merged.get_input_embeddings().weight.shape[0], mean_resizing=False)
    with torch.no_grad():
        plain = base(input_ids=ids[:, :4]).logits  # text ids only: rows the base has
    assert not torch.allclose(got[:, :4], plain, atol=1e-3)  # the adapter did something: the check is not trivial
    assert (out / "llm-adapter" / "adapter_model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert card.count("Merge check") == 1 and "## Training config (LLM)" in card and "| audio hours |" in card
    assert set(res.manifest["contents"]) >= {"README.md", "verification.json", "manifest.json", "llm"}


def test_a_different_base_is_refused(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    changed = tmp_path / "changed"
    model = AutoModelForCausalLM.from_pretrained(str(trained.qwen2_base))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    model.save_pretrained(str(changed))
    AutoTokenizer.from_pretrained(str(trained.qwen2_base)).save_pretrained(str(changed))
    with pytest.raises(ExportError, match="not the one the adapter was trained on.*checksum"):
        export(load_config(None, [*QUICK, f"export.base_model={changed}"]), str(tmp_path / "out"),
               llm=str(trained.qwen2))
    with pytest.raises(ExportError, match="missing"):
        export(load_config(None, [*QUICK, f"export.base_model={tmp_path / 'nowhere'}"]), str(tmp_path / "out"),
               llm=str(trained.qwen2))
    assert not (tmp_path / "out").exists()


def test_an_adapter_whose_targets_are_not_in_the_base_is_refused(trained, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    other = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=384)).save_pretrained(str(other))
    manifest = json.loads((trained.qwen2 / "manifest.json").read_text())
    probe = {"input_ids": torch.randint(0, 300, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    with pytest.raises(ExportError, match="does not fit the base model"):
        merge_llm(trained.qwen2, manifest, other, torch.float32, probe)


def test_an_existing_export_is_refused_unless_overwrite(trained, tmp_path):
    out = tmp_path / "out"
    export(load_config(None, QUICK), str(out), flow=str(trained.flow))
    with pytest.raises(FileExistsError):
        export(load_config(None, QUICK), str(out), flow=str(trained.flow))
    export(load_config(None, [*QUICK, "export.overwrite=true"]), str(out), flow=str(trained.flow))
    with pytest.raises(ExportError, match="nothing to export"):
        export(load_config(None, QUICK), str(tmp_path / "x"))


def test_s3_export_is_complete_and_loads_after_download(trained, s3_env, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    uri = f"{s3_env}/exports/one"
    tokens = f"{s3_env}/tokens"  # Tokens on S3 too: the export fetches only the parts it reads
    storage.upload_dir(trained.tokens, tokens)
    res = export(load_config(None, [*QUICK, "export.num_samples=1", "export.synthesis.max_audio_s=1"]), uri,
                 llm=str(trained.qwen2), flow=str(trained.flow), tokens=tokens)
    files = set(storage.list_files(uri))
    assert {"manifest.json", "README.md", "llm/model.safetensors", "llm/tokenizer.json", "flow/model.safetensors",
            "llm-adapter/adapter_model.safetensors", "audio_tokenizer/audio_tokenizer.json",
            "samples/sample-0.wav"} <= files
    assert set(res.manifest["contents"]) <= {f.split("/")[0] for f in files}
    local = storage.local_copy(uri)
    AutoModelForCausalLM.from_pretrained(str(local / "llm"))
    assert json.loads((local / "manifest.json").read_text())["uri"] == uri == res.output
    from audiotune.config import SynthesisSettings
    from audiotune.export.synthesis import Synthesizer

    speech = Synthesizer(local, SynthesisSettings(max_audio_s=1)).synthesize("hello")  # the download works whole
    assert speech.wav.size > 0

    # an upload that breaks off leaves no manifest.json, so no reader takes it for an export
    real = storage.upload_files
    calls = {"n": 0}

    def flaky(local_dir, target, rels):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError("connection reset")
        return real(local_dir, target, rels[: max(1, len(rels) // 2)])

    monkeypatch.setattr(storage, "upload_files", flaky)
    with pytest.raises(OSError):
        export(load_config(None, QUICK), f"{s3_env}/exports/two", llm=str(trained.qwen2), flow=str(trained.flow))
    assert "manifest.json" not in storage.list_files(f"{s3_env}/exports/two")


def test_registered_versions_and_champion_promotion(trained, mlflow_server, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from audiotune.export import registry

    monkeypatch.delenv("RANK", raising=False)
    name = f"voice-{uuid.uuid4().hex[:6]}"
    tracking = [f"tracking.uri={mlflow_server}", f"tracking.experiment=exp-{name}"]
    cfg = load_config(None, [*tracking, "export.num_samples=1", f"export.registered_model_name={name}",
                             "export.synthesis.max_audio_s=1"])
    res = export(cfg, str(tmp_path / "first"), llm=str(trained.qwen2), flow=str(trained.flow))
    assert res.registered_version == "1"
    client = MlflowClient(mlflow_server)
    version = client.get_model_version(name, "1")
    assert version.tags["base_model"] == str(trained.qwen2_base) and version.tags["code_version"]
    assert float(version.tags["metric.val_loss"]) == pytest.approx(res.metrics["val_loss"])
    assert res.manifest["dataset_fingerprint"] and version.tags["dataset_fingerprint"] == res.manifest[
        "dataset_fingerprint"]
    assert json.loads((tmp_path / "first" / "registration.json").read_text())["version"] == "1"
    artifacts = {a.path for a in client.list_artifacts(version.run_id, "export")}
    assert {"export/README.md", "export/manifest.json", "export/llm", "export/samples"} <= artifacts

    assert registry.promote(cfg.tracking, name).promoted  # no champion yet: the first version takes the alias
    val = res.metrics["val_loss"]
    worse = registry.register(cfg.tracking, name, "s3://elsewhere/model", None, {}, {"val_loss": val + 1})
    outcome = registry.promote(cfg.tracking, name, version=worse)
    assert not outcome.promoted and client.get_model_version_by_alias(name, "champion").version == "1"
    better = registry.register(cfg.tracking, name, "s3://elsewhere/model", None, {}, {"val_loss": val - 1})
    cli = ["promote", "--model-name", name, "--metric", "val_loss", "--set", f"tracking.uri={mlflow_server}"]
    code, _, stderr = _cli(cli, capsys)
    assert code == 0, stderr
    assert client.get_model_version_by_alias(name, "champion").version == better
    code, stdout, _ = _cli([*cli, "--version", worse], capsys)
    assert code == 3 and "did not beat" in stdout
    # a champion set by hand without the metric is kept: there is nothing to compare with
    unmeasured = registry.register(cfg.tracking, name, "s3://elsewhere/model", None, {}, {})
    client.set_registered_model_alias(name, "champion", unmeasured)
    code, stdout, stderr = _cli([*cli, "--version", better], capsys)
    assert code == 3 and "was not compared" in stdout, stderr
    assert client.get_model_version_by_alias(name, "champion").version == unmeasured


def test_an_unreachable_registry_leaves_a_complete_export(trained, tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    cfg = load_config(None, ["export.num_samples=0", "tracking.uri=http://127.0.0.1:9",
                             "export.registered_model_name=x"])
    with pytest.raises(ExportError, match="is complete, but tracking/registering it failed.*unreachable"):
        export(cfg, str(tmp_path / "out"), flow=str(trained.flow))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["kind"] == "audiotune.export"


def test_synthesize_writes_a_wav_of_plausible_length(trained, tmp_path, capsys):
    out = tmp_path / "export"
    export(load_config(None, [*QUICK, "export.num_samples=1", "export.synthesis.max_audio_s=2"]), str(out),
           llm=str(trained.qwen2), flow=str(trained.flow))
    samples = json.loads((out / "samples" / "samples.json").read_text())
    assert len(samples) == 1 and (out / samples[0]["file"]).is_file()
    wav = tmp_path / "hello.wav"
    cmd = ["synthesize", "--model", str(out), "--text", "hello there", "--out", str(wav), "--set",
           "export.synthesis.max_audio_s=2", "--set", "export.synthesis.temperature=0", "--set",
           "export.synthesis.min_token_text_ratio=2"]
    code, stdout, stderr = _cli(cmd, capsys)
    assert code == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    audio, rate = sf.read(str(wav))
    flow = json.loads((out / "flow" / "manifest.json").read_text())
    hop, token_rate = flow["mel"]["hop_length"], flow["vocab"]["token_rate"]
    from transformers import AutoTokenizer

    text_tokens = len(AutoTokenizer.from_pretrained(str(out / "llm"))("hello there", add_special_tokens=False)
                      ["input_ids"])
    # at least 2 code frames per text token (min_token_text_ratio), at most max_audio_s
    assert rate == flow["mel"]["sample_rate"] and min(2 * text_tokens, 2 * token_rate) <= result["frames"] \
        <= 2 * token_rate
    # one code frame = mel_frames_per_token mel frames = that many hops of audio
    expected = round(result["frames"] * flow["vocab"]["mel_frames_per_token"]) * hop
    assert abs(len(audio) - expected) <= hop and abs(result["seconds"] - len(audio) / rate) < 1e-3
    code, _, stderr = _cli([*cmd[:-6], "--prompt-wav", str(wav)], capsys)
    assert code == 1 and "--prompt-text" in stderr
    code, _, stderr = _cli([*cmd, "--prompt-wav", str(wav), "--prompt-text", "hello there"], capsys)
    assert code == 0, stderr[-3000:]
