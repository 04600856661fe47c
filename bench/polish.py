"""Polish stored plans (``llrc_core/polish.py``) and score each before and after.

    python bench/polish.py --out out/polish --variant whiten-calib-128 \\
        --eval-windows 128 --eval-sample spread \\
        out/abl/whiten-calib-128/cells/llrc__whiten__any-k__0.6__seed{0,1,2}.json \\
        out/abl/svdllm-whiten-calib-128/cells/svdllm__whiten__top-k__0.6.json

    python bench/polish.py --model minilm --refit --out out/polish-minilm \
        out/minilm/cells/{llrc,ars}__asvd__top-k__0.8__seed{0,1,2}.json

The plans (``llrc compare`` cells, or any JSON with a ``plan``) must come from the variant's
calibration (``bench/ablations.py``'s ``VARIANTS``), whose whitened factors they index; with
``--model minilm``, from ``llrc compare --model minilm`` at its defaults (the encoder is
polished on the distance to its dense output and scored by embedding fidelity). Each
is polished on windows of that calibration text (``PolishConfig``'s defaults unless
``--rounds`` / ``--windows`` / ``--seq-len``, seeded by the variant's calibration seed, as
``compress --polish`` and ``compare --polish`` take them), then scored as selected and polished
on the evaluation windows (with ``--refit``, both refitted too). A row per plan
goes to stdout and ``OUT/rows.jsonl``, the polished plan to ``OUT/<cell name>``. No
selection runs: polishing a plan the grid already has is cheaper than ``compare --polish``,
which selects again.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ablations import VARIANTS, metric_of, variant_config       # noqa: E402
from llrc_core.apply import restore_                            # noqa: E402
from llrc_core.compare import CompareConfig                     # noqa: E402
from llrc_core.session import Session                           # noqa: E402
from llrc_core.evaluate import EVAL_SAMPLES                     # noqa: E402
from llrc_core.files import atomic_json                         # noqa: E402
from llrc_core.plan import RankPlan                             # noqa: E402
from llrc_core.polish import PolishConfig, polish_plan, polish_windows   # noqa: E402
from llrc_core.refit import refit_windows                       # noqa: E402
from llrc_core.workflow import compress                         # noqa: E402


def score(s: Session, dec, plan: RankPlan, refit: bool = False, refit_ids=None) -> float:
    """Perplexity (an encoder: embedding fidelity) of ``plan`` (with ``refit``: refitted on
    ``refit_ids``, else on the calibration windows, as ``compress --refit``) on the session's
    evaluation data (the model restored)."""
    try:
        compress(s.loaded.model, dec, plan.method, s.windows, before=False, plan=plan,
                 refit=refit, refit_windows=refit_ids)
        return s.evaluate()[metric_of(s)]
    finally:
        restore_(s.loaded.model)


# None on the command line: --model minilm refuses what was given rather than ignore it.
DEMO_DEFAULTS = {"variant": "whiten-calib-128", "seq_len": 128, "eval_windows": 128,
                 "eval_sample": "spread"}


def session_config(args) -> CompareConfig:
    """The demo model's ablation variant, or MiniLM at compare's defaults (rho 0.8, ASVD)."""
    if args.model == "minilm":
        return CompareConfig(model="minilm", methods=("llrc",), ratios=(0.8,),
                             selections=("top-k",), decompositions=("asvd",))
    return variant_config(args.variant, argparse.Namespace(
        ratios=(0.6,), seeds=(0,), steps=None, seq_len=args.seq_len,
        eval_windows=args.eval_windows, eval_sample=args.eval_sample, refit=False,
        vote=False, polish=0, out=args.out))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cells", nargs="+", help="JSON files with a 'plan'")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="demo", choices=("demo", "minilm"))
    demo = ap.add_argument_group("the demo model only (MiniLM runs at compare's defaults)")
    demo.add_argument("--variant", choices=list(VARIANTS), help="default whiten-calib-128")
    demo.add_argument("--seq-len", type=int, help="calibration window length, default 128 "
                      "(a variant's own wins)")
    demo.add_argument("--eval-windows", type=int, help="default 128")
    demo.add_argument("--eval-sample", choices=EVAL_SAMPLES, help="default spread")
    d = PolishConfig()
    ap.add_argument("--rounds", type=int, default=d.rounds)
    ap.add_argument("--windows", type=int, default=d.windows)
    ap.add_argument("--polish-seq-len", type=int, default=d.seq_len)
    ap.add_argument("--refit", action="store_true", help="also score both plans refitted "
                    "(ppl_refit, ppl_polished_refit)")
    ap.add_argument("--refit-windows", type=int, default=0, help="with --refit: fit on this "
                    "many fresh windows of the calibration text (compress --refit-windows)")
    args = ap.parse_args(argv)
    given = [f"--{k.replace('_', '-')}" for k in DEMO_DEFAULTS if getattr(args, k) is not None]
    if args.model == "minilm" and given:
        ap.error(f"{', '.join(given)}: only for the demo model (its variant's calibration "
                 "and evaluation); MiniLM is polished and scored at compare's defaults, so "
                 "drop them with --model minilm")
    if args.refit_windows and not args.refit:
        ap.error("--refit-windows sets the windows --refit fits on: add --refit")
    for k, v in DEMO_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    cfg = session_config(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    s = Session(cfg, print)
    pcfg = PolishConfig(rounds=args.rounds, windows=args.windows, seq_len=args.polish_seq_len)
    ids = polish_windows(s.loaded, cfg.calib, pcfg, cfg.seed)
    refit_ids = refit_windows(s.loaded, cfg.calib, args.refit_windows, cfg.seq_len, cfg.seed)
    m = metric_of(s)
    for cell in map(Path, args.cells):
        plan = RankPlan.from_dict(json.loads(cell.read_text())["plan"])
        dec = s.dec(plan.decomposition)
        polished = polish_plan(s.loaded.model, dec, plan, ids, pcfg)
        atomic_json(out / cell.name, {"plan": polished.to_dict()})
        p = polished.meta["polish"]
        row = {"cell": str(cell), m: score(s, dec, plan),
               f"{m}_polished": score(s, dec, polished),
               "loss_before": p["loss_before"], "loss_after": p["loss_after"],
               "moves": p["moves"], "rounds_run": p["rounds_run"], "polish_seconds": p["seconds"],
               **({"eval_windows": args.eval_windows, "eval_sample": args.eval_sample}
                  if m == "ppl" else {"fidelity_lines": cfg.fidelity_lines})}
        if args.refit:
            row[f"{m}_refit"] = score(s, dec, plan, True, refit_ids)
            row[f"{m}_polished_refit"] = score(s, dec, polished, True, refit_ids)
            row["refit_windows"] = args.refit_windows or len(s.windows)
        print(json.dumps(row), flush=True)
        with open(out / "rows.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
