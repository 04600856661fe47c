"""Text generation for side-by-side comparisons: one prompt, one sampling setting and one seed
for every model (dense, compressed in memory, or an export reloaded), so that any difference
in the text comes from the weights. Pure library code: no Streamlit; the studio's Playground
page runs ``generate_each`` as a job and renders its events.

    cfg = SamplingConfig(max_new_tokens=24, do_sample=True, temperature=0.8, seed=0)
    g = generate(model, tokenizer, "The history of the city", cfg, on_text=print)
    g.text, g.tokens_per_s, g.prompt_ppl, g.steps[0].tokens, g.steps[0].probs

Decoding is transformers' ``generate`` (KV cache, its temperature / top-k / top-p warpers,
``TextStreamer`` for the text as it comes). Sampling draws from a private ``torch.Generator``
seeded per call (``SeededSampler``), never from the global RNG that other threads (a
compression's Gumbel noise) also draw from: the same seed gives the same tokens wherever the
call runs. The probabilities reported per step are the model's own (softmax of the raw
logits, before any sampling setting).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TextStreamer
from transformers.generation import (StoppingCriteria, StoppingCriteriaList,
                                     TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from .config import ConfigMixin, option
from .losses import next_token_loss, ppl_of
from .models import context_length, count_params

Emit = Callable[[dict], None]


@dataclass
class SamplingConfig(ConfigMixin):
    max_new_tokens: int = option(24, "tokens to generate after the prompt (at most)")
    do_sample: bool = option(False, "sample from the (warped) distribution; False: greedy")
    temperature: float = option(0.8, "divide the logits by this before sampling")
    top_p: float = option(0.95, "sample only from the smallest set of tokens holding this "
                          "probability (1: off)")
    top_k: int = option(50, "sample only from the k most likely tokens (0: off)")
    seed: int = option(0, "seed of the sampler's own generator (same seed, same tokens)")
    top_tokens: int = option(5, "most likely tokens reported per step")
    prob_steps: int = option(4, "first generation steps whose probabilities are reported")

    def __post_init__(self):
        checks = [("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
                  ("temperature", self.temperature > 0, "> 0 (use greedy for 0)"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                  ("top_k", self.top_k >= 0, ">= 0 (0 turns it off)"),
                  ("seed", self.seed >= 0, ">= 0"),
                  ("top_tokens", self.top_tokens >= 1, "at least 1"),
                  ("prob_steps", self.prob_steps >= 0, ">= 0")]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")

    def processors(self) -> list[LogitsProcessor]:
        """transformers' warpers for this setting, then the seeded draw (none when greedy)."""
        if not self.do_sample:
            return []
        warpers: list[LogitsProcessor] = [TemperatureLogitsWarper(self.temperature)]
        if self.top_k:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1:
            warpers.append(TopPLogitsWarper(self.top_p))
        return [*warpers, SeededSampler(self.seed)]


@dataclass
class StepProbs:
    """The model's next-token distribution at one generation step."""
    step: int                 # 1 = the first generated token
    tokens: list[str]         # the most likely tokens, most likely first (decoded)
    ids: list[int]
    probs: list[float]        # their probabilities (softmax of the raw logits)
    chosen: str               # the token generated at this step
    chosen_id: int
    chosen_prob: float

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class Generation:
    prompt: str
    prompt_ids: list[int]     # as fed to the model (BOS first when the tokenizer has one)
    new_ids: list[int]        # the generated tokens
    text: str                 # the generated tokens decoded (the continuation only)
    seconds: float            # the whole generate call: prefill and every step
    first_token_s: float      # prefill and the first token
    prompt_ppl: float | None  # perplexity of the model on the prompt (None under 2 tokens)
    steps: list[StepProbs] = field(default_factory=list)
    stopped: bool = False     # asked to stop before max_new_tokens (not an end token)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of the whole call (what a reader waits)."""
        return len(self.new_ids) / max(self.seconds, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens per second after the first one (decoding with the KV cache)."""
        n, t = len(self.new_ids) - 1, self.seconds - self.first_token_s
        return n / t if n > 0 and t > 0 else None

    def summary(self) -> dict:
        return {"text": self.text, "new_tokens": len(self.new_ids),
                "prompt_tokens": len(self.prompt_ids), "seconds": self.seconds,
                "first_token_s": self.first_token_s, "tokens_per_s": self.tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s, "prompt_ppl": self.prompt_ppl,
                "stopped": self.stopped, "steps": [s.to_dict() for s in self.steps]}


# --- transformers plug-ins -----------------------------------------------------------------------

class SeededSampler(LogitsProcessor):
    """Draw the next token from the warped scores with a private generator and leave only it:
    the greedy pick of ``generate`` is then that sample. Same seed, same draws."""

    def __init__(self, seed: int):
        self.seed, self.generator = seed, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generator is None:         # made on the scores' device, at the first step
            self.generator = torch.Generator(scores.device).manual_seed(self.seed)
        probs = torch.softmax(scores.float(), dim=-1)                           # (B, V)
        pick = torch.multinomial(probs, 1, generator=self.generator)            # (B, 1)
        return torch.full_like(scores, -float("inf")).scatter_(1, pick, 0.0)


class StopWhen(StoppingCriteria):
    """Stop every sequence as soon as ``should_stop()`` says so (a Stop button)."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.Tensor, scores, **kw) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool,
                          device=input_ids.device)


class CallbackStreamer(TextStreamer):
    """transformers' word-by-word text streaming, handed to a callback; records when the
    first generated token arrived."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text, self.first_at = on_text, None

    def put(self, value):
        if not self.next_tokens_are_prompt and self.first_at is None:
            self.first_at = time.perf_counter()
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text:
            self.on_text(text)


# --- generation ----------------------------------------------------------------------------------

def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """``(1, T)`` ids of the prompt: no special tokens except a leading BOS when the tokenizer
    has one (a BERT tokenizer's [CLS] ... [SEP] would end the text before it starts)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    if not ids:
        raise ValueError("the prompt is empty: type a few words")
    return torch.tensor([ids])


@torch.no_grad()
def prompt_perplexity(model, ids: torch.Tensor) -> float | None:
    """Perplexity of ``model`` on the prompt ``ids (1, T)``; None when T < 2."""
    logits = model(input_ids=ids, use_cache=False).logits                        # (1, T, V)
    return ppl_of(next_token_loss(logits, ids).item()) if ids.shape[1] > 1 else None


def top_tokens(tokenizer, logits: torch.Tensor, chosen: int, k: int, step: int) -> StepProbs:
    """The ``k`` most likely tokens of ``logits (V,)`` and the probability of ``chosen``."""
    probs = torch.softmax(logits.float(), dim=-1)                                # (V,)
    top = probs.topk(min(k, probs.numel()))
    ids = top.indices.tolist()
    return StepProbs(step, [tokenizer.decode([i]) for i in ids], ids, top.values.tolist(),
                     tokenizer.decode([chosen]), chosen, float(probs[chosen]))


def generate(model, tokenizer, prompt: str, cfg: SamplingConfig | None = None,
             on_text: Callable[[str], None] = lambda text: None,
             should_stop: Callable[[], bool] = lambda: False,
             warmup: bool = True) -> Generation:
    """Continue ``prompt`` with ``model`` (in eval mode; never changed) under ``cfg``;
    ``on_text`` receives the text as it is generated. A forward pass on the prompt first gives
    its perplexity; with ``warmup`` an untimed two-token generation then primes the decoding
    path, so that the timed call measures the model, not the first call."""
    cfg = cfg or SamplingConfig()
    if not getattr(model, "can_generate", lambda: False)():
        raise ValueError(f"{type(model).__name__} cannot generate text (an encoder, or no LM "
                         "head): load a causal language model")
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt).to(device)                               # (1, T)
    limit = context_length(model)
    if ids.shape[1] + cfg.max_new_tokens > limit:
        raise ValueError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens "
                         f"({cfg.max_new_tokens}) exceed the model's context of {limit} "
                         "tokens; shorten the prompt or generate fewer tokens")
    ppl = prompt_perplexity(model, ids)
    gc = model.generation_config
    pad = gc.pad_token_id if gc.pad_token_id is not None else tokenizer.pad_token_id
    pad = pad if pad is not None else gc.eos_token_id
    mask = torch.ones_like(ids)
    if warmup:      # the first calls of a process or a model pay one-time costs: not timed
        model.generate(ids, attention_mask=mask, generation_config=GenerationConfig(
            max_new_tokens=2, do_sample=False, pad_token_id=pad))
    config = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=False,
                              output_logits=True, return_dict_in_generate=True,
                              pad_token_id=pad)
    streamer = CallbackStreamer(tokenizer, on_text)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, generation_config=config,
                         logits_processor=LogitsProcessorList(cfg.processors()),
                         stopping_criteria=StoppingCriteriaList([StopWhen(should_stop)]),
                         streamer=streamer)
    seconds = time.perf_counter() - t0
    new = out.sequences[0, ids.shape[1]:].tolist()
    steps = [top_tokens(tokenizer, logits[0], new[i], cfg.top_tokens, i + 1)
             for i, logits in enumerate(out.logits[:cfg.prob_steps])]               # (1, V) each
    first = (streamer.first_at - t0) if streamer.first_at is not None else seconds
    return Generation(prompt, ids[0].tolist(), new,
                      tokenizer.decode(new, skip_special_tokens=True), seconds, first, ppl,
                      steps, stopped=should_stop() and len(new) < cfg.max_new_tokens)


def generate_each(models: dict, prompt: str, cfg: SamplingConfig, emit: Emit = lambda e: None,
                  should_stop: Callable[[], bool] = lambda: False) -> dict[str, Generation]:
    """``generate`` with every model in turn (one at a time: a fair clock for each, and one
    model's worth of compute); ``models``: label -> (model, tokenizer). Events: ``start``
    (label, params), ``text`` (label, a piece of text), ``generation`` (label, summary)."""
    results: dict[str, Generation] = {}
    for label, (model, tokenizer) in models.items():
        if should_stop():
            break
        emit({"type": "start", "label": label, "params": count_params(model)})
        g = generate(model, tokenizer, prompt, cfg, should_stop=should_stop,
                     on_text=lambda text, label=label: emit({"type": "text", "label": label,
                                                             "text": text}))
        results[label] = g
        emit({"type": "generation", "label": label, **g.summary()})
    return results
