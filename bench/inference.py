"""Inference speed of compressed exports against the dense model: prefill and decode tokens/s,
peak memory, file size (results and reading: bench/README.md).

Per target ratio a real plan is selected and exported as the CLI exports (demo model: SVD-LLM
on WikiText-2 calibration; random-weight Llama shapes: uniform ranks over a plain SVD), in the
source's dtype. Each export is loaded both ways, stock transformers with
``trust_remote_code=True`` (``remote``) and ``llrc_core.export.load_compressed`` (``llrc``), and
timed against the dense model in one process:

* prefill: one forward of ``batch x prefill_tokens`` tokens, KV cache built, logits of the last
  position only (``logits_to_keep=1``, as ``generate`` does);
* decode: ``generate`` of exactly ``new_tokens`` greedy tokens (``min_new_tokens`` = ``max``)
  after a ``prompt_tokens`` prompt, KV cache on; tokens/s = batch x new tokens / time.

Every repeat times every variant once per workload, in an order rotated each repeat; each time
is divided by the dense time of the same repeat and the median of these paired ratios kept.
Timer: the process's CPU time on a CPU with one thread (on a shared machine wall time mostly
measures the other jobs; wall figures are kept too), else synchronised wall time. Peak memory:
one fresh process per variant (load, then the largest prefill and decode).

    python bench/inference.py --preset demo --threads 1
    python bench/inference.py --preset llama2-7b --device cuda --dtype bfloat16   # GPU
    python bench/inference.py --smoke --json smoke.json                           # CI
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("LLRC_DATA_DIR", ROOT.parent / "shared" / "data"))
DEMO = ROOT / "assets" / "demo-model"

LLAMA = {   # random-weight Llama shapes (the demo model is loaded from assets/demo-model)
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=172,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=256),
    "llama-medium": dict(hidden_size=1024, num_hidden_layers=8, intermediate_size=2752,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=32000),
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
}
PRESETS = ["demo", *LLAMA]
SMOKE = dict(preset="tiny", prefill_tokens=32, new_tokens=4, prompt_tokens=4, batches=[1, 2],
             repeats=1)
WORKLOADS = ("prefill", "decode")


# --- models ---------------------------------------------------------------------------------------

def dense_model(preset: str, device: str, dtype: torch.dtype):
    """(model, tokenizer or None, dtype the source stores, its file bytes, how that size was
    found)."""
    if preset == "demo":
        from llrc_core.models import load_model
        loaded = load_model(DEMO, device, str(dtype).removeprefix("torch."))
        size = sum(p.stat().st_size for p in DEMO.glob("*.safetensors"))
        return (loaded.model, loaded.tokenizer, loaded.source_dtype or dtype, size,
                "safetensors files")
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    with torch.device(device):       # random weights built where they run
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA[preset]), dtype=dtype)
    size = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    return model.eval(), None, dtype, size, "parameters x bytes per number"


def plans_and_exports(model, tok, store, a, work: Path) -> list[dict]:
    """Select a plan per ratio, export it (stored in ``store``); the model is dense
    again at the end. Returns one dict per ratio with the folder and the in-memory logits of
    the compressed model on a probe input (to check both loaders against)."""
    from llrc_core.apply import restore_
    from llrc_core.pipeline import compress_, decompose_model, select_plan
    from llrc_core.speed import choose_stored_dense
    from llrc_core.export import export_model
    windows, method, decomposition = None, "uniform", "svd"
    if a.preset == "demo":
        from llrc_core.calibration import CalibConfig, load_calibration
        windows = load_calibration(tok, CalibConfig(str(DATA / "wikitext-2" / "valid.txt"),
                                                    a.n_calib, 256), model)
        method, decomposition = "svdllm", "whiten"
    t0 = time.perf_counter()
    dec = decompose_model(model, decomposition, windows)
    print(f"decomposed ({decomposition}) in {time.perf_counter() - t0:.0f} s", flush=True)
    probe = torch.randint(0, model.config.vocab_size, (1, 16),
                          generator=torch.Generator().manual_seed(1)).to(model.device)
    out = []
    for ratio in a.ratios:
        plan = select_plan(model, dec, method, windows, ratio=ratio)
        compress_(model, dec, plan)
        dense = choose_stored_dense(model, plan, a.dense_below) if a.dense_below else None
        folder = export_model(model, tok, plan, work / f"rho-{ratio}", dense=dense, force=True,
                              dtype=store)
        with torch.inference_mode():
            ref = model(probe).logits.float().cpu()
        out.append({"ratio": ratio, "folder": folder, "plan_ratio_linear": plan.ratio("linear"),
                    "ref": ref, "probe": probe})
        restore_(model)
    return out


def load_variant(kind: str, folder, a, dtype: torch.dtype):
    if kind == "llrc":
        from llrc_core.export import load_compressed
        return load_compressed(folder, a.device, dtype)[0]
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype)
    return model.to(a.device).eval()


# --- workloads ------------------------------------------------------------------------------------

def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _keep_last(model) -> dict:
    import inspect
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(
        model.forward).parameters else {}


@torch.inference_mode()
def prefill(model, ids) -> None:
    model(ids, use_cache=True, **_keep_last(model))


@torch.inference_mode()
def decode(model, prompt, new_tokens: int) -> torch.Tensor:
    pad = model.generation_config.pad_token_id
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                          pad_token_id=0 if pad is None else pad)


def inputs(vocab: int, a, device) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {}
    for b in a.batches:
        out[("prefill", b)] = torch.randint(0, vocab, (b, a.prefill_tokens), generator=g)
        out[("decode", b)] = torch.randint(0, vocab, (b, a.prompt_tokens), generator=g)
    return {k: v.to(device) for k, v in out.items()}


def run_once(model, work: str, ids, a, new_tokens: int | None = None) -> tuple[float, float]:
    """(wall, process CPU) seconds for one workload; a decode that did not produce exactly the
    tokens asked fails."""
    new_tokens = new_tokens or a.new_tokens
    _sync(a.device)
    t, c = time.perf_counter(), time.process_time()
    if work == "prefill":
        prefill(model, ids)
    else:
        got = decode(model, ids, new_tokens)
    _sync(a.device)
    seconds = time.perf_counter() - t, time.process_time() - c
    if work == "decode" and tuple(got.shape) != (ids.shape[0], ids.shape[1] + new_tokens):
        raise RuntimeError(f"generate returned {tuple(got.shape)}, not the fixed length asked")
    return seconds


def time_variants(models: dict, ids: dict, a) -> dict:
    """``{(variant, work, batch): [(wall, cpu) s per repeat]}``, variants rotated each
    repeat."""
    names = list(models)
    for name in names:                      # warm-up: allocator, kernels, remote code
        for (work, b), x in ids.items():
            run_once(models[name], work, x[:, : min(x.shape[1], 32)], a, new_tokens=4)
    times: dict = {}
    for r in range(a.repeats):
        for (work, b), x in ids.items():
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                times.setdefault((name, work, b), []).append(run_once(models[name], work, x, a))
        print(f"repeat {r + 1}/{a.repeats} done", flush=True)
    return times


# --- peak memory: one fresh process per variant ---------------------------------------------------

def memory_worker(a) -> dict:
    import transformers  # noqa: F401  (imported before the baseline, as every loader needs it)
    dtype = getattr(torch, a.dtype)
    cuda = a.device.startswith("cuda")
    before = torch.cuda.memory_allocated() if cuda else _rss("VmRSS")
    if a.loader == "dense":
        model = dense_model(a.preset, a.device, dtype)[0]
    else:
        model = load_variant(a.loader, a.folder, a, dtype)
    import gc
    gc.collect()
    load_peak = torch.cuda.max_memory_allocated() if cuda else _rss("VmHWM")
    if cuda:                       # the peak of the run, not of loading (transient copies)
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak()
    after_load = torch.cuda.memory_allocated() if cuda else _rss("VmRSS")
    ids = inputs(model.config.vocab_size, a, a.device)
    b = max(a.batches)
    run_once(model, "prefill", ids[("prefill", b)], a)
    run_once(model, "decode", ids[("decode", b)], a)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss("VmHWM")
    return {"memory_kind": "peak allocated (CUDA)" if cuda else "peak RSS",
            "before_load_mb": before / 2**20, "load_peak_mb": load_peak / 2**20,
            "after_load_mb": after_load / 2**20,
            "peak_mb": peak / 2**20, "peak_over_baseline_mb": (peak - before) / 2**20}


def _reset_peak() -> None:
    """Linux: VmHWM back to the current RSS (``clear_refs`` 5), so that it measures the run."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _rss(field: str) -> int:
    """Bytes of ``VmRSS`` (now) or ``VmHWM`` (peak) of this process. Not ``ru_maxrss``: Linux
    carries it over from the parent through fork and exec (the parent holds every model)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # not Linux: KiB


def measure_memory(a, loader: str, folder=None) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--loader", loader, *_passed(a)]
    if folder:
        cmd += ["--folder", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"memory_error": err}
    return json.loads(lines[-1][len("RESULT "):])


def _passed(a) -> list[str]:
    return ["--preset", a.preset, "--device", a.device, "--dtype", a.dtype,
            "--threads", str(a.threads), "--prefill-tokens", str(a.prefill_tokens),
            "--new-tokens", str(a.new_tokens), "--prompt-tokens", str(a.prompt_tokens),
            "--batches", *map(str, a.batches)]


# --- the run --------------------------------------------------------------------------------------

def timer(a) -> str:
    """The primary timer: CPU time of the process on one CPU thread, else wall time."""
    return "process CPU time" if a.device == "cpu" and a.threads == 1 else "wall"


def param_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def machine(a) -> dict:
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor()
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": a.device,
            "device_name": name or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def run(a) -> dict:
    from llrc_core.export import export_info
    dtype = getattr(torch, a.dtype)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="llrc-inference-"))
    model, tok, store, dense_bytes, dense_from = dense_model(a.preset, a.device, dtype)
    exports = plans_and_exports(model, tok, store, a, work)
    models, rows = {"dense": model}, [{"variant": "dense", "loader": "dense", "target_ratio": 1.0,
                                       "plan_ratio_linear": 1.0, "stored_ratio_linear": 1.0,
                                       "stored_ratio_model": 1.0, "file_bytes": dense_bytes,
                                       "file_from": dense_from, "param_bytes": param_bytes(model)}]
    for ex in exports:
        storage = export_info(ex["folder"])["storage"]
        for loader in a.loaders:
            m = load_variant(loader, ex["folder"], a, dtype)
            with torch.inference_mode():
                diff = (m(ex["probe"]).logits.float().cpu() - ex["ref"]).abs().max().item()
            name = f"rho{ex['ratio']}-{loader}"
            models[name] = m
            rows.append({"variant": name, "loader": loader, "target_ratio": ex["ratio"],
                         "plan_ratio_linear": ex["plan_ratio_linear"],
                         "stored_ratio_linear": storage["stored_ratio_linear"],
                         "stored_ratio_model": storage["stored_ratio_model"],
                         "layers_stored_dense": len(export_info(ex["folder"]).get(
                             "stored_dense", {}).get("layers", {})),
                         "file_bytes": storage["weights_bytes"],       # every shard
                         "file_from": "safetensors files", "param_bytes": param_bytes(m),
                         "max_abs_logit_diff_vs_in_memory": diff, "folder": str(ex["folder"])})
    times = time_variants(models, inputs(model.config.vocab_size, a, a.device), a)
    cpu = 1 if timer(a) == "process CPU time" else 0      # which of (wall, cpu) is primary
    for row in rows:
        for work in WORKLOADS:
            for b in a.batches:
                key, tokens = f"{work}_b{b}", b * (a.prefill_tokens if work == "prefill"
                                                   else a.new_tokens)
                mine, dense = times[(row["variant"], work, b)], times[("dense", work, b)]
                for i, tag in ((0, ""), (1, "_cpu")):
                    row[f"{key}{tag}_s"] = statistics.median(t[i] for t in mine)
                row[f"{key}_tok_s"] = tokens / statistics.median(t[cpu] for t in mine)
                for i, tag in ((cpu, ""), (0, "_wall")):   # > 1: faster than dense
                    paired = [d[i] / m[i] for d, m in zip(dense, mine)]
                    row[f"{key}{tag}_vs_dense"] = statistics.median(paired)
                    row[f"{key}{tag}_vs_dense_range"] = [min(paired), max(paired)]
        row["file_vs_dense"] = row["file_bytes"] / dense_bytes
    del models
    if a.memory:     # smoke: the dense model and the smallest ratio only (a process each)
        low = min(a.ratios)
        for row in rows:
            if not a.smoke or row["target_ratio"] in (1.0, low):
                row.update(measure_memory(a, row["loader"], row.get("folder")))
    return {"bench": "inference", "preset": a.preset, "dtype": a.dtype, "stored_dtype":
            str(store).removeprefix("torch."), "timer": timer(a), "machine": machine(a),
            "settings": {k: getattr(a, k) for k in ("ratios", "loaders", "batches",
                                                    "prefill_tokens", "prompt_tokens",
                                                    "new_tokens", "repeats", "dense_below")},
            "workdir": str(work), "variants": rows}


def markdown(res: dict) -> str:
    """One row per variant; each speed cell: tokens/s by the primary timer (x dense, paired);
    with the CPU timer also the wall-clock ratio after the slash."""
    cpu = res["timer"] == "process CPU time"
    cols = [f"{w}_b{x}" for w in WORKLOADS for x in res["settings"]["batches"]]
    unit = "tok/s per CPU-s (x dense: CPU / wall)" if cpu else "tok/s (x dense)"
    head = ("| variant | rho_linear (stored) | file MB (x dense) | weights in memory MiB | "
            + " | ".join(f"{c.replace('_', ' ')} {unit}" for c in cols)
            + " | peak MB (model + run) |")
    lines = [head, "|" + "---|" * (5 + len(cols))]
    for r in res["variants"]:
        cells = [f"{r[c + '_tok_s']:.1f} ({r[c + '_vs_dense']:.2f}"
                 + (f" / {r[c + '_wall_vs_dense']:.2f})" if cpu else ")") for c in cols]
        mem = (f"{r['peak_mb']:.0f} (+{r['peak_over_baseline_mb']:.0f})" if "peak_mb" in r
               else r.get("memory_error", "-"))
        lines.append(f"| {r['variant']} | {r['plan_ratio_linear']:.3f} "
                     f"({r['stored_ratio_linear']:.3f}) | {r['file_bytes'] / 1e6:.1f} "
                     f"({r['file_vs_dense']:.2f}) | {r['param_bytes'] / 2**20:.0f} | "
                     + " | ".join(cells) + f" | {mem} |")
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", default="demo", choices=PRESETS)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA "
                    "default), float16")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default); "
                    "on a busy 2-core machine 1 is ~10x faster than 2")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.6])
    ap.add_argument("--loaders", nargs="+", default=["remote", "llrc"],
                    choices=["remote", "llrc"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--prompt-tokens", type=int, default=16, help="prompt before decoding")
    ap.add_argument("--new-tokens", type=int, default=128, help="decoded tokens (fixed)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-calib", type=int, default=16, help="demo: calibration windows")
    ap.add_argument("--dense-below", type=float, default=0.0, help="export option: store "
                    "dense a layer slower factorised that saves under this share (0: off)")
    ap.add_argument("--no-memory", dest="memory", action="store_false",
                    help="skip the peak-memory processes")
    ap.add_argument("--workdir", help="folder for the exports (default: a new temp folder)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few tokens (CI)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--loader", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.smoke:
        for k, v in SMOKE.items():
            setattr(a, k, v)
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        print("RESULT " + json.dumps(memory_worker(a)), flush=True)
        return 0
    t0 = time.time()
    res = run(a)
    res["seconds"] = time.time() - t0
    m = res["machine"]
    print(f"# inference: {a.preset}, {a.dtype}, {m['device_name']}, {m['cpu_count']} CPUs, "
          f"{m['threads']} threads, {res['seconds']:.0f} s")
    print(markdown(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
