"""Training on several processes (host-free): the plumbing the engine and the runs use under
PyTorch's ``torchrun`` (``torch.distributed``, one process per device, one node or several).

One process is a :class:`World` of size 1 (:data:`SINGLE`) and nothing here does anything for it;
every training run is unchanged there. Under ``torchrun`` (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` in the environment) :func:`init` joins the process group (NCCL on CUDA, gloo on
the CPU) with a timeout on every collective, and the run shares the work this way:

* the batch: ``--batch-size`` is per rank; every rank draws the whole global batch (indices,
  noise, timesteps, augmentation) from the same seeded generator and takes its own rows
  (:meth:`World.rows`, :func:`local_rows`), so the random stream, the checkpoint and the result do
  not depend on how many ranks share the batch;
* the loss: a batch-normalised loss divides by the global normaliser (:func:`global_mean`), so the
  mean of the ranks' gradients is the gradient of the one-process loss over the global batch;
* the step: :meth:`World.sync_step` averages the gradients of the trainables, the loss, and ORs
  every rank's stop request in ONE all-reduce; every rank stops after the same completed step;
* the latent cache: each rank encodes its shard (:meth:`World.shard`) into the shared folder, then
  the ranks meet (:meth:`World.agree`); no image is encoded twice;
* writes: only rank 0 (:attr:`World.is_main`) writes checkpoints, outputs and previews.

A rank that dies makes the collective of the others fail (gloo: at once, a closed connection;
NCCL and hangs: after the timeout); they then take a roll call in the rendezvous store and raise
:class:`RankLost` naming the ranks that did not answer.
"""
from __future__ import annotations

import atexit
import contextlib
import contextvars
import datetime
import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from ..errors import ProductSceneError

DEFAULT_TIMEOUT_S = 600.0   # a collective that waits longer than this fails (a hung or lost rank)
ROLL_CALL_S = 5.0           # how long survivors wait for each other's answer after a failed collective


class RankLost(ProductSceneError):
    """A collective failed because a rank stopped answering (it died, or hangs)."""


def env_world() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` as ``torchrun`` sets them (``0, 1, 0`` without it)."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        size = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ProductSceneError("distributed: RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers "
                                "(torchrun sets them)") from None
    if size < 1 or not 0 <= rank < size:
        raise ProductSceneError(f"distributed: rank {rank} of a world of {size} is impossible")
    return rank, size, local


def restarted() -> bool:
    """Whether torchrun restarted this job (``--max-restarts``): the run then resumes by itself."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


@dataclass
class World:
    """The processes one training run spans; size 1 is one process (no collective runs)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    comm_seconds: float = 0.0   # time spent in this rank's collectives (the benchmark's share)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def describe(self) -> str:
        return "1 process" if not self.distributed else f"{self.size} ranks ({self.backend})"

    # -- what a rank reads ------------------------------------------------------------------------
    def rows(self, per_rank: int) -> slice:
        """This rank's rows of a global batch of ``per_rank * size`` rows."""
        return slice(self.rank * int(per_rank), (self.rank + 1) * int(per_rank))

    def shard(self, n: int) -> range:
        """This rank's share of ``n`` items (every ``size``-th, from ``rank``): deterministic, and
        the shards of all ranks cover every item exactly once."""
        return range(self.rank, int(n), self.size)

    # -- collectives ------------------------------------------------------------------------------
    def _all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        import torch.distributed as dist
        start = time.perf_counter()
        try:
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        except Exception as e:  # noqa: BLE001  (gloo: RuntimeError; NCCL: DistBackendError; timeouts)
            raise self.lost(e) from None
        finally:
            self.comm_seconds += time.perf_counter() - start
        return tensor

    def agree(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (also a meeting point: every rank waits
        for the others here)."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self._all_reduce(t).item() > 0)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over the ranks (no gradient flows through it)."""
        if not self.distributed:
            return tensor
        t = tensor.detach().to(self.device, torch.float32).clone()
        return (self._all_reduce(t) / self.size).to(tensor.device, tensor.dtype)

    def sync_step(self, params: Sequence[torch.Tensor], loss: float, stop: bool) -> tuple[float, bool]:
        """After backward: every rank's gradients of ``params`` replaced by their mean over the
        ranks; returns ``(mean loss, any rank asked to stop)``. One all-reduce for all of it."""
        if not self.distributed:
            return loss, bool(stop)
        with_grad = [p for p in params if p.grad is not None]
        parts = [p.grad.detach().reshape(-1).to(self.device, torch.float32) for p in with_grad]
        parts.append(torch.tensor([float(loss), 1.0 if stop else 0.0], device=self.device))
        flat = self._all_reduce(torch.cat(parts))
        offset = 0
        for p in with_grad:
            n = p.grad.numel()
            p.grad.copy_((flat[offset:offset + n] / self.size).view_as(p.grad).to(p.grad.dtype))
            offset += n
        return float(flat[offset] / self.size), bool(flat[offset + 1] > 0)

    def lost(self, error: BaseException) -> RankLost:
        """The error of a failed collective, naming the ranks that no longer answer (a roll call in
        the rendezvous store, :data:`ROLL_CALL_S` seconds at most)."""
        missing = self._roll_call()
        who = (f"rank {missing[0]}" if len(missing) == 1 else "ranks " + ", ".join(map(str, missing))) \
            if missing else "another rank"
        reason = " ".join(str(error).split())[:300]
        return RankLost(f"distributed: {who} of {self.size} was lost (rank {self.rank} stops; the last "
                        f"checkpoint holds the last completed step; resume with --resume): {reason}")

    def _roll_call(self) -> list[int]:
        try:
            from torch.distributed import distributed_c10d
            store = distributed_c10d._get_default_store()
            store.set_timeout(datetime.timedelta(seconds=ROLL_CALL_S))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            key = f"productscene/roll_call/{attempt}/" + "{}"
            store.set(key.format(self.rank), "here")
            deadline = time.monotonic() + ROLL_CALL_S
            while True:
                missing = [r for r in range(self.size) if not store.check([key.format(r)])]
                if not missing or time.monotonic() > deadline:
                    return missing
                time.sleep(0.1)
        except Exception:  # noqa: BLE001  (the store went with the lost rank: no names)
            return []


SINGLE = World()
_active: contextvars.ContextVar[World] = contextvars.ContextVar("productscene_world", default=SINGLE)


def active() -> World:
    """The world of the training step running now (:data:`SINGLE` outside one)."""
    return _active.get()


@contextlib.contextmanager
def activate(world: World | None) -> Iterator[World]:
    """Inside: :func:`active` is ``world`` (the engine enters it around each step's batch and loss)."""
    token = _active.set(world or SINGLE)
    try:
        yield world or SINGLE
    finally:
        _active.reset(token)


def local_rows(tensor: torch.Tensor, per_rank: int) -> torch.Tensor:
    """This rank's rows of a global batch drawn for the :func:`active` world."""
    world = active()
    return tensor if not world.distributed else tensor[world.rows(per_rank)]


def global_rows(per_rank: int) -> int:
    """Rows of the global batch when each rank takes ``per_rank``."""
    return int(per_rank) * active().size


def global_mean(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s mean over the ranks of the :func:`active` world (itself in one process)."""
    return active().mean(tensor)


def pick_device(cpu: bool) -> None:
    """Before any CUDA use: each local rank sees only its own GPU (``CUDA_VISIBLE_DEVICES``), so a
    host that trains on "the" GPU trains on this rank's."""
    rank, size, local = env_world()
    if cpu or size == 1:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d for d in visible.split(",") if d.strip()] if visible else None
    if devices is not None and not devices:
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = devices[local % len(devices)] if devices else str(local)


def init(cpu: bool = False, timeout_s: float | None = None) -> World:
    """The world this process belongs to: :data:`SINGLE` without ``torchrun``; under it, the
    process group joined (NCCL when this rank has a GPU and ``cpu`` is off, else gloo) with
    ``timeout_s`` on every collective. Call before the model is loaded (it picks this rank's GPU)."""
    rank, size, local = env_world()
    if size == 1:
        return SINGLE
    timeout = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
    if not timeout > 0:
        raise ProductSceneError(f"dist-timeout: expected seconds > 0, got {timeout_s!r}")
    pick_device(cpu)
    import torch.distributed as dist
    gpu = not cpu and torch.cuda.is_available()
    backend = "nccl" if gpu else "gloo"
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    if not dist.is_initialized():
        if gpu:
            torch.cuda.set_device(device)
        wait = datetime.timedelta(seconds=timeout)
        try:
            # the rendezvous store outlives a torchrun restart: each attempt's keys (the ranks'
            # addresses) under their own prefix, never a dead rank's from the attempt before
            store, _, _ = next(dist.rendezvous("env://", rank, size, timeout=wait))
            store = dist.PrefixStore(f"productscene/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
            dist.init_process_group(backend, store=store, timeout=wait, rank=rank, world_size=size)
        except Exception as e:  # noqa: BLE001
            raise ProductSceneError(f"distributed: rank {rank} of {size} could not join the process group "
                                    f"({backend}): {' '.join(str(e).split())[:300]}") from None
        atexit.register(shutdown)
    return World(rank=rank, size=size, local_rank=local, backend=backend, device=device)


def shutdown() -> None:
    """Leave the process group (at exit)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
