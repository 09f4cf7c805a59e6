"""Where and how work runs, for every stage: the device, this process's place in a torchrun
job, DataLoader workers, and the named random streams every seeded draw comes from."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from spl.data.common import SplError

# Each seeded draw has its own stream, so that one never shifts another: a resumed run and
# a head trained alone see exactly the draws of an uninterrupted sweep.
_STREAMS = {
    "batches": 0,  # the linear engine's shuffled order of an epoch
    "pseudo_negatives": 104_729,  # pseudo-negative sampling's mask of an epoch
    "estimator": 2 * 104_729,  # ROLE's estimator initialisation
    "head": 3 * 104_729,  # the linear heads' initialisation
    "finetune": 17,  # fine-tuning: head init, augmentation and shuffling of an epoch
}


def stream_seed(seed: int, epoch: int, stream: str) -> int:
    """The seed of one named random stream for (seed, epoch)."""
    return (seed * 1_000_003 + epoch * 7_919 + _STREAMS[stream]) % (2**63 - 1)


def generator(seed: int, epoch: int, stream: str) -> torch.Generator:
    """A CPU generator for one named stream of (seed, epoch)."""
    return torch.Generator().manual_seed(stream_seed(seed, epoch, stream))


def resolve_device(device: str | torch.device = "auto", local_rank: int | None = None):
    """``auto`` (CUDA when there is one), ``cpu``, ``cuda``, ``cuda:N``; under torchrun each
    process takes the GPU of its local rank. A device that is not there is a clear error."""
    text = str(device)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        chosen = torch.device(text)
    except RuntimeError as exc:
        raise SplError(f"unknown device {text!r}: use auto, cpu, cuda or cuda:N") from exc
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise SplError(f"--device {text}: no CUDA device here; use --device cpu")
        if local_rank is not None:
            chosen = torch.device("cuda", local_rank)
        elif chosen.index is None:
            chosen = torch.device("cuda", torch.cuda.current_device())
    return chosen


def default_workers(local_world: int = 1) -> int:
    """DataLoader workers: the CPUs this process may use, less one, at most 16."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus // max(local_world, 1) - 1))


@dataclass
class Processes:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @classmethod
    def start(cls, device: str, *, timeout: datetime.timedelta | None = None) -> Processes:
        """This process's place, its device (under torchrun, the GPU of its local rank) and
        the process group; ``timeout``: how long a collective waits for the slowest process
        (torch's default when None; a job whose processes finish their shares at different
        times, as ``fit-linear``'s, needs longer)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        chosen = resolve_device(device, local_rank if world > 1 else None)
        if chosen.type == "cuda":
            if world > 1 and chosen.index >= torch.cuda.device_count():
                raise SplError(
                    f"this torchrun process has local rank {local_rank}, but this machine has "
                    f"{torch.cuda.device_count()} GPUs: start one process per GPU "
                    f"(--nproc_per_node {torch.cuda.device_count()})"
                )
            torch.cuda.set_device(chosen)
        procs = cls(rank=rank, world=world, local_rank=local_rank, device=chosen)
        if world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                backend = "nccl" if chosen.type == "cuda" else "gloo"
                options = {} if timeout is None else {"timeout": timeout}
                dist.init_process_group(backend, **options)
                procs.owns_group = True
        return procs

    def all_ok(self, ok: bool) -> bool:
        """True when every process says ok (a barrier too)."""
        if self.world == 1:
            return ok
        import torch.distributed as dist

        backend = dist.get_backend()
        flag = torch.tensor([int(ok)], device=self.device if backend == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def together(self, work: Callable[[], object], *, everyone: bool = True):
        """Run ``work`` (on every rank, or rank 0 only); if it fails anywhere, fail everywhere."""
        error: BaseException | None = None
        value = None
        try:
            if everyone or self.rank == 0:
                value = work()
        except Exception as exc:  # re-raised below, after the other ranks hear of it
            error = exc
        if not self.all_ok(error is None):
            if error is not None:
                raise error
            raise SplError("another process of this torchrun job failed: see its message")
        return value

    def broadcast(self, value: object) -> object:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_in_order(self, owners: Sequence[int], mine: Mapping[int, object]) -> list | None:
        """Items spread over the processes, in order, on rank 0 (None on the other ranks):
        item ``i`` is ``mine[i]`` on rank ``owners[i]``. Sent one item at a time, point to
        point, so that rank 0 never holds more than one item in transit."""
        if self.world == 1:
            return [mine[i] for i in range(len(owners))]
        import torch.distributed as dist

        gathered = []
        for index, owner in enumerate(owners):
            if owner == self.rank == 0:
                gathered.append(mine[index])
            elif self.rank == owner:
                dist.send_object_list([mine[index]], dst=0)
            elif self.rank == 0:
                box = [None]
                dist.recv_object_list(box, src=owner)
                gathered.append(box[0])
        return gathered if self.rank == 0 else None

    def close(self, *, failed: bool = False) -> None:
        """The process group goes, once every rank has arrived; ``failed``: this process
        leaves on an error, at once (the others may wait in another collective, which a
        barrier here would never meet: torchrun stops them when this process exits)."""
        if self.owns_group:
            import torch.distributed as dist

            if not failed:
                self.all_ok(True)  # every rank arrives before the group goes away
            dist.destroy_process_group()


def process_seconds() -> float | None:
    """Seconds since this process started (interpreter start and imports included), for
    reporting where a command's time goes; None where the system does not say (Linux's
    /proc tells, to 10 ms)."""
    try:
        with open("/proc/self/stat") as handle:
            # the fields after the command name (which may hold spaces): starttime is 22nd
            fields = handle.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
