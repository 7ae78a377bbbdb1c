"""The outbound rule in-process: addresses, credentials, redirects and bounds.

The resolver and sockets are patched (``net``): names resolve from the test's table, every
connection attempt is recorded, a connection to PUBLIC is carried to the loopback server on the
same port, and any other non-loopback address is refused by the patch itself, so nothing leaves
the machine whatever the code under test does.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from flux import lora, lora_sources, outbound
from flux.errors import InputError
from flux.lab.loras import write_lora
from tests.cog_server import free_port
from tests.conftest import fetch_policy, lora_store
from tests.weights_server import Faults, serve_tree

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = "93.184.216.34"  # public-looking; the patched connect carries it to 127.0.0.1
LIMITS = outbound.FetchLimits(deadline_s=20, min_rate=0, window_s=10)


class Net:
    def __init__(self):
        self.table: dict[str, str] = {}
        self.attempts: list[tuple] = []
        self.lookups: list[str] = []


@pytest.fixture
def net(monkeypatch):
    monkeypatch.delenv("FLUX_FETCH_ALLOW", raising=False)
    state = Net()
    resolve, connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, port, *args, **kwargs):
        state.lookups.append(host)
        if host in state.table:
            address = ipaddress.ip_address(state.table[host])
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            sockaddr = (str(address), port, 0, 0) if address.version == 6 else (str(address), port)
            return [(family, socket.SOCK_STREAM, 6, "", sockaddr)]
        return resolve(host, port, *args, **kwargs)

    def guarded_connect(self, address):
        state.attempts.append(address)
        if address[0] == PUBLIC:
            return connect(self, ("127.0.0.1", address[1]))
        if ipaddress.ip_address(address[0].split("%")[0]).is_loopback:
            return connect(self, address)
        raise ConnectionRefusedError("the test's socket patch lets nothing leave the machine")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    return state


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/x.safetensors",
        "http://[::ffff:169.254.169.254]/x.safetensors",
        "http://metadata.test/x.safetensors",  # resolves to 169.254.169.254
        "http://internal.test/x.safetensors",  # resolves to 10.0.0.1
        "http://mapped.test/x.safetensors",  # resolves to ::ffff:169.254.169.254
        "http://127.0.0.1/x.safetensors",
        "http://localhost/x.safetensors",
        "http://2130706433/x.safetensors",
        "http://0x7f.1/x.safetensors",
        "http://127.1/x.safetensors",
        "http://[::1]/x.safetensors",
        "http://0.0.0.0/x.safetensors",
        "http://100.64.0.1/x.safetensors",
        "http://192.168.1.1/x.safetensors",
        "http://172.16.0.1/x.safetensors",
        "http://224.0.0.1/x.safetensors",
        "http://[fe80::1]/x.safetensors",
        "http://[fc00::1]/x.safetensors",
        "http://[64:ff9b::a9fe:a9fe]/x.safetensors",  # NAT64 of 169.254.169.254
        "http://[2002:a9fe:a9fe::1]/x.safetensors",  # 6to4 of 169.254.169.254
    ],
)
def test_internal_addresses_are_refused_before_any_connection(net, url, tmp_path, monkeypatch):
    net.table.update({"metadata.test": "169.254.169.254", "internal.test": "10.0.0.1",
                      "mapped.test": "::ffff:169.254.169.254"})  # fmt: skip
    with pytest.raises(outbound.Refused):
        outbound.download(url, tmp_path / "x.part", limits=LIMITS, policy=fetch_policy())
    monkeypatch.setenv("FLUX_LORA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(InputError, match="could not fetch the LoRA"):
        lora_store().fetch(url)
    assert net.attempts == []
    assert not (tmp_path / "x.part").exists()


def test_public_addresses_pass_and_hidden_internal_ones_do_not():
    public = ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
    internal = ["127.0.0.1", "10.1.2.3", "169.254.169.254", "100.64.0.1", "0.0.0.0", "255.255.255.255", "224.0.0.1",
                "240.0.0.1", "::1", "::", "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1", "64:ff9b::7f00:1",
                "2002:7f00:1::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2"]  # fmt: skip
    assert all(outbound.is_public(ipaddress.ip_address(a)) for a in public)
    assert not any(outbound.is_public(ipaddress.ip_address(a)) for a in internal)


def test_the_operator_allows_hosts_networks_and_ports():
    allowed = outbound.parse_allowed("mirror.internal, 10.0.0.0/8,127.0.0.1:8080,[::1]:9000,::1")
    policy = outbound.AddressPolicy(allowed)
    ok = [("10.2.3.4", 443), ("127.0.0.1", 8080), ("::1", 1234)]
    assert all(policy.check(host, port) == host for host, port in ok)
    for host, port in [("127.0.0.1", 8081), ("192.168.0.1", 80), ("169.254.169.254", 80)]:
        with pytest.raises(outbound.Refused):
            policy.check(host, port)


def test_a_public_name_that_redirects_inside_is_refused_at_the_redirect(net, tmp_path):
    """The first hop is a public-looking name (carried to a loopback server); its 302s to a loopback
    port and to a name of the metadata address are refused: the target logs no request."""
    (tmp_path / "x.safetensors").write_bytes(b"secret")
    net.table.update({"lora.example.com": PUBLIC, "metadata.test": "169.254.169.254"})
    with serve_tree(tmp_path) as (target, target_log):
        port = int(target.rsplit(":", 1)[1])
        redirects = {"a": f"{target}/x.safetensors", "b": "http://metadata.test/latest", "c": "ftp://u:p@example.com/"}
        with serve_tree(tmp_path, Faults(redirects=redirects)) as (redirector, _):
            first = int(redirector.rsplit(":", 1)[1])
            for path, error in [("a", outbound.Refused), ("b", outbound.Refused), ("c", outbound.FetchError)]:
                with pytest.raises(error):
                    outbound.download(
                        f"http://lora.example.com:{first}/{path}",
                        tmp_path / "o.part",
                        limits=LIMITS,
                        policy=fetch_policy(),
                    )
    assert target_log.requests == []
    assert [a for a in net.attempts if a[1] == port] == []
    assert {a[0] for a in net.attempts} == {PUBLIC}


def test_a_name_is_resolved_once_and_the_checked_address_is_the_one_connected(net, tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x" * 1000)
    net.table["cdn.example.com"] = PUBLIC
    with serve_tree(tmp_path) as (url, _):
        port = url.rsplit(":", 1)[1]
        outbound.download(
            f"http://cdn.example.com:{port}/f.bin", tmp_path / "f.part", limits=LIMITS, policy=fetch_policy()
        )
    assert net.lookups.count("cdn.example.com") == 1
    assert net.attempts == [(PUBLIC, int(port))]


@pytest.mark.parametrize(
    "url,applies",
    [
        ("https://huggingface.co/me/x/resolve/main/a.safetensors", True),
        ("https://cdn-lfs.huggingface.co/a", True),
        ("https://evilhuggingface.co/a", False),
        ("https://huggingface.co.evil.com/a", False),
        ("http://huggingface.co/a", False),
        ("http://127.0.0.1:8080/a", True),  # the endpoint the operator configured
        ("http://127.0.0.1:8081/a", False),
        ("https://127.0.0.1:8080/a", False),
    ],
)
def test_a_token_applies_only_to_its_own_service(url, applies):
    import httpx2

    credential = outbound.Credential("hf_SECRET", "huggingface.co", ("http://127.0.0.1:8080",))
    assert credential.applies_to(httpx2.URL(url)) is applies
    assert "hf_SECRET" not in repr(credential)


def test_a_redirect_off_the_origin_carries_no_token_and_one_on_it_keeps_it(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"lora bytes")
    with serve_tree(tmp_path) as (other, other_log):
        redirects = {"away": f"{other}/f.bin", "here": "/f.bin"}
        with serve_tree(tmp_path, Faults(redirects=redirects)) as (origin, origin_log):
            credential = outbound.Credential("tok", "huggingface.co", (origin,))
            outbound.download(
                f"{origin}/away", tmp_path / "a.part", limits=LIMITS, credential=credential, policy=fetch_policy()
            )
            outbound.download(
                f"{origin}/here", tmp_path / "b.part", limits=LIMITS, credential=credential, policy=fetch_policy()
            )
    assert [r["authorization"] for r in origin_log.requests] == ["Bearer tok"] * 3
    assert [r["authorization"] for r in other_log.requests] == [None]
    assert (tmp_path / "a.part").read_bytes() == (tmp_path / "b.part").read_bytes() == b"lora bytes"


def test_too_many_redirects_stop(tmp_path):
    with (
        serve_tree(tmp_path, Faults(redirects={"loop": "/loop"})) as (url, log),
        pytest.raises(outbound.FetchError, match="redirects"),
    ):
        outbound.download(f"{url}/loop", tmp_path / "o.part", limits=LIMITS, policy=fetch_policy())
    assert len(log.requests) == outbound.MAX_REDIRECTS + 1


@pytest.mark.parametrize(
    "limits,message",
    [
        (outbound.FetchLimits(deadline_s=1.5, min_rate=0, window_s=10), "deadline"),
        (outbound.FetchLimits(deadline_s=None, min_rate=1000, window_s=1.0), "minimum"),
    ],
)
def test_a_drip_server_is_cut(tmp_path, limits, message):
    """A byte every 0.2 s, whatever Content-Length says: cut at the deadline, or when a window's rate is too low."""
    (tmp_path / "slow.bin").write_bytes(b"x" * 10_000)
    with serve_tree(tmp_path, Faults(drip={"slow.bin": 0.2})) as (url, _):
        start = time.monotonic()
        with pytest.raises(outbound.TooSlow, match=message):
            outbound.download(f"{url}/slow.bin", tmp_path / "o.part", limits=limits, policy=fetch_policy())
        assert time.monotonic() - start < 15  # the body would take 2000 s


def test_a_silent_server_is_cut_after_one_window(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    start = time.monotonic()
    with listener, pytest.raises(outbound.TooSlow):
        # the connection is accepted by the kernel's backlog; nothing is ever answered
        outbound.get_json(
            f"http://127.0.0.1:{port}/",
            limits=outbound.FetchLimits(deadline_s=None, min_rate=0, window_s=1.0),
            policy=fetch_policy(),
        )
    assert time.monotonic() - start < 15  # one window of 1 s, never the open-ended wait


def test_a_compressed_body_is_read_as_sent(tmp_path):
    """No content decoding: a gzip-encoded answer counts against the size limit as sent."""
    import gzip

    (tmp_path / "g").write_bytes(gzip.compress(b"\x00" * 5_000_000))
    with serve_tree(tmp_path) as (url, _):
        outbound.download(f"{url}/g", tmp_path / "o.part", limits=LIMITS, limit=100_000, policy=fetch_policy())
    assert (tmp_path / "o.part").read_bytes() == (tmp_path / "g").read_bytes()


def _failure_text(url: str, monkeypatch, tmp_path) -> str:
    monkeypatch.setenv("FLUX_LORA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(InputError) as caught:
        lora_store().fetch(url)
    return str(caught.value).replace(url, "URL")


def test_an_arbitrary_url_fails_with_one_message_whatever_happened(tmp_path, monkeypatch):
    (tmp_path / "ok.safetensors").write_bytes(b"x")
    closed = free_port()
    with serve_tree(tmp_path, Faults(token="t")) as (auth, _), serve_tree(tmp_path) as (plain, _):
        port = plain.rsplit(":", 1)[1]
        monkeypatch.setenv("FLUX_FETCH_ALLOW", f"127.0.0.1:{port},127.0.0.1:{auth.rsplit(':', 1)[1]},"
                                               f"127.0.0.1:{closed}")  # fmt: skip
        texts = {
            "404": _failure_text(f"{plain}/missing.safetensors", monkeypatch, tmp_path),
            "401": _failure_text(f"{auth}/ok.safetensors", monkeypatch, tmp_path),
            "closed": _failure_text(f"http://127.0.0.1:{closed}/x.safetensors", monkeypatch, tmp_path),
            "refused": _failure_text(f"http://127.0.0.1:{free_port()}/x.safetensors", monkeypatch, tmp_path),
        }
    assert len(set(texts.values())) == 1, texts
    assert texts["404"] == "lora_weights: could not fetch the LoRA from URL"


def test_hub_paths_outside_the_repo_are_refused_before_any_request(tmp_path, monkeypatch):
    with serve_tree(tmp_path) as (url, log):
        monkeypatch.setenv("HF_ENDPOINT", url)
        for source in ["owner/name/../../x.safetensors", "owner/name/./x.safetensors", f"{url}/a/b/resolve/main/../x"]:
            with pytest.raises(InputError):
                lora_store().resolve(source)
    assert log.requests == []


def test_a_token_read_listing_is_not_repeated_in_errors(tmp_path, monkeypatch):
    import json

    api = tmp_path / "api" / "models" / "me" / "private" / "revision"
    api.mkdir(parents=True)
    (api / "main").write_text(json.dumps({"siblings": [{"rfilename": "secret-a.safetensors"},
                                                       {"rfilename": "secret-b.safetensors"}]}))  # fmt: skip
    with serve_tree(tmp_path) as (url, _):
        monkeypatch.setenv("HF_ENDPOINT", url)
        with pytest.raises(InputError, match="has 2 .safetensors files") as with_token:
            lora_store().resolve("me/private", tokens=lora_sources.LoraTokens(hf="caller"))
        with pytest.raises(InputError, match="secret-a") as without:
            lora_store().resolve("me/private")
    assert "secret" not in str(with_token.value) and "secret-b" in str(without.value)


def test_the_operators_tokens_serve_a_callers_lora_only_when_opted_in(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "operator-hf")
    monkeypatch.setenv("CIVITAI_API_TOKEN", "operator-civ")
    monkeypatch.delenv("FLUX_LORA_OPERATOR_TOKENS", raising=False)
    assert lora_store().tokens_for() == lora_sources.LoraTokens()
    assert lora_store().tokens_for("caller") == lora_sources.LoraTokens(hf="caller")
    monkeypatch.setenv("FLUX_LORA_OPERATOR_TOKENS", "1")
    assert lora_store().tokens_for() == lora_sources.LoraTokens("operator-hf", "operator-civ")
    assert lora_store().tokens_for("caller").hf == "caller"
    assert "operator" not in repr(lora_store().tokens_for())


def test_a_lora_fetched_with_a_token_is_cached_for_that_token_only(monkeypatch, tmp_path):
    monkeypatch.setenv("FLUX_LORA_CACHE", str(tmp_path))
    source = "me/private/lora.safetensors"
    paths = {lora_store().cached_path(source, lora_sources.LoraTokens(hf=t)) for t in (None, "a", "b")}
    assert len(paths) == 3


def _tar_bytes(entries: int, compress: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compress}") as archive:
        for i in range(entries):
            archive.addfile(tarfile.TarInfo(f"e{i}"), io.BytesIO(b""))
    return buffer.getvalue()


def test_compressed_and_entry_bomb_tars_are_refused_quickly_in_bounded_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUX_LORA_CACHE", str(tmp_path / "cache"))
    site = tmp_path / "site"
    site.mkdir()
    (site / "gz.tar").write_bytes(_tar_bytes(3, "gz"))
    (site / "xz.tar").write_bytes(_tar_bytes(3, "xz"))
    (site / "bomb.tar").write_bytes(_tar_bytes(20_000))  # 10 MB of empty entries
    with serve_tree(site) as (url, _):
        for name in ("gz.tar", "xz.tar"):
            with pytest.raises(InputError, match="compressed archives are refused"):
                lora_store().fetch(f"{url}/{name}")
        tracemalloc.start()
        start = time.monotonic()
        with pytest.raises(InputError, match=f"more than {lora_sources.MAX_TAR_ENTRIES} entries"):
            lora_store().fetch(f"{url}/bomb.tar")
        seconds = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert seconds < 20 and peak < 20e6, (seconds, peak)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_file()]


def test_partial_files_are_cleaned_at_startup_and_counted_by_eviction(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("FLUX_LORA_CACHE", str(tmp_path))
    stale = tmp_path / "abc.safetensors.123.part"
    stale.write_bytes(b"x" * 3000)
    kept = tmp_path / "def.safetensors"
    kept.write_bytes(b"x" * 1000)
    os.utime(stale, (1000, 1000))
    monkeypatch.setenv("FLUX_LORA_CACHE_BYTES", "2000")
    assert lora_store().evict(keep=kept) == [stale]
    stale.write_bytes(b"x")
    assert lora_store().clean_partials() == [stale] and kept.exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_lora_holding_nan_or_inf_is_refused_when_loaded(components, tmp_path, bad):
    up = torch.zeros(components.transformer.x_embedder.out_features, 4)
    up[0, 0] = bad
    state = {"transformer.x_embedder.lora_A.weight": torch.zeros(4, components.transformer.x_embedder.in_features),
             "transformer.x_embedder.lora_B.weight": up}  # fmt: skip
    path = write_lora(tmp_path / "nan.safetensors", state)
    with pytest.raises(InputError, match="NaN or infinite"):
        lora.convert(path, "nan", components.transformer)


def test_sixteen_bit_images_convert_without_a_float_copy():
    import numpy as np
    from PIL import Image

    from flux.images import to_rgb

    array = (np.arange(2000 * 2000, dtype=np.uint32) % 65536).astype(np.uint16).reshape(2000, 2000)
    image = Image.fromarray(array)
    tracemalloc.start()
    rgb = to_rgb(image)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    expected = np.clip(array / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(rgb)[..., 0], expected)
    # the float64 conversion peaked at 24 bytes a pixel; what is left is PIL's copy out and the RGB result
    assert peak < 12 * array.size, peak / array.size


def test_the_address_rule_is_where_every_connection_is_made(tmp_path, monkeypatch):
    """flux/outbound.py sets httpx2's pool's network backend, an internal attribute: httpx2 and
    httpcore2 are pinned in requirements.txt (the versions installed), and a release that moved the
    attribute would make this fail, not silently skip the rule."""
    from importlib.metadata import version

    pinned = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line)
    assert pinned["httpx2"] == version("httpx2") and pinned["httpcore2"] == version("httpcore2")
    checked = []
    rule = outbound.AddressPolicy.check
    monkeypatch.setattr(
        outbound.AddressPolicy, "check", lambda self, host, port: checked.append(port) or rule(self, host, port)
    )
    (tmp_path / "f.bin").write_bytes(b"x" * 1000)
    with serve_tree(tmp_path) as (url, log):
        outbound.download(f"{url}/f.bin", tmp_path / "o.part", limits=LIMITS, policy=fetch_policy())
        with pytest.raises(outbound.Refused):
            outbound.download(f"{url}/f.bin", tmp_path / "p.part", limits=LIMITS)  # loopback: not allowed by default
    assert checked == [int(url.rsplit(":", 1)[1])] * 2 and len(log.requests) == 1
