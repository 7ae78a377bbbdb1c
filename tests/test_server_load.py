"""Failures and load over HTTP: the server keeps serving, nothing is lost, memory stays flat."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from tests.cog_server import cog_server, data_uri, decode_output
from tests.conftest import image_bytes, random_image
from tests.test_images import png_header_only


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    with cog_server(tiny_weights, tmp_path_factory.mktemp("load")) as s:
        yield s


@pytest.fixture(scope="module")
def uri():
    return data_uri(image_bytes(random_image(64, 48)))


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (the server and its worker)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


@pytest.mark.parametrize(
    "inputs,message",
    [
        ({"input_image": data_uri(png_header_only(30000, 30000))}, "megapixels"),
        ({"input_image": data_uri(b"")}, "empty"),
        ({"prompt": "   "}, "prompt is empty"),
    ],
)
def test_bad_requests_fail_clearly_and_the_server_keeps_serving(server, uri, inputs, message):
    status, body = server.predict(**{"prompt": "x", "input_image": uri, **inputs})
    assert status == 200 and body["status"] == "failed"
    assert message in body["error"]
    assert "Traceback" not in body["error"]
    status, body = server.predict(prompt="x", input_image=uri, num_inference_steps=4, seed=0)
    assert body["status"] == "succeeded", body


@pytest.fixture(scope="module")
def real_size_server(tmp_path_factory):
    """The tiny model sizing its outputs as the real one does (about 1024x1024): an edit long enough
    to cancel in the middle of its denoise loop."""
    from flux.lab.tiny import make_tiny_weights

    weights = make_tiny_weights(tmp_path_factory.mktemp("tiny-1024") / "weights", side=1024)
    with cog_server(weights, tmp_path_factory.mktemp("load-1024")) as s:
        yield s


def test_cancel_during_denoise(real_size_server, uri):
    """Cancelled once the edit has started (the pipeline logs its seed as the loop begins): the
    response says canceled well before the 50 steps (about 0.15 s each here) could end."""
    server = real_size_server
    inputs = {"prompt": "x", "input_image": uri, "num_inference_steps": 50, "seed": 424242}
    body, seconds = server.cancel_when(server.logged("seed 424242,"), "cancel-me", inputs)
    assert isinstance(body, dict), body
    assert body["status"] == "canceled", body
    assert seconds < 5.0  # within a step plus the response, with room for a loaded machine
    status, body = server.predict(prompt="x", input_image=uri, num_inference_steps=4, seed=0)
    assert body["status"] == "succeeded", body


def test_fifty_sequential_predictions_keep_memory_flat(tiny_weights, tmp_path, uri):
    # its own server: memory left by the other tests' requests (a cancelled 50-step edit, bombs)
    # would otherwise be counted in the 10th prediction's figure
    with cog_server(tiny_weights, tmp_path) as server:
        _fifty_sequential(server, uri)


def _fifty_sequential(server, uri):
    rss = {}
    for i in range(1, 51):
        status, body = server.predict(prompt="x", input_image=uri, num_inference_steps=4, seed=i, output_format="jpg")
        assert status == 200 and body["status"] == "succeeded", (i, body)
        if i in (10, 50):
            rss[i] = tree_rss_bytes(server.process.pid)
    growth = rss[50] - rss[10]
    print(f"RSS after 10: {rss[10] / 2**20:.0f} MiB, after 50: {rss[50] / 2**20:.0f} MiB")
    assert growth < 50 * 2**20  # falling is fine (freed allocator arenas); rising is a leak


def test_ten_at_once_complete_or_are_refused_as_busy(server, uri):
    def one(i):
        return server.predict(
            retry_busy=False, prompt="x", input_image=uri, num_inference_steps=4, seed=100 + i, output_format="png"
        )

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(10)))
    succeeded = [body for status, body in results if status == 200 and body.get("status") == "succeeded"]
    busy = [body for status, body in results if status == 409]
    assert len(succeeded) + len(busy) == 10, results
    assert succeeded
    for body in succeeded:
        with Image.open(io.BytesIO(decode_output(body["output"]))) as image:
            image.load()
            assert image.size[0] % 16 == 0
    assert server.settled_health() == "READY"
    status, body = server.predict(prompt="x", input_image=uri, num_inference_steps=4, seed=0)
    assert body["status"] == "succeeded", body
