"""One edit across several devices: context parallelism (Ulysses) over N ranks.

The predictor's process is rank 0: the text encoders, the VAE, the safety checker, LoRA downloads,
the loop and the TaylorSeer cache stay there, unchanged. ``start`` launches N - 1 worker
processes (``python -m flux.parallel``), each reading the same configuration and building its
transformer on its own device (``cuda:RANK``; on the CPU, a process each) with
``runtime.build_transformer``, as rank 0 does. ``ParallelRuntime`` is rank 0's transformer: each
call first sends its inputs to every worker, then all ranks run the same forward: diffusers' own
plan for ``FluxTransformer2DModel`` splits the image and text tokens by sequence and gathers the
output on every rank. LoRAs are applied on every rank from the same file.

All ranks are on one machine: the rendezvous is on 127.0.0.1 and the collectives are bound to the
loopback interface, so nothing goes to any other address. Every collective has a deadline
(``FLUX_CONTEXT_PARALLEL_TIMEOUT_S``); a worker that dies or hangs fails the prediction with a clear
message within it; the container then refuses every edit with that message and reports itself
unhealthy (``ParallelRuntime.healthy``, the Cog health check) so that the platform replaces it.
A worker exits by itself when its parent process is gone.

The token axis must divide by N (Ulysses splits it evenly); ``sizes.divisible_output_size`` picks
the output size for that.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from flux import sizes
from flux.config import Config, set_library_default
from flux.device import dtype_for, freeze_loaded_objects
from flux.errors import EditError, SetupError
from flux.report import StepCallback
from flux.runtime import FastPath, LocalRuntime, LoraFile, LorasApplied, build_transformer

log = logging.getLogger(__name__)
T = TypeVar("T")

FORWARD, LORA, STOP, COMPILED = 1, 2, 3, 4


def device_for(rank: int, device_type: str) -> torch.device:
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def _backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def _init_group(rank: int, world: int, port: int, device_type: str, timeout_s: float) -> None:
    set_library_default("GLOO_SOCKET_IFNAME", "lo")
    set_library_default("NCCL_SOCKET_IFNAME", "lo")
    timeout = datetime.timedelta(seconds=timeout_s)
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        _backend(device_type), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timeout
    )


def _send(command: int, payload: dict, tensors: list[torch.Tensor], device: torch.device) -> None:
    data = json.dumps(payload).encode()
    dist.broadcast(torch.tensor([command, len(data)], dtype=torch.int64, device=device), src=0)
    dist.broadcast(torch.tensor(list(data), dtype=torch.uint8, device=device), src=0)
    for tensor in tensors:
        dist.broadcast(tensor.contiguous(), src=0)


def _receive(device: torch.device) -> tuple[int, dict, list[torch.Tensor]]:
    header = torch.zeros(2, dtype=torch.int64, device=device)
    dist.broadcast(header, src=0)
    data = torch.zeros(int(header[1]), dtype=torch.uint8, device=device)
    dist.broadcast(data, src=0)
    payload = json.loads(bytes(data.cpu().tolist()))
    tensors = []
    for shape, dtype in payload.get("tensors", []):
        tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.broadcast(tensor, src=0)
        tensors.append(tensor)
    return int(header[0]), payload, tensors


def _gather_compiled_frames(size: int, device: torch.device) -> list[int]:
    from torch._dynamo.utils import counters

    mine = torch.tensor([counters["frames"]["total"]], dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(size)]
    dist.all_gather(every, mine)
    return [int(count) for count in every]


def _split_call(kwargs: dict) -> tuple[dict, list[torch.Tensor]]:
    """A transformer call's keyword arguments as (what is not a tensor, the tensors in order)."""
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    tensors = [kwargs[k] for k in names]
    payload = {
        "names": names,
        "tensors": [[list(t.shape), str(t.dtype).removeprefix("torch.")] for t in tensors],
        "other": {k: v for k, v in kwargs.items() if k not in names},
    }
    return payload, tensors


@dataclass
class Workers:
    """Rank 0's handle on the N - 1 worker processes."""

    size: int
    device: torch.device
    processes: list[subprocess.Popen] = field(default_factory=list)
    failure: str | None = None
    # held for each exchange with the workers: Cog answers a cancel before the cancelled call has
    # ended, so the next prediction's first call must wait for it
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, command: int, payload: dict, tensors: list[torch.Tensor]) -> None:
        if self.failure is not None:
            raise EditError(self.failure)
        try:
            _send(command, payload, tensors, self.device)
        except Exception as exc:  # a collective that failed or timed out: a worker died or hangs
            raise self.record_failure(exc) from None

    def healthy(self) -> bool:
        return self.failure is None and all(p.poll() is None for p in self.processes)

    def is_failure(self, exc: BaseException) -> bool:
        """Whether ``exc``, raised during an edit, is the group's: a collective failed or a worker is gone."""
        return isinstance(exc, dist.DistError) or any(p.poll() is not None for p in self.processes)

    def record_failure(self, exc: BaseException) -> EditError:
        """Record the group as broken (every later edit is refused at once) and say why."""
        dead = [str(p.pid) for p in self.processes if p.poll() is not None]
        what = f"exited (pid {', '.join(dead)})" if dead else "stopped answering"
        self.failure = (
            f"a context-parallel worker {what} ({type(exc).__name__}); this container cannot edit until it is restarted"
        )
        log.error("%s: %s", self.failure, exc)
        return EditError(self.failure)

    def close(self, wait_s: float = 10.0) -> None:
        """Stop every worker (a STOP command, then terminate what is left) and leave the group."""
        if self.failure is None and any(p.poll() is None for p in self.processes):
            try:
                _send(STOP, {}, [], self.device)
            except Exception as exc:  # already broken: terminate below
                log.warning("context-parallel workers did not take the stop: %s", exc)
        deadline = time.monotonic() + wait_s
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class ParallelRuntime:
    """The transformer across N ranks: rank 0's own (``local``) and the workers'. Every call and
    every LoRA change goes to every rank, under the workers' lock, so each exchange is whole and
    in order."""

    local: LocalRuntime
    workers: Workers

    @property
    def decided(self) -> FastPath:
        return self.local.decided

    @property
    def transformer(self) -> torch.nn.Module:
        return self.local.transformer

    def __call__(self, **inputs: object) -> tuple[torch.Tensor, ...]:
        with self.workers.lock:
            self.workers.send(FORWARD, *_split_call(inputs))
            return self.local(**inputs)

    def apply_loras(self, files: Sequence[LoraFile]) -> LorasApplied:
        applied = self.local.apply_loras(files)
        with self.workers.lock:
            self.workers.send(LORA, {"loras": [[str(f.path), f.source, f.strength, f.field] for f in files]}, [])
        return applied

    def servable_size(self, width: int, height: int, conditioning_tokens: int) -> tuple[int, int]:
        """The nearest size whose tokens, with the conditioning's, split evenly over the ranks."""
        return sizes.divisible_output_size(width, height, conditioning_tokens, self.workers.size)

    def run(self, edit: Callable[[StepCallback | None], T], on_step: StepCallback | None) -> T:
        """``edit`` stopping only at a step boundary when cancelled (``stop_at_a_step_on_cancel``);
        a failed collective fails this edit and every later one with the group's message."""
        if self.workers.failure is not None:
            raise EditError(self.workers.failure)
        try:
            return stop_at_a_step_on_cancel(edit, on_step)
        except EditError:
            raise
        except RuntimeError as exc:
            if self.workers.is_failure(exc):
                raise self.workers.record_failure(exc) from None
            raise

    def healthy(self) -> bool:
        return self.workers.healthy()

    def compiled_frames(self) -> list[int]:
        """How many frames dynamo has compiled so far on each rank, rank 0 first: what shows that
        requests compile nothing on any rank, not only on this one."""
        with self.workers.lock:
            self.workers.send(COMPILED, {}, [])
            try:
                return _gather_compiled_frames(self.workers.size, self.workers.device)
            except Exception as exc:
                raise self.workers.record_failure(exc) from None

    def close(self) -> None:
        self.workers.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# NCCL's shared-memory transport fails or hangs in Docker's default 64 MB /dev/shm
SHARED_MEMORY_NEEDED = 1 << 30


def shared_memory_for_nccl(total_bytes: int) -> bool:
    """Where /dev/shm holds less than NCCL's shared-memory transport needs, turn that transport off
    (NCCL_SHM_DISABLE=1, unless the operator set it) and say so; True when it did."""
    if total_bytes >= SHARED_MEMORY_NEEDED or not set_library_default("NCCL_SHM_DISABLE", "1"):
        return False
    log.warning(
        "/dev/shm holds %d MB, less than the %d MB NCCL's shared-memory transport needs between GPUs: it is off "
        "(NCCL_SHM_DISABLE=1), so transfers go through slower paths; start the container with --shm-size=16g "
        "(docker run) to use it",
        total_bytes >> 20, SHARED_MEMORY_NEEDED >> 20,
    )  # fmt: skip
    return True


def _shared_memory_bytes(path: str = "/dev/shm") -> int:
    try:
        return shutil.disk_usage(path).total
    except OSError:
        return 0


def start(config: Config, device: torch.device, dtype: torch.dtype) -> ParallelRuntime:
    """Launch ``config.context_parallel - 1`` workers, join them in a process group as rank 0 and
    build rank 0's transformer (the workers build theirs meanwhile)."""
    size = config.context_parallel
    if device.type == "cuda":
        if torch.cuda.device_count() < size:
            raise SetupError(
                f"FLUX_CONTEXT_PARALLEL={size} needs {size} GPUs; this machine has {torch.cuda.device_count()}"
            )
        shared_memory_for_nccl(_shared_memory_bytes())
    port = _free_port()
    command = [sys.executable, "-m", "flux.parallel", str(size), str(port), device.type]
    environ = config.process_environ()
    processes = [subprocess.Popen([*command, str(rank)], env=environ) for rank in range(1, size)]
    workers = Workers(size, device_for(0, device.type), processes)
    try:
        _init_group(0, size, port, device.type, config.context_parallel_timeout_s)
        log.info("context parallelism: %d ranks (%d workers: pids %s)", size, size - 1, [p.pid for p in processes])
        transformer, decided = build_transformer(config.weights_dir, device, dtype, config.fast, size)
    except BaseException:
        workers.close()
        raise
    return ParallelRuntime(LocalRuntime(transformer, decided), workers)


class Stopped(Exception):
    """An edit stopped at a step boundary because its prediction was cancelled."""


def stop_at_a_step_on_cancel(run: Callable[[StepCallback], T], on_step: StepCallback | None = None) -> T:
    """``run(step_callback)`` in a helper thread while the caller waits. Cog cancels by raising an
    exception in the predictor's thread wherever it is (and may raise it again); inside a
    transformer call that would leave the workers in the middle of a collective. Here it lands in
    the waiting caller, which tells the helper to stop at the next step boundary, where every rank
    has ended the same calls, and goes on as a cancel does."""
    stop, box = threading.Event(), {}

    def step(index: int, total: int, computed: bool) -> None:
        if on_step is not None:
            on_step(index, total, computed)
        if stop.is_set():
            raise Stopped("cancelled")

    def target() -> None:
        try:
            box["result"] = run(step)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    helper = threading.Thread(target=target, name="rank0-edit", daemon=True)
    try:
        helper.start()
        while helper.is_alive():
            helper.join(0.02)
    except BaseException:
        stop.set()  # the helper stops by itself at the next step, however soon this thread leaves
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]


def _exit_with_parent() -> None:
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def worker_main(size: int, port: int, device_type: str, rank: int) -> None:
    """A worker: read the configuration, join the group, build the transformer as rank 0 does,
    then serve rank 0's commands."""
    _exit_with_parent()
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s rank {rank} %(name)s: %(message)s")
    config = Config.from_env()
    _init_group(rank, size, port, device_type, config.context_parallel_timeout_s)
    device = device_for(rank, device_type)
    transformer, decided = build_transformer(config.weights_dir, device, dtype_for(device), config.fast, size)
    runtime = LocalRuntime(transformer, decided)
    freeze_loaded_objects()
    with torch.inference_mode():
        while True:
            command, payload, tensors = _receive(device)
            if command == STOP:
                break
            if command == FORWARD:
                runtime(**dict(zip(payload["names"], tensors, strict=True)), **payload["other"])
            elif command == COMPILED:
                _gather_compiled_frames(size, device)
            elif command == LORA:
                runtime.apply_loras([LoraFile(Path(path), *rest) for path, *rest in payload["loras"]])
    dist.destroy_process_group()


if __name__ == "__main__":
    worker_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
