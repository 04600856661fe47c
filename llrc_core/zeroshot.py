"""Zero-shot multiple-choice evaluation through lm-evaluation-harness, from local files only.

The eight benchmarks usually reported for compressed LLMs are read from the shared data
folder (``<project>/../shared/data/tasks``, see its README) instead of the Hugging Face
Hub, turned into lm-eval tasks and scored by lm-eval's own machinery:

1. :func:`load_task_docs` parses the local files into plain docs
   ``{"query": str, "choices": list[str], "gold": int}``.
2. :func:`build_lm_eval_task` wraps those docs in an ``lm_eval.api.task.ConfigurableTask``
   whose ``custom_dataset`` is an in-memory ``datasets.Dataset`` (nothing is downloaded).
3. :func:`evaluate_tasks` wraps the in-memory model in ``lm_eval.models.huggingface.HFLM``
   and runs ``lm_eval.simple_evaluate``; lm-eval computes the log-likelihood of
   ``query + " " + choice`` for every choice and reports ``acc`` (argmax of the summed
   log-likelihood) and, where the standard task defines it, ``acc_norm`` (argmax of the
   log-likelihood divided by the choice's length in characters).

Prompts follow the standard lm-eval task definitions, so numbers are comparable with
``lm_eval --tasks piqa,...`` at 0-shot, with these local-data differences:

* boolq: the local file has the questions only (no passages); prompt
  ``"Question: <q>\\nAnswer:"`` with choices ``["no", "yes"]``.
* social_iqa: context and question come joined in one string; prompt ``"Q: <text>\\nA:"``.
* winogrande: standard partial scoring. Each option fills the blank and becomes the end of
  the context; lm-eval scores the (shared) rest of the sentence after the blank. The doc
  keeps the sentence with its ``_`` in ``query`` and the two fillers in ``choices``.
* mmlu: only the two local subjects (abstract_algebra, global_facts; test split, 200
  questions), pooled into one task. Prompt as lm-eval's ``mmlu`` (subject description,
  question, lettered options, ``"Answer:"``), choices are the letters ``A``-``D``.
  Small models score at chance level on it.

``acc_norm`` is ``None`` for tasks whose standard definition has no ``acc_norm``
(boolq, social_iqa, winogrande, mmlu). NQ-Open (generative) is not supported.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"

#: Supported task names, in the usual reporting order.
TASKS = ("piqa", "boolq", "arc_easy", "arc_challenge", "openbookqa", "social_iqa",
         "winogrande", "mmlu")

# task -> (folder under tasks/, option label inside `instruction`)
_ADAPTERS_LAYOUT = {
    "piqa": ("piqa", "Solution"),
    "boolq": ("boolq", None),
    "arc_easy": ("ARC-Easy", "Answer"),
    "arc_challenge": ("ARC-Challenge", "Answer"),
    "openbookqa": ("openbookqa", "Answer"),
    "social_iqa": ("social_i_qa", "Answer"),
    "winogrande": ("winogrande", "Option"),
}
MMLU_SUBJECTS = ("abstract_algebra", "global_facts")
# Tasks whose standard lm-eval definition also reports length-normalised accuracy.
_HAS_ACC_NORM = {"piqa", "arc_easy", "arc_challenge", "openbookqa"}


# --------------------------------------------------------------------------- data files
def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding ``tasks/``: ``data_dir``, else ``$LLRC_DATA_DIR``, else ``../shared/data``."""
    if data_dir is None:
        data_dir = os.environ.get("LLRC_DATA_DIR") or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


def _task_file(data_dir: Path, *parts: str) -> Path:
    """``data_dir/tasks/<parts>``; also accepts a ``data_dir`` that is the tasks folder itself."""
    root = data_dir / "tasks" if (data_dir / "tasks").is_dir() else data_dir
    path = root.joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(
            f"missing task file {path}. Point data_dir (or the LLRC_DATA_DIR environment "
            f"variable) at the shared data folder that holds tasks/ "
            f"(default {DEFAULT_DATA_DIR}); see {DEFAULT_DATA_DIR / 'README.md'}.")
    return path


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; supported tasks: {', '.join(TASKS)}")
    return task


# --------------------------------------------------------------------------- parsing
_LEAD_IN = re.compile(r"^Please .*?(?:question|sentence): ", re.DOTALL)
_FORMAT = "Answer format:"


def _split_instruction(text: str, label: str) -> tuple[str, list[str]]:
    """Split an LLM-Adapters ``instruction`` into (question, options).

    Layout: ``"Please ... question: <question>\\n\\n<Label>1: <opt> <Label>2: <opt> ...
    Answer format: <label>1/<label>2/..."``. The number of options is read from the
    ``Answer format`` line and each ``<Label>k: `` marker is searched after the previous
    one, so option texts may contain anything but the next marker.
    """
    end = text.rfind(_FORMAT)
    if end < 0:
        raise ValueError("no 'Answer format:' line")
    n_options = text[end + len(_FORMAT):].count("/") + 1
    lead = _LEAD_IN.match(text)
    if lead is None:
        raise ValueError("no 'Please ... question:' lead-in")
    starts, pos = [], lead.end()
    for k in range(1, n_options + 1):
        marker = f"{label}{k}: "
        at = text.find(marker, pos, end)
        if at < 0:
            raise ValueError(f"option marker {marker!r} not found")
        starts.append((at, at + len(marker)))
        pos = at + len(marker)
    question = text[lead.end():starts[0][0]].strip()
    bounds = [s for _, s in starts]
    ends = [a for a, _ in starts[1:]] + [end]
    options = [text[b:e].strip() for b, e in zip(bounds, ends)]
    if not question or not all(options):
        raise ValueError("empty question or option")
    return question, options


def _adapters_doc(task: str, row: dict, label: str | None) -> dict:
    """One LLM-Adapters record -> ``{"query", "choices", "gold"}`` in the task's prompt format."""
    text, answer = row["instruction"], row["answer"].strip().lower()
    if task == "boolq":
        lead = _LEAD_IN.match(text)
        end = text.rfind(_FORMAT)
        if lead is None or end < 0 or answer not in ("true", "false"):
            raise ValueError("not a true/false question")
        question = text[lead.end():end].strip()
        if not question.endswith("?"):
            question += "?"
        return {"query": f"Question: {question}\nAnswer:", "choices": ["no", "yes"],
                "gold": int(answer == "true")}
    question, options = _split_instruction(text, label)
    match = re.fullmatch(rf"{label.lower()}(\d+)", answer)
    if match is None or not 1 <= int(match.group(1)) <= len(options):
        raise ValueError(f"answer {answer!r} does not name one of {len(options)} options")
    gold = int(match.group(1)) - 1
    if task == "winogrande":
        if question.count("_") != 1:
            raise ValueError("winogrande sentence must contain exactly one '_' blank")
        query = question
    elif task == "piqa" or task.startswith("arc_"):
        query = f"Question: {question}\nAnswer:"
    elif task == "social_iqa":
        query = f"Q: {question}\nA:"
    else:  # openbookqa: the question stem alone, as in lm-eval
        query = question
    return {"query": query, "choices": options, "gold": gold}


def _mmlu_docs(data_dir: Path) -> list[dict]:
    """Both local MMLU subjects (test split), in lm-eval's zero-shot ``mmlu`` prompt."""
    docs = []
    for subject in MMLU_SUBJECTS:
        path = _task_file(data_dir, "mmlu", "test", f"{subject}_test.csv")
        description = ("The following are multiple choice questions (with answers) about "
                       f"{subject.replace('_', ' ')}.\n\n")
        with path.open(newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.DictReader(f)):
                try:
                    options = [row[f"choice{k}"].strip() for k in range(4)]
                    gold = int(row["answer"])
                    question = row["question"].strip()
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValueError(f"{path}: bad row {i + 1}: {exc}") from exc
                if not 0 <= gold < 4:
                    raise ValueError(f"{path}: row {i + 1}: answer {gold} not in 0..3")
                lettered = "".join(f"\n{letter}. {opt}" for letter, opt in zip("ABCD", options))
                docs.append({"query": f"{description}{question}{lettered}\nAnswer:",
                             "choices": ["A", "B", "C", "D"], "gold": gold})
    return docs


def load_task_docs(task: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Read one task's local evaluation split as ``[{"query", "choices", "gold"}, ...]``.

    ``query`` is the full prompt (the text lm-eval conditions on), ``choices`` the candidate
    continuations and ``gold`` the index of the right one. For winogrande, ``query`` is the
    sentence with its ``_`` blank and ``choices`` the two fillers (see module docstring).
    Raises ``ValueError`` for an unknown task or a malformed record and
    ``FileNotFoundError`` (naming the file) when the data is missing.
    """
    _check_task(task)
    root = resolve_data_dir(data_dir)
    if task == "mmlu":
        return _mmlu_docs(root)
    folder, label = _ADAPTERS_LAYOUT[task]
    path = _task_file(root, folder, "test.json")
    rows = json.loads(path.read_text(encoding="utf-8"))
    docs = []
    for i, row in enumerate(rows):
        try:
            docs.append(_adapters_doc(task, row, label))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}: record {i}: {exc}") from exc
    return docs


# --------------------------------------------------------------------------- lm-eval tasks
def _winogrande_split(doc: dict) -> tuple[str, str]:
    """Sentence parts before and after the blank."""
    before, after = doc["query"].split("_", 1)
    return before, after.strip()


def _task_functions(task: str) -> dict[str, Callable[[dict], Any]]:
    """``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` for a ConfigurableTask."""
    if task == "winogrande":
        # lm-eval's "multiple input" mode: doc_to_text returns the gold index, the choices
        # are the contexts (sentence up to the blank, filled) and the target is the rest.
        return {
            "doc_to_text": lambda doc: doc["gold"],
            "doc_to_choice": lambda doc: [_winogrande_split(doc)[0] + option
                                          for option in doc["choices"]],
            "doc_to_target": lambda doc: _winogrande_split(doc)[1],
        }
    return {
        "doc_to_text": lambda doc: doc["query"],
        "doc_to_choice": lambda doc: list(doc["choices"]),
        "doc_to_target": lambda doc: doc["gold"],
    }


def build_lm_eval_task(task: str, docs: list[dict]):
    """An lm-eval ``ConfigurableTask`` (0-shot, multiple choice) over in-memory ``docs``."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    if not docs:
        raise ValueError(f"{task}: no documents to evaluate")
    metrics = ["acc", "acc_norm"] if task in _HAS_ACC_NORM else ["acc"]
    rows = [{"query": d["query"], "choices": list(d["choices"]), "gold": int(d["gold"])}
            for d in docs]
    config = {
        "task": task,
        "custom_dataset": lambda **_: {"test": datasets.Dataset.from_list(rows)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "num_fewshot": 0,
        "target_delimiter": " ",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                        for m in metrics],
        "metadata": {"version": 1.0, "source": "llrc_core.zeroshot (local files)"},
        **_task_functions(task),
    }
    task_logger = logging.getLogger("lm_eval.api.task")
    task_logger.addFilter(_quiet_custom_dataset_hint)
    try:
        return ConfigurableTask(config=config)
    finally:
        task_logger.removeFilter(_quiet_custom_dataset_hint)


def _quiet_custom_dataset_hint(record: logging.LogRecord) -> bool:
    """Drop lm-eval's CLI ``--metadata`` hint, printed for every ``custom_dataset`` task."""
    return "Custom kwargs can be passed" not in record.getMessage()


# --------------------------------------------------------------------------- model wrapper
def _special_token_mode(tokenizer) -> bool | None:
    """``add_bos_token`` value for HFLM.

    lm-eval splits context/continuation by encoding ``context + continuation`` and cutting
    at ``len(encode(context))``, which is only right if special tokens sit at the front.
    Tokenizers that add nothing (GPT-2) or only a leading BOS (Llama) keep their default
    (``None``); tokenizers that also append tokens (BERT's ``[CLS] ... [SEP]``) get
    ``False``: no special tokens at all, as a causal BERT is trained on plain text.
    """
    probe = "a b"
    plain = tokenizer.encode(probe, add_special_tokens=False)
    full = tokenizer.encode(probe)
    return None if full[len(full) - len(plain):] == plain else False


def make_hflm(model, tokenizer, batch_size: int = 8, max_length: int | None = None):
    """Wrap an in-memory causal LM (Llama/GPT-2/``BertLMHeadModel(is_decoder=True)``) in HFLM."""
    from lm_eval.models.huggingface import HFLM

    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("only decoder-only (causal) language models are supported")
    prefix = None  # used only for empty contexts: BOS, else EOS, else CLS
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        prefix = getattr(tokenizer, "cls_token_id", None)
    return HFLM(pretrained=model, tokenizer=tokenizer, backend="causal",
                batch_size=int(batch_size), max_length=max_length,
                add_bos_token=_special_token_mode(tokenizer), prefix_token_id=prefix)


# --------------------------------------------------------------------------- evaluation
def evaluate_tasks(model, tokenizer, tasks, limit: int | None = None,
                   data_dir: str | os.PathLike | None = None, batch_size: int = 8,
                   device: str | None = None, *, max_length: int | None = None,
                   ) -> dict[str, dict]:
    """Zero-shot accuracy of ``model`` on ``tasks`` (names from :data:`TASKS`) via lm-eval.

    ``limit`` keeps the first ``limit`` docs of each task. ``device`` moves the model there
    first (HFLM runs it where its weights are); the model is left in eval mode, and a
    tokenizer without a pad token gets one from lm-eval (its unk or eos token).
    ``max_length`` defaults to the model config's ``n_positions``/``max_position_embeddings``
    (longer inputs are left-truncated by lm-eval).

    Returns ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}}``; the
    ``acc_norm`` entries are ``None`` for tasks that do not define it.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise ValueError(f"no tasks given; supported tasks: {', '.join(TASKS)}")
    for name in names:
        _check_task(name)
    if limit is not None:
        if int(limit) < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        limit = int(limit)

    task_objs = []
    for name in dict.fromkeys(names):
        docs = load_task_docs(name, data_dir)
        task_objs.append(build_lm_eval_task(name, docs[:limit] if limit else docs))

    if device is not None:
        model.to(device)
    lm = make_hflm(model, tokenizer, batch_size=batch_size, max_length=max_length)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=task_objs, task_manager=TaskManager(include_defaults=False),
        num_fewshot=0, batch_size=batch_size, log_samples=False, bootstrap_iters=1000,
        # scoring is deterministic: leave the caller's global RNG state alone
        random_seed=None, numpy_random_seed=None, torch_random_seed=None)

    results = {}
    for task in task_objs:
        name = task.config.task
        res = out["results"][name]
        norm = name in _HAS_ACC_NORM
        results[name] = {
            "acc": float(res["acc,none"]),
            "acc_stderr": _float_or_none(res.get("acc_stderr,none")),
            "acc_norm": float(res["acc_norm,none"]) if norm else None,
            "acc_norm_stderr": _float_or_none(res.get("acc_norm_stderr,none")) if norm else None,
            "n": int(out["n-samples"][name]["effective"]),
        }
    return results


def _float_or_none(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" when stderr is unavailable
        return None
