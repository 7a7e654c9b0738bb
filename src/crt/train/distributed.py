"""Data-parallel training under `torchrun`: PyTorch's process group and DistributedDataParallel.

    torchrun --standalone --nproc_per_node N -m crt train ...        # one machine, N processes
    torchrun --nnodes 2 --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:PORT \\
             --nproc_per_node N -m crt train ...                     # several machines

torchrun starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK; `join` turns
them into a process group (Gloo on CPU, NCCL on CUDA, one GPU per process). Without torchrun
every helper here is the one-process identity, so the training loop has a single code path.

What is split, and why nothing else has to be:
- the global batch. Its B rows are cut into world x grad_accum contiguous groups of rows
  (`row_share`), rank-major, so the rows a process trains are the same whatever the world
  size, and each row keeps its own recurrent state: a state never crosses processes.
- the loss normaliser. Each micro-batch's summed loss is divided by the global count of scored
  targets (`all_reduce_sum`), so the gradient DDP averages is the one-process gradient of the
  same global batch, also when ranks score different numbers of answers.
- evaluation. Each rank scores its share of the split's rows or documents and the sums are
  reduced: the split is scored once, and its perplexity does not depend on the world size.
  (A video classifier's validation is not split: every rank scores every clip, and all take
  rank 0's scores, so that their curriculum decisions agree.)
"""

from __future__ import annotations

import inspect
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from crt.errors import CRTError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: rank in 0 .. size - 1."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints, logs, plots and writes checkpoints."""
        return self.rank == 0


def launched() -> bool:
    """True in a process torchrun started with more than one process in the job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> World:
    """The current process group's rank and size; World() (rank 0 of 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def join(device: torch.device) -> torch.device:
    """Join torchrun's process group (once per process) and return this process's device.

    CPU: Gloo. CUDA: NCCL, and device cuda:LOCAL_RANK (torchrun gives each process one GPU).
    Outside torchrun: the device unchanged.
    """
    if not launched():
        return device
    if not dist.is_available():
        raise CRTError("this PyTorch build has no torch.distributed: install a build with it, or train in one process (without torchrun)")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise CRTError(
                f"torchrun started local rank {local} but this machine has {torch.cuda.device_count()} CUDA devices: "
                "give --nproc_per_node at most the number of GPUs"
            )
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        except (ValueError, RuntimeError) as e:  # WORLD_SIZE set by hand, without torchrun's rendezvous
            raise CRTError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} but the process group cannot start ({str(e).splitlines()[0][:160]}): "
                "launch with torchrun (`torchrun --nproc_per_node N -m crt train ...`), or unset WORLD_SIZE for one process"
            ) from None
    elif (dist.get_backend() == "nccl") != (device.type == "cuda"):
        raise CRTError(f"the process group runs {dist.get_backend()} and this job asks for {device.type}: run one device type per torchrun job")
    return device


def leave(finished: bool = True) -> None:
    """Destroy the process group, if one was joined (at the end of the command).

    finished: every rank got here (the command succeeded): meet at a barrier first, so that no
    rank tears down its connections while another still uses them (Gloo then aborts the
    process). After an error the others may never arrive: no barrier (torchrun stops them)."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def _reduce_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums of `values` over every process, in float64 (counts stay exact to 2**53)."""
    if world().size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t)
    return t.tolist()


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every process's `obj`, in rank order, on rank 0 (None elsewhere)."""
    w = world()
    if w.size == 1:
        return [obj]
    out = [None] * w.size if w.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def on_main(work: Callable[[], Any]) -> Any:
    """Run `work` on rank 0 alone (its result there, None elsewhere). A CRTError or OSError it
    raises is raised on every rank alike, rather than left on rank 0 while the others wait in
    their next collective (one process: just `work()`)."""
    if world().size == 1:
        return work()
    result, failure = None, None
    if world().main:
        try:
            result = work()
        except (CRTError, OSError) as e:
            failure = (
                str(e)
                if isinstance(e, CRTError)
                else f"rank 0 could not write {e.filename or 'its files'} ({e.strerror or e}): check the disk and the folder's permissions"
            )
    failure = broadcast_from_main(failure)
    if failure is not None:
        raise CRTError(failure)
    return result


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every process."""
    if world().size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def row_share(n_rows: int, parts: int, part: int) -> slice:
    """Rows of part `part` of `parts` contiguous, near-equal groups of n_rows (the first
    n_rows % parts groups hold one more). An empty slice when there are fewer rows than parts."""
    base, extra = divmod(n_rows, parts)
    lo = part * base + min(part, extra)
    return slice(lo, lo + base + (part < extra))


def micro_rows(batch_size: int, grad_accum: int) -> list[slice]:
    """The rows of the global batch this process trains, one slice per micro-batch: group
    rank * grad_accum + a of world * grad_accum equal groups. The batch must split evenly, so
    that every micro-batch has the same shape and the same rows at any world size."""
    w = world()
    parts = w.size * grad_accum
    if batch_size % parts:
        who = f"{w.size} processes x {grad_accum} accumulation steps" if w.size > 1 else f"{grad_accum} accumulation steps"
        raise CRTError(f"--batch-size {batch_size} does not split into {who}: give a batch size that is a multiple of {parts}")
    return [row_share(batch_size, parts, w.rank * grad_accum + a) for a in range(grad_accum)]


class Micro(NamedTuple):
    """One micro-batch of a step. count: the targets its loss sums over (what the global mean
    divides by); tokens: the tokens it trains on (progress, budgets); run(total): its loss, the
    summed loss divided by the global count `total`, ready for backward."""

    count: int
    tokens: int
    run: Callable[[int], torch.Tensor]


def rank_seed(seed: int, rank: int) -> int:
    """The RNG seed of rank > 0: apart from the run's seed and from every other rank's."""
    return (seed + 1_000_003 * rank) % 2**63


def seed_process(seed: int, rank: int) -> None:
    """Seed this rank's random streams (dropout, augmentation) once the model is built. Rank 0
    keeps the stream it has (so a one-process run is unchanged); every other rank draws its own,
    or its dropout masks would be copies of rank 0's on different data."""
    if rank:
        torch.manual_seed(rank_seed(seed, rank))
        random.seed(rank_seed(seed, rank))


def describe_processes(model: nn.Module) -> str:
    """How the processes train, for the run's opening line ("" in one process)."""
    if world().size == 1:
        return ""
    return f"; {world().size} processes, {dist.get_backend()}, DDP with find_unused_parameters={model.find_unused_parameters}"


class Replica(DistributedDataParallel):
    """DDP that still answers the model's own attributes (`init_state`, `cfg`, ...): the loop and
    the loss functions call one object, and every forward goes through DDP's hooks."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def replicate(model: nn.Module, device: torch.device) -> nn.Module:
    """The model wrapped for data parallelism (the model itself in one process).

    No find_unused_parameters (it can double the memory of the gradients): the parameters a step
    leaves without a gradient are tied into its loss by `anchor` instead.
    No buffer broadcast: the models' buffers are constants (frequencies, index tables, m_0 of
    zeros), identical on every rank.
    """
    if world().size == 1:
        return model
    # PyTorch 2.13 renamed the switch; both keep the init-time sync that checks the replicas agree
    no_buffer_sync = (
        {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False}
    )
    return Replica(model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)


def reached(loss: torch.Tensor, params: list[nn.Parameter]) -> list[bool]:
    """Which of `params` the autograd graph of `loss` reaches: what a backward gives a gradient.

    A walk over the graph's nodes to its AccumulateGrad leaves, in the time of a few
    microseconds per node; what find_unused_parameters does inside DDP, without DDP's extra
    bookkeeping, and only for the parameters that `anchor` and the step need."""
    leaves, seen, stack = set(), set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # an AccumulateGrad node holds its parameter
        if variable is not None:
            leaves.add(id(variable))
        stack.extend(f for f, _ in fn.next_functions)
    return [id(p) in leaves for p in params]


def anchor(params: list[nn.Parameter], used: list[bool]) -> torch.Tensor:
    """0 x one element of every parameter the loss does not use: added to the loss, it hands those
    parameters a gradient of zeros, so DDP's reduction, which waits for every parameter,
    completes (the memory RNN that writes the next state when K = 1; m_0 once the state is carried)."""
    idle = [p.view(-1)[0].float() for p, u in zip(params, used) if not u]
    return torch.stack(idle).sum() * 0.0 if idle else torch.zeros(())


def drop_unused_grads(params: list[nn.Parameter], used: list[bool]) -> None:
    """None again for the gradients of parameters no process's step used (only `anchor` reached
    them): AdamW then skips them as in one process, where they have no gradient (a zero
    gradient would still move them by their momentum and decay them)."""
    for p, u in zip(params, used):
        if not u:
            p.grad = None
