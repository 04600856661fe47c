"""Benchmark: CPU memory of loading a checkpoint for sequential onloading in another dtype.

A Llama-shaped checkpoint with random weights is saved as safetensors in ``--stored`` dtype;
then, each in its own process, it is loaded for a run in ``--dtype``:

* ``cast copy``: ``models.load_model`` in the run's dtype (transformers casts every weight:
  a copy of the model in anonymous memory), then offloaded (``onload.enable_``), the path
  before this bench;
* ``lazy``: ``onload.load_sequential``: loaded in the stored dtype (memory-mapped file
  pages), every block weight cast only when it is onloaded.

Each process reports its anonymous resident memory (``RssAnon``: what cannot be dropped and
read again from the file) and its file-backed resident memory (``RssFile``: checkpoint pages)
after the load, and after one forward pass (every block onloaded once), less what it held
before loading. The planner counts the blocks as mapped (``mapped_host_bytes``).

    python bench/onload_cast.py                                  # llama-medium, fp32 -> bf16
    python bench/onload_cast.py --preset llama2-7b-2blocks --stored float16 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.memory import PRESETS   # noqa: E402

MIB = 2 ** 20


def rss() -> dict[str, int]:
    """``RssAnon`` and ``RssFile`` of this process, in bytes (``/proc/self/status``)."""
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def worker(folder: str, dtype: str, lazy: bool) -> dict:
    import torch

    from llrc_core import onload
    from llrc_core.models import load_model
    before = rss()
    if lazy:
        model = onload.load_sequential(folder, "cpu", dtype).model
    else:
        model = onload.enable_(load_model(folder, "cpu", dtype).model, "cpu")
    loaded = rss()
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 8, dtype=torch.long))
    ran = rss()
    return {k: {"anon_mib": (v["RssAnon"] - before["RssAnon"]) / MIB,
                "file_mib": (v["RssFile"] - before["RssFile"]) / MIB}
            for k, v in (("after load", loaded), ("after a forward", ran))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama-medium", choices=list(PRESETS))
    ap.add_argument("--stored", default="float32", help="dtype of the checkpoint")
    ap.add_argument("--dtype", default="bfloat16", help="dtype of the run")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        folder, dtype, lazy = args.worker
        print(json.dumps(worker(folder, dtype, lazy == "lazy")))
        return 0
    import torch
    import transformers
    with tempfile.TemporaryDirectory() as folder:
        cfg = transformers.LlamaConfig(**PRESETS[args.preset], dtype=args.stored)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).to(getattr(torch, args.stored)).save_pretrained(
            folder)
        transformers.AutoTokenizer.from_pretrained(ROOT / "assets" / "demo-model"
                                                   ).save_pretrained(folder)   # loads need one
        size = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / MIB
        print(f"{args.preset}: checkpoint {size:.0f} MiB in {args.stored}, run in {args.dtype}")
        print("| load | after | anonymous MiB | file pages MiB |\n|---|---|---|---|")
        for kind in ("cast copy", "lazy"):
            out = subprocess.run([sys.executable, __file__, "--worker", folder, args.dtype,
                                  "lazy" if kind == "lazy" else "copy"],
                                 capture_output=True, text=True, check=True)
            for when, r in json.loads(out.stdout.splitlines()[-1]).items():
                print(f"| {kind} | {when} | {r['anon_mib']:.0f} | {r['file_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
