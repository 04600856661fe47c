"""A run across the GPUs of one machine: whole blocks placed by accelerate.

accelerate's ``infer_auto_device_map`` fills the GPUs in order with whole modules (a
transformer block is never split), sizing each by its weights. A compression run keeps more
with a block than its weights: the block's factors (stored on the block's GPU unless they are
offloaded) and, while it works, one block's statistics, hidden states and SVD workspace; the
first GPU also holds the distillation targets, the mask state and the logits. So the budget
accelerate is given per GPU is that GPU's memory less what the run keeps besides weights,
divided by ``1 + factor bytes per weight byte``. The planner then counts every phase on every
GPU from the map accelerate returned (``per_gpu``) and a plan fits when each GPU does: the
budget only steers the placement, the count decides.

The run (``compress --gpus N``) loads the model with that map (``placed``: transformers'
``from_pretrained(device_map=...)``, which dispatches it with accelerate's hooks; each block
runs on its GPU and hands its output on). Everything else follows the weights: statistics and
factors are made and stored on the layer's GPU (``pipeline.decompose_model``), masked layers
are built there (``masked.install_masked_``), parked dense layers return to it. The mask
logits stay on the first GPU with the trainer: they are a few MB (one number per singular
value), so the compression loss and the optimiser stay on one device, and each layer moves
its mask to its own GPU (autograd carries the gradient back). The distillation distances are
made where their states are and summed on the first GPU. Under torchrun each process uses
one GPU instead (``--shard-factors`` splits the factors over them).
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
    from .distill import output_head
    _, blocks = find_blocks(meta)
    memory = {g: max(int(budgets[g]), 0) for g in range(gpus)} | {"cpu": 2 ** 62}
    # Whole blocks; the output head whole too: accelerate fails on ties inside a split head
    # (BERT's decoder bias is tied to its parent's).
    head = output_head(meta)
    keep = [type(blocks[0]).__name__] + ([type(head).__name__] if head is not None else [])
    # Every weight counted in the run's dtype: accelerate takes the smaller of ``dtype`` and
    # the skeleton's own (the config's, often float16), which undercounts a float32 run.
    exact = {name: dtype for name, _ in meta.named_parameters()}
    kw = dict(dtype=dtype, no_split_module_classes=keep, special_dtypes=exact)
    log = logging.getLogger("accelerate.utils.modeling")   # "device g is not available":
    level = log.level                                         # planning needs no GPU
    log.setLevel(logging.ERROR)
    try:   # balanced: the same share of the model on every GPU, not the first ones full
        memory = get_balanced_memory(meta, max_memory=memory, **kw)
        return infer_auto_device_map(meta, max_memory=memory, **kw)
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
    act = f["activations_bytes_estimate"] if trains else 0       # split over the GPUs' blocks
    lead = ((0 if placement.offload_targets else f["distill_targets_bytes"])
            + f["mask_state_bytes"]) if trains else 0           # on GPU 0 only
    ratio = fb * f["factor_numbers"] / (b * f["dense_linear"]) if on_dev else 0.0
    cap = MARGIN * gpu_memory * 2 ** 30
    budgets = [(cap - work - (lead + act if g == 0 else 0) - f["eval_batch_bytes"]) / (1 + ratio)
               for g in range(gpus)]
    dmap = device_map(meta, gpus, budgets, c["dtype"])
    block_ids = {id(blk) for blk in find_blocks(meta)[1]}
    per = {g: dict.fromkeys(("weights", "dense", "factors", "kept", "blocks", "layer"), 0)
           for g in [*range(gpus), "cpu"]}
    for name, where in dmap.items():
        g = per[where if where in per else "cpu"]          # "disk" counts as not placed
        module = meta.get_submodule(name) if name else meta
        g["weights"] += b * count_params(module)
        g["blocks"] += sum(id(m) in block_ids for m in module.modules())   # "" holds all
        for key, (t, n) in targets.items():
            if not name or key.startswith(name + "."):
                g["dense"] += b * t.m * t.n
                g["factors"] += fb * n
                g["kept"] += c["kept_layer"][key]
                g["layer"] = max(g["layer"], c["kept_layer"][key])
    per_gpu = {}
    for g in range(gpus):
        p = per[g]
        fac = p["factors"] if on_dev else 0
        resident = p["weights"] - p["dense"] + p["kept"]      # after apply: kept-rank factors
        own = {"load": p["weights"],
               "statistics": p["weights"] + f["hidden_states_block_bytes"]
               + f["stats_block_bytes"],
               "decomposition": p["weights"] + fac + work,
               "selection": p["weights"] + fac,
               "apply": p["weights"] + fac + p["layer"],
               "evaluate": resident + f["eval_batch_bytes"], "export": resident,
               # a block's dense originals back on its GPU for the dense pass
               "refit": resident + f["refit_bytes"] + (c["block_dense"] if p["blocks"] else 0)}
        if trains:
            copies = 0 if on_dev else b * c["block_factors"]
            parked = p["dense"] if placement.park_dense else 0
            own["selection"] += (copies + act * p["blocks"] // max(f["blocks"], 1) - parked
                                 + (lead if g == 0 else 0))
        per_gpu[g] = own
    fullest = {ph: max(per_gpu[g][ph] for g in per_gpu) for ph in per_gpu[0]}
    if per["cpu"]["weights"]:                 # accelerate could not place everything
        fullest = {ph: v + per["cpu"]["weights"] for ph, v in fullest.items()}
    stored = placement.stored_bytes(f["factor_numbers"], f["spectrum_numbers"])
    offloaded = (0 if on_dev else stored) + \
        (f["distill_targets_bytes"] if trains and placement.offload_targets else 0)
    parked = sum(per[g]["dense"] for g in range(gpus)) if placement.park_dense else 0
    host = {ph: (parked if ph in ("selection", "apply", "refit", "evaluate", "export") else 0)
            + (offloaded if ph in ("decomposition", "selection", "apply") else 0)
            for ph in fullest}
    host["export"] += f["write_buffer_bytes"]            # one shard written from the CPU
    extra = {"placement": placement.to_dict() | {"device": f"{gpus} GPUs, blocks placed by "
                                                            "accelerate"},
             "factors_stored_bytes": stored, "per_gpu": per_gpu,
             "device_map": {str(g): per[g]["blocks"] for g in per if per[g]["weights"]},
             "placed_modules": dict(dmap), "unplaced_bytes": per["cpu"]["weights"]}
    return fullest, host, extra


def placed(facts: dict) -> dict[str, int]:
    """The module -> GPU map a plan across GPUs runs with (``facts["placed_modules"]``),
    refused (``LLRCError``) when accelerate left a module off the GPUs: factors and masked
    layers are made on their weights' GPU, which such a module has not."""
    from .errors import LLRCError
    dmap = facts["placed_modules"]
    left = sorted(name for name, where in dmap.items() if not isinstance(where, int))
    if left:
        raise LLRCError(f"the model does not fit on the {len(facts['per_gpu'])} GPUs: "
                        f"accelerate left {left[:3]} in CPU memory; use more GPUs (--gpus), "
                        "or one GPU with --offload weights (its blocks onloaded in turn)")
    return dmap
