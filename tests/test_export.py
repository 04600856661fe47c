"""Export: reload in a fresh process both ways, merged dense, file size, and safety.

One module fixture compresses every case of ``CASES``, exports it factorised and merged dense,
then ONE fresh Python process reloads every folder three ways (stock transformers with
``trust_remote_code=True`` while ``llrc_core`` cannot be imported; ``load_compressed``; the
merged folder with stock transformers) with ``torch.load`` and ``pickle`` disabled, and writes
the logits back as safetensors. Tiny models have random weights: they test plumbing only.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DEMO, ROOT, tiny_ids, tiny_model
from llrc_core import export as ex
from llrc_core import files
from llrc_core.errors import ModelLoadError
from llrc_core.export import export_model, load_compressed
from llrc_core.models import count_params
from llrc_core.pipeline import compress_, decompose_model, select_plan
from llrc_core.plan import LayerPlan, RankPlan

# (case, architecture or "demo", dtype, plan: "uniform" top-k or hand-made "any-k")
CASES = [
    ("llama", "llama", torch.float32, "any-k"),
    ("qwen2", "qwen2", torch.float32, "uniform"),
    ("mistral", "mistral", torch.float32, "any-k"),
    ("gpt2", "gpt2", torch.float32, "any-k"),
    ("opt", "opt", torch.float32, "any-k"),
    ("demo", "demo", torch.float32, "uniform"),
    ("llama-fp16", "llama", torch.float16, "any-k"),
    ("gpt2-bf16", "gpt2", torch.bfloat16, "any-k"),
    ("demo-shards", "demo", torch.float32, "uniform"),
]
SHARDS = {"demo-shards": "4MB"}     # max_shard_size of a case written in shards (default 5GB)
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}   # max |logit diff|


def any_k_plan(dec, total: int, seed: int = 0) -> RankPlan:
    """Non-prefix kept indices (random subsets) at about half break-even; the first layer dense."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for i, (name, (m, n)) in enumerate(dec.shapes.items()):
        k = max(1, m * n // (m + n) // 2)
        kept = None if i == 0 else sorted(torch.randperm(min(m, n), generator=g)[:k].tolist())
        layers[name] = LayerPlan(m, n, kept)
    return RankPlan(layers, total, "manual", dec.decomposition, "any-k")


def build(arch: str, dtype: torch.dtype, kind: str):
    """(compressed model, tokenizer, plan, input ids)."""
    if arch == "demo":
        from llrc_core import load_model
        loaded = load_model(DEMO, device="cpu", dtype="float32")
        model, tok, ids = loaded.model, loaded.tokenizer, tiny_ids(2, 24, vocab=5000)
    else:
        model, tok, ids = tiny_model(arch), None, tiny_ids()
    if dtype != torch.float32:   # built in its dtype, as load_model(dtype=...) builds it
        half = type(model)._from_config(model.config, dtype=dtype)
        half.load_state_dict(model.state_dict())
        model = half.eval()
    dec = decompose_model(model, "svd")
    plan = (select_plan(model, dec, "uniform", ratio=0.6) if kind == "uniform"
            else any_k_plan(dec, count_params(model)))
    compress_(model, dec, plan)
    return model, tok, plan, ids


RELOAD = r'''
import json, pickle, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file

def forbidden(*a, **k):
    raise AssertionError("something tried to unpickle")
torch.load = pickle.load = pickle.loads = forbidden
root, work = sys.argv[1], Path(sys.argv[2])
cases = json.loads((work / "cases.json").read_text())
sys.modules["llrc_core"] = None          # the remote-code path must not need llrc_core
from transformers import AutoModelForCausalLM
out, info = {}, {}
def logits(model, name):
    with torch.no_grad():
        return model(load_file(str(work / f"{name}.ids.safetensors"))["ids"]).logits.contiguous()
for name in cases:
    m = AutoModelForCausalLM.from_pretrained(work / name, trust_remote_code=True)
    out[f"{name}/remote"] = logits(m, name)
    info[name] = {"class": type(m).__name__, "dtype": str(m.dtype),
                  "kept": {n: mod.kept for n, mod in m.named_modules() if hasattr(mod, "kept")}}
    m = AutoModelForCausalLM.from_pretrained(work / f"{name}-merged")
    out[f"{name}/merged"] = logits(m, name)
    info[name]["merged_class"] = type(m).__name__
del sys.modules["llrc_core"]
sys.path.insert(0, root)
from llrc_core.export import load_compressed
for name in cases:
    m, tok, plan = load_compressed(work / name)
    out[f"{name}/llrc"] = logits(m, name)
    info[name]["plan"] = plan.to_dict()
    info[name]["tokenizer"] = tok is not None
save_file(out, str(work / "logits.safetensors"))
(work / "info.json").write_text(json.dumps(info))
'''


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    work = tmp_path_factory.mktemp("export")
    cases = {}
    for name, arch, dtype, kind in CASES:
        model, tok, plan, ids = build(arch, dtype, kind)
        with torch.no_grad():
            ref = model(ids).logits
        report = {"ppl_before": 93.25, "ppl_after": 124.5,
                  "eval_text": "data/wikitext-2/test.txt"} if name == "demo" else None
        shard = SHARDS.get(name, "5GB")
        export_model(model, tok, plan, work / name, report=report, max_shard_size=shard)
        export_model(model, tok, plan, work / f"{name}-merged", merged_dense=True,
                     max_shard_size=shard)
        save_file({"ids": ids, "ref": ref}, str(work / f"{name}.ids.safetensors"))
        cases[name] = dict(ref=ref, plan=plan, dtype=dtype, total=plan.total_params,
                           has_tok=tok is not None)
        del model
    (work / "cases.json").write_text(json.dumps(list(cases)))
    (work / "reload.py").write_text(RELOAD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(work / "modules"),
           "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, str(work / "reload.py"), str(ROOT), str(work)],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return work, cases, load_file(str(work / "logits.safetensors")), \
        json.loads((work / "info.json").read_text())


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_reload_in_fresh_process_matches(reloaded, name):
    work, cases, logits, info = reloaded
    case = cases[name]
    ref, tol = case["ref"], TOL[case["dtype"]]
    for way in ("remote", "llrc"):
        got = logits[f"{name}/{way}"]
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert (got.float() - ref.float()).abs().max().item() <= tol, way
    assert info[name]["class"].startswith("LLRC")
    assert info[name]["dtype"] == str(case["dtype"])
    # any-k: the exact kept indices survive both loaders
    want = {n: lp.kept for n, lp in case["plan"].layers.items() if not lp.dense}
    assert info[name]["kept"] == want
    assert info[name]["plan"]["layers"] == case["plan"].to_dict()["layers"]
    assert info[name]["tokenizer"] == case["has_tok"]
    # merged dense: the plain architecture, same logits within rounding of A B
    assert not info[name]["merged_class"].startswith("LLRC")
    merged_tol = 1e-4 if case["dtype"] == torch.float32 else 4 * tol
    scale = ref.float().abs().max().item()
    assert (logits[f"{name}/merged"].float() - ref.float()).abs().max().item() \
        <= merged_tol * max(1.0, scale)


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_weights_file_size_matches_achieved_ratio(reloaded, name):
    """Predicted payload = rho_model x parameters before compression x bytes per number: both
    count every parameter (embeddings, norms, biases, LM head) once, tied weights once, and
    the model has no persistent buffers. The safetensors JSON header (tensor names, shapes,
    the kept-index metadata) comes on top; it is read from the file's first 8 bytes."""
    work, cases, _, _ = reloaded
    case = cases[name]
    size, header = _weights_size(work / name)
    itemsize = torch.tensor([], dtype=case["dtype"]).element_size()
    predicted = case["plan"].ratio("model") * case["total"] * itemsize
    assert abs(size - header - predicted) <= 0.02 * predicted
    assert abs(size - (predicted + header)) <= 0.02 * (predicted + header)
    if arch_of(name) == "demo":   # a real model: the header is negligible, the ratio predicts it
        assert abs(size - predicted) <= 0.02 * predicted
    merged, _ = _weights_size(work / f"{name}-merged")
    dense = case["total"] * itemsize
    assert abs(merged - dense) <= 0.02 * dense + header
    cfg = json.loads((work / name / "config.json").read_text())
    assert cfg["llrc"]["storage"]["weights_bytes"] == size


def arch_of(name: str) -> str:
    return next(c[1] for c in CASES if c[0] == name)


def _weights_size(folder: Path) -> tuple[int, int]:
    """Bytes of an export's weights files (one, or the shards) and of their headers."""
    from llrc_core.hf_remote.modeling_llrc import weight_files
    paths = [Path(f) for f in weight_files(str(folder))[0]]
    return (sum(p.stat().st_size for p in paths),
            sum(8 + struct.unpack("<Q", p.read_bytes()[:8])[0] for p in paths))


@pytest.mark.parametrize("size, want", [("5GB", 5 * 10 ** 9), (" 500mb ", 5 * 10 ** 8),
                                        ("1.5KB", 1500), (4096, 4096), ("0", None),
                                        ("inf", None), ("nan", None), ("5 GiB", None)])
def test_shard_sizes_read_as_the_hub_writes_them(size, want):
    from llrc_core.shards import shard_bytes
    if want is None:
        with pytest.raises(ValueError, match="not a size"):
            shard_bytes(size)
    else:
        assert shard_bytes(size) == want


def test_sharded_export_is_written_shard_by_shard(reloaded, monkeypatch, tmp_path):
    """4 MB shards of the demo model: transformers' index names every tensor once, each shard
    is at most 4 MB (or one larger tensor: the 47 MB embedding) and says ``format: pt``, the
    kept-index metadata sits in the index, and every weights file written holds one shard's
    tensors only (what bounds the export's extra memory)."""
    from safetensors import safe_open

    from llrc_core import shards
    work, cases, _, _ = reloaded
    shard_count = {}
    for folder in (work / "demo-shards", work / "demo-shards-merged"):
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) >= 6 and not (folder / "model.safetensors").exists()
        tensors = {}
        for f in files:
            assert (folder / f).stat().st_size <= 4_000_000 or len(load_file(folder / f)) == 1
            with safe_open(str(folder / f), framework="pt") as sf:
                assert sf.metadata() == {"format": "pt"}
            tensors.update(load_file(folder / f))
        assert sorted(tensors) == sorted(index["weight_map"])
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
        shard_count[folder.name] = len(files)
    index = json.loads((work / "demo-shards" / "model.safetensors.index.json").read_text())
    assert json.loads(index["metadata"]["llrc_layers"]) == {
        n: lp.kept for n, lp in cases["demo-shards"]["plan"].layers.items()}
    cfg = json.loads((work / "demo-shards" / "config.json").read_text())
    assert cfg["llrc"]["storage"]["weights_files"] == shard_count["demo-shards"]
    assert f"| weights files | {shard_count['demo-shards']} shards, " in \
        (work / "demo-shards" / "README.md").read_text()

    written = []
    monkeypatch.setattr(shards, "save_file", lambda t, path, metadata: written.append(
        (sum(x.nbytes for x in t.values()), len(t))) or save_file(t, path, metadata=metadata))
    model, tok, plan, _ = build("demo", torch.float32, "uniform")
    export_model(model, tok, plan, tmp_path / "m", merged_dense=True, max_shard_size="10MB")
    assert len(written) >= 5 and all(n <= 10_000_000 or k == 1 for n, k in written)
    with pytest.raises(ValueError, match="not a size"):
        export_model(model, tok, plan, tmp_path / "bad", max_shard_size="5XB")
    assert not (tmp_path / "bad").exists()


def test_folder_contents_and_card(reloaded):
    work, cases, _, _ = reloaded
    folder = work / "demo"
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_llrc.py", "rank_plan.json",
            "rank_plan.csv", "README.md", "report.json", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["auto_map"] == {"AutoConfig": "modeling_llrc.LLRCExportConfig",
                               "AutoModelForCausalLM": "modeling_llrc.LLRCModel"}
    assert (cfg["model_type"], cfg["llrc"]["base_model_type"]) == ("llrc", "bert")
    plan = cases["demo"]["plan"]
    layer = next(iter(plan.layers))
    assert cfg["llrc"]["plan"]["layers"][layer]["rank"] == plan.layers[layer].rank
    card = (folder / "README.md").read_text()
    for text in ("uniform", f"{plan.ratio('linear'):.4f}", f"{plan.ratio('model'):.4f}",
                 "124.500", "93.250", "`test.txt`", "trust_remote_code=True",
                 "load_compressed"):
        assert text in card, text
    assert "trust_remote_code" not in (work / "demo-merged" / "README.md").read_text()
    assert not list(work.glob(".*tmp-*"))


# --- safety: in-process, one tiny model ----------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    model, _, plan, ids = build("llama", torch.float32, "any-k")
    folder = tmp_path_factory.mktemp("small") / "good"
    export_model(model, None, plan, folder)
    return model, plan, ids, folder


def test_refuses_non_empty_destination_unless_force(small, tmp_path):
    model, plan, ids, _ = small
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        export_model(model, None, plan, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_model(model, None, plan, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    export_model(model, None, plan, empty)    # an empty folder is fine
    assert (empty / "config.json").exists()


@pytest.mark.parametrize("where, exc", [("save_file", OSError), ("model_card", KeyboardInterrupt),
                                        ("_move_into_place", OSError)])
@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_write_leaves_no_destination(small, tmp_path, monkeypatch, where, exc,
                                                 existing):
    model, plan, _, _ = small
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("old")

    def fail(*args, **kw):
        if where == "save_file":           # half a file is on disk when the failure comes
            Path(args[1]).write_bytes(b"partial")
        raise exc("simulated failure")
    from llrc_core import shards
    monkeypatch.setattr({"_move_into_place": files, "save_file": shards}.get(where, ex), where,
                        fail)
    with pytest.raises(exc):
        export_model(model, None, plan, out, force=existing)
    if existing:     # --force over an old export: the old one is intact
        assert [p.name for p in out.iterdir()] == ["old.txt"]
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if existing else [])


def _edit_config(folder: Path, fn) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg["llrc"]["plan"]["layers"])
    (folder / "config.json").write_text(json.dumps(cfg))


def _low_rank_layer(layers: dict) -> str:
    return next(n for n, v in layers.items() if v["kept"] is not None)


def _set(layers, **kw):
    layers[_low_rank_layer(layers)].update(kw)


def _first(layers):
    return layers[_low_rank_layer(layers)]


def _moved(entry) -> list[int]:
    """Same count, one index swapped for one that was dropped."""
    kept = entry["kept"]
    free = min(set(range(min(entry["shape"]))) - set(kept))
    return sorted(set(kept[1:]) | {free})


TAMPER = [  # (case, edit on the copied folder, words the error must contain)
    ("rank changed", lambda f: _edit_config(f, lambda L: _set(L, rank=_first(L)["rank"] + 1)),
     "says rank"),
    ("kept shortened", lambda f: _edit_config(
        f, lambda L: _set(L, kept=_first(L)["kept"][:-1], rank=_first(L)["rank"] - 1)),
     "shape"),
    ("kept index changed", lambda f: _edit_config(f, lambda L: _set(L, kept=_moved(_first(L))),
                                                  ), "kept indices"),
    ("shape changed", lambda f: _edit_config(
        f, lambda L: _set(L, shape=[_first(L)["shape"][0] + 1, _first(L)["shape"][1]])),
     "shape"),
    ("weights truncated", lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:-100]), "model.safetensors"),
    ("weights missing", lambda f: (f / "model.safetensors").unlink(), "model.safetensors"),
    ("plan csv missing", lambda f: (f / "rank_plan.csv").unlink(), "rank_plan.csv"),
]


@pytest.mark.parametrize("case, edit, words", TAMPER, ids=[t[0] for t in TAMPER])
def test_tampered_folder_fails_naming_layer(small, tmp_path, monkeypatch, case, edit, words):
    _, plan, _, good = small
    folder = tmp_path / case.replace(" ", "_")
    shutil.copytree(good, folder)
    cfg = json.loads((folder / "config.json").read_text())
    layer = _low_rank_layer(cfg["llrc"]["plan"]["layers"])
    edit(folder)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(ModelLoadError) as err:
        load_compressed(folder)
    assert words in str(err.value)
    if "missing" not in case and "truncated" not in case:
        assert layer in str(err.value)
    from transformers import AutoModelForCausalLM   # the remote-code loader runs the same checks
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    with pytest.raises(ValueError) as err2:
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert words in str(err2.value)
    if "missing" not in case and "truncated" not in case:
        assert layer in str(err2.value)


def test_cli_export_merged_from_llrc_folder(small, tmp_path):
    from llrc_core.cli import main
    model, plan, ids, good = small
    out = tmp_path / "merged"
    assert main(["export", "--model", str(good), "--out", str(out), "--merged-dense"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert "auto_map" not in cfg and cfg["llrc_merged"]["ratio_linear"] == plan.ratio("linear")
    merged, _, plan2 = load_compressed(out)
    with torch.no_grad():
        assert (merged(ids).logits - model(ids).logits).abs().max().item() <= 1e-4
    assert plan2.to_dict() == plan.to_dict()
    assert main(["export", "--model", str(good), "--out", str(out)]) == 2   # not empty
