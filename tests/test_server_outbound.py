"""Outbound fetches through the real Cog HTTP server, tried as a hostile client would.

Every server here listens on loopback. The Cog server allows exactly the ports of the servers a
case needs to reach (FLUX_FETCH_ALLOW=127.0.0.1:PORT,...), so every other loopback port stands for
an internal address under the default rule. Look-alike names resolve to 127.0.0.1 inside the Cog
server's processes only (tests/fake_dns, FLUX_TEST_HOSTS).
"""

from __future__ import annotations

import io
import json
import tarfile
import time

import pytest

from flux.lab.loras import make_lora, write_lora
from flux.loading import load_components
from tests.cog_server import ROOT, cog_server, data_uri
from tests.conftest import image_bytes, random_image
from tests.weights_server import Faults, serve_tree

CALLER = "hf_CALLERsecret0123456789"
OPERATOR = "hf_OPERATORsecret0123456789"
CIVITAI = "civ_CALLERsecret0123456789"
LOOKALIKES = ("evilhuggingface.co", "huggingface.co.example.net", "cdn.huggingface.co", "notcivitai.com",
              "lora.example.com")  # fmt: skip


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _tar(entries: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def world(tiny_weights, tmp_path_factory):
    """A site (allowed), a Hub stand-in that wants the caller's token (allowed), internal targets on
    127.0.0.1 and ::1 (not allowed), and the Cog server."""
    root = tmp_path_factory.mktemp("outbound")
    transformer = load_components(tiny_weights).transformer
    site, hub, target = root / "site", root / "hub", root / "target"
    lora = make_lora(transformer, "peft", rank=4, seed=1)
    for directory in (site, target):
        write_lora(directory / "peft.safetensors", lora)
    write_lora(hub / "me" / "style" / "resolve" / "main" / "lora.safetensors", lora)
    api = hub / "api" / "models" / "me"
    for name in ("style", "other"):
        (api / name / "revision").mkdir(parents=True)
        (api / name / "revision" / "main").write_text(json.dumps({"siblings": [{"rfilename": "lora.safetensors"}]}))
    poisoned = dict(lora)
    first = next(iter(poisoned))
    poisoned[first] = poisoned[first].clone()
    poisoned[first].view(-1)[0] = float("nan")
    write_lora(site / "nan.safetensors", poisoned)
    (site / "gz.tar").write_bytes(_tar({"lora.safetensors": (site / "peft.safetensors").read_bytes()}, "w:gz"))
    (site / "bomb.tar").write_bytes(_tar({f"e{i}": b"" for i in range(5000)}))
    (site / "slow.safetensors").write_bytes((site / "peft.safetensors").read_bytes())
    (site / "slower.safetensors").write_bytes((site / "peft.safetensors").read_bytes())
    with (
        serve_tree(target) as (target_url, target_log),
        serve_tree(target, host="::1") as (target6_url, target6_log),
        serve_tree(site, Faults(drip={"slow.safetensors": 0.05, "slower.safetensors": 0.05})) as (site_url, site_log),
    ):
        hub_faults = Faults(redirects={"me/moved/resolve/main/lora.safetensors": f"{site_url}/peft.safetensors"},
                            token=CALLER)  # fmt: skip
        with serve_tree(hub, hub_faults) as (hub_url, hub_log):
            redirect_faults = Faults(redirects={"to-loopback.safetensors": f"{target_url}/peft.safetensors"})
            with serve_tree(site, redirect_faults) as (redirector_url, _):
                allowed = ",".join(f"127.0.0.1:{_port(u)}" for u in (site_url, hub_url, redirector_url))
                env = {
                    "FLUX_FETCH_ALLOW": allowed,
                    "FLUX_FETCH_DEADLINE_S": "3",
                    "FLUX_FETCH_MIN_RATE": "1",
                    "HF_ENDPOINT": hub_url,
                    "HF_TOKEN": OPERATOR,
                    "CIVITAI_API_TOKEN": "civ_OPERATORsecret",
                    "FLUX_LORA_CACHE": str(root / "cache"),
                    "PYTHONPATH": str(ROOT / "tests" / "fake_dns"),
                    "FLUX_TEST_HOSTS": ",".join(f"{name}=127.0.0.1" for name in LOOKALIKES),
                }
                (root / "work").mkdir()
                with cog_server(tiny_weights, root / "work", env=env) as server:
                    yield {
                        "server": server, "site": site_url, "site_log": site_log, "hub_log": hub_log,
                        "target": target_url, "target6": target6_url, "redirector": redirector_url,
                        "internal_logs": (target_log, target6_log),
                    }  # fmt: skip


def _edit(world, **inputs) -> dict:
    png = data_uri(image_bytes(random_image(48, 40, seed=4)))
    status, body = world["server"].predict(
        prompt="make it red", input_image=png, num_inference_steps=4, seed=3, output_format="png", **inputs
    )
    assert status == 200, body
    return body


def _succeeds_next(world) -> None:
    assert _edit(world)["status"] == "succeeded"


def _no_secret_anywhere(world, body: dict) -> None:
    text = json.dumps(body) + world["server"].log()
    for secret in (CALLER, OPERATOR, CIVITAI, "civ_OPERATORsecret"):
        assert secret not in text


@pytest.mark.parametrize(
    "host,token",
    [
        ("evilhuggingface.co", {"hf_api_token": CALLER}),
        ("huggingface.co.example.net", {"hf_api_token": CALLER}),
        ("cdn.huggingface.co", {"hf_api_token": CALLER}),  # the Hub's own domain, but plain http
        ("notcivitai.com", {"civitai_api_token": CIVITAI}),
    ],
)
def test_lookalike_hosts_and_plain_http_receive_no_token(world, host, token):
    site_port = _port(world["site"])
    before = len(world["site_log"].requests)
    body = _edit(world, lora_weights=f"http://{host}:{site_port}/peft.safetensors", **token)
    assert body["status"] == "succeeded", body
    requests = world["site_log"].requests[before:]
    assert requests and all(r["authorization"] is None for r in requests)
    _no_secret_anywhere(world, body)


def test_the_callers_token_reaches_the_hub_only_and_the_operators_never(world):
    hub_log, site_log = world["hub_log"], world["site_log"]
    body = _edit(world, lora_weights="me/style", hf_api_token=CALLER)
    assert body["status"] == "succeeded", body
    assert [r["path"] for r in hub_log.requests[-2:]] == ["api/models/me/style/revision/main",
                                                          "me/style/resolve/main/lora.safetensors"]  # fmt: skip
    assert all(r["authorization"] == f"Bearer {CALLER}" for r in hub_log.requests)
    _no_secret_anywhere(world, body)
    # no caller token: the operator's HF_TOKEN is not lent (FLUX_LORA_OPERATOR_TOKENS is off)
    denied = _edit(world, lora_weights="me/other")
    assert denied["status"] == "failed" and "access denied (HTTP 401)" in denied["error"], denied
    assert hub_log.requests[-1]["authorization"] is None
    # a Hub redirect to another host carries no Authorization there
    before = len(site_log.requests)
    moved = _edit(world, lora_weights="me/moved/lora.safetensors", hf_api_token=CALLER)
    assert moved["status"] == "succeeded", moved
    assert hub_log.requests[-1]["authorization"] == f"Bearer {CALLER}"
    assert [r["authorization"] for r in site_log.requests[before:]] == [None]
    _no_secret_anywhere(world, moved)


def test_internal_targets_are_refused_before_any_connection(world):
    port = _port(world["target"])
    urls = [
        f"http://127.0.0.1:{port}/peft.safetensors",
        f"http://localhost:{port}/peft.safetensors",
        f"http://2130706433:{port}/peft.safetensors",
        f"http://0x7f.1:{port}/peft.safetensors",
        f"{world['target6']}/peft.safetensors",
        f"http://lora.example.com:{_port(world['redirector'])}/to-loopback.safetensors",  # 302 to the target
    ]
    for url in urls:
        body = _edit(world, lora_weights=url)
        assert body["status"] == "failed" and "could not fetch the LoRA" in body["error"], (url, body)
        _succeeds_next(world)
    assert all(log.requests == [] for log in world["internal_logs"])


def test_a_drip_server_is_cut_at_the_deadline(world):
    start = time.monotonic()
    body = _edit(world, lora_weights=f"{world['site']}/slow.safetensors")
    assert body["status"] == "failed" and "could not fetch the LoRA" in body["error"], body
    assert time.monotonic() - start < 3 + 15  # the deadline, plus the request around it (the file: minutes)
    _succeeds_next(world)


def test_cancel_stops_a_download(world):
    """Cancelled once the site has the download's request (a byte every 0.05 s: minutes to finish):
    the prediction is canceled within a few of its reads."""
    png = data_uri(image_bytes(random_image(48, 40, seed=4)))
    inputs = {"prompt": "x", "input_image": png, "lora_weights": f"{world['site']}/slower.safetensors"}
    asked = len([r for r in world["site_log"].requests if r["path"] == "slower.safetensors"])
    started = lambda: len([r for r in world["site_log"].requests if r["path"] == "slower.safetensors"]) > asked  # noqa: E731
    response, seconds = world["server"].cancel_when(started, "cancel-download", inputs, within_s=60)
    assert response["status"] == "canceled", response
    assert seconds < 5.0
    _succeeds_next(world)


@pytest.mark.parametrize(
    "name,message",
    [
        ("gz.tar", "compressed archives are refused"),
        ("bomb.tar", "more than 1000 entries"),
        ("nan.safetensors", "NaN or infinite"),
    ],
)
def test_bombs_and_poisoned_loras_are_refused_quickly(world, name, message):
    start = time.monotonic()
    body = _edit(world, lora_weights=f"{world['site']}/{name}")
    assert body["status"] == "failed" and message in body["error"], body
    assert time.monotonic() - start < 20
    _succeeds_next(world)


def test_too_many_references_and_a_huge_prompt_are_refused(world):
    """The prompt by the schema (HTTP 422); four references by the predictor, before any is decoded
    (the schema cog build writes has no bound on a list's length)."""
    png = data_uri(image_bytes(random_image(16, 16)))
    status, body = world["server"].predict(prompt="x", input_image=png, reference_images=[png] * 4)
    assert body["status"] == "failed" and "at most 3 reference_images are accepted; got 4" in body["error"]
    status, body = world["server"].predict(prompt="x" * 10_001, input_image=png)
    assert status == 422 and "prompt" in str(body)
    _succeeds_next(world)


def test_references_are_counted_before_any_is_decoded():
    """In-process: four references that are not even images fail on their count, when the request is made."""
    from flux.errors import InputError
    from flux.request import EditRequest

    with pytest.raises(InputError, match="at most 3 reference_images"):
        EditRequest("x", b"not an image", references=(b"junk",) * 4)
    with pytest.raises(InputError, match="prompt is longer"):
        EditRequest("x" * 10_001, b"not an image")
