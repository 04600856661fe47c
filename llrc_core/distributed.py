"""Data parallel mask training over ``torch.distributed`` (torchrun, accelerate launch).

``torchrun --nproc_per_node N -m llrc_core compress ...`` starts N processes; each finds the
process group in its environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``; ``init_from_env``),
with NCCL on GPUs and gloo on CPU. Every rank loads the model and draws the same
calibration windows (same seed), and the ranks share the work before training:

* statistics: each rank forwards its share of the windows (``my_share``) and each block's
  sums are all-reduced (``sum_``; ``stats.collect_stats``);
* decomposition: each block's layers are dealt out by their work (``deal``) and each is
  ``broadcast`` from the rank that made it (``pipeline.decompose_model``).

Then each rank trains the masks on its share of each global batch:

* ``local(idx)``: the rank's contiguous slice of the global batch ``idx`` (all ranks draw the
  same ``idx`` from the same seeded order);
* the data term is scaled by ``share(idx)`` (its windows over the global batch, times the
  world size), so that the rank-averaged gradient is the gradient of the global-batch mean;
  terms every rank computes in full (compression, TV) keep their weight under the average;
* ``average_grads``: one all-reduce of the mask gradients per step.

Why not ``DistributedDataParallel``: DDP hooks the parameters of a module whose ``forward`` it
runs; the mask logits live in a trainer and reach the frozen model through swapped layers, so
there is no module forward to wrap, and the parameters are a few hundred thousand floats: one
flat all-reduce per step is what DDP's bucketed reducer would do here. The frozen model is
replicated, except, with ``--shard-factors``, the masked layers' factors: ``shard_`` splits
each layer's ``U`` and ``V`` over the ranks with FSDP2 (``fully_shard``), which gathers them for
the layer's forward and backward passes. FSDP2 shards a module's parameters, and the factors
are frozen parameters of the masked layer, so it shards exactly them (the mask logits stay
in the trainer, replicated, reduced by ``average_grads``). A model too large for one device
otherwise has its dense blocks onloaded in turn (``onload.py``), with or without sharding.

Only the main rank writes files (checkpoints, exports, logs) and emits events. Outside a
process group every function is the identity, so single-process code pays nothing.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group described by the environment (torchrun's ``RANK`` and
    ``WORLD_SIZE``); returns whether this run is distributed. A CUDA run binds each process
    to the device of its ``LOCAL_RANK``."""
    if active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    return True


def _my_part(t: torch.Tensor, what: str, setting: str) -> torch.Tensor:
    """This rank's contiguous part of ``t`` along dim 0 (sizes differ by at most 1); ``what``
    and ``setting`` name ``t`` and the option that sizes it when it is too short to split."""
    if not active():
        return t
    if len(t) < world_size():
        raise ValueError(f"{what} of {len(t)} windows cannot be split over {world_size()} "
                         f"processes: raise {setting} to at least {world_size()} or launch "
                         "fewer processes")
    return t.tensor_split(world_size())[rank()]


def local(idx: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of the global batch ``idx``."""
    return _my_part(idx, "a global batch", "batch_size")


def share(idx: torch.Tensor) -> float:
    """Weight of this rank's data term: its windows over the global batch, times the world
    size (1.0 outside a process group)."""
    return len(local(idx)) / len(idx) * world_size() if active() else 1.0


def average_grads(params) -> None:
    """Average the gradients of ``params`` over the ranks (one flat all-reduce)."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def my_share(windows: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of all the calibration ``windows`` (every window outside
    a group), for work whose sums are then all-reduced (``sum_``)."""
    return _my_part(windows, "a calibration set", "--n-calib")


def sum_(tensors: list[torch.Tensor], count: float = 0.0) -> float:
    """Sum ``tensors`` over the ranks in place (collective: every rank passes tensors of the
    same shapes, in the same order) and return the sum of ``count``; outside a group,
    ``count``."""
    if not active():
        return count
    for t in tensors:
        moved = t.to(comm_device())          # gloo reduces CPU tensors, NCCL CUDA ones
        dist.all_reduce(moved)
        if moved is not t:                   # ``to`` returns ``t`` itself when it is there
            t.copy_(moved)
    c = torch.tensor([count], dtype=torch.float64, device=comm_device())
    dist.all_reduce(c)
    return float(c.item())


def comm_device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"      # NCCL moves CUDA tensors


def deal(costs: list[float], ranks: int | None = None) -> list[int]:
    """The rank that does each item of work of ``costs``, over ``ranks`` (default: this
    group's world size; 1 outside a group): the costliest item first, each to the least
    loaded rank so far (ties: the lower rank, then the earlier item), so that the ranks
    finish their share together. The same on every rank (it depends on the costs alone);
    a scheduling rule hand-written because torch.distributed has none to offer."""
    ranks = world_size() if ranks is None else ranks
    load, owners = [0.0] * ranks, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        owners[i] = min(range(ranks), key=load.__getitem__)
        load[owners[i]] += costs[i]
    return owners


def broadcast(tensors: list[torch.Tensor], src: int) -> list[torch.Tensor]:
    """``tensors`` as rank ``src`` holds them, on every rank (collective: the other ranks pass
    tensors of the same shapes and dtypes, their contents ignored), on the communication
    device; outside a group, ``tensors`` as they are."""
    if not active():
        return tensors
    out = [t.to(comm_device()).contiguous() for t in tensors]   # sent as laid out in memory
    for t in out:
        dist.broadcast(t, src)
    return out


def row_range(rows: int) -> slice:
    """This rank's rows of a tensor of ``rows`` rows split as ``torch.chunk`` (and FSDP2)
    splits dim 0: ``ceil(rows / world)`` each, the last ones short or empty."""
    size = -(-rows // world_size())
    return slice(min(rank() * size, rows), min((rank() + 1) * size, rows))


def my_rows(t: torch.Tensor) -> torch.Tensor:
    """A copy of this rank's rows of ``t`` (``row_range``)."""
    return t[row_range(t.shape[0])].clone()


def all_rows(piece: torch.Tensor, rows: int) -> torch.Tensor:
    """The whole tensor of ``rows`` rows from every rank's ``my_rows`` piece (collective:
    every rank calls it, in the same order), on the piece's device. Pieces are padded to one
    size because all-gather takes equal sizes."""
    if not active():
        return piece
    size = -(-rows // world_size())
    padded = piece.new_zeros((size, *piece.shape[1:]), device=comm_device())
    padded[:piece.shape[0]] = piece
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:rows].to(piece.device)


_MESHES: dict = {}


def shard_(module, device: torch.device):
    """FSDP2's ``fully_shard`` of ``module`` over every rank: each parameter split along its
    first dimension, this rank's chunk moved to ``device``; whole for the module's forward and
    backward passes, then split again. Needs a process group (``init_from_env``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    if not active():
        raise ValueError("sharded factors need a process group: launch with torchrun "
                         "--nproc_per_node N (N > 1), or drop --shard-factors")
    key = (torch.device(device).type, id(dist.group.WORLD))  # one 1-D mesh per device type
    if key not in _MESHES:                                    # and process group
        _MESHES[key] = init_device_mesh(key[0], (world_size(),))
    # Explicitly resharded after forward: each sharded layer is its own FSDP root, and FSDP2
    # keeps a root's parameters whole from forward to backward unless told otherwise, which
    # would hold every layer's whole factors at the end of the forward pass.
    return fully_shard(module, mesh=_MESHES[key], reshard_after_forward=True)


def mean(value: float) -> float:
    """The mean of a float over the ranks (for reported losses)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def agreed(value) -> bool:
    """Whether every rank holds an equal ``value`` (any picklable; collective), so that a
    choice made from it is the same on every rank; True outside a group."""
    if not active():
        return True
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)


def barrier() -> None:
    if active():
        dist.barrier()
