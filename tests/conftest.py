"""Shared fixtures: paths to the shared data and the demo model, tiny models from a config.

Tiny models have random weights (flat spectra): use them for plumbing (targets, shapes, logits
equal after reload), never to judge compression quality — that is what the demo model is for.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLRC_DATA_DIR", ROOT.parent / "shared" / "data"))
WIKI_VALID = DATA / "wikitext-2" / "valid.txt"
WIKI_TEST = DATA / "wikitext-2" / "test.txt"
DEMO = ROOT / "assets" / "demo-model"

_COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=64)
# One row per supported architecture: (name, config class, extra config fields).
TINY_ARCHS = [
    ("llama", "LlamaConfig", dict(num_key_value_heads=2)),
    ("mistral", "MistralConfig", dict(num_key_value_heads=2)),
    ("qwen2", "Qwen2Config", dict(num_key_value_heads=2)),
    ("gemma", "GemmaConfig", dict(num_key_value_heads=2, head_dim=8)),
    ("gpt2", "GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64,
                                bos_token_id=0, eos_token_id=0)),
    ("opt", "OPTConfig", dict(ffn_dim=64, word_embed_proj_dim=32)),
    ("phi", "PhiConfig", dict(num_key_value_heads=4)),
    ("bert", "BertConfig", dict(is_decoder=True)),
]


def tiny_model(arch: str, seed: int = 0):
    """A tiny causal LM of ``arch`` with random weights, in eval mode, float32."""
    import transformers
    from transformers import AutoModelForCausalLM
    _, cls, extra = next(row for row in TINY_ARCHS if row[0] == arch)
    torch.manual_seed(seed)
    cfg = getattr(transformers, cls)(**{**_COMMON, **extra})
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_ids(n: int = 2, length: int = 16, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not WIKI_TEST.exists():
        pytest.fail(f"shared data not found at {DATA}: clone the project beside ../shared")
    return DATA


@pytest.fixture()
def demo():
    """A fresh copy of the demo model (float32, CPU) with its tokenizer."""
    from llrc_core import load_model
    return load_model(DEMO, device="cpu", dtype="float32")


def tiny_tokenizer(vocab: int = 128):
    """A word-level fast tokenizer of ``vocab`` entries trained offline on WikiText-2 valid lines
    (specials: <pad> 0, <unk> 1, <eos> 2); pairs with ``tiny_model`` for CLI and selfgen tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    lines = WIKI_VALID.read_text(encoding="utf-8").splitlines()[:400]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>")


@pytest.fixture()
def ws(tmp_path, monkeypatch):
    """The studio's workspace module on a fresh workspace, an outside folder with a file, and a
    symlink escaping the workspace (``test_hosted.py``, ``test_resume.py``)."""
    import sys
    sys.path.insert(0, str(ROOT))   # the app's studio/ helpers
    from studio import workspace
    space, outside = tmp_path / "workspace", tmp_path / "outside"
    space.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("secret text " * 100)
    (space / "link").symlink_to(outside, target_is_directory=True)
    monkeypatch.setenv("LLRC_STUDIO_WORKSPACE", str(space))
    monkeypatch.delenv("LLRC_STUDIO_ALLOWED_ROOTS", raising=False)
    return workspace, space, outside
