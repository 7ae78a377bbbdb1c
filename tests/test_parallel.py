"""One edit across 2 CPU processes (gloo on loopback): the same latents as one process within 1e-4
at every size a request can make, every level, references in each mode, a LoRA and its restore;
a killed worker fails clearly; no worker outlives its parent."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flux import sizes
from flux.config import Config
from flux.edit import edit
from flux.lab.loras import make_lora, write_lora
from flux.lab.plans import direct, lab_plan
from flux.loading import load_components
from flux.pipeline import load_model, plan_edit, run_edit
from flux.request import EditRequest
from tests.conftest import image_bytes, lora_store, random_image
from tests.weights_server import serve_tree

TOLERANCE = 1e-4
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tiny_weights):
    """The tiny model in one process, and across two (rank 0 here, one worker process)."""
    single = load_components(tiny_weights)
    parallel = load_model(Config.from_env(WEIGHTS_DIR=str(tiny_weights), FLUX_CONTEXT_PARALLEL="2"), with_safety=False)
    yield single, parallel
    parallel.close()


def _same_edit(models, image, settings, references=()):
    """The parallel model's edit through the product path, and one process at the size it chose."""
    single, parallel = models
    request = EditRequest(image=image_bytes(image), check_safety=False,
                          references=tuple(image_bytes(r) for r in references), **settings)  # fmt: skip
    result = run_edit(parallel, request)
    width, height = result.image.size
    plan = lab_plan(single, image, request.prompt, width, height, request.seed, num_steps=request.num_steps,
                    acceleration=request.acceleration, mode=request.multi_image_mode, references=references)  # fmt: skip
    reference = edit(single, image, plan, references=list(references), transformer=direct(single))
    return result, reference


def test_the_token_axis_divides_and_the_latents_match_at_many_sizes(models):
    rng = random.Random(7)
    shapes = [(rng.randint(8, 700), rng.randint(8, 700)) for _ in range(10)]
    odd = 0
    for width, height in shapes:
        image = random_image(width, height, seed=width)
        plain = sizes.output_size("match_input_image", width, height, 256)
        condition = sizes.tokens(*sizes.conditioning_size(width, height, 256))
        odd += (sizes.tokens(*plain) + condition) % 2
        result, reference = _same_edit(models, image, {"prompt": "make it red", "seed": 3, "num_steps": 4})
        assert (sizes.tokens(*result.image.size) + condition) % 2 == 0
        assert abs(result.image.width - plain[0]) <= 64 and abs(result.image.height - plain[1]) <= 64
        assert (result.latents - reference.latents).abs().max().item() <= TOLERANCE
    assert odd > 0  # some of these sizes had an odd token count and were moved to the nearest even one


@pytest.mark.parametrize("ratio", sizes.ASPECT_RATIO_CHOICES[1:])
def test_every_explicit_aspect_ratio(models, ratio):
    image = random_image(90, 60, seed=1)
    result, reference = _same_edit(models, image, {"prompt": "x", "seed": 1, "num_steps": 4, "aspect_ratio": ratio})
    assert (result.latents - reference.latents).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("level", ["none", "go fast", "go really fast"])
def test_every_level(models, level):
    image = random_image(120, 80, seed=2)
    settings = {"prompt": "make it blue", "seed": 5, "num_steps": 10, "acceleration": level}
    result, reference = _same_edit(models, image, settings)
    assert (result.latents - reference.latents).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("mode", ["offset", "stitch", "index"])
def test_references_in_each_mode(models, mode):
    image, references = random_image(100, 70, seed=3), [random_image(50, 90, seed=4), random_image(33, 33, seed=5)]
    settings = {"prompt": "combine", "seed": 2, "num_steps": 4, "multi_image_mode": mode}
    result, reference = _same_edit(models, image, settings, references)
    assert (result.latents - reference.latents).abs().max().item() <= TOLERANCE


def test_a_lora_on_every_rank_and_its_exact_restore(models, tiny_weights, tmp_path, monkeypatch):
    from flux.lora_sources import LoraRequest

    single, parallel = models
    monkeypatch.setenv("FLUX_LORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(parallel, "loras", lora_store())
    write_lora(tmp_path / "site" / "l.safetensors", make_lora(single.transformer, "peft", rank=4, seed=1))
    image = random_image(64, 48, seed=6)
    plain = EditRequest("x", image_bytes(image), seed=4, num_steps=4, check_safety=False)
    base = run_edit(parallel, plain).latents
    with serve_tree(tmp_path / "site") as (url, _):
        loras = (LoraRequest(f"{url}/l.safetensors", 0.8),)
        with_lora = run_edit(parallel, dataclasses.replace(plain, loras=loras)).latents
    from flux.lora import LoraState, convert

    state = LoraState(single.transformer)
    state.apply([(convert(next((tmp_path / "cache").glob("*.safetensors")), "l", single.transformer), 0.8)])
    plan = plan_edit(parallel, plain, image, [])
    plan = lab_plan(single, image, "x", plan.width, plan.height, 4, num_steps=4)
    reference = edit(single, image, plan, transformer=direct(single)).latents
    state.apply([])
    assert (with_lora - reference).abs().max().item() <= TOLERANCE and not torch.equal(with_lora, base)
    restored = run_edit(parallel, plain).latents
    assert torch.equal(restored, base)


def _running(pid: int) -> bool:
    """The process exists and is not a zombie waiting for a parent that is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


KILLED_WORKER = """
import json, os, signal, sys, time
sys.path.insert(0, ROOT)
from flux.config import Config
from flux.errors import EditError
from flux.pipeline import load_model, run_edit
from flux.request import EditRequest
from tests.conftest import image_bytes, random_image
model = load_model(Config.from_env(), with_safety=False)
request = EditRequest("x", image_bytes(random_image(64, 64)), seed=1, num_steps=4, check_safety=False)
run_edit(model, request)
worker = model.runtime.workers.processes[0]
os.kill(worker.pid, SIGNAL)
if SIGNAL == signal.SIGKILL:
    worker.wait(timeout=10)
report = {}
for name in ("first", "next"):
    start = time.monotonic()
    try:
        run_edit(model, request)
        report[name] = ["succeeded", 0]
    except EditError as exc:
        report[name] = [str(exc), time.monotonic() - start]
model.runtime.workers.close(wait_s=5)
report["left"] = [p.poll() is None for p in model.runtime.workers.processes]
print(json.dumps(report))
"""


def _run_rank_zero(script: str, tiny_weights, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """``script`` as rank 0 of its own 2-process group, in a process of its own (one group per process)."""
    code = script.replace("ROOT", repr(str(ROOT)))
    environment = {**os.environ, "FLUX_CONTEXT_PARALLEL": "2", "WEIGHTS_DIR": str(tiny_weights), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=environment, cwd=ROOT)  # fmt: skip


@pytest.mark.parametrize(
    "signal_name, deadline_s, said",
    [("SIGKILL", 10, "context-parallel worker exited"), ("SIGSTOP", 5, "context-parallel worker stopped answering")],
)
def test_a_dead_or_hung_worker_fails_the_edit_clearly_within_the_deadline(tiny_weights, signal_name, deadline_s, said):
    """A worker killed, or stopped (a hang: alive, never answering): the next edit fails with a
    clear message within the collective deadline, the one after at once, and no worker is left."""
    import json

    script = KILLED_WORKER.replace("SIGNAL", f"signal.{signal_name}")
    result = _run_rank_zero(script, tiny_weights, FLUX_CONTEXT_PARALLEL_TIMEOUT_S=str(deadline_s))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    (first, first_s), (following, following_s) = report["first"], report["next"]
    assert said in first and "until it is restarted" in first, first
    assert "EditError" not in first
    assert first_s < deadline_s + 10  # within the collective deadline (and a loaded machine's delays)
    assert following == first and following_s < deadline_s / 2  # told at once: no second wait for the deadline
    assert report["left"] == [False]


PARENT = """
import sys, time
sys.path.insert(0, ROOT)
from flux.config import Config
from flux.pipeline import load_model
model = load_model(Config.from_env(), with_safety=False)
print("ready", flush=True)
time.sleep(60)
"""


def test_workers_end_with_shutdown_and_with_their_parent(tiny_weights, tmp_path):
    """A parent that exits without closing (killed) still leaves no worker behind."""
    code = PARENT.replace("ROOT", repr(str(ROOT)))
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "FLUX_CONTEXT_PARALLEL": "2", "WEIGHTS_DIR": str(tiny_weights)})  # fmt: skip
    try:
        assert parent.stdout.readline().strip() == "ready"
        workers = _children(parent.pid)
        assert len(workers) == 1
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_running(w) for w in workers):
            time.sleep(0.2)
        assert not any(_running(w) for w in workers)
    finally:
        parent.kill()


def test_through_the_cog_server_and_no_worker_after_shutdown(tiny_weights, tmp_path):
    """Two servers, one process and two: the same image for the same request; after the parallel
    server stops, its worker is gone."""
    from tests.cog_server import cog_server, data_uri, decode_output

    request = {"prompt": "make it red", "num_inference_steps": 4, "seed": 9, "output_format": "png",
               "input_image": data_uri(image_bytes(random_image(90, 70, seed=8))), "acceleration": "go really fast"}  # fmt: skip
    images = []
    for ranks in ("1", "2"):
        work = tmp_path / ranks
        work.mkdir()
        with cog_server(tiny_weights, work, env={"FLUX_CONTEXT_PARALLEL": ranks}) as server:
            status, body = server.predict(**request)
            assert status == 200 and body["status"] == "succeeded", body
            images.append(decode_output(body["output"]))
            workers = [p for child in _children(server.process.pid) for p in _children(child)]
            assert len(workers) == int(ranks) - 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_running(w) for w in workers):
            time.sleep(0.2)
        assert not any(_running(w) for w in workers)
    import io

    import numpy as np
    from PIL import Image

    one, two = (np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16) for data in images)
    assert one.shape == two.shape and np.abs(one - two).max() <= 1


COMPILED = """
import json, sys
from pathlib import Path
sys.path.insert(0, ROOT)
import torch, torch._dynamo
from flux.config import Config
from flux.pipeline import load_model, run_edit
from flux.request import EditRequest
from tests.conftest import image_bytes, random_image
from flux.lab.loras import make_lora, write_lora
from flux.lora_sources import LoraRequest
from tests.weights_server import serve_tree
model = load_model(Config.from_env(), with_safety=False)  # compiles in its warm-up, on both ranks
write_lora(SITE / "l.safetensors", make_lora(model.components.transformer, "peft", rank=4, seed=1))
before = model.runtime.compiled_frames()
seen = []
def request(w, h, **changes):
    return EditRequest("x", image_bytes(random_image(w, h)), **{"seed": 1, "num_steps": 4, "check_safety": False, **changes})
with torch._dynamo.config.patch(error_on_recompile=True), serve_tree(SITE) as (url, _):
    for w, h in [(90, 60), (37, 100), (200, 199), (640, 90), (64, 64)]:
        seen.append(run_edit(model, request(w, h)).image.size)
    references = (image_bytes(random_image(50, 90)), image_bytes(random_image(33, 33)))
    for mode in ("offset", "stitch"):
        run_edit(model, request(100, 70, references=references, multi_image_mode=mode))
    applied = []
    for loras in ((LoraRequest(f"{url}/l.safetensors", 0.8),), ()):  # a LoRA, then its restore
        edited = run_edit(model, request(80, 80, num_steps=6, acceleration="go really fast", loras=loras))
        applied.append(len(edited.report.loras))
after = model.runtime.compiled_frames()
model.close()
print(json.dumps({"before": before, "after": after, "loras_applied": applied,
                  "sizes": seen, "fast_path": model.runtime.decided.summary()}))
"""


def test_compiled_nothing_compiles_during_requests(tiny_weights, tmp_path):
    """Dynamic shapes under context parallelism (dynamo, eager backend): the warm-up compiles, the
    requests that follow, at other sizes, with references in two modes, with a LoRA and after its
    restore, at another level, compile nothing on any rank (each rank's dynamo counter, gathered
    from the worker too)."""
    import json

    (tmp_path / "site").mkdir()
    script = COMPILED.replace("SITE", f"Path({str(tmp_path / 'site')!r})")
    result = _run_rank_zero(script, tiny_weights, timeout=300, FLUX_COMPILE="1", FLUX_COMPILE_BACKEND="eager",
                            FLUX_LORA_CACHE=str(tmp_path / "cache"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["fast_path"]["context_parallel"] == "ulysses x2" and report["fast_path"]["compile"] == "eager"
    assert len(report["before"]) == 2 and min(report["before"]) > 0  # the warm-up compiled on both ranks
    assert report["after"] == report["before"] and len({tuple(s) for s in report["sizes"]}) >= 4
    assert report["loras_applied"] == [1, 0]


def test_a_dead_worker_makes_the_cog_server_unhealthy(tiny_weights, tmp_path):
    """Kill the worker of a parallel Cog server: /health-check says UNHEALTHY (the platform's cue to
    replace the container) and a prediction fails with the clear message."""
    from tests.cog_server import cog_server, data_uri

    with cog_server(tiny_weights, tmp_path, env={"FLUX_CONTEXT_PARALLEL": "2",
                                                 "FLUX_CONTEXT_PARALLEL_TIMEOUT_S": "10"}) as server:  # fmt: skip
        assert server.settled_health() == "READY"
        (worker,) = [p for child in _children(server.process.pid) for p in _children(child)]
        os.kill(worker, signal.SIGKILL)
        assert server.health_within("UNHEALTHY", 10) == "UNHEALTHY"
        status, body = server.predict(prompt="x", input_image=data_uri(image_bytes(random_image(32, 32))),
                                      num_inference_steps=4)  # fmt: skip
        assert status == 200 and body["status"] == "failed", body
        assert "context-parallel worker exited" in body["error"] and "Traceback" not in body["error"]


def test_when_rank_zero_itself_dies_the_server_says_unhealthy_and_no_worker_is_left(tiny_weights, tmp_path):
    """On GPUs, NCCL's watchdog ends rank 0's process when a collective passes its deadline
    (TORCH_NCCL_ASYNC_ERROR_HANDLING's default). Its stand-in here: rank 0 (coglet's Python worker)
    killed. /health-check says UNHEALTHY, the worker exits, and the next prediction fails at once.
    (The prediction is sent once the orphaned worker is gone: sent while it was still exiting, on a
    loaded machine, coglet once left it unanswered until the client's timeout.)"""
    from tests.cog_server import cog_server, data_uri

    with cog_server(tiny_weights, tmp_path, env={"FLUX_CONTEXT_PARALLEL": "2"}) as server:
        assert server.settled_health() == "READY"
        (rank_zero,) = _children(server.process.pid)
        (worker,) = _children(rank_zero)
        os.kill(rank_zero, signal.SIGKILL)
        assert server.health_within("UNHEALTHY", 10) == "UNHEALTHY"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _running(worker):
            time.sleep(0.2)
        assert not _running(worker)
        request = {"input": {"prompt": "x", "input_image": data_uri(image_bytes(random_image(32, 32))),
                             "num_inference_steps": 4}}  # fmt: skip
        start = time.monotonic()
        status, body = server.post("/predictions", request, timeout=60)
        assert body["status"] == "failed" and time.monotonic() - start < 10, (status, body)


def test_cancel_mid_edit_leaves_every_rank_in_step(tmp_path):
    """A cancel through the Cog server lands while rank 0 waits for a transformer call, which ends
    on every rank first: the prediction is canceled within a step, the next one succeeds and the
    server stays healthy."""
    from flux.lab.tiny import make_tiny_weights
    from tests.cog_server import cog_server, data_uri

    weights = make_tiny_weights(tmp_path / "weights", side=1024)  # about 1 MP outputs: slow enough steps
    uri = data_uri(image_bytes(random_image(64, 64)))
    with cog_server(weights, tmp_path, env={"FLUX_CONTEXT_PARALLEL": "2"}) as server:
        inputs = {"prompt": "x", "input_image": uri, "num_inference_steps": 50, "seed": 515151}
        response, seconds = server.cancel_when(server.logged("seed 515151,"), "cancel-cp", inputs)
        assert response["status"] == "canceled", response
        assert seconds < 8.0  # within a step on every rank plus the response, with room for a loaded machine
        status, body = server.predict(prompt="x", input_image=uri, num_inference_steps=4, seed=0)
        assert body["status"] == "succeeded", body
        assert server.settled_health() == "READY"


class _Spawned(Exception):
    pass


def test_a_small_dev_shm_turns_nccl_shared_memory_off_before_any_worker_starts(monkeypatch, caplog):
    """Docker's default /dev/shm (64 MB) is too small for NCCL's shared-memory transport (it fails or
    hangs): with several CUDA ranks, setup turns that transport off, says so naming --shm-size, and
    the workers start with it off; an operator's own NCCL_SHM_DISABLE stands; a large /dev/shm changes nothing."""
    from flux import parallel

    monkeypatch.delenv("NCCL_SHM_DISABLE", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(parallel, "_shared_memory_bytes", lambda: 64 << 20)
    spawned = []

    def popen(command, env):
        spawned.append(env)
        raise _Spawned

    monkeypatch.setattr(parallel.subprocess, "Popen", popen)
    with pytest.raises(_Spawned):
        parallel.start(Config.from_env(FLUX_CONTEXT_PARALLEL="2"), torch.device("cuda"), torch.bfloat16)
    assert spawned[0]["NCCL_SHM_DISABLE"] == "1" and os.environ["NCCL_SHM_DISABLE"] == "1"
    assert "/dev/shm holds 64 MB" in caplog.text and "--shm-size" in caplog.text
    monkeypatch.setenv("NCCL_SHM_DISABLE", "0")
    assert parallel.shared_memory_for_nccl(64 << 20) is False and os.environ["NCCL_SHM_DISABLE"] == "0"
    monkeypatch.delenv("NCCL_SHM_DISABLE")
    assert parallel.shared_memory_for_nccl(16 << 30) is False and "NCCL_SHM_DISABLE" not in os.environ
