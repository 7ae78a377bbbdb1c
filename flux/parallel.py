"""One edit across several devices: context parallelism (Ulysses) over N ranks.

The predictor's process is rank 0: the text encoders, the VAE, the safety checker, LoRA downloads,
the loop and the TaylorSeer cache stay there, unchanged. ``start`` launches N - 1 worker
processes (``python -m flux.parallel``), each loading only the transformer onto its own device
(``cuda:RANK``; on the CPU, a process each) with the same fast path as rank 0, in the same order:
attention backend, FP8, LoRA side branch, parallelism, compile. Every transformer call of rank 0
first sends its inputs to every worker (a forward pre-hook on rank 0's transformer), then all ranks
run the same forward: diffusers' own plan for ``FluxTransformer2DModel`` splits the image and text
tokens by sequence and gathers the output on every rank. LoRAs are applied on every rank from the
same file.

All ranks are on one machine: the rendezvous is on 127.0.0.1 and the collectives are bound to the
loopback interface, so nothing goes to any other address. Every collective has a deadline
(``FLUX_CONTEXT_PARALLEL_TIMEOUT_S``); a worker that dies or hangs fails the prediction with a clear
message within it; the container then refuses every edit with that message and reports itself
unhealthy (``Model.healthy``, the Cog health check) so that the platform replaces it.
A worker exits by itself when its parent process is gone.

The token axis must divide by N (Ulysses splits it evenly); ``sizes.divisible_output_size`` picks
the output size for that.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from flux import settings
from flux.errors import EditError

log = logging.getLogger(__name__)
T = TypeVar("T")

FORWARD, LORA, STOP, COMPILED = 1, 2, 3, 4
WORKER_READY_S = 600.0  # how long setup() waits for every worker to load and warm up


def enable_ulysses(transformer: torch.nn.Module, degree: int) -> None:
    """diffusers' context parallelism (Ulysses, ``degree`` ranks) on the transformer. The process
    group must be up. diffusers derives each rank's device from ``torch.accelerator.device_count()``,
    which is 0 on a CPU-only machine: it is counted as 1 for the call (each CPU rank is a process)."""
    from diffusers import ContextParallelConfig

    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: max(1, count())
    try:
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
    finally:
        torch.accelerator.device_count = count


def device_for(rank: int, device_type: str) -> torch.device:
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def _backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def _init_group(rank: int, world: int, port: int, device_type: str) -> None:
    settings.default_for_library("GLOO_SOCKET_IFNAME", "lo")
    settings.default_for_library("NCCL_SOCKET_IFNAME", "lo")
    timeout = datetime.timedelta(seconds=settings.get_float("FLUX_CONTEXT_PARALLEL_TIMEOUT_S"))
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
            raise self.failed(exc) from None

    def healthy(self) -> bool:
        return self.failure is None and all(p.poll() is None for p in self.processes)

    def is_failure(self, exc: BaseException) -> bool:
        """Whether ``exc``, raised during an edit, is the group's: a collective failed or a worker is gone."""
        return isinstance(exc, dist.DistError) or any(p.poll() is not None for p in self.processes)

    def failed(self, exc: BaseException) -> EditError:
        """Record the group as broken (every later edit is refused at once) and say why."""
        dead = [str(p.pid) for p in self.processes if p.poll() is not None]
        what = f"exited (pid {', '.join(dead)})" if dead else "stopped answering"
        self.failure = (
            f"a context-parallel worker {what} ({type(exc).__name__}); this container cannot edit until it is restarted"
        )
        log.error("%s: %s", self.failure, exc)
        return EditError(self.failure)

    def forward_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        payload, tensors = _split_call(kwargs)
        self.send(FORWARD, payload, tensors)

    def apply_loras(self, entries: list[tuple[str, str, float]]) -> None:
        """(path, source, strength) of each LoRA, applied on every worker as rank 0 applied them."""
        with self.lock:
            self.send(LORA, {"loras": entries}, [])

    def compiled_frames(self) -> list[int]:
        """How many frames dynamo has compiled so far on each rank, rank 0 first: what shows that
        requests compile nothing on any rank, not only on this one."""
        with self.lock:
            self.send(COMPILED, {}, [])
            try:
                return _gather_compiled_frames(self.size, self.device)
            except Exception as exc:
                raise self.failed(exc) from None

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(size: int, weights_dir: str | Path, device: torch.device) -> Workers:
    """Launch ``size - 1`` workers for ``weights_dir`` and join them in a process group as rank 0."""
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise EditError(f"FLUX_CONTEXT_PARALLEL={size} needs {size} GPUs; this machine has {torch.cuda.device_count()}")
    port = _free_port()
    command = [sys.executable, "-m", "flux.parallel", str(size), str(port), str(weights_dir), device.type]
    processes = [subprocess.Popen([*command, str(rank)]) for rank in range(1, size)]
    _init_group(0, size, port, device.type)
    log.info("context parallelism: %d ranks (%d workers: pids %s)", size, size - 1, [p.pid for p in processes])
    return Workers(size, device_for(0, device.type), processes)


def one_call_at_a_time(transformer: torch.nn.Module, lock: threading.Lock) -> None:
    """Rank 0's transformer calls hold ``lock``, as the LoRA broadcasts do: every exchange with the
    workers is whole and in order, also when a cancelled edit's last call and the next prediction's
    first meet (Cog answers a cancel before the cancelled work has ended)."""
    base = type(transformer)

    def call(self: torch.nn.Module, *args, **kwargs):
        with lock:
            return base.__call__(self, *args, **kwargs)

    transformer.__class__ = type(f"{base.__name__}OnEveryRank", (base,), {"__call__": call})


class Stopped(Exception):
    """An edit stopped at a step boundary because its prediction was cancelled."""


def stop_at_a_step_on_cancel(run: Callable[[Callable[[int, int, bool], None]], T], on_step=None) -> T:
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


def worker_main(size: int, port: int, weights_dir: str, device_type: str, rank: int) -> None:
    """A worker: join the group, load the transformer with the fast path, then serve rank 0's commands."""
    from diffusers import FluxTransformer2DModel

    from flux.device import dtype_for, freeze_loaded_objects
    from flux.fast import FastSettings, optimize_transformer
    from flux.lora import LoraState

    _exit_with_parent()
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s rank {rank} %(name)s: %(message)s")
    _init_group(rank, size, port, device_type)
    device = device_for(rank, device_type)
    dtype = dtype_for(device)
    transformer = FluxTransformer2DModel.from_pretrained(
        Path(weights_dir) / "transformer", local_files_only=True, dtype=dtype
    )
    transformer = transformer.to(device).eval()
    applied = optimize_transformer(transformer, device, dtype, FastSettings.from_env(), size)
    rank_of_branch = applied.get("lora_branch_rank", 0)
    loras = LoraState(transformer, rank_of_branch if isinstance(rank_of_branch, int) else 0, applied.get("fp8") is True)
    freeze_loaded_objects()
    with torch.inference_mode():
        while True:
            command, payload, tensors = _receive(device)
            if command == STOP:
                break
            if command == FORWARD:
                transformer(**dict(zip(payload["names"], tensors, strict=True)), **payload["other"])
            elif command == COMPILED:
                _gather_compiled_frames(size, device)
            elif command == LORA:
                wanted = [
                    (loras.converted(Path(path), source)[0], strength) for path, source, strength in payload["loras"]
                ]
                loras.apply(wanted)
    dist.destroy_process_group()


if __name__ == "__main__":
    worker_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))
