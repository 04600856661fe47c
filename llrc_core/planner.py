"""Memory planner: what a compression run needs, phase by phase, before anything is loaded.

The model is built on the meta device from its config (a folder holding only ``config.json``
is enough: any size, no memory, no weights), and the bytes of each phase are counted from
the layer shapes, the dtypes and the calibration settings, for the data path this package
runs today:

* **load**: the weights in the compute dtype.
* **statistics**: weights + one block's calibration hidden states (in and out) + that block's
  float64 statistics (a Gram ``n x n`` for whitening, a vector for ASVD, per input: layers
  fed one tensor, q/k/v and gate/up, share one; ``stats.shared_inputs``).
* **decomposition**: weights + the factors ``U (m x r)``, ``V (r x n)`` of every target,
  stored in the placement's factor dtype as each layer is decomposed (on the device, or in
  CPU memory when offloaded) + the float64 work of the largest single SVD and its float32
  result; factors sharded over N processes: each process's share in CPU memory, and the
  ``ceil(layers / N)`` layers of a block it decomposes, held until they are handed round.
* **selection** (learned methods): weights less the dense originals of the swapped layers
  (parked in CPU memory on a GPU) + the stored factors + the masked layers' copies in the
  compute dtype (none when the dtypes match; one block's fetched factors when offloaded) +
  the distillation targets (unless offloaded) + the activations kept for the backward pass
  of one batch + the mask logits with their optimiser state. Non-learned methods need only
  the weights and factors.
* **apply**: ``compress`` releases a layer's factors once it is applied and, on a GPU, moves
  its dense original to CPU memory: on a CPU, weights + per layer the larger of its stored
  factors and its kept-rank factors; on a GPU, weights + the factors still on the device
  + one layer's kept-rank factors. **evaluate** / **export**: the weights (less the dense
  targets on a GPU) + the kept-rank factors (at most the dense size) + for evaluate one
  batch's logits; export + at most one shard of tensors made as they are written (cast to the
  stored dtype or multiplied back; ``shards.py``, 5 GB by default): an upper bound, none are
  made when the model is exported factorised in its own dtype.
* **polish** (``compress --polish``, counted when ``polish`` is given): a learned method's
  selection phase without optimiser state, for one polish batch's backward pass with its
  logits (an encoder: the dense last states as targets; ``footprint.polish_counts``).
* **refit** (``compress --refit``, counted when ``refit_batch_size`` is given): the applied
  model + ``footprint.refit_bytes`` (the dense and the compressed hidden states of every
  window at one block, two float64 ``n x n`` sums, one batch's inputs, one layer's solve)
  + on a GPU one block's dense originals, fetched back for the dense pass. It needs the
  weights in memory, so no sequential onloading.

``offload="auto"`` counts the placements of ``placement.OFFLOADS`` in order (all on the
device, then distillation targets in CPU memory, then factors too, then the dense blocks)
and keeps the first that fits; ``facts["placement"]`` says which.

``offload="weights"`` is sequential onloading (``onload.py``): the GPU holds the frame and
one layer's weights at a time. With ``gpus`` > 1 (and no sequential onloading) whole blocks
are placed across the GPUs by accelerate and every phase is counted per GPU (``spread.py``;
``compress --gpus N`` runs that map). Whether a plan fits the machine a run will have, and
the refusal when it does not, are ``preflight.check_fits``.

``peak_gpu_bytes`` is the largest need over the phases on the fullest GPU; ``fits`` compares
it with ``gpu_memory`` less a 5 % margin. On a CPU-only plan (``gpus=0``) the same numbers
are host memory. Activations are an estimate (``footprint.activation_bytes``) and are
labelled so. ``bench/memory.py`` measures each phase's peak against these numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import footprint, spread
from .models import DTYPES, count_params, find_blocks, find_targets, skeleton, source_dtype
from .placement import OFFLOADS, SHARDABLE, Placement
from .shards import DEFAULT_MAX_SHARD, write_buffer_bytes
from .stats import shared_inputs

GIB = 2 ** 30
PHASES = ("load", "statistics", "decomposition", "selection", "polish", "apply", "refit",
          "evaluate", "export")


@dataclass
class MemoryPlan:
    """Bytes per phase (on the first GPU, or on the CPU when ``gpus == 0``) and the facts
    they were counted from."""
    model: str
    dtype: str
    method: str
    gpus: int
    gpu_memory: float | None                  # GiB per GPU (host when gpus == 0); None: unchecked
    phases: dict[str, int]                    # phase -> bytes on the first GPU (or host)
    cpu_phases: dict[str, int]                # phase -> host bytes
    facts: dict = field(default_factory=dict)  # counts the phases were built from
    placement: Placement | None = None         # where the counted run keeps factors, targets

    @property
    def peak_gpu_bytes(self) -> int:
        return max(self.phases.values())

    @property
    def _used(self) -> dict[str, int]:
        """Bytes per phase on the device that holds the run: the first GPU, or the host."""
        return self.phases if self.gpus else self.cpu_phases

    @property
    def peak_bytes(self) -> int:
        return max(self._used.values())

    @property
    def peak_phase(self) -> str:
        return max(self._used, key=self._used.get)

    @property
    def fits(self) -> bool:
        """Within the memory, less a 5 % margin; across GPUs, also every module placed on
        one (a run does not work on modules accelerate leaves in CPU memory)."""
        if self.gpu_memory is None:
            return True
        return self.peak_bytes <= 0.95 * self.gpu_memory * GIB and \
            not self.facts.get("unplaced_bytes")

    def to_dict(self) -> dict:
        return {"model": self.model, "dtype": self.dtype, "method": self.method,
                "gpus": self.gpus, "gpu_memory_gib": self.gpu_memory,
                "peak_gpu_bytes": self.peak_gpu_bytes, "peak_phase": self.peak_phase,
                "fits": self.fits, "phases": self.phases, "cpu_phases": self.cpu_phases,
                "placement": self.facts.get("placement"), "facts": self.facts}

    def table(self) -> str:
        where = f"per GPU ({self.gpus})" if self.gpus else "host"
        lines = [f"{'phase':<14}{where + ' GiB':>16}{'CPU GiB':>10}"]
        lines += [f"{p:<14}{self.phases[p] / GIB:>16.2f}{self.cpu_phases[p] / GIB:>10.2f}"
                  for p in PHASES if p in self.phases]
        verdict = "fits" if self.fits else "does NOT fit"
        cap = "unchecked" if self.gpu_memory is None else \
            f"{self.gpu_memory:g} GiB {'per GPU' if self.gpus else 'of host memory'}, 5 % margin"
        lines.append(f"peak {self.peak_bytes / GIB:.2f} GiB in {self.peak_phase}: "
                     f"{verdict} ({cap})")
        if self.placement is not None:
            pl = self.placement
            if "device_map" in self.facts:
                lines.append("blocks per GPU (accelerate): " + ", ".join(
                    f"{g}: {n}" for g, n in self.facts["device_map"].items())
                    + " (`compress --gpus N` runs this placement)")
            lines.append(f"placement: factors stored in "
                         f"{str(pl.factor_dtype).removeprefix('torch.')}, offload {pl.offload}"
                         + (f", split over {pl.shard_over} processes (FSDP2) while masks train"
                            if pl.sharded else "")
                         + (", dense blocks in CPU memory, onloaded one layer at a time"
                            if pl.offload_weights and self.gpus else
                            ", dense originals parked in CPU memory while masks train"
                            if pl.park_dense else ""))
            if self.facts["processes"] > 1:
                lines.append(f"each of the {self.facts['processes']} processes needs the GPU "
                             "and CPU memory above (each collects statistics over its share "
                             "of the windows" + ("; each keeps its share of the factors in "
                             "CPU memory)" if pl.sharded else ")"))
        if self.facts.get("mapped_host_bytes"):
            lines.append(f"of the CPU memory, {self.facts['mapped_host_bytes'] / GIB:.1f} GiB "
                         "are the blocks memory-mapped from the checkpoint (safetensors, in "
                         "its stored dtype): file pages, read and cast as each block is "
                         "onloaded")
        return "\n".join(lines)


def plan_memory(model: str, dtype: str = "bfloat16", method: str = "llrc",
                decomposition: str = "whiten", n_calib: int = 64, seq_len: int = 512,
                batch_size: int = 4, gpus: int = 1, gpu_memory: float | None = 80.0,
                trust_remote_code: bool = False, meta=None, offload: str = "auto",
                factor_dtype: str | None = None, train_seq_len: int | None = None,
                max_shard_size: int | str = DEFAULT_MAX_SHARD, shard_over: int = 1,
                processes: int = 1, refit_batch_size: int | None = None,
                polish=None, refit_windows: int = 0) -> MemoryPlan:
    """Count the memory of compressing ``model`` (a folder or Hub id; only its config is
    read) with ``method`` at these settings. ``meta``: an already built model (meta-device,
    or loaded: only its shapes, parameter count and config are used). ``offload``: one of
    ``placement.OFFLOADS``, or ``auto``: the first of them that fits (``facts["placement"]``
    says which). ``train_seq_len``: tokens of each window a learned method trains on per
    step (``None``: the method's default; 0: the whole window). ``max_shard_size``: the
    export's shards (``shards.py``), written one at a time from CPU memory. ``shard_over``:
    the torchrun processes (one GPU each) the factors are split over while masks train
    (``compress --shard-factors``; 1: none); each process is counted. ``processes``: the
    torchrun processes of the run (at least ``shard_over``), which share the statistics pass
    (each holds its share of the windows' hidden states) and deal the decomposition out.
    ``refit_batch_size``: count the refit pass with that many windows a batch (``None``: no
    refit); it rules out sequential onloading; ``refit_windows``: the refit's own windows
    (``compress --refit-windows``; 0: the calibration windows). ``polish``: count the polish
    pass of that ``PolishConfig`` (``None``: no polish)."""
    from .selectors import get_selector
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if gpus < 0 or min(n_calib, seq_len, batch_size) < 1:
        raise ValueError("gpus must be >= 0 and n_calib, seq_len, batch_size >= 1")
    if offload != "auto" and offload not in OFFLOADS:
        raise ValueError(f"offload must be 'auto' or one of {OFFLOADS}, got {offload!r}")
    if refit_batch_size is not None and offload == "weights":
        raise ValueError("--refit needs the weights in memory, and --offload weights onloads "
                         "them block by block: drop --refit, or run where the model fits "
                         "(see llrc plan-memory)")
    if shard_over > 1 and gpus > 1:
        raise ValueError("sharded factors run one GPU per process: plan --gpus 1 (or 0) with "
                         "--shard-factors N for torchrun --nproc_per_node N")
    spec = get_selector(method)
    meta = meta if meta is not None else skeleton(model, trust_remote_code)
    if train_seq_len is None:
        train_seq_len = getattr(spec.config(), "train_seq_len", 0)
    step_len = min(seq_len, train_seq_len) if train_seq_len else seq_len
    processes = max(processes, shard_over, 1)
    counts = _counts(meta, dtype, decomposition, n_calib, seq_len, batch_size, step_len,
                     two_targets=method == "llrc", processes=processes)
    f = counts["facts"]
    f["refit_bytes"] = footprint.refit_bytes(
        counts, refit_batch_size or batch_size, seq_len,
        -(-refit_windows // processes) * seq_len if refit_windows else None)
    f["write_buffer_bytes"] = write_buffer_bytes(f["weights_bytes"], max_shard_size)
    # Sequential onloading loads a safetensors checkpoint in its own dtype, memory-mapped
    # (onload.load_sequential), and casts each layer as it is onloaded.
    stored = source_dtype(str(model), meta.config)
    f["weights_mapped"] = stored is not None and stored.is_floating_point
    f["stored_itemsize"] = stored.itemsize if f["weights_mapped"] else DTYPES[dtype].itemsize
    device = "cuda" if gpus else "cpu"
    plan = None
    auto = [o for o in (SHARDABLE if shard_over > 1 else OFFLOADS)
            if not (refit_batch_size is not None and o == "weights")]
    for level in (auto if offload == "auto" else (offload,)):
        placement = Placement.for_run(DTYPES[dtype], device, level, factor_dtype, shard_over)
        phases, host, facts = _placed_phases(counts, placement, spec.trains, meta, gpus,
                                             gpu_memory)
        if polish is not None:     # the masked layers of a learned selection, one batch
            pol, pol_host, _ = _placed_phases(footprint.polish_counts(counts, polish, meta),
                                              placement, True, meta, gpus, gpu_memory)
            phases["polish"], host["polish"] = pol["selection"], pol_host["selection"]
        else:
            host.pop("polish", None)
        if refit_batch_size is None:
            phases.pop("refit", None)
            host.pop("refit", None)
        plan = MemoryPlan(str(model), dtype, method, gpus, gpu_memory, phases, host,
                          {**counts["facts"], **facts}, placement)
        if plan.fits or not gpus:          # on a CPU every placement is the same memory
            break
    return plan


def _counts(meta, dtype: str, decomposition: str, n_calib: int, seq_len: int,
            batch_size: int, step_len: int, two_targets: bool, processes: int = 1) -> dict:
    """Numbers and bytes that do not depend on the placement (for one of ``processes``)."""
    from .decompose import DECOMPOSITIONS
    tokens = n_calib * seq_len
    my_tokens = -(-n_calib // processes) * seq_len   # statistics: this process's windows
    b = DTYPES[dtype].itemsize                                             # bytes per number
    targets = find_targets(meta)
    cfg = meta.config
    d = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0))
    inter = int(getattr(cfg, "intermediate_size", 0) or getattr(cfg, "n_inner", 0) or 4 * d)
    blocks = 1 + max(t.block for t in targets)
    layer_factors = {t.name: min(t.m, t.n) * (t.m + t.n) for t in targets}  # U and V, full rank
    per_block: dict[int, list] = {}
    for t in targets:
        per_block.setdefault(t.block, []).append(t)
    # Statistics of one block: one float64 Gram (or vector) per group of layers fed one
    # tensor (q/k/v, gate/up: ``stats.shared_inputs``), for the block that needs the most.
    groups = shared_inputs(meta)

    def numbers(ts, power: int) -> int:
        first = {next((g[0] for g in groups if t.kind in g), t.kind): t for t in ts}
        return sum(t.n ** power for t in first.values())
    widest = max(per_block.values(), key=lambda ts: numbers(ts, 2))
    needs = getattr(DECOMPOSITIONS.get(decomposition), "needs", ())
    stats = (8 * numbers(widest, 2) if "gram" in needs                  # whiten, whiten-eig
             else 8 * numbers(widest, 1) if needs else 0)               # asvd; svd: none
    params = count_params(meta)
    _, block_list = find_blocks(meta)
    in_blocks = [count_params(blk) for blk in block_list]
    facts = {"params": params, "weights_bytes": params * b, "targets": len(targets),
             "processes": processes,
             # sequential onloading: what stays on the device, and what visits it at once
             "frame_bytes": (params - sum(in_blocks)) * b,
             "block_rest_bytes": (sum(in_blocks) - sum(t.m * t.n for t in targets)) * b,
             "layer_bytes": max(t.m * t.n for t in targets) * b, "itemsize": b,
             "blocks": blocks, "hidden_size": d, "intermediate_size": inter,
             "dense_linear": sum(t.m * t.n for t in targets),
             "factor_numbers": sum(layer_factors.values()),
             "spectrum_numbers": sum(min(t.m, t.n) for t in targets),
             "stats_block_bytes": stats,
             "hidden_states_block_bytes": footprint.hidden_states_bytes(my_tokens, d, b),
             "svd_work_bytes": max(footprint.decomposition_work(t.m, t.n, decomposition)
                                   for t in targets),
             "calibration_tokens": tokens,
             "distill_targets_bytes": (2 if two_targets else 1) * tokens * d * b,
             "mask_state_bytes": 3 * 4 * sum(min(t.m, t.n) for t in targets)}  # theta, Adam m, v
    facts["train_tokens_per_step"] = batch_size * step_len
    facts["activations_bytes_estimate"] = footprint.activation_bytes(facts,
                                                                     batch_size * step_len)
    # One evaluation batch: its float32 logits and a block's intermediate values.
    vocab = facts["vocab_size"] = int(getattr(cfg, "vocab_size", 0) or 0)
    facts["eval_batch_bytes"] = batch_size * seq_len * (4 * vocab + b * (4 * d + 3 * inter))
    return {"b": b, "dtype": DTYPES[dtype], "facts": facts,
            "layers": [(t, layer_factors[t.name]) for t in targets],
            "block_dense": b * max(sum(t.m * t.n for t in ts) for ts in per_block.values()),
            "block_factors": max(sum(layer_factors[t.name] for t in ts)
                                 for ts in per_block.values()),
            "dealt_numbers": footprint.dealt_numbers(per_block, layer_factors, decomposition,
                                                     processes),
            # a layer's kept-rank factors after apply: at most its dense size
            "kept_layer": {t.name: b * min(t.m * t.n, layer_factors[t.name]) for t in targets}}


def _placed_phases(c: dict, placement: Placement, trains: bool, meta, gpus: int,
                   gpu_memory: float | None) -> tuple[dict[str, int], dict[str, int], dict]:
    """Bytes per phase on the fullest GPU and on the host, and the facts, for one placement:
    blocks across GPUs (``spread.phases``) or on one device (``_phases``)."""
    if gpus > 1 and not placement.offload_weights:
        return spread.phases(c, placement, trains, meta, gpus, gpu_memory or float("inf"))
    return _phases(c, placement, trains, bool(gpus))


def _phases(c: dict, placement: Placement, trains: bool, gpu: bool
            ) -> tuple[dict[str, int], dict[str, int], dict]:
    """Bytes per phase on the run's device and on the host, for one placement."""
    if placement.offload_weights and gpu:
        return _sequential_phases(c, placement, trains)
    f, b = c["facts"], c["b"]
    fb = placement.factor_dtype.itemsize
    weights, spectrum = f["weights_bytes"], f["spectrum_numbers"]
    stored = placement.stored_bytes(f["factor_numbers"], spectrum)
    # made into CPU memory (on a CPU run the same memory: counted where they are used)
    in_host = gpu and (placement.offload_factors or placement.sharded)
    on_dev = 0 if in_host else stored
    on_host = stored if in_host else 0
    phases = {"load": weights,
              "statistics": weights + f["hidden_states_block_bytes"] + f["stats_block_bytes"],
              # the last block: its statistics, hidden states and one layer's work, all factors
              "decomposition": weights + on_dev + f["stats_block_bytes"]
              + f["hidden_states_block_bytes"] + f["svd_work_bytes"]
              + footprint.dealt_on_device(c, placement)}
    extra = {"placement": placement.to_dict() | {"device": "one GPU" if gpu else "host"},
             "factors_stored_bytes": stored}
    host_sel = on_host
    if trains:
        if placement.offload_factors:       # one block's factors fetched at a time (a bound)
            copies = b * c["block_factors"]
        elif placement.sharded:
            copies = footprint.shard_on_device(c, placement)
        elif fb != b:                       # masked layers copy the factors to the model dtype
            copies = b * f["factor_numbers"]
        else:
            copies = 0                      # used in place
        copies += b * spectrum
        parked = b * f["dense_linear"] if placement.park_dense else 0
        targets, act = f["distill_targets_bytes"], f["activations_bytes_estimate"]
        on_dev_targets = 0 if placement.offload_targets else targets
        phases["selection"] = (weights - parked + on_dev + copies + on_dev_targets + act
                               + f["mask_state_bytes"])
        host_sel += parked + (targets if placement.offload_targets else 0)
        extra.update(factor_copies_bytes=copies, parked_dense_bytes=parked)
    else:
        phases["selection"] = weights + on_dev
    # On a GPU apply moves each layer's dense original to CPU memory once its kept-rank
    # factors exist (kept-rank <= dense): the peak is at the start, with one layer's kept-rank
    # factors being made. On a CPU, ``footprint.released_apply``.
    kept = sum(c["kept_layer"].values())
    if gpu:
        apply = weights + on_dev + max(c["kept_layer"].values())
        resident = weights - b * f["dense_linear"] + kept
    else:
        apply = weights + footprint.released_apply(c, placement)
        resident = weights + kept
    phases.update(apply=apply, evaluate=resident + f["eval_batch_bytes"], export=resident,
                  refit=resident + f["refit_bytes"] + (c["block_dense"] if gpu else 0))
    extra.update(kept_bound_bytes=kept)
    if gpu:
        host = {p: 0 for p in PHASES}
        parked_after = b * f["dense_linear"]          # the originals, after apply
        host.update(decomposition=on_host, selection=host_sel, apply=on_host + parked_after,
                    refit=parked_after, evaluate=parked_after, export=parked_after)
    else:
        host = dict(phases)
    host["export"] += f["write_buffer_bytes"]       # one shard written from the CPU
    return phases, host, extra


def _sequential_phases(c: dict, placement: Placement, trains: bool
                       ) -> tuple[dict[str, int], dict[str, int], dict]:
    """Sequential onloading (``onload.py``) on a GPU: the device holds the frame (embeddings,
    LM head, final norm) and one layer's weights at a time; the dense weights, the factors and
    the distillation targets wait in CPU memory, and so do the compressed layers after apply
    (the dense originals stay there too, for ``restore_``)."""
    f, b = c["facts"], c["b"]
    frame, layer = f["frame_bytes"], f["layer_bytes"]
    stored = placement.stored_bytes(f["factor_numbers"], f["spectrum_numbers"])
    work = f["hidden_states_block_bytes"] + f["stats_block_bytes"]
    phases = {"load": frame, "statistics": frame + layer + work,
              "decomposition": frame + layer + work + f["svd_work_bytes"]
              + footprint.dealt_on_device(c, placement),
              "selection": frame, "apply": frame,
              "evaluate": frame + layer + f["eval_batch_bytes"], "export": 0}
    # The blocks, in CPU memory throughout: pages of the checkpoint in its stored dtype.
    home = (f["weights_bytes"] - frame) // f["itemsize"] * f["stored_itemsize"]
    extra = {"placement": placement.to_dict() | {"device": "one GPU, blocks onloaded in turn"},
             "factors_stored_bytes": stored, "mapped_host_bytes": home * f["weights_mapped"]}
    host = {"load": home, "statistics": home, "decomposition": home + stored,
            "selection": home + stored}
    if trains:    # the blocks' norms (kept for the backward), one block's fetched factors
        copies = b * f["spectrum_numbers"] + (footprint.shard_on_device(c, placement)
                                              if placement.sharded else b * c["block_factors"])
        phases["selection"] += (f["block_rest_bytes"] + copies + f["activations_bytes_estimate"]
                                + f["mask_state_bytes"])
        host["selection"] += f["distill_targets_bytes"]
        extra.update(factor_copies_bytes=copies, parked_dense_bytes=0)
    kept = sum(c["kept_layer"].values())
    host["apply"] = home + footprint.released_apply(c, placement)
    host["evaluate"] = home + kept
    host["export"] = f["weights_bytes"] + kept + f["write_buffer_bytes"]
    extra.update(kept_bound_bytes=kept)
    return phases, host, extra
