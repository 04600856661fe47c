"""One LLRC mask-training step against one dense forward+backward step of the same model.

Both steps see the same batch and compute the same hidden-state distillation loss (middle and
last layer, no vocabulary projection). The dense step trains every weight (AdamW); the LLRC
step trains only the mask logits over frozen factors, choosing per layer the cheaper masked
matmul (``--path auto``). Reported: tokens/s, the time ratio LLRC/dense (goal <= 1.3), peak
memory (RSS on CPU, ``max_memory_allocated`` on CUDA). Steps alternate so machine noise hits
both alike.

    python bench/llrc_step.py                                   # demo model, CPU
    python bench/llrc_step.py --preset llama2-7b --device cuda --bf16   # GPU machine
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from llrc_core import distill, losses
from llrc_core.apply import restore_
from llrc_core.masked import install_masked_
from llrc_core.pipeline import decompose_model
from llrc_core.selectors.llrc import LLRCConfig, LLRCTrainer
from llrc_core.pipeline import make_context

PRESETS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama-small": dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=8,
                        num_attention_heads=16, num_key_value_heads=16, vocab_size=32000),
}


def load(args):
    if args.preset == "demo":
        from llrc_core import load_model
        return load_model("assets/demo-model", args.device, "float32").model
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_config(LlamaConfig(**PRESETS[args.preset]), dtype=dtype)
    return model.to(args.device).eval()


def peak_memory(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo", choices=["demo", *PRESETS])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--path", default="auto", choices=["auto", "dense", "factorised"])
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()

    model = load(args)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch * 2, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    dec = decompose_model(model, "svd")
    layers_idx = distill.distill_layers(model)
    targets = distill.precompute_targets(model, ids, layers_idx, args.batch)

    # Dense step: all weights train.
    dense_opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def dense_step():
        model.train()
        hs = distill.hidden_at(model, ids[:args.batch].to(device), layers_idx)
        loss = sum(losses.nmse(h, t[:args.batch]) for h, t in zip(hs, targets))
        dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        dense_opt.step()
        model.eval()

    # LLRC step: the trainer's own loss and update on masked layers (one step of the shared
    # loop in ``selectors/learned.py``, without its events and accounting).
    cfg = LLRCConfig(ratio=0.8, batch_size=args.batch, train_seq_len=0, path=args.path,
                     bf16=args.bf16)
    ctx = make_context(model, dec, ids)
    trainer = LLRCTrainer(ctx, cfg, ctx.reachable_budget(cfg))
    step = [0]

    def llrc_step(masked):
        loss, _ = trainer.loss(masked, step[0])
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.backward(loss)
        trainer.optimizer_step()
        step[0] += 1

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    dense_t, llrc_t = [], []
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for i in range(args.steps + 1):   # first round is warm-up
        for p, g in frozen:
            p.requires_grad_(g)
        d = timed(dense_step)
        for p, _ in frozen:
            p.requires_grad_(False)
        masked = install_masked_(model, dec.factors)
        for layer in masked.values():
            layer.path = args.path
        l_ = timed(lambda: llrc_step(masked))
        paths = sorted({layer.last_path for layer in masked.values()})
        restore_(model)
        if i:
            dense_t.append(d)
            llrc_t.append(l_)
    tokens = args.batch * args.seq_len
    dm, lm = statistics.median(dense_t), statistics.median(llrc_t)
    result = {"preset": args.preset, "device": str(device),
              "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "tokens_per_step": tokens,
              "dense_s": dm, "llrc_s": lm, "ratio_llrc_over_dense": lm / dm,
              "dense_tokens_per_s": tokens / dm, "llrc_tokens_per_s": tokens / lm,
              "paths_used": paths, "peak_memory_gib": peak_memory(device)}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
