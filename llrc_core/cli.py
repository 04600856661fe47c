"""Command-line interface: ``llrc`` / ``python -m llrc_core``. A thin face over the library."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from .counting import check_ratio
from .errors import LLRCError


def _bar(desc: str):
    return lambda it: tqdm(it, desc=desc, leave=False)


def _common(p: argparse.ArgumentParser, calib_required: bool = False) -> None:
    p.add_argument("--model", required=True, help="Hub id or local folder")
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: auto)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model's own code to run (off unless asked)")
    p.add_argument("--calib", required=calib_required,
                   help="local .txt/.jsonl/.json file or folder, 'wikitext2', 'c4', 'selfgen'")
    p.add_argument("--n-calib", type=int, default=32, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decomposition", default="svd", choices=["svd", "asvd", "whiten"])
    p.add_argument("--alpha", type=float, default=0.5, help="ASVD exponent")
    p.add_argument("--batch-size", type=int, default=8)


def _load(args):
    from .models import load_model
    return load_model(args.model, args.device, args.dtype, args.trust_remote_code)


def _decompose(args, loaded):
    from .pipeline import calibrate, decompose_model
    windows = None
    if args.calib:
        windows = calibrate(loaded, args.calib, args.n_calib, args.seq_len, args.seed)
    elif args.decomposition != "svd":
        raise LLRCError(f"--decomposition {args.decomposition} needs calibration data: pass "
                        "--calib FILE (or 'selfgen')")
    dec = decompose_model(loaded.model, args.decomposition, windows, alpha=args.alpha,
                          batch_size=args.batch_size, progress=_bar("decompose blocks"))
    return dec, windows


def cmd_spectra(args) -> dict:
    import pandas as pd
    from .pipeline import spectra_rows
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{str(out)!r} exists; choose another file or pass --force")
    loaded = _load(args)
    dec, _ = _decompose(args, loaded)
    df = pd.DataFrame(spectra_rows(dec))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(out)
    return {"rows": len(df), "layers": len(dec.targets), "out": str(out)}


def _method_options(args) -> dict:
    opts = {"ratio": args.ratio, "scope": args.ratio_scope, "selection": args.selection}
    for item in args.opt or []:
        key, _, value = item.partition("=")
        try:
            opts[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            opts[key.replace("-", "_")] = value
    return opts


def cmd_compress(args) -> dict:
    from .evaluate import eval_windows, perplexity
    from .export import _prepare_destination, export_model
    from .pipeline import compress_, select_plan
    from .selectors import get_selector

    check_ratio(args.ratio)
    get_selector(args.method)
    _prepare_destination(Path(args.out), args.force)
    if args.eval_text and not Path(args.eval_text).exists():
        raise FileNotFoundError(f"--eval-text not found: {args.eval_text!r}")
    t0 = time.time()
    loaded = _load(args)
    dec, windows = _decompose(args, loaded)
    report = {"model": args.model}
    ev = None
    if args.eval_text:
        ev = eval_windows(loaded.tokenizer, args.eval_text, min(args.seq_len, 512),
                          args.max_eval_windows)
        report["ppl_before"] = perplexity(loaded.model, ev, args.batch_size)["ppl"]
    plan = select_plan(loaded.model, dec, args.method, windows, **_method_options(args))
    compress_(loaded.model, dec, plan)
    if ev is not None:
        report["ppl_after"] = perplexity(loaded.model, ev, args.batch_size)["ppl"]
    report = {"method": args.method, "decomposition": args.decomposition,
              "selection": args.selection, "target_ratio": args.ratio,
              "ratio_scope": args.ratio_scope, **plan.summary(), **report,
              "seconds": time.time() - t0}
    export_model(loaded.model, loaded.tokenizer, plan, args.out, report=report, force=args.force)
    return {k: v for k, v in report.items() if k != "ranks"} | {"out": args.out}


def cmd_eval(args) -> dict:
    from .evaluate import eval_windows, perplexity
    from .export import load_compressed
    from .models import load_model
    path = Path(args.model)
    if (path / "config.json").exists() and "llrc" in json.loads((path / "config.json").read_text()):
        model, tok, _ = load_compressed(path, args.device)
    else:
        loaded = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
        model, tok = loaded.model, loaded.tokenizer
    ev = eval_windows(tok, args.text, args.seq_len, args.max_windows)
    return perplexity(model, ev, args.batch_size, progress=_bar("eval"))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llrc", description="Low-rank compression of language "
                                 "models with learned rank selection")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("spectra", help="singular values of every target layer to CSV")
    _common(p)
    p.add_argument("--out", required=True, help="CSV file")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.set_defaults(func=cmd_spectra)

    p = sub.add_parser("compress", help="select ranks, apply, evaluate, export")
    _common(p, calib_required=True)
    p.add_argument("--method", default="uniform", help="rank selector (uniform, energy, ...)")
    p.add_argument("--ratio", type=float, required=True, help="kept parameter ratio in (0, 1]")
    p.add_argument("--ratio-scope", default="linear", choices=["linear", "model"])
    p.add_argument("--selection", default="top-k", choices=["top-k", "any-k"])
    p.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="method hyperparameter, repeatable (e.g. --opt steps=300)")
    p.add_argument("--eval-text", help="text file for perplexity before and after")
    p.add_argument("--max-eval-windows", type=int, default=None)
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="perplexity of a model or an exported folder on a text")
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=cmd_eval)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (LLRCError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=1))
    return 0
