"""Training on several processes: one model sharded over ranks, or many categories spread over them.

    torchrun --standalone --nproc_per_node 2 -m fastflow train --data ROOT --category bottle --output RUN
    torchrun --standalone --nproc_per_node 4 -m fastflow train --data ROOT --category all --output RUNS
    # several machines: the same command on each, with torchrun's rendezvous flags
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m fastflow train ...

``init_from_env`` reads what torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
and joins the process group: NCCL with one GPU per rank (cuda:LOCAL_RANK) when CUDA is available,
gloo on CPUs (``--device cpu`` chooses gloo on a machine with GPUs too). Without torchrun (or with one
process) it returns ``SINGLE`` and nothing changes.

One model on N ranks, exactly the model of one process with the same global batch and seed:
  * the epoch order is a permutation that depends only on (seed, epoch), so every rank knows it;
  * training image i belongs to rank i % N for the whole run: each rank decodes and caches the
    backbone features of its 1/N only (the validation images are split the same way);
  * global batch k is order[kB:(k+1)B], as in one process; each rank runs the flow on the images
    of that batch it owns (any number from 0 to B, B/N on average);
  * each rank backpropagates (sum of its per-image NLLs) / (images in the global batch) and the
    gradients are summed over ranks by one all_reduce: the gradient of the global batch mean,
    equal to the single-process gradient up to float32 summation order. Clipping, Adam and the
    non-finite check then run on identical numbers on every rank, so the ranks stay identical.
  * validation NLL sums and image scores are reduced / gathered over ranks; only rank 0 writes.

Why a manual all_reduce and not ``DistributedDataParallel``: DDP divides by the number of ranks,
which is exact only when every rank holds the same number of images; here a rank's share of a
batch varies, can be zero (a rank owning none of a batch must still join the reduction, while DDP
arms its reducer in ``forward``), and the trainer calls ``forward_features`` on cached features,
not ``forward``. One flat all_reduce of the summed gradients per step is what DDP does in buckets,
minus the overlap with backward (small here: the flows are a few million parameters).

The price of owning fixed images is load imbalance: with a global batch of 32 on 2 ranks a rank's
share is 16 +- 2.8 images, and the step waits for the larger share. Augmented runs (``--augment``)
draw different random transforms than a single process (each rank has its own generator), so they
are equivalent in distribution, not bit for bit.

Many categories (``--category all`` or a list) on N ranks: when there are at least N categories,
whole categories go round-robin to the ranks and each rank trains its own alone (no gradient
traffic at all, every process busy); rank 0 gathers the results and writes the summary. With fewer
categories than ranks, each category is sharded over all ranks in turn, as above.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; ``Dist()`` is a single process (every helper a no-op)."""

    rank: int = 0  # global rank, 0 .. world - 1
    world: int = 1  # number of processes in the job
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where this rank computes

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes files."""
        return self.rank == 0

    def owned(self, items: list) -> list:
        """This rank's fixed share of a list: items[rank::world] (item i belongs to rank i % world)."""
        return items[self.rank::self.world]

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum ``values`` over ranks, in place; returns it."""
        if self.world > 1:
            tdist.all_reduce(values, op=tdist.ReduceOp.SUM)
        return values

    def sum_gradients(self, params: list[torch.nn.Parameter], stats: list[float]) -> list[float]:
        """Sum every parameter's gradient over ranks (missing grads count as zero), and ``stats``
        with them, in one all_reduce. Afterwards each ``p.grad`` is the summed gradient."""
        grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device, dtype=p.dtype)
                 for p in params]
        flat = torch.cat(grads + [torch.tensor(stats, dtype=grads[0].dtype, device=grads[0].device)])
        self.all_reduce_sum(flat)
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        return flat[offset:].tolist()

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite ``tensors`` with rank 0's values."""
        if self.world > 1:
            for t in tensors:
                tdist.broadcast(t, src=0)

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()


SINGLE = Dist()


def init_from_env(timeout_minutes: float = 30.0, device: str = "auto") -> Dist:
    """Join the process group torchrun describes in the environment; ``SINGLE`` when there is none.

    ``device`` (``--device``): ``auto`` or ``cuda``: ``nccl`` with each rank on cuda:LOCAL_RANK when CUDA
    is available (``auto`` falls back to ``gloo`` on CPUs); ``cpu``: ``gloo`` on CPUs even where there
    are GPUs. An explicit ``cuda:N`` is refused: under torchrun the GPU is the rank's local rank.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start distributed runs "
                         f"with torchrun (torchrun --nproc_per_node N -m fastflow train ...)")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    wanted = str(device).strip().lower()
    if wanted not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {device} under torchrun: use auto, cuda (each rank on cuda:LOCAL_RANK) "
                         f"or cpu (gloo)")
    if wanted != "cpu" and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(f"LOCAL_RANK {local_rank} but this machine has {count} CUDA GPU(s): start at most "
                             f"{count} processes per node (torchrun --nproc_per_node {count}) or use --device cpu")
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif wanted == "cuda":
        from .device import resolve_device

        resolve_device("cuda")  # raises the one-line "not available" error
    else:
        backend, device = "gloo", torch.device("cpu")
    if not tdist.is_initialized():
        tdist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                 timeout=timedelta(minutes=timeout_minutes))
    return Dist(rank, world, device)


def shutdown() -> None:
    """Leave the process group (if any) so the process exits cleanly."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
