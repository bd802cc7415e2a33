"""Training on several processes or machines: data parallelism with torch.distributed, as torchrun starts it.

    torchrun --nproc-per-node 2 -m plainsd train unet --resume ...

Every process holds the whole model. The batch of a step is still a pure function of (seed, step, micro): each
process builds the same global batch (its indices, captions and random draws, which are cheap) and runs the
networks on its own rows of it only (rows()); DistributedDataParallel averages the gradients, so that the
weights after a step are those of one process training on the whole batch, whatever the number of processes.
That is also why a run can be resumed on a different number of processes. Process 0 alone writes checkpoints,
samples and logs. Without torchrun's environment variables there is one process and none of this happens.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def join() -> None:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR...), over
    gloo: plainsd trains on CPUs. Nothing to do without torchrun or with a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_initialized() or world <= 1:
        return
    rank = int(os.environ["RANK"])
    # torchrun's agent serves one store for all restarts of the group, and a restarted process could read the
    # address a killed one left in it and wait for it forever: each attempt keeps its keys under its own prefix.
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent and rank == 0)
    attempt = dist.PrefixStore(f"plainsd/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group("gloo", store=attempt, rank=rank, world_size=world)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def group():
    """The block runs as a member of torchrun's process group (join), which it leaves at the end."""
    join()
    try:
        yield
    finally:
        leave()


def size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this is the process that writes files and prints (rank 0, or the only one)."""
    return rank() == 0


def restarted() -> bool:
    """Whether torchrun has restarted the group after a process failed (--max-restarts): the run then goes on
    from its last checkpoint."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def rows(n: int) -> slice | None:
    """This process's rows of a global batch of n; None when there is one process (all rows, as ever)."""
    world = size()
    if world == 1:
        return None
    if n % world:
        raise ValueError(f"the batch of {n} does not split evenly over {world} processes; "
                         f"use a batch size that is a multiple of {world}")
    per = n // world
    return slice(rank() * per, (rank() + 1) * per)


def take(rows: slice | None, *batch):
    """Each of the global batch's tensors or lists cut to `rows` (None: unchanged); a single one comes back bare."""
    cut = tuple(b if rows is None or b is None else b[rows] for b in batch)
    return cut[0] if len(cut) == 1 else cut


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every process's rows of x, in rank order, with gradients flowing back to each process's own rows (for
    losses that compare each sample with the whole batch, as CLIP's contrastive loss)."""
    if size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()))


def mean(value: float) -> float:
    """The mean of a number over the processes (the loss of the whole batch, for the log)."""
    if size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / size()


def share(mine: dict) -> dict:
    """Every process's entries of a dict (each process made some of the keys) in one dict, on every process."""
    if size() == 1:
        return mine
    everyone = [None] * size()
    dist.all_gather_object(everyone, mine)
    return {k: v for part in everyone for k, v in part.items()}


def barrier() -> None:
    if size() > 1:
        dist.barrier()


class StepModule(torch.nn.Module):
    """The trained tensors and the loss that uses them, as one module for DistributedDataParallel: its forward is
    the loss of a micro-batch, and DDP averages the tensors' gradients over the processes during backward."""

    def __init__(self, params: dict[str, torch.nn.Parameter], loss_fn):
        super().__init__()
        self.trained = torch.nn.ParameterList(params.values())
        self.loss_fn = loss_fn

    def forward(self, step: int, micro: int) -> torch.Tensor:
        return self.loss_fn(step, micro)


def data_parallel(params: dict[str, torch.nn.Parameter], loss_fn):
    """None for one process; else a DDP module whose call computes loss_fn's loss and, in backward, averages
    the gradients over the processes (its no_sync() skips that on the micro-batches before the last)."""
    if size() == 1:
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(StepModule(params, loss_fn))
