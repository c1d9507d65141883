"""Base loading: strict (a relabelled checkpoint fails loudly), remote code only with llm.trust_remote_code and
with its files hashed, Kimi-Audio refused, one registry of base families."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from audiotune.cli import main
from audiotune.config import LLMStageConfig
from audiotune.models.families import ModelError, RemoteCodeNotTrusted, family_for
from audiotune.models.lm import load_base
from tests.helpers import save_tiny_base

FAST = ["tracking.enabled=false", "run.num_workers=1", "llm.train.eval_every=1000", "llm.train.save_every=1000",
        "llm.train.batch_tokens=2048", "llm.layout=tts", "llm.train.max_steps=2", "llm.train.warmup_ratio=0"]


def _train_cli(tokens: Path, base: Path, out: Path, *sets: str) -> int:
    argv = ["train", "llm", "--tokens", str(tokens), "--base-model", str(base), "--output", str(out)]
    return main([*argv, *[a for s in (*FAST, *sets) for a in ("--set", s)]])


def _rewrite(folder: Path, rename=None, config=None) -> None:
    """Rename the weights of a saved checkpoint and edit its config.json, in place."""
    file = folder / "model.safetensors"
    tensors = load_file(str(file))
    if rename:
        tensors = {rename(k): v for k, v in tensors.items()}
    save_file(tensors, str(file), metadata={"format": "pt"})
    if config:
        data = json.loads((folder / "config.json").read_text())
        data.update(config)
        (folder / "config.json").write_text(json.dumps(data, indent=2))


# ------------------------------------------------------------------------------------------- strict loading
def _asteroid_key(key: str) -> str:
    """MOSS-TTSD's AsteroidTTSInstruct layout: the Qwen3 backbone under model.language_model, the head as lm_heads.0."""
    return "lm_heads.0.weight" if key == "lm_head.weight" else key.replace("model.", "model.language_model.", 1)


def test_a_relabelled_checkpoint_fails_loudly_through_the_cli_and_trains_nothing(llm_tokens, tmp_path, capsys):
    base = save_tiny_base(llm_tokens, tmp_path / "relabelled", arch="qwen3")
    _rewrite(base, _asteroid_key, {"architectures": ["Qwen3ForCausalLM"]})  # was AsteroidTTSInstruct upstream
    code = _train_cli(llm_tokens, base, tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 1, err  # README: 1, the work failed
    line = [x for x in err.splitlines() if "does not load as Qwen3ForCausalLM" in x]
    assert len(line) == 1, err
    n = len(load_file(str(base / "model.safetensors")))
    assert f"{n} weights of Qwen3ForCausalLM are not in the checkpoint" in line[0]
    assert f"{n} checkpoint weights are not used by Qwen3ForCausalLM" in line[0]
    assert "lm_heads.0.weight" in line[0] and "model.language_model." in line[0] and "lm_head.weight" in line[0]
    assert not (tmp_path / "out").exists() and not Path(f"{tmp_path / 'out'}.checkpoints").exists()


def test_missing_unused_and_mis_shaped_weights_are_each_listed(tmp_path, llm_tokens):
    base = save_tiny_base(llm_tokens, tmp_path / "base")
    load_base(base, torch.float32, "eager")  # as saved: loads
    _rewrite(base, lambda k: k.replace("layers.1.mlp.up_proj", "layers.1.mlp.upproj"))
    with pytest.raises(ModelError, match=r"1 weights of Qwen2ForCausalLM are not in the checkpoint "
                                         r"\(model\.layers\.1\.mlp\.up_proj\.weight\); 1 checkpoint weights are not "
                                         r"used by Qwen2ForCausalLM \(model\.layers\.1\.mlp\.upproj\.weight\)"):
        load_base(base, torch.float32, "eager")
    tensors = load_file(str(base / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors.pop("model.layers.1.mlp.upproj.weight")[:, :-1].contiguous()
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"1 weights have another shape .*up_proj\.weight \(128, 63\) vs \(128, 64\)"):
        load_base(base, torch.float32, "eager")


def test_created_on_purpose_weights_are_allowed_by_name(tmp_path, llm_tokens, caplog):
    from transformers import AutoModelForCausalLM

    from audiotune.models.families import strict_from_pretrained

    base = save_tiny_base(llm_tokens, tmp_path / "base")
    _rewrite(base, lambda k: "dropped" if k == "lm_head.weight" else k)
    tensors = load_file(str(base / "model.safetensors"))
    del tensors["dropped"]
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"1 weights of Qwen2ForCausalLM are not in the checkpoint \(lm_head"):
        strict_from_pretrained(AutoModelForCausalLM, base)
    with caplog.at_level("INFO", logger="audiotune.models.families"):
        strict_from_pretrained(AutoModelForCausalLM, base, allowed_missing={"lm_head.weight": "a head we create"})
    assert "lm_head.weight is not in the checkpoint; created on purpose (a head we create)" in caplog.text


# ---------------------------------------------------------------------------------------------- remote code
CONFIGURATION = '''from transformers import Qwen2Config


class Step1Config(Qwen2Config):
    model_type = "step1"
'''
MODELING = '''from transformers import Qwen2ForCausalLM

from .configuration_step1 import Step1Config


class Step1ForCausalLM(Qwen2ForCausalLM):
    """A stand-in for Step-Audio-EditX's Step1ForCausalLM: its code ships with the weights, eager attention only."""

    config_class = Step1Config
    _supports_sdpa = False
    _supports_flash_attn = False
'''
AUTO_MAP = {"AutoConfig": "configuration_step1.Step1Config", "AutoModelForCausalLM": "modeling_step1.Step1ForCausalLM"}


def remote_code_base(tokens: Path, folder: Path) -> Path:
    """A tiny Qwen2 saved as a model whose code ships with it (config.json auto_map, model_type step1)."""
    save_tiny_base(tokens, folder)
    (folder / "configuration_step1.py").write_text(CONFIGURATION)
    (folder / "modeling_step1.py").write_text(MODELING)
    _rewrite(folder, config={"model_type": "step1", "architectures": ["Step1ForCausalLM"], "auto_map": AUTO_MAP})
    return folder


@pytest.fixture
def no_prompt(monkeypatch):
    """Any interactive prompt (transformers' trust_remote_code [y/N]) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"interactive prompt: {args}")

    monkeypatch.setattr("builtins.input", refuse)


def test_remote_code_is_refused_without_the_flag_in_one_line_and_without_a_prompt(llm_tokens, tmp_path, capsys,
                                                                                   no_prompt):
    base = remote_code_base(llm_tokens, tmp_path / f"step1_{tmp_path.name}")
    assert family_for(base).name == "remote-code"
    code = _train_cli(llm_tokens, base, tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2, err  # README: 2, a setting to change
    line = [x for x in err.splitlines() if "llm.trust_remote_code=true" in x]
    assert len(line) == 1 and "modeling_step1.Step1ForCausalLM" in line[0], err
    assert not (tmp_path / "out").exists()
    unknown = save_tiny_base(llm_tokens, tmp_path / "unknown")
    _rewrite(unknown, config={"model_type": "nobody_knows", "architectures": ["NobodyForCausalLM"]})
    with pytest.raises(RemoteCodeNotTrusted, match="model_type 'nobody_knows'.*llm.trust_remote_code"):
        load_base(unknown, torch.float32, "sdpa")
    with pytest.raises(ModelError, match="names no code for AutoModelForCausalLM"):
        load_base(unknown, torch.float32, "sdpa", LLMStageConfig(trust_remote_code=True))


def test_remote_code_trains_with_the_flag_hashes_its_files_and_export_refuses_changed_code(llm_tokens, tmp_path,
                                                                                          no_prompt):
    import hashlib

    from audiotune.config import load_config
    from audiotune.export.merge import ExportError
    from audiotune.stages.export import export
    from audiotune.stages.train_llm import train_llm

    base = remote_code_base(llm_tokens, tmp_path / f"step1_{tmp_path.name}")
    cfg = load_config(None, [*FAST, "llm.trust_remote_code=true", "llm.attn_implementation=sdpa"])
    res = train_llm(cfg, tokens=str(llm_tokens), output=str(tmp_path / "llm"), base_model=str(base))
    manifest = res.manifest
    assert manifest["attn_implementation"] == "eager"  # Step1ForCausalLM has no sdpa
    hashes = {f: hashlib.sha256((base / f).read_bytes()).hexdigest()
              for f in ("configuration_step1.py", "modeling_step1.py")}
    assert manifest["base_fingerprint"]["remote_code"] == hashes

    quick = ["tracking.enabled=false", "export.num_samples=0"]
    out = export(load_config(None, quick), str(tmp_path / "export"), llm=str(tmp_path / "llm"))
    assert out.manifest["verification"]["passed"]
    assert (tmp_path / "export" / "llm" / "modeling_step1.py").read_text() == MODELING  # beside the weights
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"`modeling_step1.py` (sha256 {hashes['modeling_step1.py']})" in card

    (base / "modeling_step1.py").write_text(MODELING + "\n# edited after training\n")
    with pytest.raises(ExportError, match=r"remote code modeling_step1\.py: sha256 \w+… at training, \w+… now"):
        export(load_config(None, quick), str(tmp_path / "again"), llm=str(tmp_path / "llm"))
    assert not (tmp_path / "again").exists()


# ------------------------------------------------------------------------------------- Kimi-Audio, registry
def test_kimi_audio_is_recognised_and_runs_only_with_remote_code_trusted(llm_tokens, tmp_path):
    kimi = save_tiny_base(llm_tokens, tmp_path / "kimi")
    _rewrite(kimi, config={"model_type": "kimi_audio", "architectures": ["MoonshotKimiaForCausalLM"],
                           "auto_map": {"AutoModelForCausalLM": "modeling_moonshot_kimia.MoonshotKimiaForCausalLM"}})
    heads = save_tiny_base(llm_tokens, tmp_path / "heads")  # a causal-LM label on weights with an audio head
    tensors = load_file(str(heads / "model.safetensors"))
    tensors["mimo_output.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, str(heads / "model.safetensors"), metadata={"format": "pt"})
    for folder in (kimi, heads):
        assert family_for(folder).name == "kimi-audio"
        with pytest.raises(RemoteCodeNotTrusted, match=r"Kimi-Audio \(MoonshotKimiaForCausalLM\).*"
                                                       r"llm\.trust_remote_code=true"):
            load_base(folder, torch.float32, "sdpa")  # trained through its own code: tests/test_kimi.py
    with pytest.raises(ModelError, match="config.json names no code for AutoModelForCausalLM"):
        load_base(heads, torch.float32, "sdpa", LLMStageConfig(trust_remote_code=True))


def test_one_registry_decides_how_every_base_loads(llm_tokens, tmp_path, monkeypatch):
    from audiotune.models import families
    from audiotune.models.lm import build_lm
    from audiotune.models.vocab import AudioVocab

    plain = save_tiny_base(llm_tokens, tmp_path / "plain")
    assert family_for(plain).name == "hf-causal-lm"
    order = [f.name for f in families.families()]  # highest priority first; the plain family takes the rest
    assert order.index("kimi-audio") < order.index("remote-code") < order.index("hf-causal-lm") == len(order) - 1

    class Custom(families.HFCausalLM):
        name, priority = "custom", 50
        loaded: list[Path] = []

        def detect(self, config, path):
            return path.name == "plain"

        def load(self, path, settings, dtype, attn):
            self.loaded.append(path)
            return super().load(path, settings, dtype, attn)

    monkeypatch.setitem(families._FAMILIES, "custom", Custom())
    assert family_for(plain).name == "custom"
    vocab = AudioVocab(text_vocab_size=40, special_ids={}, codebook_size=8, num_codebooks=1, audio_offset=40,
                       pad_id=0, eos_id=1)
    build_lm(LLMStageConfig(), vocab, plain, torch.float32, base_text_size=40)  # the llm stage's path
    assert Custom.loaded == [plain]


def test_trust_remote_code_is_a_described_field_reachable_from_the_pipeline_config():
    from audiotune.config import AudiotuneConfig
    from audiotune.orchestration import params

    field = LLMStageConfig.model_fields["trust_remote_code"]
    assert field.default is False and "auto_map" in field.description
    cfg, _ = params.resolve({"llm": {"trust_remote_code": True}}, params.defaults())
    assert cfg.llm.trust_remote_code is True
    assert AudiotuneConfig.model_validate_json(cfg.model_dump_json()).llm.trust_remote_code is True
