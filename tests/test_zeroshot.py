"""Tests for llrc_core.zeroshot: local task loaders and lm-eval scoring of known-answer models.

The toy models are real ``transformers`` models whose weights are set by hand so that their
next-token log-probabilities are known; lm-eval tokenises, runs the forward pass and scores,
so the accuracies asserted below are exact.
"""
from __future__ import annotations

import csv
import json
import os

import pytest

# Prove that nothing reaches for the Hub (set before lm-eval / datasets are imported).
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402

from llrc_core import zeroshot  # noqa: E402
from llrc_core.zeroshot import TASKS, evaluate_tasks, load_task_docs  # noqa: E402

SHARED = zeroshot.DEFAULT_DATA_DIR
needs_shared = pytest.mark.skipif(not (SHARED / "tasks").is_dir(),
                                  reason=f"shared data not found at {SHARED}")

README_COUNTS = {"piqa": 1838, "boolq": 3270, "arc_easy": 2376, "arc_challenge": 1172,
                 "openbookqa": 500, "social_iqa": 1954, "winogrande": 1267}
N_CHOICES = {"piqa": {2}, "boolq": {2}, "arc_easy": {3, 4, 5}, "arc_challenge": {3, 4, 5},
             "openbookqa": {4}, "social_iqa": {3}, "winogrande": {2}, "mmlu": {4}}


# --------------------------------------------------------------------------- 1. loaders
def _mmlu_test_rows() -> int:
    total = 0
    for subject in zeroshot.MMLU_SUBJECTS:
        with open(SHARED / "tasks" / "mmlu" / "test" / f"{subject}_test.csv",
                  newline="", encoding="utf-8") as f:
            total += sum(1 for _ in csv.DictReader(f))
    return total


@needs_shared
@pytest.mark.parametrize("task", TASKS)
def test_loader_reads_every_local_file(task):
    docs = load_task_docs(task, SHARED)
    expected = _mmlu_test_rows() if task == "mmlu" else README_COUNTS[task]
    assert len(docs) == expected
    assert all(set(d) == {"query", "choices", "gold"} for d in docs)
    assert {len(d["choices"]) for d in docs} <= N_CHOICES[task]
    assert all(0 <= d["gold"] < len(d["choices"]) for d in docs)
    assert all(d["query"].strip() and all(c.strip() for c in d["choices"]) for d in docs)
    # every gold index is used, so the answer parsing is not stuck on one value
    assert {d["gold"] for d in docs} >= set(range(2 if task in ("piqa", "boolq", "winogrande")
                                                  else 3))
    if task == "winogrande":
        assert all(d["query"].count("_") == 1 for d in docs)


@needs_shared
def test_loader_parses_first_records_exactly():
    piqa = load_task_docs("piqa", SHARED)[1]
    assert piqa == {"query": "Question: dresser\nAnswer:",
                    "choices": ["replace drawer with bobby pin",
                                "finish, woodgrain with  bobby pin"], "gold": 1}
    arc = load_task_docs("arc_easy", SHARED)[1]
    assert arc["choices"] == ["safety goggles", "breathing mask", "rubber gloves", "lead apron"]
    assert arc["gold"] == 1
    assert load_task_docs("boolq", SHARED)[1]["gold"] == 1  # "true" -> "yes"
    wino = load_task_docs("winogrande", SHARED)[0]
    assert wino["choices"] == ["Sarah", "Maria"] and wino["gold"] == 1
    assert load_task_docs("arc_easy", SHARED)[0]["query"].startswith("Question: Which statement")
    assert len(load_task_docs("mmlu", SHARED)) == 200


def test_data_dir_from_environment(tmp_path, monkeypatch):
    _write_data_dir(tmp_path)
    monkeypatch.setenv("LLRC_DATA_DIR", str(tmp_path))
    assert len(load_task_docs("piqa")) == len(PIQA)


# --------------------------------------------------------------------------- 3. errors
def test_unknown_task_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'hellaswag'.*piqa"):
        load_task_docs("hellaswag", tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_tasks(None, None, ["piqa", "nope"], data_dir=tmp_path)


def test_missing_data_dir_names_the_file(tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(FileNotFoundError, match=r"no-such-dir.*piqa.*test\.json.*LLRC_DATA_DIR"):
        load_task_docs("piqa", missing)
    with pytest.raises(FileNotFoundError, match=r"abstract_algebra_test\.csv"):
        load_task_docs("mmlu", missing)


def test_malformed_record_is_reported(tmp_path):
    (tmp_path / "tasks" / "piqa").mkdir(parents=True)
    bad = [{"instruction": "Please choose the correct solution to the question: x\n\n"
                           "Solution1: a\n\nAnswer format: solution1/solution2",
            "input": "", "output": "", "answer": "solution1"}]
    (tmp_path / "tasks" / "piqa" / "test.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"record 0.*Solution2"):
        load_task_docs("piqa", tmp_path)


# --------------------------------------------------------------------------- toy data
# "good" is the preferred token, "poor" the dispreferred one, other words are neutral;
# all choices have 4 characters so that acc_norm ranks like acc.
PIQA = [(["good", "okay"], 0, True), (["fine", "good"], 1, True),
        (["good", "okay"], 1, False), (["poor", "fine"], 1, True)]
ARC_E = [(["okay", "good", "fine"], 1, True),
         (["fine", "okay", "poor", "okay", "good"], 4, True),
         (["good", "okay", "fine", "poor"], 3, False)]
ARC_C = [(["good", "okay", "fine", "poor"], 0, True), (["okay", "poor", "good", "fine"], 3, False)]
OBQA = [(["okay", "fine", "good", "poor"], 2, True), (["good", "okay", "fine", "poor"], 0, True)]
SIQA = [(["good", "okay", "fine"], 1, False), (["poor", "good", "okay"], 0, False)]
BOOLQ = [(True, True), (True, True), (False, False), (True, True)]  # the model always says yes
# (options, gold, right for the bigram model that prefers "won" after "alice")
WINO = [(["Alice", "Bob"], 0, True), (["Bob", "Alice"], 1, True), (["Alice", "Bob"], 1, False)]
MMLU = {"abstract_algebra": [2, 0], "global_facts": [2, 2]}  # the model always says C

MC_SETS = {"piqa": ("piqa", "Solution", "solution", PIQA),
           "arc_easy": ("ARC-Easy", "Answer", "answer", ARC_E),
           "arc_challenge": ("ARC-Challenge", "Answer", "answer", ARC_C),
           "openbookqa": ("openbookqa", "Answer", "answer", OBQA),
           "social_iqa": ("social_i_qa", "Answer", "answer", SIQA)}


def _acc(rows) -> float:
    return sum(row[-1] for row in rows) / len(rows)


EXPECTED = {task: _acc(rows) for task, (*_, rows) in MC_SETS.items()}
EXPECTED.update(boolq=_acc(BOOLQ), winogrande=_acc(WINO),
                mmlu=sum(a == 2 for v in MMLU.values() for a in v) / 4)


def _write_json(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))


def _write_data_dir(root):
    """The shared-data layout (tasks/<name>/test.json, tasks/mmlu/test/*.csv) with toy docs."""
    tasks = root / "tasks"
    for folder, label, low, rows in MC_SETS.values():
        sep = "\n\n" if label == "Solution" else " "
        records = []
        for i, (options, gold, _) in enumerate(rows):
            opts = sep.join(f"{label}{k + 1}: {o}" for k, o in enumerate(options))
            fmt = "/".join(f"{low}{k + 1}" for k in range(len(options)))
            records.append({"instruction": f"Please choose the correct answer to the question: "
                                           f"what is it {i} ?\n\n{opts}\n\nAnswer format: {fmt}",
                            "input": "", "output": "", "answer": f"{low}{gold + 1}"})
        _write_json(tasks / folder / "test.json", records)
    _write_json(tasks / "boolq" / "test.json", [
        {"instruction": f"Please answer the following question with true or false, question: "
                        f"is it {i}?\n\nAnswer format: true/false", "input": "", "output": "",
         "answer": str(truth).lower()} for i, (truth, _) in enumerate(BOOLQ)])
    _write_json(tasks / "winogrande" / "test.json", [
        {"instruction": "Please choose the correct answer to fill in the blank to complete the "
                        f"given sentence: Alice and Bob raced {i} so _ won the race.\n\n"
                        f"Option1: {a} Option2: {b} Answer format: option1/option2",
         "input": "", "output": "", "answer": f"option{gold + 1}"}
        for i, ((a, b), gold, _) in enumerate(WINO)])
    for subject, answers in MMLU.items():
        path = tasks / "mmlu" / "test" / f"{subject}_test.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
            for i, answer in enumerate(answers):
                writer.writerow([f"what is it {i} ?", "okay", "fine", "good", "poor", answer])
    return root


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return _write_data_dir(tmp_path_factory.mktemp("llrc-data"))


# --------------------------------------------------------------------------- toy models
WORDS = ["good", "poor", "okay", "fine", "yes", "no", "a", "b", "c", "d", "alice", "bob",
         "won", "the", "race", "question", "answer", "what", "is", "it", ":", "?", "."]
# Next-token scores: prefer "good", avoid "poor", say "yes" and "c"; after "alice" also "won".
SCORES = {"good": 10.0, "poor": -10.0, "yes": 5.0, "c": 5.0}


def make_tokenizer(style: str):
    """Word-level tokenizer; specials like Llama (BOS), GPT-2 (none) or BERT ([CLS] .. [SEP])."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = {"llama": ["<unk>", "<pad>", "<s>", "</s>"], "gpt2": ["<unk>", "<|endoftext|>"],
                "bert": ["[UNK]", "[PAD]", "[CLS]", "[SEP]"]}[style]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if style == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 2)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                       bos_token="<s>", eos_token="</s>")
    if style == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def score_vector(tokenizer) -> torch.Tensor:
    s = torch.zeros(len(tokenizer))
    for word, value in SCORES.items():
        s[tokenizer.convert_tokens_to_ids(word)] = value
    return s


@torch.no_grad()
def make_bigram_llama(tokenizer):
    """LlamaForCausalLM computing logits(next | current token u) = B[u] exactly.

    Blocks are switched off (o_proj = down_proj = 0, so the residual stream is the
    embedding), embeddings are one-hot, the final RMSNorm maps one-hot e_u to
    sqrt(H) * e_u and lm_head = B^T / sqrt(H) (H = hidden size >= V).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    v = len(tokenizer)
    h = v + v % 2  # RoPE needs an even head dimension
    cfg = LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=4, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, rms_norm_eps=1e-12,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    table = score_vector(tokenizer).repeat(v, 1)
    table[tokenizer.convert_tokens_to_ids("alice"), tokenizer.convert_tokens_to_ids("won")] = 10.0
    model.model.embed_tokens.weight.copy_(torch.eye(v, h))
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    model.model.norm.weight.fill_(1.0)
    model.lm_head.weight.zero_()
    model.lm_head.weight[:, :v] = table.T / h ** 0.5
    return model


@torch.no_grad()
def make_constant_lm(style: str, tokenizer):
    """GPT-2 or causal BERT whose logits are the score vector at every position."""
    from transformers import BertConfig, BertLMHeadModel, GPT2Config, GPT2LMHeadModel

    s = score_vector(tokenizer)
    if style == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=8, n_layer=1,
                                           n_head=2, n_positions=64)).eval()
        model.transformer.ln_f.weight.zero_()  # final hidden state = ln_f.bias = e_0
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight[:, 0] = s  # tied lm_head: logits = wte @ e_0 = s
        return model
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=8, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=8, max_position_embeddings=512,
                     is_decoder=True, pad_token_id=tokenizer.pad_token_id)
    model = BertLMHeadModel(cfg).eval()
    model.cls.predictions.decoder.weight.zero_()  # logits = 0 @ h + bias = s
    model.cls.predictions.bias.copy_(s)
    model.cls.predictions.decoder.bias.copy_(s)
    return model


def test_toy_model_logits_are_as_designed():
    tok = make_tokenizer("llama")
    model = make_bigram_llama(tok)
    ids = torch.tensor([tok.encode("what alice")])
    logp = model(ids).logits.log_softmax(-1)[0]
    good, won, poor = (tok.convert_tokens_to_ids(w) for w in ("good", "won", "poor"))
    assert logp[1].argmax() == good and logp[2, won] > -1.0 > -9.0 > logp[1, won]
    assert logp[:, poor].max() < -19.0
    for style in ("gpt2", "bert"):
        tok = make_tokenizer(style)
        logits = make_constant_lm(style, tok)(torch.tensor([[5, 6, 7]])).logits[0]
        assert torch.allclose(logits, score_vector(tok).expand_as(logits), atol=1e-5)


# --------------------------------------------------------------------------- 2. known answers
def test_known_answer_bigram_llama_all_tasks(toy_data):
    tok = make_tokenizer("llama")
    res = evaluate_tasks(make_bigram_llama(tok), tok, list(TASKS), data_dir=toy_data,
                         batch_size=4)
    assert set(res) == set(TASKS)
    for task in TASKS:
        assert res[task]["n"] == len(load_task_docs(task, toy_data)), task
        assert res[task]["acc"] == pytest.approx(EXPECTED[task], abs=1e-9), task
        if task in ("piqa", "arc_easy", "arc_challenge", "openbookqa"):
            assert res[task]["acc_norm"] == pytest.approx(EXPECTED[task], abs=1e-9), task
        else:
            assert res[task]["acc_norm"] is None, task
    # spot-check the designed values themselves
    assert (res["piqa"]["acc"], res["boolq"]["acc"], res["social_iqa"]["acc"],
            res["openbookqa"]["acc"], res["mmlu"]["acc"]) == (0.75, 0.75, 0.0, 1.0, 0.75)
    # partial scoring: "won" is likely only after "alice", so the filler before it decides
    assert res["winogrande"]["acc"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("style", ["gpt2", "bert"])
def test_known_answer_constant_models(style, toy_data):
    """GPT-2 (no special tokens) and causal BERT ([CLS]/[SEP], no BOS/EOS) through HFLM.

    If lm-eval's context/continuation split were off by the trailing [SEP], every choice
    would score the same and these accuracies would differ.
    """
    tok = make_tokenizer(style)
    tasks = ["piqa", "arc_easy", "boolq", "mmlu"]
    res = evaluate_tasks(make_constant_lm(style, tok), tok, tasks, data_dir=toy_data,
                         batch_size=3, device="cpu")
    for task in tasks:
        assert res[task]["acc"] == pytest.approx(EXPECTED[task], abs=1e-9), (style, task)


def test_limit_caps_documents_and_keeps_rng_state(toy_data):
    tok = make_tokenizer("llama")
    model = make_bigram_llama(tok)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    res = evaluate_tasks(model, tok, "piqa", limit=2, data_dir=toy_data)
    assert res["piqa"]["n"] == 2 and res["piqa"]["acc"] == 1.0  # the first two are right
    assert torch.equal(torch.get_rng_state(), state)


@needs_shared
def test_real_local_tasks_run_offline():
    """Every real task goes through lm-eval end to end (a few docs each)."""
    tok = make_tokenizer("bert")
    res = evaluate_tasks(make_constant_lm("bert", tok), tok, list(TASKS), limit=3,
                         data_dir=SHARED, batch_size=8)
    for task in TASKS:
        assert res[task]["n"] == 3
        assert 0.0 <= res[task]["acc"] <= 1.0
