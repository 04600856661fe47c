"""How far a perplexity on k evaluation windows carries: the sampling noise of "plan A closes
X % of the reference's gap to dense", measured on the whole evaluation text.

    python bench/eval_sampling.py --out out/sampling --ref DIR/cells/svdllm__whiten__top-k__0.6.json \
        DIR/cells/llrc__whiten__any-k__0.6__seed0.json ... [--k 16,32,64,128]

The model, calibration and factors come from the first cell's ``compare`` folder
(``config.json``). The dense model and every cell's plan (the reference's too) are scored
token by token over every window of the folder's evaluation text (``--out`` keeps those
scores: a second run reuses them). Then for each plan and each k the share of the
reference's gap to dense it closes is computed on

- the first k windows (what ``--max-eval-windows k`` measures; the bench uses 16),
- every block of k consecutive windows (mean and sd over the blocks),
- every evenly spaced sample of k windows (``o, o + s, o + 2s, ...`` with ``s = total // k``,
  for each offset ``o``: mean and sd over the offsets; ``--eval-sample spread`` takes one
  such sample, spaced from the first window to the last),
- the whole text.

The sd over blocks and offsets is the noise of a k-window evaluation of that plan.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablations import _session         # noqa: E402


def gap_closed(nll: dict[str, torch.Tensor], name: str, ref: str,
               rows: torch.Tensor) -> float:
    """Share of ``ref``'s perplexity gap to ``dense`` that ``name`` closes on windows ``rows``
    of the per-token scores ``nll[...] (windows, tokens)``."""
    ppl = {k: float(nll[k][rows].mean().exp()) for k in ("dense", ref, name)}
    return (ppl[ref] - ppl[name]) / (ppl[ref] - ppl["dense"])


def samples(total: int, k: int) -> dict[str, list[torch.Tensor]]:
    """Window indices of each k-window sample of a ``total``-window text."""
    step = total // k
    return {"first": [torch.arange(k)],
            "blocks": [torch.arange(b * k, b * k + k) for b in range(total // k)],
            "spread": [torch.arange(o, total, step)[:k] for o in range(step)],
            "whole": [torch.arange(total)]}


def sampling_table(nll: dict[str, torch.Tensor], ref: str, ks: list[int]) -> list[dict]:
    """One row per (plan, k): the gap closed on each sample, mean and sd over blocks and
    spread offsets."""
    rows, total = [], nll["dense"].shape[0]
    for name in nll:
        if name in ("dense", ref):
            continue
        for k in ks:
            got = {s: torch.tensor([gap_closed(nll, name, ref, r) for r in idx])
                   for s, idx in samples(total, k).items()}
            rows.append({"plan": name, "k": k, "first": float(got["first"][0]),
                         "blocks_mean": float(got["blocks"].mean()),
                         "blocks_sd": float(got["blocks"].std()),
                         "spread_mean": float(got["spread"].mean()),
                         "spread_sd": float(got["spread"].std()),
                         "whole": float(got["whole"][0])})
    return rows


def score(s, plan_path: Path | None) -> torch.Tensor:
    """Next-token NLL of every token of the session's evaluation windows  # (windows, T - 1)"""
    from llrc_core.apply import restore_
    from llrc_core.blocks import inference_mode
    from llrc_core.losses import next_token_loss
    from llrc_core.pipeline import compress_
    from llrc_core.plan import RankPlan
    model = s.loaded.model
    if plan_path is not None:
        plan = RankPlan.from_dict(json.loads(plan_path.read_text())["plan"])
        compress_(model, s.dec(plan.decomposition), plan)
    try:
        out = []
        with inference_mode(model):
            for ids in s._eval.split(s.cfg.batch_size):
                nll = next_token_loss(model(input_ids=ids).logits, ids, "none")
                out.append(nll.view(len(ids), -1))
        return torch.cat(out)
    finally:
        restore_(model)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cells", nargs="+", type=Path, help="compare cells (JSON) of the plans")
    ap.add_argument("--ref", required=True, type=Path, help="the reference's cell (SVD-LLM)")
    ap.add_argument("--out", required=True, type=Path, help="folder for the per-token scores")
    ap.add_argument("--k", default="16,32,64,128", help="window counts to sample")
    args = ap.parse_args(argv)
    s = _session(args.ref.parent.parent, max_eval_windows=None, eval_sample="first")
    args.out.mkdir(parents=True, exist_ok=True)
    nll = {}
    for name, path in [("dense", None), *((p.stem, p) for p in [args.ref, *args.cells])]:
        f = args.out / f"{name}.pt"
        if f.exists():
            nll[name] = torch.load(f, weights_only=True)
        else:
            nll[name] = score(s, path)
            torch.save(nll[name], f)
        print(f"{name}: ppl {float(nll[name].mean().exp()):.3f} over "
              f"{nll[name].shape[0]} windows", file=sys.stderr)
    rows = sampling_table(nll, args.ref.stem, [int(k) for k in args.k.split(",")])
    print("| plan | k | first k | k consecutive: mean ± sd | k spread: mean ± sd | whole |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['plan']} | {r['k']} | {r['first']:.3f} | {r['blocks_mean']:.3f} ± "
              f"{r['blocks_sd']:.3f} | {r['spread_mean']:.3f} ± {r['spread_sd']:.3f} | "
              f"{r['whole']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
