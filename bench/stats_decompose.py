"""Benchmark: calibration statistics + decomposition of every target layer, two ways.

* ``block``: ``pipeline.decompose_model`` — one pass through the model block by block; each
  block's statistics are decomposed as soon as they are complete and then dropped.
* ``naive``: ``stats.collect_stats_naive`` — one full forward pass over the calibration set
  per target layer, all statistics kept — then every layer decomposed in a loop.

Both variants of a case run side by side in one invocation, each in a fresh subprocess so that
its peak memory (RSS; CUDA peak on a GPU) is its own. Both decompose the same weights with the
same statistics, so their spectra must agree: the largest relative difference is reported.

    python bench/stats_decompose.py                        # demo (whiten, asvd) + llama-medium
    python bench/stats_decompose.py --preset demo --decompositions whiten
    python bench/stats_decompose.py --preset llama2-7b --device cuda --dtype bfloat16 \
        --n-calib 32 --seq-len 2048                        # needs a GPU (about 16 GB + stats)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("LLRC_DATA_DIR", ROOT.parent / "shared" / "data"))
DEMO = ROOT / "assets" / "demo-model"

# Random-weight Llama shapes (the demo model is loaded from assets/demo-model instead).
PRESETS = {
    "demo": None,
    "llama-small": dict(hidden_size=256, num_hidden_layers=2, intermediate_size=688,
                        num_attention_heads=4, num_key_value_heads=4, vocab_size=1000),
    "llama-medium": dict(hidden_size=1024, num_hidden_layers=8, intermediate_size=2752,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=32000),
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama2-7b-1block": dict(hidden_size=4096, num_hidden_layers=1, intermediate_size=11008,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
}
# (preset, decomposition, n_calib, seq_len) run when no --preset is given.
DEFAULT_CASES = [("demo", "whiten", 16, 256), ("demo", "asvd", 16, 256),
                 ("llama-medium", "whiten", 4, 128)]
VARIANTS = ("block", "naive")


def _rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- worker: one (preset, decomposition, variant) in its own process ----------------------------
def _setup(preset: str, n_calib: int, seq_len: int, device: str, dtype: str):
    import torch
    from llrc_core.models import load_model, pick_dtype
    if preset == "demo":
        from llrc_core.pipeline import calibrate
        loaded = load_model(DEMO, device=device, dtype=dtype)
        windows = calibrate(loaded, str(DATA / "wikitext-2" / "valid.txt"), n_calib, seq_len)
        return loaded.model, windows
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(**PRESETS[preset], max_position_embeddings=max(seq_len, 2048))
    torch.manual_seed(0)
    dt = pick_dtype(dtype, torch.device(device))
    with torch.device(device):        # build the random weights where they will run
        model = AutoModelForCausalLM.from_config(cfg, dtype=dt).eval()
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, cfg.vocab_size, (n_calib, seq_len), generator=gen)
    return model, windows


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(a) -> dict:
    import torch
    from llrc_core.decompose import DECOMPOSITIONS, decompose
    from llrc_core.models import find_targets, weight_of
    from llrc_core.pipeline import decompose_model
    from llrc_core.stats import collect_stats_naive

    if a.threads:
        torch.set_num_threads(a.threads)
    model, windows = _setup(a.preset, a.n_calib, a.seq_len, a.device, a.dtype)
    targets = find_targets(model)
    rss_setup = _rss_mb()
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    cuda_base = torch.cuda.memory_allocated() if a.device.startswith("cuda") else 0
    out = {"preset": a.preset, "decomposition": a.decomposition, "variant": a.variant,
           "layers": len(targets), "windows": list(windows.shape),
           "threads": torch.get_num_threads()}
    _sync(a.device)
    t0 = time.perf_counter()
    if a.variant == "block":
        dec = decompose_model(model, a.decomposition, windows, batch_size=a.batch_size)
        factors = dec.factors
        _sync(a.device)
        out["seconds"] = time.perf_counter() - t0
    else:
        needs = DECOMPOSITIONS[a.decomposition].needs
        modules = dict(model.named_modules())
        stats = collect_stats_naive(model, targets, windows, gram="gram" in needs,
                                    absmean="absmean" in needs, batch_size=a.batch_size)
        _sync(a.device)
        t1 = time.perf_counter()
        factors = {t.name: decompose(weight_of(modules[t.name]).detach(), a.decomposition,
                                     stats[t.name]) for t in targets}
        _sync(a.device)
        out.update(stats_seconds=t1 - t0, decompose_seconds=time.perf_counter() - t1)
        out["seconds"] = time.perf_counter() - t0
    out["rss_setup_mb"] = rss_setup
    out["rss_peak_mb"] = _rss_mb()
    if a.device.startswith("cuda"):
        out["cuda_peak_over_model_mb"] = (torch.cuda.max_memory_allocated() - cuda_base) / 2**20
    torch.save({n: f.S.float().cpu() for n, f in factors.items()}, a.spectra)
    return out


# --- driver: both variants of each case, side by side -------------------------------------------
def run_case(a, preset: str, decomposition: str, n_calib: int, seq_len: int) -> dict:
    import torch
    rows, spectra = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            path = Path(tmp) / f"{variant}.pt"
            cmd = [sys.executable, __file__, "--worker", "--preset", preset,
                   "--decompositions", decomposition, "--variant", variant,
                   "--n-calib", str(n_calib), "--seq-len", str(seq_len),
                   "--batch-size", str(a.batch_size), "--device", a.device,
                   "--dtype", a.dtype, "--threads", str(a.threads), "--spectra", str(path)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                err = proc.stderr.strip().splitlines()[-1:] or ["no output"]
                rows[variant] = {"variant": variant, "error": err[0]}   # e.g. out of memory
                print(f"  {preset} {decomposition} {variant}: FAILED {err[0]}", flush=True)
                continue
            rows[variant] = json.loads(lines[-1][len("RESULT "):])
            spectra[variant] = torch.load(path)
            print(f"  {preset} {decomposition} {variant}: {rows[variant]['seconds']:.1f} s, "
                  f"peak RSS {rows[variant]['rss_peak_mb']:.0f} MB", flush=True)
    case = {"preset": preset, "decomposition": decomposition, "n_calib": n_calib,
            "seq_len": seq_len, **{v: rows[v] for v in VARIANTS}}
    if len(spectra) == 2:
        b, n = spectra["block"], spectra["naive"]
        case["speedup"] = rows["naive"]["seconds"] / rows["block"]["seconds"]
        case["max_rel_spectrum_diff"] = max(
            float(((b[k] - n[k]).abs() / n[k][0].clamp_min(1e-30)).max()) for k in n)
    return case


def markdown(cases: list[dict]) -> str:
    head = ("| model | decomposition | layers | calib (n x L) | block s | naive s "
            "(stats + decompose) | speedup | peak RSS block / naive MB | max rel. spectrum "
            "diff |\n|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for c in cases:
        b, n = c["block"], c["naive"]
        if "error" in b or "error" in n:
            rows.append(f"| {c['preset']} | {c['decomposition']} | | | "
                        f"{b.get('error', '')} | {n.get('error', '')} | | | |")
            continue
        rows.append(
            f"| {c['preset']} | {c['decomposition']} | {b['layers']} | "
            f"{c['n_calib']} x {c['seq_len']} | {b['seconds']:.1f} | {n['seconds']:.1f} "
            f"({n['stats_seconds']:.1f} + {n['decompose_seconds']:.1f}) | {c['speedup']:.2f}x | "
            f"{b['rss_peak_mb']:.0f} / {n['rss_peak_mb']:.0f} (after setup {b['rss_setup_mb']:.0f})"
            f" | {c['max_rel_spectrum_diff']:.1e} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), help="one model (default: the "
                    "demo model and llama-medium)")
    ap.add_argument("--decompositions", nargs="+", default=["whiten", "asvd"],
                    choices=["whiten", "asvd"], help="with --preset")
    ap.add_argument("--n-calib", type=int, default=16, help="calibration windows (with --preset)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per window (with --preset)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="auto", help="float32 (CPU default), bfloat16, float16")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--json", help="also write all results to this JSON file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--spectra", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        a.decomposition = a.decompositions[0]
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return 0
    cases = DEFAULT_CASES if a.preset is None else [
        (a.preset, d, a.n_calib, a.seq_len) for d in a.decompositions]
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, device {a.device}"
    print(f"# stats + decomposition benchmark ({machine})", flush=True)
    t0 = time.time()
    results = [run_case(a, *case) for case in cases]
    print(markdown(results))
    print(f"total {time.time() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine, "cases": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
