"""Start the real Cog HTTP server (coglet) on 127.0.0.1 for tests, the way scripts/serve.sh does."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, process: subprocess.Popen, log_path: Path):
        self.url, self.process, self.log_path = url, process, log_path

    def get(self, path: str, timeout: float = 10) -> tuple[int, dict | str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def post(
        self, path: str, body: dict, timeout: float = 300, headers: dict | None = None, method: str = "POST"
    ) -> tuple[int, dict | str]:
        data = json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})}, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            text = e.read().decode()
            with contextlib.suppress(ValueError):
                return e.code, json.loads(text)
            return e.code, text

    def predict(self, retry_busy: bool = True, **inputs) -> tuple[int, dict | str]:
        """One prediction. coglet can answer 409 ("At capacity") for a moment right after it returned
        the previous response, so a sequential client retries a 409 after a short pause, as
        docs/failures.md tells users to."""
        for _ in range(50):
            status, body = self.post("/predictions", {"input": inputs})
            if status != 409 or not retry_busy:
                break
            time.sleep(0.1)
        return status, body

    def cancel_when(
        self, reached: Callable[[], bool], prediction_id: str, inputs: dict, within_s: float = 120
    ) -> tuple[dict, float]:
        """Start a prediction and cancel it once ``reached()`` says it got to the stage wanted (a
        line in the server's log, a request a test server received): (its final response, seconds
        from the cancel to that response)."""
        import threading

        result: dict = {}

        def run() -> None:
            request = {"id": prediction_id, "input": inputs}
            result["response"] = self.post(f"/predictions/{prediction_id}", request, method="PUT")[1]
            result["done"] = time.monotonic()

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + within_s
        while not reached() and "done" not in result:
            if time.monotonic() > deadline:
                raise AssertionError(f"the stage was not reached within {within_s}s:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        cancelled_at = time.monotonic()
        self.post(f"/predictions/{prediction_id}/cancel", {})
        thread.join(timeout=within_s)
        return result["response"], result["done"] - cancelled_at

    def settled_health(self, within_s: float = 10) -> str:
        """The health status once the server has finished its last prediction: coglet can still say
        BUSY for a moment after it returned the response (the same window as the 409 above)."""
        deadline = time.monotonic() + within_s
        while True:
            status = self.get("/health-check")[1]["status"]
            if status != "BUSY" or time.monotonic() > deadline:
                return status
            time.sleep(0.1)

    def health_within(self, wanted: str, within_s: float = 10) -> str:
        """The health status once it is ``wanted``, or whatever it is after ``within_s``."""
        deadline = time.monotonic() + within_s
        while True:
            status = self.get("/health-check")[1]["status"]
            if status == wanted or time.monotonic() > deadline:
                return status
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def logged(self, text: str) -> Callable[[], bool]:
        """Whether the server's log shows ``text`` (a stage a prediction reached), as a condition."""
        return lambda: text in self.log()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def decode_output(output: str) -> bytes:
    return base64.b64decode(output.split(",", 1)[1])


@contextlib.contextmanager
def cog_server(weights_dir: Path, workdir: Path, env: dict | None = None, ready_timeout: float = 120):
    from flux.lab.cog_schema import write_schema

    write_schema()
    port = free_port()
    venv_bin = str(Path(sys.executable).parent)
    environment = {
        **os.environ,
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
        "PORT": str(port),
        "WEIGHTS_DIR": str(weights_dir),
        "FLUX_OUTPUT_DIR": str(workdir / "outputs"),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    log_path = workdir / f"server-{port}.log"
    log_file = open(log_path, "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
        cwd=ROOT, env=environment, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{server.log()[-3000:]}")
            with contextlib.suppress(OSError):
                status, body = server.get("/health-check", timeout=2)
                if status == 200 and isinstance(body, dict) and body.get("status") in ("READY", "SETUP_FAILED"):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in {ready_timeout}s:\n{server.log()[-3000:]}")
            time.sleep(0.3)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log_file.close()
