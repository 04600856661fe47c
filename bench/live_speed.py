"""Benchmark: the studio's live runs on CPU, the code of a git revision against this tree.

Two cases, as the Compress page starts them (demo model, ASVD, WikiText-2 valid calibration,
16 x 128 tokens by default):

* ``llrc``: LLRC with its defaults (any-k, rho_linear 0.8). Measured: seconds from the start
  of the selection (targets precomputed included) to the first step whose trained ratio
  meets the target, and seconds per step. The run stops there unless ``--full``.
* ``strs``: STRS's sensitivity table (every target x 9 candidates; ``--stride K``: every
  K-th target only, e.g. 6: one layer kind in every block, the table's mix of block depths).
  Measured: seconds for the table and per pass; ``table_est_s`` scales a strided table to
  all targets.

Each variant runs in a fresh subprocess; variants alternate, round after round, so machine
load hits them alike. ``before`` imports ``llrc_core`` from ``git archive <rev>`` (default
``HEAD``), ``after`` from this tree. A variant name may carry a thread setting: ``before@1``
runs on 1 thread, ``after@auto`` lets the run measure its count (``llrc_core/threads.py``),
``after@2`` pins 2. Every variant must compute the same numbers: the LLRC losses and ratios
of every step and the STRS scores are compared between variants (``max_diff_vs``, 0.0 =
bit-identical); with ``--full``, also the plans' kept indices (``same_plan_as``).

    python bench/live_speed.py llrc                                   # before, after@auto
    python bench/live_speed.py llrc --variants before@2,before@1,after@auto --rounds 2
    python bench/live_speed.py strs --stride 6 --variants before,after@auto
    python bench/live_speed.py strs --n-calib 32 --json strs.json     # the compare grid's size
    python bench/live_speed.py llrc --load 2     # while 2 busy processes share the cores

``--load N`` starts N processes spinning a Python loop for the whole run (a shared machine,
reproducibly): an op that runs on several threads waits for the slowest of them, and with
the cores taken one of them is often off its core.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLRC_DATA_DIR", ROOT.parent / "shared" / "data"))
DEMO = ROOT / "assets" / "demo-model"


# --- worker: one variant in its own process ---------------------------------------------------
def _setup(a):
    """Model, windows and ASVD factors, decomposed on 1 thread in every variant: the factors
    (LAPACK's SVD) depend on the thread count, the selection must not."""
    import torch
    from llrc_core.models import load_model
    from llrc_core.pipeline import calibrate, decompose_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    loaded = load_model(DEMO, device="cpu", dtype="float32")
    windows = calibrate(loaded, str(DATA / "wikitext-2" / "valid.txt"), a.n_calib, a.seq_len)
    t = time.perf_counter()
    dec = decompose_model(loaded.model, "asvd", windows)
    dec_s = time.perf_counter() - t
    torch.set_num_threads(threads)
    return loaded.model, windows, dec, dec_s, threads


def worker_llrc(a) -> dict:
    from llrc_core.pipeline import select_plan
    model, windows, dec, dec_s, threads = _setup(a)
    steps, met = [], []
    t0 = time.perf_counter()

    def on_event(e):
        if e["type"] == "step":
            now = time.perf_counter() - t0
            steps.append({"step": e["step"], "s": now, "loss": e["loss"],
                          "ratio": e["ratio_linear"], "threads": e.get("threads")})
            if e["ratio_linear"] <= a.ratio and not met:
                met.append((e["step"], now))

    plan = select_plan(model, dec, "llrc", windows, callback=on_event, ratio=a.ratio,
                       should_stop=lambda: bool(met) and not a.full, mask_every=0)
    total = time.perf_counter() - t0
    per_step = [(b["s"] - s["s"]) for s, b in zip(steps, steps[1:])]
    return {"decompose_s": dec_s, "threads_start": threads, "steps": len(steps),
            "first_met_step": met[0][0] if met else None,
            "first_met_s": met[0][1] if met else None, "total_s": total,
            "median_step_s": sorted(per_step)[len(per_step) // 2] if per_step else None,
            "thread_counts": sorted({s["threads"] for s in steps if s["threads"]}),
            "trace": [[s["loss"], s["ratio"]] for s in steps],
            "kept": {n: lp.kept for n, lp in plan.layers.items()} if a.full else None,
            "ranks": plan.ranks() if a.full else None}


def worker_strs(a) -> dict:
    from llrc_core.models import find_targets
    from llrc_core.selectors.strs import STRSConfig, sensitivity_table
    model, windows, dec, dec_s, threads = _setup(a)
    all_names = [t.name for t in find_targets(model)]
    names = all_names[::a.stride]
    seen = []
    t0 = time.perf_counter()
    table, base, passes = sensitivity_table(
        model, {n: dec.factors[n] for n in names}, windows, STRSConfig().candidates,
        callback=lambda e: seen.append(e.get("threads")))
    total = time.perf_counter() - t0
    return {"decompose_s": dec_s, "threads_start": threads, "passes": passes, "total_s": total,
            "per_pass_s": total / max(passes, 1), "base": base,
            "table_est_s": total * len(all_names) / len(names),
            "thread_counts": sorted({t for t in seen if t}),
            "trace": [[base]] + [[row[k] for k in sorted(row)] for row in table.values()]}


# --- parent: variants in subprocesses, alternating -------------------------------------------
def checkout(rev: str, dest: Path) -> Path:
    archive = subprocess.run(["git", "archive", rev, "llrc_core"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run_variant(a, variant: str, code: Path) -> dict:
    name, _, threads = variant.partition("@")
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LLRC_THREADS", None)
    if threads and threads != "auto":
        env["OMP_NUM_THREADS"] = threads          # the torch default of the process
        env["LLRC_THREADS"] = threads             # the new code's loops: pinned
    args = [sys.executable, __file__, a.case, "--worker", "--n-calib", str(a.n_calib),
            "--seq-len", str(a.seq_len), "--ratio", str(a.ratio), "--stride", str(a.stride)]
    args += ["--full"] if a.full else []
    t = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"variant": variant, "error": proc.stderr.strip().splitlines()[-1:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"variant": variant, "wall_s": time.perf_counter() - t, **out}


def max_diff(trace_a: list, trace_b: list) -> float | None:
    """Largest absolute difference over the common prefix of two traces (None: no overlap)."""
    pairs = [(x, y) for ra, rb in zip(trace_a, trace_b) for x, y in zip(ra, rb)]
    return max((abs(x - y) for x, y in pairs), default=None)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", choices=["llrc", "strs"])
    ap.add_argument("--variants", default="before,after@auto")
    ap.add_argument("--rev", default="HEAD", help="git revision of the 'before' code")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--ratio", type=float, default=0.8)
    ap.add_argument("--stride", type=int, default=1, help="strs: every K-th target (1: all)")
    ap.add_argument("--full", action="store_true", help="llrc: the whole run, not to the target")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--load", type=int, default=0, help="busy processes running alongside")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args()


def run_all(a) -> list[dict]:
    """Every variant, round after round; the 'before' code from ``git archive``."""
    with tempfile.TemporaryDirectory() as tmp:
        code = {"before": checkout(a.rev, Path(tmp)), "after": ROOT}
        results = []
        for r in range(a.rounds):
            for v in a.variants.split(","):
                res = run_variant(a, v, code[v.partition("@")[0]])
                res["round"] = r
                results.append(res)
                print(json.dumps({k: v for k, v in res.items() if k not in ("trace", "kept")}),
                      flush=True)
    return results


def main() -> None:
    a = parse_args()
    if a.worker:
        sys.path.insert(0, os.environ["PYTHONPATH"])
        import llrc_core
        out = (worker_llrc if a.case == "llrc" else worker_strs)(a)
        print(json.dumps({**out, "code": str(Path(llrc_core.__file__).parents[1])}))
        return

    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                 for _ in range(a.load)]
    try:
        results = run_all(a)
    finally:
        for p in spinners:
            p.kill()
    ok = [r for r in results if "trace" in r]
    for r in ok:      # against every variant of the first round (0.0: the same bits)
        r["max_diff_vs"] = {o["variant"]: max_diff(o["trace"], r["trace"])
                            for o in ok if o["round"] == 0 and o is not r}
        if a.full:
            r["same_plan_as"] = {o["variant"]: o["kept"] == r["kept"]
                                 for o in ok if o["round"] == 0 and o is not r}
    summary = {"case": a.case, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "load_avg": os.getloadavg(), "spinners": a.load, "n_calib": a.n_calib,
               "seq_len": a.seq_len,
               "results": [{k: v for k, v in r.items() if k not in ("trace", "kept")}
                           for r in results]}
    for r in summary["results"]:
        print(json.dumps(r))
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
