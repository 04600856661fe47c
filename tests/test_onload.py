"""Sequential onloading (issue 11, ``llrc_core/onload.py``): the blocks' weights wait in CPU
memory as meta parameters and visit the execution device per layer. On a CPU the execution
device is the CPU, but the weights are meta between forward passes exactly as on a GPU: any
code path that reads a weight without onloading it fails here."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import DEMO, WIKI_TEST, WIKI_VALID, tiny_ids, tiny_model
from llrc_core import onload
from llrc_core.apply import restore_
from llrc_core.models import find_blocks, find_targets, load_model
from llrc_core.pipeline import calibrate, compress_, decompose_model, select_plan
from llrc_core.placement import Placement
from test_selectors import ROWS


def _devices(module) -> set[str]:
    return {p.device.type for p in module.parameters()}


def test_blocks_wait_as_meta_and_visit_one_layer_at_a_time():
    model = tiny_model("llama")
    ids = tiny_ids()
    ref = model(input_ids=ids).logits
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    onload.enable_(model, "cpu")
    read = dict(onload.named_weights(model))                 # read in place, nothing onloaded
    assert read.keys() == weights.keys() and all(torch.equal(read[n], w)
                                                 for n, w in weights.items())
    _, blocks = find_blocks(model)
    assert all(_devices(b) == {"meta"} for b in blocks)
    assert _devices(model.model.embed_tokens) == _devices(model.lm_head) == {"cpu"}
    targets = [model.get_submodule(t.name) for t in find_targets(model)]
    present = []                # while each target computes: how many targets hold weights

    def watch(layer):
        inner = layer._old_forward         # accelerate's hook wraps the forward around this

        def forward(*args, **kwargs):
            present.append(sum(t.weight.device.type != "meta" for t in targets))
            return inner(*args, **kwargs)
        layer._old_forward = forward

    for t in targets:
        watch(t)
    assert torch.equal(model(input_ids=ids).logits, ref)
    assert len(present) == len(targets) and max(present) == 1
    with onload.onloaded(targets[0]):
        assert targets[0].weight.device.type == "cpu"
    assert targets[0].weight.device.type == "meta"
    with pytest.raises(ValueError, match="already onloaded"):
        onload.enable_(model, "cpu")
    onload.disable_(model)
    assert _devices(model) == {"cpu"} and onload.execution_device(model) is None
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    assert torch.equal(model(input_ids=ids).logits, ref)


def test_an_onloaded_llrc_run_equals_the_in_memory_run():
    """Whitening, LLRC (12 steps), apply with release on the demo model: the factors, the
    losses of every step, the plan and the compressed logits equal the in-memory run's bit for
    bit; the compressed layers wait offloaded too; ``restore_`` and ``disable_`` give back
    the dense model and a plain compressed one (what an export reads)."""
    runs = {}
    for mode in ("none", "weights"):
        demo = load_model(DEMO, device="cpu", dtype="float32")
        windows = calibrate(demo, str(WIKI_VALID), 8, 64)
        ids = windows[:2]
        dense = demo.model(input_ids=ids).logits
        if mode == "weights":
            onload.enable_(demo.model, "cpu")
        dec = decompose_model(demo.model, "whiten", windows,
                              placement=Placement.for_run(torch.float32, "cpu", mode))
        events = []
        plan = select_plan(demo.model, dec, "llrc", windows, callback=events.append, steps=12,
                           ratio=0.7, mask_every=0)
        factors = {n: (f.U.clone(), f.S.clone()) for n, f in dec.factors.items()}
        compress_(demo.model, dec, plan, release=True)
        low = [demo.model.get_submodule(n) for n, lp in plan.layers.items() if not lp.dense]
        assert {d for m in low for d in _devices(m)} == ({"meta"} if mode == "weights"
                                                         else {"cpu"})
        out = demo.model(input_ids=ids).logits
        onload.disable_(demo.model)
        assert _devices(demo.model) == {"cpu"}
        assert torch.equal(demo.model(input_ids=ids).logits, out)
        restore_(demo.model)
        assert torch.equal(demo.model(input_ids=ids).logits, dense)
        runs[mode] = (factors, {n: lp.kept for n, lp in plan.layers.items()},
                      [e["loss"] for e in events if e["type"] == "step"], out)
    (f0, k0, l0, o0), (f1, k1, l1, o1) = runs["none"], runs["weights"]
    assert f0.keys() == f1.keys() and all(torch.equal(f0[n][0], f1[n][0]) and
                                          torch.equal(f0[n][1], f1[n][1]) for n in f0)
    assert k0 == k1 and l0 == l1 and len(l0) == 12
    assert torch.equal(o0, o1)


def test_compress_with_offloaded_weights_writes_the_same_export(tmp_path):
    """``llrc compress --offload weights`` (on a CPU the same hooks run) writes the plan and
    the weights of ``--offload none``, with its placement in the report. No
    ``--decomposition``: the method's preferred one (uniform: ASVD) is used and reported."""
    from llrc_core.cli import main
    from llrc_core.export import load_compressed
    args = ["compress", "--model", str(DEMO), "--method", "uniform", "--ratio", "0.8",
            "--calib", str(WIKI_TEST), "--n-calib", "8", "--seq-len", "64", "--device", "cpu"]
    for mode in ("none", "weights"):
        assert main([*args, "--offload", mode, "--out", str(tmp_path / mode)]) == 0
    plans = [json.loads((tmp_path / m / "rank_plan.json").read_text())["layers"]
             for m in ("none", "weights")]
    assert plans[0] == plans[1]
    report = json.loads((tmp_path / "weights" / "report.json").read_text())
    assert report["placement"]["offload"] == "weights" and report["decomposition"] == "asvd"
    ids = tiny_ids(2, 16, vocab=1000)
    logits = [load_compressed(tmp_path / m, "cpu")[0](input_ids=ids).logits
              for m in ("none", "weights")]
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("method", sorted(ROWS))
def test_every_method_plans_the_same_onloaded(method):
    """Each registered method (its fast row of ``test_selectors``) on the tiny Llama: the plan
    of an onloaded model equals the in-memory one's, so no method reads a weight that waits
    offloaded."""
    plans = []
    for onloaded in (False, True):
        model, ids = tiny_model("llama"), tiny_ids(8, 16)
        if onloaded:
            onload.enable_(model, "cpu")
        dec = decompose_model(model, "whiten", ids)
        plan = select_plan(model, dec, method, ids, ratio=0.6, **ROWS[method])
        plans.append({n: lp.kept for n, lp in plan.layers.items()})
    assert plans[0] == plans[1]


def _mapped_ranges(path) -> list[tuple[int, int]]:
    """Address ranges of this process mapping ``path`` (``/proc/self/maps``)."""
    out = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[-1] == str(path):
            lo, hi = fields[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blocks_wait_as_pages_of_the_checkpoint_in_any_run_dtype(tmp_path, dtype):
    """A float32 checkpoint loaded for a float32 or a bfloat16 run: every block weight waiting
    in CPU memory lies in the memory-mapped safetensors file (no copy: file pages, read as
    blocks are onloaded), as the planner's ``mapped_host_bytes`` counts (at the checkpoint's
    4 bytes a number). A bfloat16 run casts each weight as it is onloaded: the model computes
    the same logits, bit for bit, as one loaded cast, and ``disable_`` hands back bfloat16."""
    from conftest import tiny_tokenizer
    from llrc_core.models import load_model
    from llrc_core.onload import load_sequential
    from llrc_core.planner import plan_memory
    tiny_model("llama").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded = load_sequential(str(tmp_path), "cpu", dtype)
    assert loaded.dtype == getattr(torch, dtype) and loaded.source_dtype == torch.float32
    ranges = _mapped_ranges((tmp_path / "model.safetensors").resolve())
    _, blocks = find_blocks(loaded.model)
    waiting = [t for n, t in onload.named_weights(loaded.model) if n.startswith("model.layers.")]
    assert len(waiting) == len(list(blocks[0].parameters())) * len(blocks)
    assert all(any(lo <= t.data_ptr() < hi for lo, hi in ranges) for t in waiting)
    assert {t.dtype for t in waiting} == {torch.float32}
    assert {p.dtype for p in loaded.model.parameters()} == {getattr(torch, dtype)}
    ids = tiny_ids(2, 16)
    eager = load_model(str(tmp_path), "cpu", dtype).model
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, eager(input_ids=ids).logits)
    rotary = loaded.model.model.rotary_emb.inv_freq          # computed, not cast
    assert rotary.dtype == eager.model.rotary_emb.inv_freq.dtype
    onload.disable_(loaded.model)
    assert {p.dtype for p in loaded.model.parameters()} == {getattr(torch, dtype)}
    plan = plan_memory(str(tmp_path), dtype, gpus=1, gpu_memory=80, offload="weights")
    home = plan.cpu_phases["load"]
    in_blocks = sum(p.numel() for p in blocks.parameters())
    assert plan.facts["mapped_host_bytes"] == home == in_blocks * 4
    assert "memory-mapped" in plan.table()
