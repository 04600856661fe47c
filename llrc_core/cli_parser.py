"""The ``llrc`` command line's arguments: one subparser per command of ``cli.py``, which
dispatches on the subcommand's name."""
from __future__ import annotations

import argparse

from .decompose import DECOMPOSITIONS

SAMPLE_HELP = ("which windows a capped evaluation takes: first (the text's first ones) or "
               "spread (evenly over the whole text; on the demo model half the sampling "
               "noise of as many consecutive windows, bench/README.md)")


def _common(p: argparse.ArgumentParser, calib_required: bool = False,
            decomposition: str = "svd") -> None:
    p.add_argument("--model", required=True, help="Hub id, local folder, or 'minilm'")
    p.add_argument("--device", default=None, help="cuda or cpu; unset: cuda when present")
    p.add_argument("--dtype", default=None, help="compute dtype: float32, float16, bfloat16; "
                   "unset (auto): bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model's own code to run (off unless asked)")
    p.add_argument("--allow-compressed", action="store_true",
                   help="accept an LLRC low-rank export as --model: load it dense (A B "
                   "multiplied back) to compress it again (refused unless asked)")
    p.add_argument("--calib", required=calib_required,
                   help="local .txt/.jsonl/.json file or folder, 'wikitext2', 'c4', 'selfgen'")
    p.add_argument("--n-calib", type=int, default=32, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    p.add_argument("--seed", type=int, default=0)
    auto = ["auto"] if decomposition == "auto" else []
    p.add_argument("--decomposition", default=decomposition, choices=[*auto, *DECOMPOSITIONS],
                   help="auto: the method's preferred one (the best measured)" if auto else None)
    p.add_argument("--alpha", type=float, default=0.5, help="ASVD exponent")
    p.add_argument("--batch-size", type=int, default=8)


def _size(text: str) -> int:
    from .shards import shard_bytes
    try:
        return shard_bytes(text)
    except ValueError as exc:            # argparse's own message would hide ours
        raise argparse.ArgumentTypeError(str(exc)) from None


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--merged-dense", action="store_true",
                   help="export a plain model of the original architecture (A B multiplied back)")
    p.add_argument("--dense-below", type=float, default=0.0, metavar="SHARE",
                   help="store dense (W = A B, same outputs) each low-rank layer that runs slower "
                   "factorised than dense on --device (timed at one decode step) and saves under "
                   "SHARE of its weights; the stored ratio is recomputed and printed (0: off)")
    from .shards import DEFAULT_MAX_SHARD
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD, metavar="SIZE", type=_size,
                   help="largest weights file (e.g. 5GB, 500MB): a bigger export is written "
                   "shard by shard with an index, so it needs one shard of extra memory")


def _placement_args(p: argparse.ArgumentParser) -> None:
    from .placement import OFFLOADS
    p.add_argument("--offload", default="auto", choices=["auto", *OFFLOADS],
                   help="what waits in CPU memory during the run: none, targets (distillation "
                   "targets), factors (targets and factors), weights (all that and the dense "
                   "blocks, onloaded one layer at a time); auto: the least that fits")
    p.add_argument("--factor-dtype", default="auto", help="dtype factors are stored in: auto "
                   "(the model's on a GPU, float32 on a CPU), float32, bfloat16, float16")


def _polish_args(p: argparse.ArgumentParser) -> None:
    from .polish import PolishConfig
    d = PolishConfig()
    p.add_argument("--polish", type=int, default=0, metavar="ROUNDS",
                   help="after selection, move singular values between layers for up to "
                   "ROUNDS rounds while that lowers the loss on windows of the calibration "
                   "text (next-token loss; an encoder's: the distance of its pooled output "
                   f"to the original's; llrc_core/polish.py; {d.rounds} is the measured "
                   "setting; 0: off)")
    p.add_argument("--polish-windows", type=int, default=d.windows,
                   help="calibration windows the polish measures its loss on")
    p.add_argument("--polish-seq-len", type=int, default=d.seq_len,
                   help="tokens per polish window")


def _refit_windows_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--refit-windows", type=int, default=0, metavar="N",
                   help="with --refit: fit on N fresh windows of the calibration text (other "
                   "than the selection's; on the demo model 512 x 128 tokens beat the 128 it "
                   "selects on, bench/README.md) instead of the calibration windows (0)")


def build_parser() -> argparse.ArgumentParser:
    from .counting import SCOPES
    from .evaluate import EVAL_SAMPLES, EVAL_SEQ_LEN, EVAL_WINDOWS
    from .selectors import SELECTORS, any_k_methods
    from .selectors.base import SELECTIONS
    ap = argparse.ArgumentParser(prog="llrc", description="Low-rank compression of language "
                                 "models with learned rank selection")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("spectra", help="singular values of every target layer to CSV")
    _common(p)
    p.add_argument("--out", required=True, help="CSV file")
    p.add_argument("--force", action="store_true", help="overwrite --out")

    p = sub.add_parser("compress", help="select ranks, apply, evaluate, export")
    _common(p, calib_required=True, decomposition="auto")
    p.add_argument("--method", default="uniform",
                   help=f"rank selector: {', '.join(sorted(SELECTORS))}")
    p.add_argument("--ratio", type=float, required=True, help="kept parameter ratio in (0, 1]")
    p.add_argument("--ratio-scope", default="linear", choices=list(SCOPES))
    p.add_argument("--selection", default="top-k", choices=list(SELECTIONS),
                   help=f"any-k only for {', '.join(any_k_methods())}")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="method hyperparameter, repeatable (e.g. --opt steps=300)")
    p.add_argument("--refit", action="store_true", help="refit each low-rank layer's output "
                   "factor to the compressed model's own inputs on the calibration windows "
                   "(closed form; same ranks and size)")
    _refit_windows_arg(p)
    _polish_args(p)
    p.add_argument("--vote-seeds", metavar="S1,S2,...", help="learned methods: run once per "
                   "seed and keep the vote of their plans (the values most keep, on the same "
                   "budget; llrc_core/vote.py): N times the selection time")
    p.add_argument("--log", help="JSONL file receiving every event of the run (any method)")
    p.add_argument("--checkpoint", help="learned methods: state file, written every 50 steps "
                   "and at the end; a run with the same options resumes from it")
    p.add_argument("--eval-text", help="text file for perplexity before and after")
    p.add_argument("--eval-seq-len", type=int, default=EVAL_SEQ_LEN,
                   help="tokens per evaluation window")
    p.add_argument("--max-eval-windows", type=int, default=EVAL_WINDOWS,
                   help="evaluation windows (see --eval-sample)")
    p.add_argument("--eval-sample", default="first", choices=list(EVAL_SAMPLES),
                   help=SAMPLE_HELP)
    p.add_argument("--shard-factors", action="store_true",
                   help="under torchrun --nproc_per_node N: split the factors over the N "
                   "processes (FSDP2) while masks train, instead of offloading them")
    p.add_argument("--gpus", type=int, default=1, help="GPUs of this machine to place the "
                   "model's blocks across (accelerate), for a model one GPU cannot hold "
                   "without --offload weights; 1: one GPU (under torchrun: one per process)")
    _placement_args(p)
    _export_args(p)

    p = sub.add_parser("export", help="re-export an LLRC folder, or compress --model with --plan")
    _common(p)
    p.add_argument("--plan", help="rank_plan.json to apply when --model is not an LLRC folder")
    _export_args(p)

    p = sub.add_parser("eval", help="perplexity of a model or an exported folder on a text")
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--seq-len", type=int, default=EVAL_SEQ_LEN, help="tokens per window")
    p.add_argument("--max-windows", type=int, default=EVAL_WINDOWS,
                   help="windows evaluated (see --sample)")
    p.add_argument("--sample", default="first", choices=list(EVAL_SAMPLES), help=SAMPLE_HELP)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--trust-remote-code", action="store_true")

    p = sub.add_parser("plan-memory", help="memory per phase of a compression, from the config "
                       "alone (any model size: no weights are read)")
    p.add_argument("--model", required=True,
                   help="Hub id, folder (config.json is enough), or 'minilm'")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--method", default="llrc", help="rank selector")
    p.add_argument("--decomposition", default="whiten", choices=list(DECOMPOSITIONS))
    p.add_argument("--n-calib", type=int, default=64, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=4, help="windows per training step")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (0: a CPU run)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--shard-factors", type=int, default=1, metavar="N",
                   help="plan factors split over N processes while masks train (compress "
                   "--shard-factors under torchrun --nproc_per_node N); counts one process")
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="torchrun processes of the run (data parallel; at least "
                   "--shard-factors); counts one process")
    p.add_argument("--refit", action="store_true", help="count compress --refit's pass too "
                   "(--batch-size windows a batch); it rules out --offload weights")
    _refit_windows_arg(p)
    _polish_args(p)        # --polish ROUNDS (any > 0): count compress --polish's pass too
    _placement_args(p)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")

    from .compare import CompareConfig
    d = CompareConfig()
    p = sub.add_parser("compare", help="grid of methods x ratios; resumable; tables and figures")
    p.add_argument("--model", default=d.model, help="model folder, Hub id, or 'minilm'")
    p.add_argument("--methods", help="comma list (default: every registered method)")
    p.add_argument("--ratios", default="0.9,0.8,0.6", help="comma list of target ratios")
    p.add_argument("--selection", default="top-k,any-k",
                   help="top-k and/or any-k (any-k only where a method supports it)")
    p.add_argument("--decomposition", default="auto", help="auto or a comma list of "
                   + ",".join(DECOMPOSITIONS))
    p.add_argument("--ratio-scope", default="linear", choices=list(SCOPES))
    p.add_argument("--calib", default=d.calib, help="calibration text")
    p.add_argument("--n-calib", type=int, default=d.n_calib)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--eval-text", default=d.eval_text)
    p.add_argument("--eval-seq-len", type=int, default=d.eval_seq_len)
    p.add_argument("--max-eval-windows", type=int, default=d.max_eval_windows)
    p.add_argument("--eval-sample", default=d.eval_sample, choices=list(EVAL_SAMPLES),
                   help=SAMPLE_HELP)
    p.add_argument("--tasks", help="comma list of zero-shot tasks (causal LMs)")
    p.add_argument("--limit", type=int, default=None, help="docs per task")
    p.add_argument("--opt", action="append", metavar="[METHOD.]KEY=VALUE",
                   help="method hyperparameter, repeatable (e.g. --opt strs.candidates=[0.4,0.8])")
    p.add_argument("--refit", action="store_true", help="refit the output factors of every "
                   "plan to the compressed model's inputs before evaluating it")
    _refit_windows_arg(p)
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)),
                   help="comma list: each method that trains runs once per seed; summary.csv "
                        "gives mean and sd per cell")
    p.add_argument("--vote", action="store_true", help="with 2+ seeds: also evaluate the vote "
                   "of each learned cell's seed plans (the values most keep, same budget)")
    p.add_argument("--polish", type=int, default=d.polish, metavar="ROUNDS",
                   help="polish every selected plan for up to ROUNDS rounds (compress --polish)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--device", default=None)
    p.add_argument("--allow-compressed", action="store_true",
                   help="accept an LLRC export as --model (loaded dense, compressed again)")
    p.add_argument("--out", required=True, help="results folder (re-running resumes)")
    for p in sub.choices.values():      # every subcommand's --help shows its defaults
        p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    return ap
