"""The convert fan-out: plan → units → merge equals the one-task convert; units stable under added files;
streaming from S3 under a local-disk cap."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from audiotune import artifacts, storage
from audiotune.config import load_config
from audiotune.data import plan as plan_mod
from audiotune.data.merge import MergeError
from audiotune.stages import convert_units
from audiotune.stages.convert import convert
from tests.helpers import good_corpus, write_jsonl

UNITS = ["convert.unit_max_rows=4", "convert.max_units=50"]


def _cfg(*overrides: str):
    return load_config(None, ["tracking.enabled=false", "run.num_workers=1", "convert.val_fraction=0.25",
                              *UNITS, *overrides])


def _rows(dataset: Path) -> dict[str, list[dict]]:
    manifest = json.loads((dataset / "manifest.json").read_text())
    artifacts.verify_shards(dataset, manifest, str(dataset))
    out = {}
    for split in ("train", "val"):
        out[split] = [r for p in sorted((dataset / split).glob("part-*.parquet"))
                      for r in pq.read_table(p).to_pylist()]
    return out


def _corpus_with_bad_rows(root: Path, n: int) -> Path:
    manifest = good_corpus(root, n)
    lines = manifest.read_text().splitlines()
    lines.insert(3, json.dumps({"id": "missing", "audio": "wavs/nope.wav", "text": "x"}))
    lines.insert(5, "not json")
    lines.append(lines[0])  # a duplicate id
    return write_jsonl(manifest, lines)


def test_merged_units_equal_the_one_task_dataset(tmp_path):
    src = _corpus_with_bad_rows(tmp_path / "src", 14)
    cfg = _cfg()
    single = convert(cfg, source=str(src), output=str(tmp_path / "single"))
    fanned = convert_units.convert_fanout(cfg, str(tmp_path / "fanned"), source=str(src),
                                          workdir=str(tmp_path / "work"))
    assert len(fanned.manifest["units"]) >= 3
    a, b = _rows(tmp_path / "single"), _rows(tmp_path / "fanned")
    for split in ("train", "val"):
        assert [r["id"] for r in a[split]] == [r["id"] for r in b[split]]
        assert a[split] == b[split]  # every column, the FLAC bytes included
    assert len(a["val"]) > 0
    ra, rb = single.report, fanned.report
    for key in ("rows", "hours", "tasks", "speakers", "quarantine_reasons", "quarantine_reason_fields",
                "duration_histogram", "bad_fraction"):
        assert ra[key] == rb[key], key
    qa = sorted(json.loads(x)["reason"] for x in (tmp_path / "single" / "quarantine.jsonl").read_text().splitlines())
    qb = sorted(json.loads(x)["reason"] for x in (tmp_path / "fanned" / "quarantine.jsonl").read_text().splitlines())
    assert qa == qb and len(qa) == 3
    assert fanned.manifest["splits"]["train"]["rows"] == single.manifest["splits"]["train"]["rows"]


def test_added_files_land_in_a_new_unit_and_old_ids_stay(tmp_path):
    root = tmp_path / "src"
    good_corpus(root, 10)
    plan_uri = str(tmp_path / "kept-plan")
    cfg = _cfg(f"convert.plan_uri={plan_uri}")
    first = convert_units.plan(cfg, str(tmp_path / "p1"), source=str(root / "manifest.jsonl"))
    old = [u["id"] for u in first["units"]]
    assert len(old) == 3  # 4 + 4 + 2 rows
    lines = (root / "manifest.jsonl").read_text().splitlines()
    extra = good_corpus(tmp_path / "more", 3, start=10)  # utt00010..12, their audio beside the others
    for wav in (tmp_path / "more" / "wavs").iterdir():
        (root / "wavs" / wav.name).write_bytes(wav.read_bytes())
    write_jsonl(root / "manifest.jsonl", lines + extra.read_text().splitlines())
    second = convert_units.plan(cfg, str(tmp_path / "p2"), source=str(root / "manifest.jsonl"))
    new = [u["id"] for u in second["units"]]
    assert new[:3] == old and len(new) == 4
    assert plan_mod.read_unit(str(tmp_path / "p2"), new[3])[0]["record"]["id"] == "utt00010"
    # without the previous plan the same rows pack greedily: the partial unit changes
    fresh = convert_units.plan(_cfg(), str(tmp_path / "p3"), source=str(root / "manifest.jsonl"))
    assert [u["id"] for u in fresh["units"]][:2] == old[:2]
    assert [u["id"] for u in fresh["units"]][2] != old[2]


def test_unit_ids_follow_content(tmp_path):
    good_corpus(tmp_path / "a", 6)
    good_corpus(tmp_path / "b", 6)
    ids = [[u["id"] for u in convert_units.plan(_cfg(), str(tmp_path / f"p{k}"), str(tmp_path / k /
                                                "manifest.jsonl"))["units"]] for k in ("a", "b")]
    assert ids[0] != ids[1]  # the same rows elsewhere: other audio stamps (mtime), other ids
    again = convert_units.plan(_cfg(), str(tmp_path / "pa2"), str(tmp_path / "a" / "manifest.jsonl"))
    assert [u["id"] for u in again["units"]] == ids[0]


def test_max_units_raises_the_unit_bounds(tmp_path):
    src = good_corpus(tmp_path / "src", 10)
    planned = convert_units.plan(_cfg("convert.unit_max_rows=1", "convert.max_units=3"), str(tmp_path / "p"),
                                 str(src))
    assert [u["rows"] for u in planned["units"]] == [4, 4, 2]


def test_merge_names_a_missing_unit(tmp_path):
    src = good_corpus(tmp_path / "src", 9)
    cfg = _cfg()
    planned = convert_units.plan(cfg, str(tmp_path / "plan"), str(src))
    first = planned["units"][0]["id"]
    convert_units.convert_unit(cfg, str(tmp_path / "plan"), first, str(tmp_path / "part0"))
    with pytest.raises(MergeError, match="has no converted part"):
        convert_units.merge(cfg, str(tmp_path / "plan"), [str(tmp_path / "part0")], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("workers,objects", [(1, 3), (2, 3), (2, 1)])
def test_streams_from_s3_under_the_disk_cap(tmp_path, s3_env, workers, objects):
    root = tmp_path / "src"
    good_corpus(root, 8)
    storage.upload_dir(root, f"{s3_env}/corpus")
    corpus_bytes = sum(p.stat().st_size for p in (root / "wavs").iterdir())
    cap = objects * max(p.stat().st_size for p in (root / "wavs").iterdir())  # 1: one object at a time
    assert cap < corpus_bytes
    cfg = _cfg(f"convert.max_local_disk_bytes={cap}", "convert.unit_max_rows=100", f"run.num_workers={workers}")
    planned = convert_units.plan(cfg, str(tmp_path / "plan"), f"{s3_env}/corpus/manifest.jsonl")
    assert len(planned["units"]) == 1 and planned["source_bytes"] == corpus_bytes
    part = convert_units.convert_unit(cfg, str(tmp_path / "plan"), planned["units"][0]["id"], str(tmp_path / "part"))
    figures = part["figures"]
    assert 0 < figures["peak_spool_bytes"] <= cap
    assert figures["s3_bytes_read"] == corpus_bytes  # each audio object read once, nothing else
    assert part["report"]["rows"]["train"] + part["report"]["rows"]["val"] == 8
    local = convert(cfg, source=str(root / "manifest.jsonl"), output=str(tmp_path / "single"))
    merged = convert_units.merge(cfg, str(tmp_path / "plan"), [str(tmp_path / "part")], str(tmp_path / "merged"))
    assert _rows(tmp_path / "single") == _rows(tmp_path / "merged")
    assert merged.report["rows"] == local.report["rows"]


def test_an_object_above_the_cap_is_refused_naming_it(tmp_path, s3_env):
    from audiotune.data.stream import StreamError

    root = tmp_path / "src"
    good_corpus(root, 2)
    storage.upload_dir(root, f"{s3_env}/c")
    cfg = _cfg("convert.max_local_disk_bytes=100")
    planned = convert_units.plan(cfg, str(tmp_path / "plan"), f"{s3_env}/c/manifest.jsonl")
    with pytest.raises(StreamError, match=r"s3://.*/c/wavs/utt00000.wav: \d+ bytes is more than "
                                          "convert.max_local_disk_bytes=100"):
        convert_units.convert_unit(cfg, str(tmp_path / "plan"), planned["units"][0]["id"], str(tmp_path / "part"))


def test_kfp_local_fanout_merges_and_reruns_only_the_new_unit(tmp_path):
    """The real DAG under kfp.local, twice. First plan_data → ParallelFor(convert_unit) → merge_data →
    prepare_tokenizer → ParallelFor(tokenize_unit) → merge_tokens: the Dataset and the Tokens equal the one-task
    stages'. Then, with added rows, the convert fan-out alone: only the new unit is converted, the others are
    cache hits."""
    from audiotune.pipelines.finetune import convert_fanout, tokenize_fanout
    from kfp import dsl, local

    from audiotune.orchestration.steps import TOKENIZE_SECTIONS, to_json
    from audiotune.stages.tokenize import tokenize

    root = tmp_path / "src"
    good_corpus(root, 7)
    cfg = _cfg("convert.unit_max_rows=3", f"convert.plan_uri={tmp_path / 'plan'}", "pipeline.data_parallelism=2",
               *TOKENIZE)
    conf, tconf = to_json(cfg, ("run", "tracking", "convert")), to_json(cfg, TOKENIZE_SECTIONS)

    @dsl.pipeline(name="tokens")
    def through_tokens(source_uri: str, fingerprint: str):
        merged = convert_fanout(cfg, cfg.cluster, True, source_uri, "", fingerprint, conf)
        tokenize_fanout(cfg, cfg.cluster, True, merged, "", tconf, {})

    @dsl.pipeline(name="fanout")
    def fanout(source_uri: str, fingerprint: str):
        convert_fanout(cfg, cfg.cluster, True, source_uri, "", fingerprint, conf)

    # the one-task stages first: after a kfp.local run, librosa's numba compilation in this process trips over
    # kfp.local's print patch (kfp.local.logging_utils)
    convert(cfg, source=str(root / "manifest.jsonl"), output=str(tmp_path / "single"))
    tokenize(cfg, dataset=str(tmp_path / "single"), output=str(tmp_path / "single-tokens"))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"),
               raise_on_error=True, enable_caching=True)
    through_tokens(source_uri=str(root / "manifest.jsonl"), fingerprint="v1")
    (first,) = (tmp_path / "kfp").glob("tokens-*")
    assert len(list(first.glob("for-loop-*/convert-unit"))) == 3
    assert len(list(first.glob("for-loop-*/tokenize-unit"))) == 3
    assert _rows(first / "merge-data" / "dataset") == _rows(tmp_path / "single")
    _same_tokens(tmp_path / "single-tokens", first / "merge-tokens" / "tokens")  # the same Dataset's rows
    (setup,) = first.glob("prepare-tokenizer/setup/setup.json")
    assert len(json.loads(setup.read_text())["fit"]["rows_per_folder"]) == 3  # one fit, over the three units

    lines = (root / "manifest.jsonl").read_text().splitlines()
    extra = good_corpus(tmp_path / "more", 2, start=7)
    for wav in (tmp_path / "more" / "wavs").iterdir():
        (root / "wavs" / wav.name).write_bytes(wav.read_bytes())
    write_jsonl(root / "manifest.jsonl", lines + extra.read_text().splitlines())
    fanout(source_uri=str(root / "manifest.jsonl"), fingerprint="v2")
    (second,) = (tmp_path / "kfp").glob("fanout-*")
    ran = sorted(p.name for p in second.glob("for-loop-*/convert-unit"))
    assert len(ran) == 1, ran  # the three old units came from the cache
    merged = _rows(second / "merge-data" / "dataset")
    assert sum(len(v) for v in merged.values()) == 9


def test_a_failed_unit_is_redone_alone(tmp_path, s3_env):
    """An object changed after planning fails its unit only (naming the object); once it is back, re-running that
    unit alone completes the merge."""
    from audiotune.data.stream import StreamError

    root = tmp_path / "src"
    good_corpus(root, 9)
    storage.upload_dir(root, f"{s3_env}/c")
    cfg = _cfg("convert.unit_max_rows=3")
    plan_dir = str(tmp_path / "plan")
    units = [u["id"] for u in convert_units.plan(cfg, plan_dir, f"{s3_env}/c/manifest.jsonl")["units"]]
    assert len(units) == 3
    victim = f"{s3_env}/c/wavs/utt00004.wav"
    original = storage.read_bytes(victim)
    storage.write_bytes(victim, original[:-100])
    parts = [str(tmp_path / "parts" / u) for u in units]
    for unit, part in zip(units, parts, strict=True):
        if unit == units[1]:
            with pytest.raises(StreamError, match="utt00004.wav: changed or removed since the plan"):
                convert_units.convert_unit(cfg, plan_dir, unit, part)
        else:
            convert_units.convert_unit(cfg, plan_dir, unit, part)
    assert not Path(parts[1]).exists()
    storage.write_bytes(victim, original)
    convert_units.convert_unit(cfg, plan_dir, units[1], parts[1])
    merged = convert_units.merge(cfg, plan_dir, parts, str(tmp_path / "out"))
    assert merged.report["rows"]["train"] + merged.report["rows"]["val"] == 9


def test_the_fanout_compiles_into_the_pipeline(tmp_path):
    """pipeline.data_parallelism > 0: plan-data → a ParallelFor (its parallelism limit) of convert-unit (retried,
    cached) → merge-data (the collected parts' URIs) → prepare-tokenizer → a ParallelFor of tokenize-unit →
    merge-tokens,
    which feeds training; 0 keeps the one convert-data and tokenize-data tasks."""
    import yaml

    from audiotune import sdk

    path = sdk.compile(tmp_path / "f.yaml", load_config(None, ["pipeline.data_parallelism=3",
                                                                "convert.plan_uri=s3://b/plan"]))
    spec = next(yaml.safe_load_all(Path(path).read_text()))
    tasks = {n: t for c in spec["components"].values() for n, t in c.get("dag", {}).get("tasks", {}).items()}
    assert "convert-data" not in tasks and {"plan-data", "merge-data", "convert-unit"} <= set(tasks)
    loop = next(t for n, t in tasks.items() if n.startswith("for-loop") and "plan-data" in json.dumps(t))
    assert loop["iteratorPolicy"] == {"parallelismLimit": 3}
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("plan-data-Output")
    unit = tasks["convert-unit"]
    assert unit["cachingOptions"] == {"enableCache": True} and unit["retryPolicy"]["maxRetryCount"] == 2
    assert "plan" not in unit.get("inputs", {}).get("artifacts", {})  # the durable plan: cache keys hold
    # the parts reach the merges as collected URIs (parameters): KFP's launcher downloads input artifacts
    parts = tasks["merge-data"]["inputs"]["parameters"]["parts"]["taskOutputParameter"]
    assert parts["producerTask"].startswith("for-loop") and parts["outputParameterKey"].endswith("part_uri")
    assert "parts" not in tasks["merge-data"]["inputs"].get("artifacts", {})
    assert "tokenize-data" not in tasks and {"prepare-tokenizer", "tokenize-unit", "merge-tokens"} <= set(tasks)
    setup = tasks["prepare-tokenizer"]["inputs"]["parameters"]
    assert setup["part_uris"]["componentInputParameter"].endswith("merge-data-part_uris")  # URIs, not artifacts
    token_loop = next(t for n, t in tasks.items() if n.startswith("for-loop") and t is not loop)
    assert token_loop["parameterIterator"]["items"]["inputParameter"].endswith("prepare-tokenizer-Output")
    tok_unit = tasks["tokenize-unit"]
    assert tok_unit["cachingOptions"] == {"enableCache": True} and tok_unit["retryPolicy"]["maxRetryCount"] == 2
    assert tasks["merge-tokens"]["inputs"]["parameters"]["parts"]["taskOutputParameter"]["producerTask"] == \
        next(n for n, t in tasks.items() if t is token_loop)
    assert "merge-tokens" in json.dumps(tasks["train-llm"]["inputs"]["artifacts"]["tokens"])


def test_an_acestep_folder_on_s3_is_found_by_its_listed_audio(tmp_path, s3_env):
    from tests.helpers import write_audio

    root = tmp_path / "songs"
    for i in range(4):
        write_audio(root / f"song{i}.wav", seconds=1.0, seed=i)
        (root / f"song{i}_prompt.txt").write_text(f"pop, take {i}")
    storage.upload_dir(root, f"{s3_env}/songs")
    cfg = _cfg("convert.unit_max_rows=2")
    fanned = convert_units.convert_fanout(cfg, str(tmp_path / "fanned"), source=f"{s3_env}/songs")
    single = convert(cfg, source=str(root), output=str(tmp_path / "single"))
    assert fanned.manifest["format"] == "acestep" and len(fanned.manifest["units"]) == 2
    assert _rows(tmp_path / "fanned") == _rows(tmp_path / "single")
    assert fanned.report["rows"] == single.report["rows"]


@pytest.mark.parametrize("name", ["plan_data", "convert_unit", "merge_data", "prepare_tokenizer", "tokenize_unit",
                                  "merge_tokens"])
def test_fanout_components_are_thin_documented_and_on_the_cpu_image(name):
    from audiotune import components
    from audiotune.images import CPU_IMAGE
    from tests.test_components import test_thin_and_documented

    test_thin_and_documented(name)
    assert getattr(components, name).component_spec.implementation.container.image == CPU_IMAGE


def test_a_changed_file_changes_only_its_unit(tmp_path):
    root = tmp_path / "src"
    src = good_corpus(root, 9)
    cfg = _cfg("convert.unit_max_rows=3", f"convert.plan_uri={tmp_path / 'kept'}")
    old = [u["id"] for u in convert_units.plan(cfg, str(tmp_path / "p1"), str(src))["units"]]
    from tests.helpers import write_audio

    write_audio(root / "wavs" / "utt00004.wav", seconds=0.9, seed=99)  # in the second unit
    new = [u["id"] for u in convert_units.plan(cfg, str(tmp_path / "p2"), str(src))["units"]]
    assert new[0] == old[0] and new[2] == old[2] and new[1] != old[1]


# ---------------------------------------------------------------------------------------- tokenize fan-out

TOKENIZE = ["tokenize.audio_tokenizer.codebook_size=16", "tokenize.audio_tokenizer.fit_max_frames=100",
            "tokenize.vocab_size=300"]  # a BPE trained here: the text tokenizer is a global fit too


def _same_tokens(one: Path, fanned: Path) -> None:
    """Row for row (every column: ids, codes, mels, split), the same tokenizer files."""
    assert _rows(one) == _rows(fanned)
    for rel in ("tokenizer/tokenizer.json", "tokenizer/speakers.json", "tokenizer/mel.json",
                "tokenizer/audio/mel_kmeans.safetensors"):
        assert (one / rel).read_bytes() == (fanned / rel).read_bytes(), rel


def test_tokenize_fanout_equals_the_one_task_tokens_and_fits_once(tmp_path, monkeypatch):
    """The per-unit tokenize (set-up once, a row pass per convert part, merge) gives the one-task stage's Tokens
    of the merged Dataset; the codebook is fitted once, on a sample with rows of several units."""
    from audiotune.stages import tokenize_units
    from audiotune.stages.tokenize import tokenize
    from audiotune.tokenization.audio_tokenizers.mel_kmeans import MelKMeansTokenizer

    src = _corpus_with_bad_rows(tmp_path / "src", 14)
    cfg = _cfg(*TOKENIZE)
    dataset = str(tmp_path / "ds")
    convert_units.convert_fanout(cfg, dataset, source=str(src), workdir=str(tmp_path / "work"))
    parts = sorted(str(p) for p in (tmp_path / "work" / "parts").iterdir())[::-1]  # any order: the plan's wins
    assert len(parts) >= 3
    one = tokenize(cfg, dataset=dataset, output=str(tmp_path / "one"))

    fits = []
    fit = MelKMeansTokenizer.fit

    def counted(self, wavs, sample_rate, seed):
        wavs = list(wavs)
        fits.append(len(wavs))
        return fit(self, wavs, sample_rate, seed)

    monkeypatch.setattr(MelKMeansTokenizer, "fit", counted)
    fanned = tokenize_units.tokenize_fanout(cfg, dataset, parts, str(tmp_path / "fanned"),
                                            workdir=str(tmp_path / "tok-work"))
    assert len(fits) == 1  # once for the Dataset, not once per unit
    sample = fanned.report["fit"]
    assert fits[0] == sample["rows"] and sum(sample["rows_per_folder"]) == sample["rows"]
    assert sum(1 for n in sample["rows_per_folder"] if n) >= 2, sample  # the sample spans units
    _same_tokens(tmp_path / "one", tmp_path / "fanned")
    for key in ("rows", "quarantine_reasons", "audio_hours", "text_tokens", "audio_frames", "codebook_usage",
                "sequence_length_percentiles", "bad_fraction", "audio_tokens_per_second"):
        assert one.report[key] == fanned.report[key], key
    for key in ("splits", "quarantined", "text_tokenizer", "audio_tokenizer", "speakers", "dataset_fingerprint"):
        a, b = one.manifest[key], fanned.manifest[key]
        if key == "splits":
            a, b = ({s: v["rows"] for s, v in x.items()} for x in (a, b))
        assert a == b, key
    assert len(_rows(tmp_path / "fanned")["val"]) > 0


def test_the_fit_sample_chosen_from_bounded_unit_prefixes_is_the_whole_datasets():
    """Each unit offers only its key-order prefix up to fit seconds; the choice among those is the choice over all
    rows, for any split of the rows into units."""
    import random

    from audiotune.tokenization.tokenizer_setup import choose_fit_rows, fit_key, seconds_prefix

    rng = random.Random(0)
    for _ in range(200):
        units = [[(fit_key(3, f"r{k}-{i}"), f"r{k}-{i}", rng.uniform(0.2, 6.0)) for i in range(rng.randint(0, 25))]
                 for k in range(rng.randint(1, 6))]
        max_seconds = rng.uniform(0.5, 80.0)
        offered = [seconds_prefix(rows, max_seconds) for rows in units]
        assert choose_fit_rows([r for rows in offered for r in rows], max_seconds) == \
            choose_fit_rows([r for rows in units for r in rows], max_seconds)
        for rows, kept in zip(units, offered, strict=True):  # bounded: all but the last row hold < max_seconds
            assert sum(r[2] for r in kept[:-1]) < max_seconds and len(kept) <= len(rows)


def test_tokenize_fanout_refuses_parts_of_another_dataset_and_names_a_missing_unit(tmp_path):
    from audiotune.stages import tokenize_units

    cfg = _cfg(*TOKENIZE)
    convert_units.convert_fanout(cfg, str(tmp_path / "a"), source=str(good_corpus(tmp_path / "sa", 9)),
                                 workdir=str(tmp_path / "wa"))
    convert_units.convert_fanout(cfg, str(tmp_path / "b"), source=str(good_corpus(tmp_path / "sb", 9)),
                                 workdir=str(tmp_path / "wb"))
    parts_a = sorted(str(p) for p in (tmp_path / "wa" / "parts").iterdir())
    parts_b = sorted(str(p) for p in (tmp_path / "wb" / "parts").iterdir())
    with pytest.raises(tokenize_units.TokenizeUnitsError, match="is not in the Dataset's units"):
        tokenize_units.prepare(cfg, str(tmp_path / "a"), parts_a + parts_b[:1], str(tmp_path / "setup"))
    with pytest.raises(tokenize_units.TokenizeUnitsError, match="has no convert part"):
        tokenize_units.prepare(cfg, str(tmp_path / "a"), parts_a[1:], str(tmp_path / "setup"))
    setup = str(tmp_path / "setup")
    tokenize_units.prepare(cfg, str(tmp_path / "a"), parts_a, setup)
    with pytest.raises(tokenize_units.TokenizeUnitsError, match="is not one of the set-up's 3 units"):
        tokenize_units.tokenize_unit(cfg, setup, parts_b[0], str(tmp_path / "tb"))
    tokenize_units.tokenize_unit(cfg, setup, parts_a[0], str(tmp_path / "t0"))
    with pytest.raises(tokenize_units.TokenizeUnitsError, match="has no tokenized part .* re-run its tokenize_unit"):
        tokenize_units.merge(cfg, setup, [str(tmp_path / "t0")], str(tmp_path / "tokens"))
    assert not (tmp_path / "tokens").exists()


def test_tokenizer_setup_reads_parts_on_s3_by_columns(tmp_path, s3_env):
    """Convert parts on S3: the set-up reads their ids, durations, speakers and texts and the audio of the sampled
    shards only (ranged GETs), and builds the tokenizers the local parts give."""
    from audiotune.stages import tokenize_units
    from tests.helpers import write_audio

    rows = []
    for i in range(12):  # 3 s rows in shards of 2 rows: 6 shards of ~180 KB
        write_audio(tmp_path / "src" / f"u{i}.wav", seconds=3.0, seed=i)
        rows.append({"id": f"u{i:02d}", "audio": f"u{i}.wav", "text": f"row {i}", "speaker": f"s{i % 2}"})
    cfg = _cfg(*TOKENIZE, "convert.unit_max_rows=4", "convert.shard_max_rows=2")
    convert_units.convert_fanout(cfg, str(tmp_path / "ds"), source=str(write_jsonl(tmp_path / "src" / "m.jsonl",
                                                                                    rows)),
                                 workdir=str(tmp_path / "work"))
    local = sorted(str(p) for p in (tmp_path / "work" / "parts").iterdir())
    storage.upload_dir(tmp_path / "work" / "parts", f"{s3_env}/parts")
    remote = [f"{s3_env}/parts/{Path(p).name}" for p in local]
    a = tokenize_units.prepare(cfg, str(tmp_path / "ds"), local, str(tmp_path / "setup-local"))
    b = tokenize_units.prepare(cfg, str(tmp_path / "ds"), remote, str(tmp_path / "setup-s3"))
    assert a["fit"]["rows_per_folder"] == b["fit"]["rows_per_folder"] and b["parts"][0].startswith("s3://")
    for rel in ("tokenizer.json", "speakers.json", "audio/mel_kmeans.safetensors"):
        assert (tmp_path / "setup-local" / "tokenizer" / rel).read_bytes() == \
            (tmp_path / "setup-s3" / "tokenizer" / rel).read_bytes(), rel
    parts_bytes = sum(p.stat().st_size for p in (tmp_path / "work" / "parts").rglob("*.parquet"))
    # here most of what is read is pyarrow's 64 KiB footer read per shard (6 shards of ~180 KB); the audio of only
    # the two sampled rows' shards is read
    assert a["s3_bytes_read"] == 0 and 0 < b["s3_bytes_read"] < 0.8 * parts_bytes, (b["s3_bytes_read"], parts_bytes)


def test_merges_of_parts_on_s3_copy_shards_server_side_and_equal_the_local_merge(tmp_path, s3_env, monkeypatch):
    """Parts and output on S3: the merge downloads the parts' small files only (no shard passes through its disk),
    and the merged Dataset and Tokens hold the same rows, with checked checksums, as merges of local parts."""
    from audiotune import publish
    from audiotune.stages import tokenize_units

    src = good_corpus(tmp_path / "src", 10)
    cfg = _cfg(*TOKENIZE)
    local = convert_units.convert_fanout(cfg, str(tmp_path / "ds"), source=str(src), workdir=str(tmp_path / "w"))
    storage.upload_dir(tmp_path / "w", f"{s3_env}/w")
    parts = [f"{s3_env}/w/parts/{p.name}" for p in sorted((tmp_path / "w" / "parts").iterdir())]
    fetched, copied = [], []
    download, copy = storage.download, publish._copy_remote
    monkeypatch.setattr(storage, "download", lambda uri, dest: fetched.append(str(uri)) or download(uri, dest))
    monkeypatch.setattr(publish, "_copy_remote", lambda uri, remote: copied.extend(remote) or copy(uri, remote))
    merged = convert_units.merge(cfg, str(tmp_path / "w" / "plan"), parts, f"{s3_env}/ds")
    assert fetched and not [u for u in fetched if u.endswith(".parquet")]
    assert sorted(copied) == sorted(e["path"] for e in merged.manifest["shard_files"])
    assert merged.manifest["shard_files"] == local.manifest["shard_files"]
    assert _rows(storage.download(f"{s3_env}/ds", tmp_path / "ds-back")) == _rows(tmp_path / "ds")

    setup = tokenize_units.prepare(cfg, str(tmp_path / "ds"), [str(tmp_path / "w" / "parts" / Path(p).name)
                                                              for p in parts], str(tmp_path / "setup"))
    done = []
    for k, part in enumerate(setup["parts"]):
        done.append(str(tmp_path / "tp" / f"{k:05d}"))
        tokenize_units.tokenize_unit(cfg, str(tmp_path / "setup"), part, done[-1])
    one = tokenize_units.merge(cfg, str(tmp_path / "setup"), done, str(tmp_path / "tokens"))
    storage.upload_dir(tmp_path / "tp", f"{s3_env}/tp")
    fetched.clear()
    on_s3 = tokenize_units.merge(cfg, str(tmp_path / "setup"), [f"{s3_env}/tp/{Path(d).name}" for d in done],
                                 f"{s3_env}/tokens")
    assert fetched and not [u for u in fetched if u.endswith(".parquet")]
    assert on_s3.manifest["shard_files"] == one.manifest["shard_files"]
    back = storage.download(f"{s3_env}/tokens", tmp_path / "tokens-back")
    artifacts.verify_shards(back, json.loads((back / "manifest.json").read_text()), str(back))


def test_a_merge_publishes_straight_to_an_s3_artifact_uri(tmp_path):
    from audiotune.orchestration import data_fanout

    local = tmp_path / "minio" / "b" / "merge-data" / "dataset"
    assert data_fanout.publish_target("minio://b/merge-data/dataset", str(local)) == "s3://b/merge-data/dataset"
    assert local.is_dir() and not any(local.iterdir())  # the launcher's upload finds an empty folder
    assert data_fanout.publish_target(str(tmp_path / "x"), str(tmp_path / "x")) == str(tmp_path / "x")
    assert data_fanout.publish_target("gs://b/x", str(tmp_path / "g")) == str(tmp_path / "g")
