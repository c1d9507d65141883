"""Parity with the upstream projects' own code, on the tiny release-layout checkpoints of the kit.

The kit's location comes from ``AUDIOTUNE_UPSTREAM_FIXTURES`` (default ``tests/fixtures/upstream``),
so another kit in the same layout (other sizes, other seeds) is checked by the same tests. A model
folder absent from the kit is skipped; one that is present and does not match is a failure.

Every comparison uses the kit README's rule::

    torch.testing.assert_close(yours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max())

in float32 on the CPU, in eval mode, without grad. Each stage is tested on its own (encoder path,
estimator, Euler solver, HiFT decode, LLM heads), so a failure points at one component.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

KIT = Path(os.environ.get("AUDIOTUNE_UPSTREAM_FIXTURES", Path(__file__).parent / "fixtures" / "upstream"))

FLOW_FOLDERS = ("cosyvoice-300m", "cosyvoice2", "step-audio-editx-flow")
LLM_FOLDERS = ("moss-ttsd-v0.7",)


def kit_folder(name: str) -> Path:
    """The kit's folder ``name``; skips the test when the kit does not hold it."""
    folder = KIT / name
    if not folder.is_dir():
        pytest.skip(f"{name} is not in the parity kit {KIT}")
    return folder


def reference(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "reference.safetensors"))


def assert_parity(yours: torch.Tensor, ref: torch.Tensor, name: str) -> float:
    """The kit's tolerance rule; returns the max relative error (for the figures in the notes)."""
    yours = yours.detach().to(torch.float32).cpu()
    torch.testing.assert_close(yours, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()), msg=lambda m: f"{name}: {m}")
    return float(((yours - ref).abs() / ref.abs().clamp(min=1e-12)).max())


# ---- flow: (1) encoder path -------------------------------------------------------------------------------------
ENCODER_OUTPUTS = ("mu", "mask", "spks", "cond")
_ENCODED: dict[Path, dict[str, torch.Tensor]] = {}


def _encoded(name: str) -> dict[str, torch.Tensor]:
    """The folder's flow through the release loader users get (yaml + ``flow.pt``, strict), fed the kit's
    inputs: ``encode`` = upstream ``flow.inference`` up to its decoder call (computed once per folder)."""
    from audiotune.models.flow.native.release import load_release

    folder = kit_folder(name)
    if folder in _ENCODED:
        return _ENCODED[folder]
    ref = reference(folder)
    flow, _ = load_release(folder)
    inputs = ("token", "token_len", "prompt_token", "prompt_token_len", "prompt_feat", "prompt_feat_len", "embedding")
    with torch.inference_mode():
        out = flow.encode(*(ref[key] for key in inputs))
    _ENCODED[folder] = dict(zip(ENCODER_OUTPUTS, out, strict=True))
    return _ENCODED[folder]


@pytest.mark.parametrize("tensor", ENCODER_OUTPUTS)
@pytest.mark.parametrize("name", FLOW_FOLDERS)
def test_flow_encoder_path(name: str, tensor: str) -> None:
    """Token embedding → encoder → projection (→ length regulator), speaker projection and prompt ``cond``."""
    yours = _encoded(name)[tensor]
    ref = reference(kit_folder(name))[tensor]
    assert yours.shape == ref.shape, f"{name} {tensor}: shape {tuple(yours.shape)}, upstream {tuple(ref.shape)}"
    assert_parity(yours, ref, f"{name} {tensor}")



# ---- flow: (2) estimator and (3) Euler solver -------------------------------------------------------------------
def _release_cfm(folder: Path):
    """The flow's ``decoder`` (CFM + estimator) built from the folder's yaml, with the ``decoder.*`` part of
    ``flow.pt`` loaded strictly (a missing, unexpected or mis-shaped estimator key fails here)."""
    from audiotune.models.flow.io import load_state_dict_strict
    from audiotune.models.flow.native.cfm import build_cfm
    from audiotune.models.flow.native.hyperyaml import load_release_yaml
    from audiotune.models.flow.native.release import find_yaml, read_state

    cfm = build_cfm(load_release_yaml(find_yaml(folder))["flow"].get("decoder"))
    state = read_state(folder / "flow.pt")
    load_state_dict_strict(cfm, {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")},
                           str(folder / "flow.pt"))
    return cfm.eval()


@pytest.mark.parametrize("name", FLOW_FOLDERS)
def test_flow_estimator(name: str) -> None:
    """One velocity evaluation on a batch of 2 (row 1 padded), all positions compared (``est_out``)."""
    folder = kit_folder(name)
    ref = reference(folder)
    cfm = _release_cfm(folder)
    with torch.inference_mode():
        out = cfm.estimator(ref["est_x"], ref["est_mask"], ref["est_mu"], ref["est_t"], ref["est_spks"],
                            ref["est_cond"])
    assert_parity(out, ref["est_out"], f"{name} est_out")


@pytest.mark.parametrize("name", FLOW_FOLDERS)
def test_flow_euler_solver(name: str) -> None:
    """Euler sampling with CFG from the kit's noise over the cosine t_span of ``n_timesteps`` (``mel``)."""
    from audiotune.models.flow.native.cfm import time_span

    folder = kit_folder(name)
    ref = reference(folder)
    cfm = _release_cfm(folder)
    assert cfm.inference_cfg_rate == pytest.approx(float(ref["cfg_rate"]))
    t_span = time_span(int(ref["n_timesteps"]), cfm.t_scheduler)
    with torch.inference_mode():
        mel = cfm.solve_euler(ref["noise"], t_span, ref["mu"], ref["mask"], ref["spks"], ref["cond"])
    assert_parity(mel, ref["mel"], f"{name} mel")


# ---- HiFT vocoder: (4) decode ----------------------------------------------------------------------------------


def _release_vocoder(folder: Path):
    """The folder's HiFT through the loader ``flow.vocoder`` / ``synthesize --vocoder`` use, given the
    yaml's own mel settings."""
    from audiotune.models.flow.native.hyperyaml import load_release_yaml
    from audiotune.models.vocoder import load_vocoder, release_mel_settings

    (yaml_file,) = [p for p in sorted(folder.glob("*.yaml")) if "hift" in load_release_yaml(p)]
    return load_vocoder(str(folder), release_mel_settings(load_release_yaml(yaml_file)))


@pytest.mark.parametrize("name", FLOW_FOLDERS)
def test_hift_decode(name: str) -> None:
    folder = kit_folder(name)
    ref = reference(folder)
    hift = _release_vocoder(folder).model
    with torch.inference_mode():
        wav = hift.decode(x=ref["hift_mel"], s=ref["hift_source"])
    assert_parity(wav, ref["hift_wav"], f"{name} hift_wav")


@pytest.mark.parametrize("name", FLOW_FOLDERS)
def test_hift_weights_round_trip(name: str) -> None:
    from audiotune.models.flow.native.hift import hift_state_dict

    folder = kit_folder(name)
    hift = _release_vocoder(folder).model
    release = torch.load(folder / "hift.pt", map_location="cpu", weights_only=True)
    saved = hift_state_dict(hift)
    assert list(saved) == list(release)
    for key, tensor in release.items():
        assert saved[key].dtype == tensor.dtype and torch.equal(saved[key], tensor), key


# ---- flow release folder: load → export round trip, fine-tune with the encoder frozen ---------------------------
@pytest.mark.parametrize("name", FLOW_FOLDERS)
def test_release_load_then_export_is_bit_identical(name: str, tmp_path: Path) -> None:
    """Load → write back with no training: the same keys in the same order, the same dtypes and values, the yaml
    and ``hift.pt`` byte for byte; what we wrote loads again strictly."""
    from audiotune.models.flow.native.release import find_yaml, load_release, save_release

    folder = kit_folder(name)
    flow, info = load_release(folder)
    save_release(flow, info, tmp_path)
    theirs = torch.load(folder / "flow.pt", weights_only=True)
    ours = torch.load(tmp_path / "flow.pt", weights_only=True)
    assert list(ours) == list(theirs)
    for key, ref in theirs.items():
        assert ours[key].dtype == ref.dtype and torch.equal(ours[key], ref), f"{name} {key}"
    yaml = find_yaml(folder).name
    assert (tmp_path / yaml).read_bytes() == (folder / yaml).read_bytes()
    if (folder / "hift.pt").is_file():
        assert (tmp_path / "hift.pt").read_bytes() == (folder / "hift.pt").read_bytes()
    load_release(tmp_path)


def _encoder_keys(flow) -> set[str]:
    """State-dict keys of the parameters ``freeze_encoder`` freezes (``encoder_modules()``)."""
    frozen = {id(p) for module in flow.encoder_modules() for p in module.parameters()}
    return {name for name, p in flow.named_parameters() if id(p) in frozen}


def test_release_fine_tune_with_the_encoder_frozen_exports_the_upstream_layout(tmp_path: Path) -> None:
    """``audiotune train flow --base-flow <cosyvoice-300m folder>`` with ``flow.freeze_encoder=true`` on Tokens
    built to fit → ``flow.pt`` with exactly the kit's keys and shapes, encoder tensors unchanged, the estimator
    changed; a sample rendered with the release's HiFT; the export package carries flow.pt + yaml + hift.pt."""
    import json

    from audiotune.cli import main as cli_main
    from audiotune.config import load_config
    from audiotune.models.flow.native.release import load_release
    from audiotune.stages.export import export
    from tests.helpers import release_tokens

    folder = kit_folder("cosyvoice-300m")
    tokens = release_tokens(tmp_path / "tokens", folder)
    out = tmp_path / "flow"
    sets = ["tracking.enabled=false", "run.num_workers=1", "flow.freeze_encoder=true", "flow.train.max_steps=3",
            "flow.train.lr=1e-2", "flow.train.schedule=constant", "flow.max_frames_in_batch=400",
            "flow.num_samples=1", f"flow.vocoder={folder}", "flow.train.eval_every=1000",
            "flow.train.save_every=1000"]
    code = cli_main(["train", "flow", "--tokens", str(tokens), "--output", str(out), "--base-flow", str(folder),
                     *[a for s in sets for a in ("--set", s)]])
    assert code == 0
    theirs = torch.load(folder / "flow.pt", weights_only=True)
    ours = torch.load(out / "flow.pt", weights_only=True)
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype for k in theirs)
    flow, _ = load_release(folder)
    encoder = _encoder_keys(flow)
    assert encoder and all(torch.equal(ours[k], theirs[k]) for k in encoder)
    assert any(not torch.equal(ours[k], theirs[k]) for k in theirs if k.startswith("decoder.estimator."))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arch"] == "cosyvoice-300m" and manifest["init"] == "base_flow"
    assert (out / "hift.pt").read_bytes() == (folder / "hift.pt").read_bytes()
    assert (out / "samples" / "final-0.wav").is_file()  # upstream's inference path + the release's HiFT

    package = tmp_path / "export"
    export(load_config(None, ["tracking.enabled=false"]), output=str(package), flow=str(out))
    for name in ("flow.pt", "cosyvoice.yaml", "hift.pt", "model.safetensors"):
        assert (package / "flow" / name).read_bytes() == (out / name).read_bytes(), name
    load_release(package / "flow")




# ---- LLM: MOSS-TTSD AsteroidTTS heads and round trip -----------------------------------------------------------
def _moss(folder: Path, attn: str, dtype: torch.dtype = torch.float32):
    """The kit's AsteroidTTS checkpoint through the loader users get (the base-family registry)."""
    from audiotune.models.families import family_for, load_model

    assert family_for(folder).name == "moss-asteroid-tts"
    return load_model(folder, None, dtype, attn).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_moss_ttsd_heads_match_upstream(attn):
    """Every head's logits (``logits_all[k]`` upstream) from the stored input_ids [B, T, C] and attention mask."""
    folder = kit_folder("moss-ttsd-v0.7")
    ref = reference(folder)
    model = _moss(folder, attn)
    with torch.inference_mode():
        out = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"])
    heads = [out.logits, *out.codebook_logits]
    expected = sorted((k for k in ref if k.startswith("logits_")), key=lambda k: int(k.split("_")[1]))
    assert len(heads) == len(expected), f"{len(heads)} heads, the reference has {len(expected)}"
    failures = []
    for k, name in enumerate(expected):
        try:
            assert_parity(heads[k], ref[name], f"{name} ({attn})")
        except AssertionError as err:
            failures.append(str(err).splitlines()[0])
    assert not failures, "; ".join(failures)


def test_moss_ttsd_round_trip_is_bit_identical(tmp_path):
    """load → save in the AsteroidTTS layout, no training: the same config fields, keys, shapes, dtypes, bits."""
    import json

    from safetensors import safe_open

    from audiotune.models.families import family_for, save_model

    folder = kit_folder("moss-ttsd-v0.7")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:  # loaded in the dtype it is stored in
        stored = f.get_tensor("lm_heads.0.weight").dtype
    save_model(_moss(folder, "eager", stored), tmp_path / "out", family_for(folder))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    written, original = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "out", folder))
    assert written == original
    with safe_open(str(folder / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert b.metadata() == a.metadata()
        for key in a.keys():  # noqa: SIM118 (safe_open is not a mapping)
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), key
