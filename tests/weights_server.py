"""A real HTTP server on 127.0.0.1 serving a weights tree, with Range support and injectable faults."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Faults:
    token: str | None = None  # required bearer token
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before the first drop
    corrupt: set[str] = field(default_factory=set)  # paths served with flipped bytes
    delay: float = 0.0  # seconds before each GET answers (lets downloads overlap)
    redirects: dict[str, str] = field(default_factory=dict)  # path -> where a 302 sends the client
    drip: dict[str, float] = field(default_factory=dict)  # path -> seconds between bytes of its body


@dataclass
class Log:
    requests: list[dict] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def make_handler(root: Path, faults: Faults, log: Log):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _file(self) -> Path | None:
            rel = self.path.lstrip("/")
            target = (root / rel).resolve()
            return target if target.is_file() and root.resolve() in target.parents else None

        def _check(self) -> Path | None:
            with log.lock:
                log.requests.append(
                    {
                        "method": self.command,
                        "path": self.path.lstrip("/"),
                        "range": self.headers.get("Range"),
                        "authorization": self.headers.get("Authorization"),
                    }
                )
            location = faults.redirects.get(self.path.lstrip("/"))
            if location is not None:
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if faults.token and self.headers.get("Authorization") != f"Bearer {faults.token}":
                self.send_error(401, "Unauthorized")
                return None
            target = self._file()
            if target is None:
                self.send_error(404, "Not Found")
            return target

        def do_HEAD(self):
            target = self._check()
            if target is not None:
                self.send_response(200)
                self.send_header("Content-Length", str(target.stat().st_size))
                self.end_headers()

        def do_POST(self):  # the Hub's paths-info API: the answer is a file at that path
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.do_GET()

        def do_GET(self):
            target = self._check()
            if target is None:
                return
            with log.lock:
                log.in_flight += 1
                log.max_in_flight = max(log.max_in_flight, log.in_flight)
            try:
                time.sleep(faults.delay)
                self._send(target)
            finally:
                with log.lock:
                    log.in_flight -= 1

        def _send(self, target: Path):
            rel = self.path.lstrip("/")
            data = target.read_bytes()
            if rel in faults.corrupt:
                data = bytes(b ^ 0xFF for b in data)
            start = 0
            header = self.headers.get("Range")
            if header:
                start = int(header.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    self.send_error(416, "Range Not Satisfiable")
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            interval = faults.drip.get(rel)
            if interval is not None:
                with contextlib.suppress(OSError):
                    for byte in body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(interval)
                return
            cut = faults.drop_after.pop(rel, None)
            if cut is not None:
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(2)
                return
            self.wfile.write(body)

    return Handler


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


@contextlib.contextmanager
def serve_tree(root: Path, faults: Faults | None = None, host: str = "127.0.0.1"):
    """Serve ``root`` on ``host`` (a loopback address: 127.0.0.1, or ::1); yields (url, log)."""
    faults = faults or Faults()
    log = Log()
    server_class = _IPv6Server if ":" in host else ThreadingHTTPServer
    server = server_class((host, 0), make_handler(root, faults, log))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    netloc = f"[{host}]" if ":" in host else host
    try:
        yield f"http://{netloc}:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()
