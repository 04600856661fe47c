"""Planning a run across the GPUs of one machine: whole blocks placed by accelerate.

accelerate's ``infer_auto_device_map`` fills the GPUs in order with whole modules (a
transformer block is never split), sizing each by its weights. A compression run keeps more
with a block than its weights: the block's factors (stored on the block's GPU unless they are
offloaded) and, while it works, one block's statistics, hidden states and SVD workspace; the
first GPU also holds the distillation targets, the mask state and the logits. So the budget
accelerate is given per GPU is that GPU's memory less what the run keeps besides weights,
divided by ``1 + factor bytes per weight byte``. The planner then counts every phase on every
GPU from the map accelerate returned (``per_gpu``) and a plan fits when each GPU does: the
budget only steers the placement, the count decides.

Only the plan exists: running the placed model (accelerate's ``dispatch_model``, the masked
layers built on their block's GPU) has not run on several GPUs yet, so ``compress`` plans and
runs on one GPU, with sequential onloading (``onload.py``) when the model needs it.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .models import count_params, find_blocks
from .placement import Placement

MARGIN = 0.95     # of each GPU's memory, as ``planner.MemoryPlan.fits``


def device_map(meta: nn.Module, gpus: int, budgets: list[int], dtype: torch.dtype) -> dict:
    """accelerate's placement of ``meta``'s modules on GPUs ``0..gpus-1`` with at most
    ``budgets[g]`` bytes of weights each (a module left over goes to ``"cpu"``)."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory
    _, blocks = find_blocks(meta)
    memory = {g: max(int(budgets[g]), 0) for g in range(gpus)} | {"cpu": 2 ** 62}
    keep = [type(blocks[0]).__name__]
    log = logging.getLogger("accelerate.utils.modeling")   # "device g is not available":
    level = log.level                                         # planning needs no GPU
    log.setLevel(logging.ERROR)
    try:   # balanced: the same share of the model on every GPU, not the first ones full
        memory = get_balanced_memory(meta, max_memory=memory, dtype=dtype,
                                     no_split_module_classes=keep)
        return infer_auto_device_map(meta, max_memory=memory, dtype=dtype,
                                     no_split_module_classes=keep)
    finally:
        log.setLevel(level)


def phases(c: dict, placement: Placement, trains: bool, meta: nn.Module, gpus: int,
           gpu_memory: float) -> tuple[dict[str, int], dict[str, int], dict]:
    """Bytes per phase on the fullest GPU, on the host, and the facts (``per_gpu``: phase
    bytes of every GPU; ``device_map``: blocks per GPU) for ``gpus`` GPUs of ``gpu_memory``
    GiB, placed by accelerate."""
    f, b = c["facts"], c["b"]
    fb = placement.factor_dtype.itemsize
    on_dev = not placement.offload_factors
    targets = {t.name: (t, n) for t, n in c["layers"]}
    work = f["hidden_states_block_bytes"] + f["stats_block_bytes"] + f["svd_work_bytes"]
    first = (0 if placement.offload_targets else f["distill_targets_bytes"]) * trains + \
        (f["mask_state_bytes"] + f["activations_bytes_estimate"]) * trains
    ratio = fb * f["factor_numbers"] / (b * f["dense_linear"]) if on_dev else 0.0
    cap = MARGIN * gpu_memory * 2 ** 30
    budgets = [(cap - work - (first if g == 0 else 0) - f["eval_batch_bytes"]) / (1 + ratio)
               for g in range(gpus)]
    dmap = device_map(meta, gpus, budgets, torch.float16 if b == 2 else torch.float32)
    per = {g: dict.fromkeys(("weights", "dense", "factors", "kept", "blocks", "layer"), 0)
           for g in [*range(gpus), "cpu"]}
    for name, where in dmap.items():
        where = where if where in per else "cpu"          # "disk" counts as not placed
        g = per[where]
        module = meta.get_submodule(name) if name else meta
        g["weights"] += b * count_params(module)
        inside = [v for k, v in targets.items() if not name or k.startswith(name + ".")]
        g["blocks"] += sum(1 for blk in find_blocks(meta)[1] if blk is module)
        for t, n in inside:
            g["dense"] += b * t.m * t.n
            g["factors"] += fb * n
            g["kept"] += b * min(t.m * t.n, n)
            g["layer"] = max(g["layer"], b * min(t.m * t.n, n))
    blocks = f["blocks"]
    per_gpu = {}
    for g in range(gpus):
        p = per[g]
        fac = p["factors"] if on_dev else 0
        act = f["activations_bytes_estimate"] * p["blocks"] // max(blocks, 1)
        parked = p["dense"] if placement.park_dense else 0
        own = {"load": p["weights"],
               "statistics": p["weights"] + f["hidden_states_block_bytes"]
               + f["stats_block_bytes"],
               "decomposition": p["weights"] + fac + work,
               "selection": p["weights"] + fac,
               "apply": p["weights"] + fac + p["layer"],
               "evaluate": p["weights"] - p["dense"] + p["kept"] + f["eval_batch_bytes"],
               "export": p["weights"] - p["dense"] + p["kept"]}
        if trains:
            copies = b * c["block_factors"] if not on_dev else 0
            own["selection"] += copies + act - parked + (first - f["activations_bytes_estimate"]
                                                         if g == 0 else 0)
        per_gpu[g] = own
    fullest = {ph: max(per_gpu[g][ph] for g in per_gpu) for ph in per_gpu[0]}
    if per["cpu"]["weights"]:                 # accelerate could not place everything
        fullest = {ph: v + per["cpu"]["weights"] for ph, v in fullest.items()}
    stored = fb * f["factor_numbers"] + 4 * f["spectrum_numbers"]
    host_extra = (0 if on_dev else stored) + \
        (f["distill_targets_bytes"] * trains if placement.offload_targets else 0)
    host = {ph: (sum(per[g]["dense"] for g in range(gpus)) if placement.park_dense and
                 ph != "load" and ph != "statistics" and ph != "decomposition" else 0)
            + (host_extra if ph in ("decomposition", "selection", "apply") else 0)
            for ph in fullest}
    host["export"] += f["weights_bytes"]                 # the state dict written from the CPU
    extra = {"placement": placement.to_dict() | {"device": f"{gpus} GPUs, blocks placed by "
                                                            "accelerate"},
             "factors_stored_bytes": stored, "per_gpu": per_gpu,
             "device_map": {str(g): per[g]["blocks"] for g in per if per[g]["weights"]},
             "unplaced_bytes": per["cpu"]["weights"]}
    return fullest, host, extra
