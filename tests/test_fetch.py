"""The weights fetcher against a real HTTP server on 127.0.0.1 serving a tiny-weights tree."""

from __future__ import annotations

import json
import shutil

import pytest

from flux import weights
from flux.config import Config
from flux.errors import SetupError
from flux.fetch import FetchError, WeightsRemote, fetch
from flux.pipeline import load_model
from tests.conftest import fetch_policy
from tests.weights_server import Faults, serve_tree

BIG = "transformer/diffusion_pytorch_model-00001-of-00003.safetensors"


@pytest.fixture
def manifest(tiny_weights):
    return json.loads((tiny_weights / weights.TREE_MANIFEST_NAME).read_text())


def mirror(url: str, token: str | None = None) -> WeightsRemote:
    """The weights from a mirror at ``url`` (the tests' loopback server, which FLUX_FETCH_ALLOW allows)."""
    return WeightsRemote(base_url=url, token=token, policy=fetch_policy())


def gets(log, path=None):
    return [r for r in log.requests if r["method"] == "GET" and (path is None or r["path"] == path)]


def test_fresh_fetch_is_accepted_by_setup_and_second_run_downloads_nothing(tiny_weights, manifest, tmp_path):
    out = tmp_path / "weights"
    with serve_tree(tiny_weights, Faults(delay=0.05)) as (url, log):
        report = fetch(out, manifest, mirror(url), workers=4, progress=False)
        assert len(report.downloaded) == len(manifest["files"])
        assert log.max_in_flight > 1  # several files at once
        assert weights.problems(out) == []
        model = load_model(Config.from_env(WEIGHTS_DIR=str(out)))
        assert model.components.transformer is not None
        before = len(log.requests)
        again = fetch(out, manifest, mirror(url), progress=False)
        assert again.downloaded == [] and len(again.skipped) == len(manifest["files"])
        assert len(log.requests) == before  # recognised by sizes, nothing asked of the server


def test_dropped_connection_is_resumed_with_range(tiny_weights, manifest, tmp_path):
    out = tmp_path / "weights"
    size = (tiny_weights / BIG).stat().st_size
    cut = size // 3
    with serve_tree(tiny_weights, Faults(drop_after={BIG: cut})) as (url, log):
        fetch(out, manifest, mirror(url), progress=False, backoff=0.01)
    requests = gets(log, BIG)
    assert requests[0]["range"] is None
    assert requests[1]["range"] == f"bytes={cut}-"
    assert (out / BIG).read_bytes() == (tiny_weights / BIG).read_bytes()
    assert weights.problems(out) == []


def test_wrong_bytes_never_reach_the_final_path(tiny_weights, manifest, tmp_path):
    out = tmp_path / "weights"
    with serve_tree(tiny_weights, Faults(corrupt={BIG})) as (url, _), pytest.raises(FetchError, match="sha256"):
        fetch(out, manifest, mirror(url), progress=False)
    assert not (out / BIG).exists()
    assert not (out / (BIG + ".part")).exists()
    assert list((out / ".rejected").rglob("*.part.*"))
    with pytest.raises(SetupError, match=f"missing: {BIG}"):
        load_model(Config.from_env(WEIGHTS_DIR=str(out)))


def test_stale_partial_file_never_reaches_the_final_path(tiny_weights, manifest, tmp_path):
    out = tmp_path / "weights"
    partial = out / (BIG + ".part")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\x00" * 100)  # bytes from some other file, left by an earlier run
    with serve_tree(tiny_weights) as (url, log):
        with pytest.raises(FetchError, match="sha256"):
            fetch(out, manifest, mirror(url), progress=False)
        assert gets(log, BIG)[0]["range"] == "bytes=100-"
        assert not (out / BIG).exists()
        fetch(out, manifest, mirror(url), progress=False)  # the bad partial was set aside: a clean retry
    assert (out / BIG).read_bytes() == (tiny_weights / BIG).read_bytes()


def test_token_is_sent_and_401_explains_the_licence(tiny_weights, manifest, tmp_path, monkeypatch):
    secret = "hf_testsecret123"
    with serve_tree(tiny_weights, Faults(token=secret)) as (url, log):
        monkeypatch.delenv("HF_TOKEN", raising=False)
        with pytest.raises(FetchError) as info:
            fetch(tmp_path / "a", manifest, mirror(url), progress=False)
        assert "HTTP 401" in str(info.value) and "licence" in str(info.value) and "HF_TOKEN" in str(info.value)
        monkeypatch.setenv("HF_TOKEN", secret)
        remote = WeightsRemote.from_config(Config.from_env(WEIGHTS_BASE_URL=url))  # the operator's HF_TOKEN
        fetch(tmp_path / "b", manifest, remote, progress=False)
    assert all(r["authorization"] == f"Bearer {secret}" for r in gets(log)[-len(manifest["files"]) :])


def test_404_and_full_disk_are_clear(tiny_weights, manifest, tmp_path, monkeypatch):
    missing = {**manifest, "files": [*manifest["files"], {"path": "extra/none.bin", "size": 3, "sha256": None}]}
    with serve_tree(tiny_weights) as (url, _):
        with pytest.raises(FetchError, match="not found"):
            fetch(tmp_path / "a", missing, mirror(url), progress=False)
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 10))
        with pytest.raises(FetchError, match="not enough free disk"):
            fetch(tmp_path / "b", manifest, mirror(url), progress=False)


def test_rehash_detects_a_corrupted_file_of_the_right_size(tiny_weights, manifest, tmp_path):
    out = tmp_path / "weights"
    shutil.copytree(tiny_weights, out)
    data = bytearray((out / BIG).read_bytes())
    data[-1] ^= 0xFF
    (out / BIG).write_bytes(bytes(data))
    with serve_tree(tiny_weights) as (url, log):
        assert fetch(out, manifest, mirror(url), progress=False).downloaded == []  # sizes look right
        report = fetch(out, manifest, mirror(url), rehash=True, progress=False)
    assert report.downloaded == [BIG]
    assert (out / BIG).read_bytes() == (tiny_weights / BIG).read_bytes()


def test_setup_lists_wrong_sizes(tiny_weights, tmp_path):
    out = tmp_path / "weights"
    shutil.copytree(tiny_weights, out)
    with open(out / BIG, "ab") as f:
        f.write(b"junk")
    with pytest.raises(SetupError, match=f"wrong size: {BIG}"):
        load_model(Config.from_env(WEIGHTS_DIR=str(out)))


def test_the_token_never_follows_a_redirect_off_the_mirror(tiny_weights, manifest, tmp_path):
    """The mirror answers every file with a 302 to another server (a CDN): that server serves the
    files and never sees the token."""
    secret = "hf_mirrorsecret123"
    with serve_tree(tiny_weights) as (cdn, cdn_log):
        redirects = {e["path"]: f"{cdn}/{e['path']}" for e in manifest["files"]}
        with serve_tree(tiny_weights, Faults(redirects=redirects)) as (origin, mirror_log):
            fetch(tmp_path / "w", manifest, mirror(origin, secret), progress=False)
    assert weights.problems(tmp_path / "w") == []
    assert {r["authorization"] for r in mirror_log.requests} == {f"Bearer {secret}"}
    assert {r["authorization"] for r in cdn_log.requests} == {None}
