"""Benchmark: the memory planner's numbers against measured peaks, phase by phase, on a CPU.

A Llama-shaped model with random weights is built from a config in its dtype, then one
compression runs as ``llrc compress`` runs it: statistics and decomposition (block by block,
factors stored as the placement says), LLRC mask training for a few steps (whole windows, so
that the planner's activation estimate is for the same tokens), apply (factors released
layer by layer), with ``--polish`` one polish round (``polish.py``: one backward and one
checked move over the calibration windows, ``--batch-size`` a batch) before apply, with
``--refit`` the refit pass (``--batch-size`` windows a batch), one
evaluation batch, the export (``--max-shard-size``: one shard at a
time; ``--export-dtype``: cast as written, as a source stored in another dtype is). A sampling thread reads the process's resident
memory every 10 ms; each phase's peak, less the memory before the model was built, is
compared with ``llrc plan-memory``'s host bytes for the same settings (``gpus=0``). Each case
runs in its own process.

    python bench/memory.py                                   # llama-small, llama-medium
    python bench/memory.py --preset llama2-7b-2blocks --dtype bfloat16 --n-calib 8 \\
        --seq-len 512                                        # the issue's 7B-shaped check
    python bench/memory.py --preset llama2-70b-8blocks --device cuda --dtype bfloat16 \\
        --offload weights                  # sequential onloading: 70B-shaped blocks in turn
    python bench/memory.py --preset llama-medium --shard 2
                     # factors sharded over 2 torchrun processes (gloo): each one measured
    python bench/memory.py --preset llama-medium --processes 2
                     # 2 replicated torchrun processes: they share statistics and SVDs
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    "llama-small": dict(hidden_size=256, num_hidden_layers=2, intermediate_size=688,
                        num_attention_heads=4, num_key_value_heads=4, vocab_size=1000),
    "llama-medium": dict(hidden_size=1024, num_hidden_layers=8, intermediate_size=2752,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=32000),
    "llama2-7b-2blocks": dict(hidden_size=4096, num_hidden_layers=2, intermediate_size=11008,
                              num_attention_heads=32, num_key_value_heads=32,
                              vocab_size=32000),
    "llama2-70b-8blocks": dict(hidden_size=8192, num_hidden_layers=8, intermediate_size=28672,
                               num_attention_heads=64, num_key_value_heads=8,
                               vocab_size=32000),
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
}
DEFAULT_CASES = [("llama-small", "float32"), ("llama-medium", "float32")]
COMPARED = {"load": ("load",), "decomposition": ("statistics", "decomposition"),
            "selection": ("selection",), "polish": ("polish",), "apply": ("apply",),
            "refit": ("refit",),
            "evaluate": ("evaluate",), "export": ("export",)}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peaks:
    """Peak memory per phase: resident memory sampled on a thread (CPU), or CUDA's own peak
    counter reset at each phase."""

    def __init__(self, cuda: bool = False, every: float = 0.01):
        import torch
        self.torch, self.cuda = torch, cuda
        self.phase, self.peaks, self.every = "baseline", {}, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.every)

    def now(self) -> int:
        return self.torch.cuda.max_memory_allocated() if self.cuda else rss_bytes()

    def sample(self):
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.now())

    def enter(self, phase: str):
        self.sample()
        gc.collect()
        if not self.cuda:        # give freed heap memory back: RSS then counts live memory
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        self.phase = phase
        self.sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def worker(a) -> dict:
    import torch
    import transformers
    from llrc_core import distributed
    from llrc_core.export import export_model
    from llrc_core.pipeline import compress_, decompose_model, select_plan
    from llrc_core.planner import plan_memory
    from llrc_core.polish import PolishConfig
    from llrc_core.preflight import device_memory_gib
    dtype, cuda = getattr(torch, a.dtype), a.device == "cuda"
    distributed.init_from_env()                 # --shard N: one of N torchrun processes
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**PRESETS[a.preset])
    folder = Path(tempfile.mkdtemp(prefix=f"rank{distributed.rank()}-"))
    cfg.save_pretrained(folder)
    gpus, gib = device_memory_gib(a.device)
    polish = PolishConfig(rounds=1, pairs=1, windows=a.n_calib, seq_len=a.seq_len,
                          batch_size=a.batch_size) if a.polish else None
    plan = plan_memory(str(folder), a.dtype, "llrc", a.decomposition, a.n_calib, a.seq_len,
                       a.batch_size, gpus=gpus, gpu_memory=gib if gpus else None,
                       offload=a.offload, factor_dtype=a.factor_dtype, train_seq_len=0,
                       max_shard_size=a.max_shard_size,
                       shard_over=distributed.world_size() if a.shard > 1 else 1,
                       processes=distributed.world_size(),
                       refit_batch_size=a.batch_size if a.refit else None,
                       polish=polish)
    placement = plan.placement
    windows = torch.randint(0, cfg.vocab_size, (a.n_calib, a.seq_len),
                            generator=torch.Generator().manual_seed(0))
    base = 0 if cuda else rss_bytes()
    with Peaks(cuda) as peaks:
        peaks.enter("load")
        home = "cpu" if placement.offload_weights else a.device
        with torch.device(home):           # built in its dtype: no float32 copy first
            model = transformers.LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()
        if placement.offload_weights:      # sequential onloading: blocks wait in CPU memory
            from llrc_core.onload import enable_
            enable_(model, a.device)
        peaks.enter("decomposition")
        t = time.perf_counter()
        dec = decompose_model(model, a.decomposition, windows, batch_size=a.batch_size,
                              placement=placement)
        decompose_s = time.perf_counter() - t
        peaks.enter("selection")
        t = time.perf_counter()
        stamps = []
        rank_plan = select_plan(model, dec, "llrc", windows, ratio=0.6, steps=a.steps,
                                batch_size=a.batch_size, train_seq_len=0, mask_every=0,
                                callback=lambda e: e["type"] == "step" and stamps.append(
                                    time.perf_counter()))
        select_s = time.perf_counter() - t
        if a.polish:
            from llrc_core.polish import polish_plan
            peaks.enter("polish")
            rank_plan = polish_plan(model, dec, rank_plan, windows, polish)
        peaks.enter("apply")
        compress_(model, dec, rank_plan, release=True)
        if a.refit:
            from llrc_core.refit import refit_
            peaks.enter("refit")
            refit_(model, windows, a.batch_size)
        peaks.enter("evaluate")
        with torch.no_grad():
            model(windows[:a.batch_size])
        peaks.enter("export")
        if placement.offload_weights:
            from llrc_core.onload import disable_
            disable_(model)                # as ``compress`` does: all in CPU memory
        if distributed.is_main():
            export_model(model, None, rank_plan, folder / "export",
                         max_shard_size=a.max_shard_size, dtype=a.export_dtype)
        peaks.enter("done")
    used = plan.phases if gpus else plan.cpu_phases
    compared = {p: qs for p, qs in COMPARED.items() if all(q in used for q in qs)}  # planned
    measured = {p: peaks.peaks.get(p, 0) - base for p in compared}
    planned = {p: max(used[q] for q in qs) for p, qs in compared.items()}
    return {"preset": a.preset, "rank": distributed.rank(),
            "processes": distributed.world_size(),
            "device": str(torch.cuda.get_device_name(0)) if cuda else "cpu", "dtype": a.dtype, "export_dtype": a.export_dtype or a.dtype,
            "max_shard_size": a.max_shard_size, "placement": placement.to_dict(),
            "decomposition": a.decomposition, "n_calib": a.n_calib, "seq_len": a.seq_len,
            "batch_size": a.batch_size, "steps": a.steps, "baseline_bytes": base,
            "decompose_s": decompose_s, "select_s": select_s,
            "step_s": sorted(b - a for a, b in zip(stamps, stamps[1:]))[len(stamps) // 2 - 1]
            if len(stamps) > 1 else None,
            "phases": {p: {"measured_gib": measured[p] / 2 ** 30,
                           "planned_gib": planned[p] / 2 ** 30,
                           "measured_over_planned": measured[p] / planned[p]}
                       for p in compared}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=list(PRESETS))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--factor-dtype", default="auto")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--offload", default="auto")
    ap.add_argument("--decomposition", default="whiten")
    ap.add_argument("--n-calib", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-shard-size", default="5GB", help="the export's shards")
    ap.add_argument("--export-dtype", default=None, help="dtype stored (default: --dtype)")
    ap.add_argument("--shard", type=int, default=1, metavar="N",
                    help="factors sharded over N torchrun processes (--shard-factors)")
    ap.add_argument("--processes", type=int, default=1, metavar="N",
                    help="N replicated torchrun processes (data parallel, not sharded)")
    ap.add_argument("--refit", action="store_true", help="refit after apply (compress --refit)")
    ap.add_argument("--polish", action="store_true", help="a polish round before apply "
                    "(compress --polish)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    cases = [(a.preset, a.dtype)] if a.preset else DEFAULT_CASES
    results = []
    for preset, dtype in cases:
        nproc = max(a.shard, a.processes)
        launch = [sys.executable] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        args = [*launch, __file__, "--worker", "--preset", preset, "--dtype", dtype,
                "--factor-dtype", a.factor_dtype, "--decomposition", a.decomposition,
                "--device", a.device, "--offload", a.offload,
                "--n-calib", str(a.n_calib), "--seq-len", str(a.seq_len),
                "--batch-size", str(a.batch_size), "--steps", str(a.steps),
                "--max-shard-size", a.max_shard_size, "--shard", str(a.shard),
                *(["--refit"] if a.refit else []), *(["--polish"] if a.polish else []),
                *(["--export-dtype", a.export_dtype] if a.export_dtype else [])]
        proc = subprocess.run(args, capture_output=True, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if proc.returncode != 0:
            results.append({"preset": preset, "error": proc.stderr.strip().splitlines()[-3:]})
            print(json.dumps(results[-1]), flush=True)
            continue
        for line in proc.stdout.strip().splitlines()[-nproc:]:      # one line per process
            results.append(json.loads(line))
            print(json.dumps(results[-1]), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": f"{platform.machine()}, "
                                            f"{os.cpu_count()} CPUs", "results": results},
                                           indent=1))


if __name__ == "__main__":
    main()
