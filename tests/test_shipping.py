"""Shipping: a lean build context, the real weights pinned, and setup() fetching missing weights
from a mirror or the Hub (both played by an HTTP server on 127.0.0.1), verified before loading."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from flux import weights
from flux.config import Config
from flux.errors import SetupError
from flux.fetch import FetchError, WeightsRemote, fetch
from flux.lab.build_context import build_context
from tests.test_predict import DEFAULTS, make_predictor
from tests.weights_server import Faults, serve_tree

ROOT = Path(__file__).resolve().parent.parent
REVISION = "0123456789abcdef0123456789abcdef01234567"


def test_build_context_holds_the_code_and_nothing_else(tmp_path):
    for junk in (".venv/lib/big.so", ".cache/tiny-weights/x.safetensors", "outputs/out.png", ".whl/torchao.whl",
                 "weights/transformer/diffusion_pytorch_model-00001-of-00003.safetensors", "flux/__pycache__/a.pyc"):  # fmt: skip
        (tmp_path / junk).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / junk).write_bytes(b"x" * 1000)
    for kept in ("predict.py", "cog.yaml", "flux/edit.py", "taylor_utils.py", "weights_manifest.json"):
        (tmp_path / kept).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / kept).write_text("x")
    shutil.copy(ROOT / ".dockerignore", tmp_path / ".dockerignore")
    paths = {p for p, _ in build_context(tmp_path)}
    assert {"predict.py", "cog.yaml", "flux/edit.py", "taylor_utils.py", "weights_manifest.json"} <= paths
    assert not any(
        p.startswith((".venv", ".cache", "outputs", ".whl", "weights/")) or "__pycache__" in p for p in paths
    )
    baked = {p for p, _ in build_context(tmp_path, bake=True)}
    assert "weights/transformer/diffusion_pytorch_model-00001-of-00003.safetensors" in baked


def test_this_projects_build_context_is_small():
    files = build_context(ROOT)
    paths = [p for p, _ in files]
    for needed in ("predict.py", "cog.yaml", "requirements-gpu.txt", "requirements.txt", "weights_manifest.json",
                   "taylor_utils.py", "flux/pipeline.py", "flux/lora.py"):  # fmt: skip
        assert needed in paths
    assert not any(p.startswith(("tests/", ".venv/", ".cache/", "flux/lab/", "flux/proxy_weights/")) for p in paths)
    assert sum(size for _, size in files) < 1_000_000


def test_the_real_manifest_is_pinned():
    manifest = weights.load_manifest()
    for source in manifest["sources"].values():
        assert re.fullmatch(r"[0-9a-f]{40}", source["revision"])
    assert manifest["sources"]["flux"]["revision"] == "24e9dedc4ef646698dc8eb4e18ae2cec3c9fea0d"
    pinned = {f["path"]: (f["size"], f["sha256"]) for f in manifest["files"] if f["sha256"]}
    assert pinned["vae/diffusion_pytorch_model.safetensors"] == (
        167666902, "f5b59a26851551b67ae1fe58d32e76486e1e812def4696a4bea97f16604d40a3"
    )  # fmt: skip
    assert len(pinned) == 13


def _hub(tmp_path: Path, tree: Path, wrong: str | None = None) -> tuple[Path, dict]:
    """A Hub laid out on disk: files under REPO/resolve/REVISION/, the paths-info answer, and a
    manifest with no sizes or hashes that names the repo at REVISION."""
    hub = tmp_path / "hub"
    own = json.loads((tree / weights.TREE_MANIFEST_NAME).read_text())
    manifest = {"sources": {"m": {"repository": "test/tiny", "revision": REVISION}}, "files": []}
    info = []
    for entry in own["files"]:
        target = hub / "test" / "tiny" / "resolve" / REVISION / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tree / entry["path"], target)
        sha = hashlib.sha256((tree / entry["path"]).read_bytes()).hexdigest()
        if entry["path"] == wrong:
            sha = "0" * 64
        info.append({"type": "file", "path": entry["path"], "size": entry["size"], "oid": "x",
                     "lfs": {"oid": sha, "size": entry["size"]}})  # fmt: skip
        manifest["files"].append(
            {"path": entry["path"], "source": "m", "remote": entry["path"], "size": None, "sha256": None}
        )
    api = hub / "api" / "models" / "test" / "tiny" / "paths-info" / REVISION
    api.parent.mkdir(parents=True, exist_ok=True)
    api.write_text(json.dumps(info))
    return hub, manifest


def test_hub_reported_hashes_reject_a_mismatch_even_without_manifest_hashes(tiny_weights, tmp_path, monkeypatch):
    wrong = "transformer/config.json"
    hub, manifest = _hub(tmp_path, tiny_weights, wrong=wrong)
    with serve_tree(hub) as (url, log):
        monkeypatch.setenv("HF_ENDPOINT", url)
        with pytest.raises(FetchError, match=rf"{re.escape(wrong)}: sha256 \w+ does not match 0000"):
            fetch(tmp_path / "weights", manifest, WeightsRemote.from_config(Config.from_env()), progress=False)
        assert not (tmp_path / "weights" / wrong).exists()
        assert list((tmp_path / "weights" / ".rejected").rglob("config.json*"))
        files = [r["path"] for r in log.requests if r["method"] == "GET"]
        assert files and all(f"/resolve/{REVISION}/" in p for p in files)  # the pinned revision is what is asked
        assert [r["path"] for r in log.requests if r["method"] == "POST"] == [
            f"api/models/test/tiny/paths-info/{REVISION}"
        ]


def test_setup_fetches_from_a_mirror_verifies_and_loads(tiny_weights, tmp_path, monkeypatch):
    """An empty weights folder, WEIGHTS_BASE_URL set: setup() fetches, verifies (sha256 from the
    Hub, here the same local server) and loads; a prediction then works."""
    hub, manifest = _hub(tmp_path, tiny_weights)
    mirror = hub / "test" / "tiny" / "resolve" / REVISION
    # the tree's own manifest names what it must hold (the tiny model's files, at the stand-in Hub)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / weights.TREE_MANIFEST_NAME).write_text(json.dumps(manifest))
    with serve_tree(hub) as (url, log):
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("WEIGHTS_BASE_URL", f"{url}/test/tiny/resolve/{REVISION}")
        monkeypatch.setenv("FLUX_OUTPUT_DIR", str(tmp_path / "out"))
        predictor = make_predictor(tmp_path / "weights", monkeypatch)
        assert "fetch" in predictor.model.seconds and weights.problems(tmp_path / "weights") == []
        gets = [r["path"] for r in log.requests if r["method"] == "GET"]
        assert len(gets) == len(manifest["files"])
    for entry in manifest["files"]:
        assert (tmp_path / "weights" / entry["path"]).read_bytes() == (mirror / entry["path"]).read_bytes()
    from tests.conftest import image_bytes, random_image

    source = tmp_path / "in.png"
    source.write_bytes(image_bytes(random_image(64, 48)))
    from cog import Path as CogPath

    assert Path(predictor.predict(prompt="x", input_image=CogPath(source), **DEFAULTS)).is_file()


def test_without_weights_or_a_source_setup_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("WEIGHTS_BASE_URL", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(SetupError, match="set WEIGHTS_BASE_URL"):
        make_predictor(tmp_path / "weights", monkeypatch)


def test_a_mirror_with_a_bad_file_fails_setup_and_loads_nothing(tiny_weights, tmp_path, monkeypatch):
    hub, manifest = _hub(tmp_path, tiny_weights)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / weights.TREE_MANIFEST_NAME).write_text(json.dumps(manifest))
    with serve_tree(hub, Faults(corrupt={f"test/tiny/resolve/{REVISION}/vae/config.json"})) as (url, _):
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("WEIGHTS_BASE_URL", f"{url}/test/tiny/resolve/{REVISION}")
        with pytest.raises(FetchError, match="vae/config.json: sha256"):
            make_predictor(tmp_path / "weights", monkeypatch)
    assert not (tmp_path / "weights" / "vae" / "config.json").exists()


def test_the_image_runs_the_command_line_to_the_missing_weights_message(tmp_path):
    """What `cog build` puts in the image (the build context: no flux/lab, no proxy weights) runs
    `python -m flux edit` with no weights to the message that lists what is missing and how to fetch
    it, and `python -m flux download` is there to fetch it."""
    import os
    import subprocess
    import sys

    from tests.conftest import image_bytes, random_image

    image = tmp_path / "image"
    for path, _ in build_context(ROOT):
        (image / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path, image / path)
    assert not (image / "flux" / "lab").exists() and not (image / "flux" / "proxy_weights").exists()
    (tmp_path / "in.png").write_bytes(image_bytes(random_image(64, 48)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WEIGHTS_BASE_URL", "HF_TOKEN")}
    env["WEIGHTS_DIR"] = str(tmp_path / "src" / "weights")  # cog.yaml's /src/weights, absent
    command = [sys.executable, "-m", "flux", "edit", "--image", str(tmp_path / "in.png"), "--prompt", "make it red",
               "--out", str(tmp_path / "out.png")]  # fmt: skip
    done = subprocess.run(command, cwd=image, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"error: the weights in {tmp_path / 'src' / 'weights'} are incomplete" in done.stderr
    assert "missing: transformer/diffusion_pytorch_model-00001-of-00003.safetensors" in done.stderr
    assert "python -m flux download --out" in done.stderr and "WEIGHTS_BASE_URL" in done.stderr
    assert "Traceback" not in done.stderr and "--proxy" not in done.stderr and not (tmp_path / "out.png").exists()
    helped = subprocess.run([sys.executable, "-m", "flux", "download", "--help"], cwd=image, env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert helped.returncode == 0 and "--base-url" in helped.stdout
