"""storage: local paths and S3 (a real moto server over HTTP), downloads, atomic publish."""

from __future__ import annotations

import json

import pytest

from audiotune import publish, storage


def _write_tree(root, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


TREE = {"manifest.json": b'{"kind": "audiotune.test"}', "a.txt": b"a", "sub/b.bin": b"\x00\x01", "sub/deep/c": b"c"}


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    """A root URI, local or S3 (the S3 one only asks for the server when used)."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_env")


def test_join_and_is_s3():
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/x")
    assert storage.join("s3://b/", "x/", "/y.json") == "s3://b/x/y.json"
    assert storage.join("s3://b/p") == "s3://b/p"
    assert storage.join("/tmp/a", "b", "c.txt") == "/tmp/a/b/c.txt"


def test_round_trips(base, tmp_path):
    uri = storage.join(base, "dir", "f.txt")
    assert not storage.exists(uri)
    storage.write_text(uri, "héllo")
    assert storage.exists(uri) and storage.exists(storage.join(base, "dir"))
    assert storage.read_text(uri) == "héllo"
    storage.write_bytes(storage.join(base, "dir", "g.bin"), b"\xff")
    assert storage.read_bytes(storage.join(base, "dir", "g.bin")) == b"\xff"
    assert storage.list_files(storage.join(base, "dir")) == ["f.txt", "g.bin"]
    # a prefix that is only a string prefix of another is not a directory
    assert not storage.exists(storage.join(base, "di"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(base, "nope.txt"))
    storage.delete(uri)
    assert not storage.exists(uri) and storage.exists(storage.join(base, "dir"))
    storage.delete(storage.join(base, "dir"))
    assert not storage.exists(storage.join(base, "dir"))
    storage.delete(storage.join(base, "dir"))  # missing is fine


def test_upload_list_download_prefix(base, tmp_path):
    _write_tree(tmp_path / "src", TREE)
    uri = storage.join(base, "art")
    storage.upload_dir(tmp_path / "src", uri)
    assert storage.list_files(uri) == sorted(TREE)
    out = storage.download(uri, tmp_path / "down")
    assert {p: (out / p).read_bytes() for p in TREE} == TREE
    one = storage.download(storage.join(uri, "sub/b.bin"), tmp_path / "one.bin")
    assert one.read_bytes() == b"\x00\x01"
    with pytest.raises(FileNotFoundError):
        storage.download(storage.join(base, "missing"), tmp_path / "x")


def test_local_copy_s3_uses_cache_while_manifest_unchanged(s3_env, tmp_path):
    _write_tree(tmp_path / "src", TREE)
    uri = f"{s3_env}/art"
    storage.upload_dir(tmp_path / "src", uri)
    cache = tmp_path / "cache"
    first = storage.local_copy(uri, cache_dir=cache)
    assert (first / "sub/deep/c").read_bytes() == b"c"
    (first / "a.txt").write_bytes(b"local edit")
    assert storage.local_copy(uri, cache_dir=cache) == first
    assert (first / "a.txt").read_bytes() == b"local edit"  # cache hit: not downloaded again
    storage.write_text(f"{uri}/manifest.json", '{"kind": "audiotune.test", "v": 2}')
    again = storage.local_copy(uri, cache_dir=cache)
    assert (again / "a.txt").read_bytes() == b"a"
    assert json.loads((again / "manifest.json").read_text())["v"] == 2
    assert storage.local_copy(str(tmp_path / "src")) == tmp_path / "src"


def test_local_copy_caches_a_plain_prefix_once_across_processes(s3_env, tmp_path):
    """A base model folder has no manifest: cached by its objects' ETags; concurrent ranks download it once."""
    import subprocess
    import sys

    model = {"config.json": b"{}", "model.safetensors": b"w" * 1000, "tokenizer.json": b"{}"}
    _write_tree(tmp_path / "model", model)
    uri = f"{s3_env}/models/base"
    storage.upload_dir(tmp_path / "model", uri)
    cache = tmp_path / "cache"
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout); "
            "from audiotune import storage; print('PATH', storage.local_copy(sys.argv[1], cache_dir=sys.argv[2]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, str(cache)], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({line for out in outs for line in out.splitlines() if line.startswith("PATH")}) == 1
    assert sum(out.count("downloaded") for out in outs) == 1  # one rank downloaded, the others reused it
    path = storage.local_copy(uri, cache_dir=cache)
    (path / "model.safetensors").write_bytes(b"local edit")
    assert storage.local_copy(uri, cache_dir=cache) == path and (path / "model.safetensors").read_bytes() == \
        b"local edit"  # unchanged source: a cache hit
    storage.write_bytes(f"{uri}/model.safetensors", b"v" * 1000)  # new weights: downloaded again
    assert storage.local_copy(uri, cache_dir=cache).joinpath("model.safetensors").read_bytes() == b"v" * 1000
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.local_copy(f"{s3_env}/models/missing", cache_dir=cache)


def test_publish_then_refuse_then_overwrite(base):
    uri = storage.join(base, "out", "ds")
    with publish.publish_dir(uri) as staging:
        _write_tree(staging, TREE)
    assert storage.list_files(uri) == sorted(TREE)
    with pytest.raises(FileExistsError, match="ds"):
        with publish.publish_dir(uri):
            raise AssertionError("the block must not run for an existing target")
    with publish.publish_dir(uri, overwrite=True) as staging:
        _write_tree(staging, {"manifest.json": b"{}", "new.txt": b"n"})
    assert storage.list_files(uri) == ["manifest.json", "new.txt"]
    assert storage.read_text(storage.join(uri, "manifest.json")) == "{}"


def test_publish_local_leaves_no_staging(tmp_path):
    target = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        with publish.publish_dir(target) as staging:
            assert staging.parent == tmp_path and staging.name.startswith(".ds.tmp-")
            _write_tree(staging, TREE)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with publish.publish_dir(target) as staging:
        _write_tree(staging, TREE)
    with publish.publish_dir(target, overwrite=True) as staging:
        _write_tree(staging, {"manifest.json": b"{}"})
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_publish_exception_publishes_nothing(base):
    uri = storage.join(base, "ds")
    with pytest.raises(RuntimeError, match="boom"):
        with publish.publish_dir(uri) as staging:
            _write_tree(staging, TREE)
            raise RuntimeError("boom")
    assert not storage.exists(uri)
    assert not staging.exists()


def test_publish_s3_interrupted_upload_leaves_no_manifest(s3_env, monkeypatch):
    uri = f"{s3_env}/ds"
    real = storage.client()
    uploaded: list[str] = []

    class Flaky:
        """Forwards to the real client but fails on the third upload."""

        def __getattr__(self, name):
            return getattr(real, name)

        def upload_file(self, filename, bucket, key):
            if len(uploaded) == 2:
                raise OSError("connection dropped")
            uploaded.append(key)
            real.upload_file(filename, bucket, key)

    files = {f"part-{i}.bin": bytes([i]) for i in range(4)} | {"manifest.json": b"{}"}
    with monkeypatch.context() as patch:
        patch.setattr(storage, "run_all", lambda fn, items: [fn(i) for i in items])
        patch.setattr(storage, "client", lambda: Flaky())
        with pytest.raises(OSError, match="connection dropped"):
            with publish.publish_dir(uri) as staging:
                _write_tree(staging, files)
    assert len(storage.list_files(uri)) == 2
    assert not storage.exists(f"{uri}/manifest.json")
    assert all(not k.endswith("manifest.json") for k in uploaded)
    # what the interrupted upload left is no artifact: a retry (no overwrite) publishes and replaces it
    assert not publish.holds_artifact(uri)
    retry = {"part-9.bin": b"9", "manifest.json": b"{}"}
    with publish.publish_dir(uri) as staging:
        _write_tree(staging, retry)
    assert storage.list_files(uri) == sorted(retry) and publish.holds_artifact(uri)


def test_s3_manifest_uploaded_last(s3_env, monkeypatch):
    order: list[str] = []
    real_upload = storage.upload_files
    monkeypatch.setattr(storage, "upload_files", lambda d, u, rels: (order.extend(rels), real_upload(d, u, rels)))
    with publish.publish_dir(f"{s3_env}/ds") as staging:
        _write_tree(staging, TREE)
    assert order[-1] == "manifest.json" and sorted(order) == sorted(TREE)


def test_client_follows_endpoint_env(s3_env, monkeypatch):
    first = storage.client()
    assert storage.client() is first
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert storage.client() is not first
