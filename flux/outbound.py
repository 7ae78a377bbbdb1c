"""Every outbound HTTP request the server makes: the address rule, credentials, redirects and bounds.

- **Addresses.** A name is resolved once, every address it resolves to is checked, and the socket
  connects to the checked address (no second lookup, so DNS rebinding cannot swap it). Only public
  unicast addresses pass by default: loopback, private, link-local, shared (100.64/10), multicast,
  reserved, unspecified, and IPv6 forms that embed one of those (IPv4-mapped, 6to4, NAT64, Teredo)
  are refused before any connection, on the first request and after every redirect.
  ``FLUX_FETCH_ALLOW`` names what an operator allows besides: hosts, addresses, networks, each
  optionally with a port (``mirror.internal,10.0.0.0/8,127.0.0.1:8080,[::1]:9000``).
- **Credentials.** A ``Credential`` goes only to its own service: its domain or a dot-bounded
  subdomain over https, or exactly the endpoint the operator configured (any scheme), and never to
  a redirect that leaves the first request's origin.
- **Redirects** are followed by hand (at most ``MAX_REDIRECTS``), http and https only, no
  credentials in URLs, every hop through the same address rule.
- **Bounds.** Every body is read raw (no content decoding, so no compression bomb), within a size
  limit, a wall-clock deadline and a minimum rate measured over windows (``FetchLimits``).

httpx2 (the HTTP client huggingface_hub is built on) does the HTTP; the rule lives in its network
backend, where the connection is made. Proxy and netrc settings from the environment are ignored.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpcore2
import httpx2

MAX_REDIRECTS = 5
USER_AGENT = "flux-kontext-cog/1"
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchError(RuntimeError):
    """A URL could not be fetched; ``status``: the HTTP status, if the server answered one;
    ``retry``: a dropped or failed connection, which a download may try again."""

    def __init__(self, message: str, status: int | None = None, retry: bool = False):
        super().__init__(message)
        self.status = status
        self.retry = retry


class Refused(FetchError):
    """The address rule refused the target before any connection."""


class TooSlow(FetchError):
    """The body did not arrive within the deadline or at the minimum rate."""


# --- the address rule --------------------------------------------------------------------------


@dataclass(frozen=True)
class Allowed:
    """One entry of FLUX_FETCH_ALLOW: a host name or a network, on any port or on one."""

    host: str | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    port: int | None = None

    def matches(self, host: str, address: IPAddress, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        return self.host == host.lower() if self.host is not None else address in self.network


def parse_allowed(text: str) -> tuple[Allowed, ...]:
    """FLUX_FETCH_ALLOW's entries: ``host``, ``host:port``, ``1.2.3.4``, ``10.0.0.0/8``, ``[::1]:9000``;
    ValueError for an entry that is none of these."""
    entries = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        port = None
        if item.startswith("["):
            inside, _, rest = item[1:].partition("]")
            item, port = inside, (_port(rest[1:]) if rest.startswith(":") else None)
        elif item.count(":") == 1:
            item, _, number = item.partition(":")
            port = _port(number)
        try:
            entries.append(Allowed(network=ipaddress.ip_network(item, strict=False), port=port))
        except ValueError:
            if not _HOST.fullmatch(item):
                raise ValueError(f"{item!r} is not a host, address or network") from None
            entries.append(Allowed(host=item.lower(), port=port))
    return tuple(entries)


_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    return port


def is_public(address: IPAddress) -> bool:
    """A global unicast address, also when it hides inside an IPv6 form."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(embedded)
        if address.teredo:
            return False
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_unspecified)


@dataclass(frozen=True)
class AddressPolicy:
    allowed: tuple[Allowed, ...] = ()

    def check(self, host: str, port: int) -> str:
        """The address to connect to for ``host``: resolved once, every address checked; raises Refused."""
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError:
                raise FetchError(f"could not resolve {host}") from None
            addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        for address in addresses:
            if not (is_public(address) or any(a.matches(host, address, port) for a in self.allowed)):
                raise Refused(f"{host} is not a public address ({address}); FLUX_FETCH_ALLOW allows it")
        return str(addresses[0])


PUBLIC_ONLY = AddressPolicy()


class _CheckedBackend(httpcore2.SyncBackend):
    """httpcore's socket backend, connecting only to an address the policy checked."""

    def __init__(self, policy: AddressPolicy):
        self.policy = policy

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):  # noqa: ANN001
        return super().connect_tcp(self.policy.check(host, port), port, timeout, local_address, socket_options)


# --- credentials -------------------------------------------------------------------------------


def _origin(url: httpx2.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host.lower(), url.port or {"http": 80, "https": 443}.get(url.scheme)


@dataclass(frozen=True)
class Credential:
    """A bearer token and the one service it belongs to."""

    token: str
    domain: str  # the service's own domain, e.g. huggingface.co
    endpoints: tuple[str, ...] = ()  # origins the operator configured for it (a mirror, the tests' server)

    def __repr__(self) -> str:
        return f"Credential(domain={self.domain!r}, endpoints={self.endpoints!r})"

    def applies_to(self, url: httpx2.URL) -> bool:
        """Sent to an origin the operator configured for it as it is; to the service's own domain
        (or a dot-bounded subdomain) over https only."""
        return serves(url, self.domain, self.endpoints) and (url.scheme == "https" or serves(url, "", self.endpoints))


def serves(url: httpx2.URL, domain: str, endpoints: tuple[str, ...] = ()) -> bool:
    """The one host rule for a service: ``url`` is the service's when its origin is one the
    operator configured (scheme, host and port), or its host is ``domain`` or a dot-bounded
    subdomain of it (``cdn.huggingface.co``, never ``evilhuggingface.co``)."""
    if any(_origin(url) == _origin(httpx2.URL(e)) for e in endpoints if e):
        return True
    host = url.host.lower()
    return bool(domain) and (host == domain or host.endswith("." + domain))


# --- bounds ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchLimits:
    """How long a download may take: ``deadline_s`` in all (None: no deadline), and at least
    ``min_rate`` bytes a second over every ``window_s`` (also the longest wait for any one read)."""

    deadline_s: float | None
    min_rate: float
    window_s: float


class Clock:
    """The deadline and the rate windows of one download (across its redirects and retries)."""

    def __init__(self, limits: FetchLimits):
        self.limits = limits
        self.started = self.window_started = time.monotonic()
        self.window_bytes = 0

    def remaining(self) -> float:
        if self.limits.deadline_s is None:
            return self.limits.window_s
        left = self.limits.deadline_s - (time.monotonic() - self.started)
        if left <= 0:
            raise TooSlow(f"not done within the deadline of {self.limits.deadline_s:g} s")
        return min(left, self.limits.window_s)

    def received(self, count: int) -> None:
        self.remaining()
        self.window_bytes += count
        now = time.monotonic()
        if now - self.window_started >= self.limits.window_s:
            rate = self.window_bytes / (now - self.window_started)
            if rate < self.limits.min_rate:
                raise TooSlow(f"arriving at {rate:.0f} B/s, under the minimum of {self.limits.min_rate:g} B/s")
            self.window_started, self.window_bytes = now, 0


# --- requests ----------------------------------------------------------------------------------


def _client(policy: AddressPolicy, timeout_s: float) -> httpx2.Client:
    transport = httpx2.HTTPTransport(trust_env=False)
    # httpx2 takes no network backend, so the rule goes into the pool it made (a private attribute:
    # httpx2 and httpcore2 are pinned in requirements.txt, and tests/test_outbound.py fails if the
    # backend stops being called)
    transport._pool._network_backend = _CheckedBackend(policy)
    return httpx2.Client(transport=transport, trust_env=False, follow_redirects=False, timeout=timeout_s)


@contextlib.contextmanager
def open_url(
    url: str,
    *,
    clock: Clock,
    credential: Credential | None = None,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    data: bytes | None = None,
    policy: AddressPolicy = PUBLIC_ONLY,
) -> Iterator[httpx2.Response]:
    """The final response to ``url`` after redirects, its body unread. Raises FetchError for a
    refused or unreachable target, a URL that is not plain http(s), or too many redirects."""
    first = current = httpx2.URL(url)
    with _client(policy, clock.remaining()) as client:
        for _ in range(MAX_REDIRECTS + 1):
            if current.scheme not in ("http", "https") or not current.host:
                raise FetchError(f"only http and https URLs are fetched, not {current.scheme or 'this'}")
            if current.userinfo:
                raise FetchError("URLs with credentials in them are not fetched")
            sent = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **(headers or {})}
            if credential is not None and credential.applies_to(current) and _origin(current) == _origin(first):
                sent["Authorization"] = f"Bearer {credential.token}"
            request = client.build_request(method, current, headers=sent, content=data, timeout=clock.remaining())
            try:
                response = client.send(request, stream=True)
            except httpx2.TimeoutException:
                raise TooSlow(f"{current.host} did not answer within {clock.limits.window_s:g} s") from None
            except httpx2.TransportError as exc:
                raise FetchError(f"could not reach {current.host} ({type(exc).__name__})", retry=True) from None
            if response.is_redirect:
                response.close()
                current = current.join(response.headers["location"])
                if response.status_code in (301, 302, 303) and method == "POST":
                    method, data = "GET", None
                continue
            try:
                yield response
            finally:
                response.close()
            return
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")


def body_chunks(response: httpx2.Response, clock: Clock, limit: int | None, start: int = 0) -> Iterator[bytes]:
    """The raw body, checked against the clock and the size limit (counting ``start`` bytes already held)."""
    length = response.headers.get("Content-Length")
    if limit is not None and length and length.isdigit() and start + int(length) > limit:
        raise FetchError(f"{start + int(length)} bytes, over the limit of {limit}", status=413)
    total = start
    try:
        for block in response.iter_raw():  # as it arrives: a dropped body keeps what came
            total += len(block)
            if limit is not None and total > limit:
                raise FetchError(f"over the limit of {limit} bytes", status=413)
            clock.received(len(block))
            yield block
    except httpx2.TimeoutException:
        raise TooSlow(f"nothing arrived for {clock.limits.window_s:g} s") from None
    except httpx2.TransportError as exc:
        raise FetchError(f"the connection failed ({type(exc).__name__})", retry=True) from None


def get_bytes(
    url: str,
    *,
    limits: FetchLimits,
    policy: AddressPolicy = PUBLIC_ONLY,
    credential: Credential | None = None,
    method: str = "GET",
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    limit: int = 8 << 20,
) -> bytes:
    """A body (at most ``limit`` bytes); an HTTP error raises FetchError with its status."""
    clock = Clock(limits)
    with open_url(
        url, clock=clock, credential=credential, method=method, data=data, headers=headers, policy=policy
    ) as response:
        if response.status_code >= 400:
            raise FetchError(f"HTTP {response.status_code}", status=response.status_code)
        return b"".join(body_chunks(response, clock, limit))


def get_json(url: str, **options: object) -> object:
    """A JSON document (``get_bytes``' options); an answer that is not JSON raises FetchError."""
    import json

    try:
        return json.loads(get_bytes(url, **options))
    except ValueError:
        raise FetchError("the answer is not JSON") from None


def download(
    url: str,
    partial: Path,
    *,
    limits: FetchLimits,
    policy: AddressPolicy = PUBLIC_ONLY,
    credential: Credential | None = None,
    expected: int | None = None,
    limit: int | None = None,
    retries: int = 5,
    backoff: float = 0.5,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> int:
    """Download ``url`` into ``partial``, resuming a dropped connection with an HTTP Range request;
    returns the bytes transferred. HTTP errors other than 5xx, refusals and slow bodies are raised
    at once (FetchError, with ``status`` for an HTTP error); dropped connections are retried."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    clock = Clock(limits)
    transferred = attempt = 0
    while True:
        start = partial.stat().st_size if partial.exists() else 0
        if expected is not None and start >= expected:
            break  # complete (or too long: the caller's checks set it aside)
        try:
            headers = {"Range": f"bytes={start}-"} if start else {}
            with open_url(url, clock=clock, credential=credential, headers=headers, policy=policy) as response:
                if response.status_code == 416:  # nothing left from this offset: the caller checks what we have
                    break
                if response.status_code >= 400:
                    raise FetchError(f"HTTP {response.status_code}", status=response.status_code)
                if start and response.status_code != 206:
                    start = 0  # the server ignored the Range: start over
                length = response.headers.get("Content-Length")
                if expected is None and length and length.isdigit():  # a body cut short is resumed, not taken whole
                    expected = start + int(length)
                with open(partial, "ab" if start else "wb") as out:
                    for block in body_chunks(response, clock, limit, start):
                        out.write(block)
                        transferred += len(block)
                        on_bytes(len(block))
            if expected is None or partial.stat().st_size >= expected:
                break
            raise FetchError("the connection closed before the end of the file", retry=True)
        except FetchError as exc:
            if not (exc.retry or (exc.status or 0) >= 500) or attempt >= retries:
                raise
        attempt += 1
        time.sleep(backoff * 2 ** (attempt - 1))
    return transferred
