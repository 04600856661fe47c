"""Calibration token windows: ``n`` samples x ``seq_len`` tokens, seeded.

Sources, in the order they are tried:
* a local ``.txt`` / ``.jsonl`` / ``.json`` file, or a folder of them;
* a Hub dataset through ``datasets`` (``wikitext2``, ``c4``) when online;
* ``selfgen``: text the model samples itself (ASVD's offline fallback).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CalibrationError

HUB_SOURCES = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "wikitext-2": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "c4": ("allenai/c4", "en", "validation", "text"),
}
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


@dataclass
class CalibConfig:
    source: str = "selfgen"   # local file/folder, "wikitext2", "c4" or "selfgen"
    n_samples: int = 32       # windows
    seq_len: int = 256        # tokens per window
    seed: int = 0             # picks window starts (and selfgen sampling)

    def __post_init__(self):
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")


def _read_json_texts(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]
    else:
        rows = json.loads(path.read_text(encoding="utf-8"))
        rows = rows if isinstance(rows, list) else [rows]
    texts = []
    for row in rows:
        if isinstance(row, str):
            texts.append(row)
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            texts.append(row["text"])
        else:
            raise CalibrationError(f"{path}: each JSON record must be a string or have a "
                                   "'text' field")
    return texts


def read_local_text(path: str | Path) -> str:
    """Text of a .txt/.jsonl/.json file, or of all such files in a folder (sorted)."""
    path = Path(path).expanduser()
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() \
        else [path]
    if not files:
        raise CalibrationError(f"no .txt/.jsonl/.json files in folder {str(path)!r}")
    parts = []
    for f in files:
        if f.suffix not in TEXT_SUFFIXES:
            raise CalibrationError(f"unsupported calibration file {str(f)!r}: use .txt, .jsonl "
                                   "(one {\"text\": ...} per line) or .json")
        parts.extend([f.read_text(encoding="utf-8")] if f.suffix == ".txt"
                     else _read_json_texts(f))
    return "\n\n".join(parts)


def _hub_text(name: str) -> str:
    try:
        from datasets import load_dataset
        repo, cfg, split, field = HUB_SOURCES[name]
        ds = load_dataset(repo, cfg, split=split)
        return "\n\n".join(t for t in ds[field][:20000] if t)
    except Exception as exc:
        raise CalibrationError(f"could not load {name!r} from the Hub ({exc}); offline, pass a "
                               "local text file (e.g. ../shared/data/wikitext-2/valid.txt) or "
                               "--calib selfgen") from exc


def windows_from_ids(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens at seeded random starts: (n, L)."""
    if ids.numel() < seq_len + 1:
        raise CalibrationError(
            f"calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
            "give a longer text or a smaller --seq-len")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of a long text, without special tokens, as a 1-D tensor."""
    import transformers
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "sequence longer than max length" is expected
    try:
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    finally:
        transformers.logging.set_verbosity(verbosity)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def self_generate(model, tokenizer, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Windows the model samples itself, from random starting tokens (seeded): (n, L)."""
    if not getattr(model, "can_generate", lambda: False)():
        raise CalibrationError("selfgen needs a causal LM that can generate; pass a text file "
                               "with --calib instead")
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    special = set(tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(min(len(tokenizer), model.config.vocab_size))
                         if i not in special])
    first = pool[torch.randint(0, len(pool), (n_samples, 1), generator=gen)].to(device)
    torch.manual_seed(seed)
    out = model.generate(first, do_sample=True, top_k=50, top_p=0.95, max_length=seq_len,
                         min_length=seq_len, pad_token_id=tokenizer.pad_token_id or 0)
    return out[:, :seq_len].cpu()


def local_text(src: str, seq_len: int) -> str | None:
    """The text of a local calibration file or folder, checked not empty; ``None`` for a Hub
    set name. Anything else is refused, naming the accepted sources."""
    if Path(src).expanduser().exists():
        text = read_local_text(src)
        _check_not_empty(src, text, seq_len)
        return text
    if src.lower() in HUB_SOURCES:
        return None
    raise CalibrationError(f"calibration source {src!r} is neither an existing file or "
                           f"folder nor one of {sorted(HUB_SOURCES)} or 'selfgen'")


def _check_not_empty(src: str, text: str, seq_len: int) -> None:
    if not text.strip():
        raise CalibrationError(f"calibration source {src!r} is empty; give a text with at least "
                               f"{seq_len + 1} tokens")


def load_calibration(tokenizer, cfg: CalibConfig, model=None) -> torch.Tensor:
    """Token windows (n_samples, seq_len) for ``cfg.source``."""
    src = str(cfg.source)
    if src == "selfgen":
        if model is None:
            raise CalibrationError("selfgen calibration needs the model")
        return self_generate(model, tokenizer, cfg.n_samples, cfg.seq_len, cfg.seed)
    text = local_text(src, cfg.seq_len)
    if text is None:
        text = _hub_text(src.lower())
        _check_not_empty(src, text, cfg.seq_len)
    return windows_from_ids(tokenize(tokenizer, text), cfg.n_samples, cfg.seq_len, cfg.seed)
