"""The release-yaml reader: hyperpyyaml tags as inert data, nothing imported or executed."""

from __future__ import annotations

import sys

import pytest

from audiotune.models.flow.native.hyperyaml import (
    Apply,
    Name,
    New,
    ReleaseYamlError,
    load_release_yaml,
    parse_release_yaml,
)

RELEASE = """\
__set_seed1: !apply:random.seed [1986]
sample_rate: 24000
token_mel_ratio: 2
chunk_size: 25
llm: !new:cosyvoice.llm.llm.Qwen2LM
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    token_mel_ratio: !ref <token_mel_ratio>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            channels: [256]
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    sampling_rate: !ref <sample_rate>
    center: False
"""


def test_release_sections_are_data_and_other_sections_untouched():
    before = set(sys.modules)
    doc = parse_release_yaml(RELEASE)
    assert not {m for m in set(sys.modules) - before if m.split(".")[0] in ("cosyvoice", "matcha", "omegaconf")}
    flow = doc["flow"]
    assert isinstance(flow, New) and flow.short == "CausalMaskedDiffWithXvec" and flow.get("token_mel_ratio") == 2
    decoder = flow.get("decoder")
    assert decoder.get("cfm_params") == {"sigma_min": 1e-06}
    assert decoder.get("estimator").get("static_chunk_size") == 50
    assert decoder.get("estimator").get("channels") == [256]
    mel = Name("matcha.utils.audio.mel_spectrogram", {"sampling_rate": 24000, "center": False})
    assert doc["feat_extractor"] == mel
    # the llm section's dangling <qwen_pretrain_path> is never resolved, the !apply never evaluated
    assert "llm" not in doc and "__set_seed1" not in doc and doc["sample_rate"] == 24000


@pytest.mark.parametrize("text, needle", [
    ("flow: !!python/object/apply:os.system [id]\n", "python/object/apply:os.system"),
    ("x: !!python/name:os.system\n", "python/name:os.system"),
    ("flow: !include:other.yaml\n", "!include:other.yaml"),
    ("flow: !new:a.B {x: !ref <missing>}\n", "<missing> names nothing"),
    ("k: 1\nflow: !new:a.B {x: !ref <k> + __import__('os')}\n", "not plain arithmetic"),
    ("flow: [1, 2\n", "not readable YAML"),
])
def test_forbidden_or_broken_yaml_is_one_line(text, needle):
    with pytest.raises(ReleaseYamlError) as info:
        parse_release_yaml(text, "x.yaml")
    assert needle in str(info.value) and "\n" not in str(info.value) and str(info.value).startswith("x.yaml")


def test_apply_outside_sections_is_kept_inert(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: !apply:random.seed [1]\nflow: !new:a.B {}\n")
    doc = load_release_yaml(path, sections=("flow", "seed"))
    assert doc["seed"] == Apply("random.seed", [1]) and doc["flow"] == New("a.B", {})
