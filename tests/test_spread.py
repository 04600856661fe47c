"""Blocks across the GPUs of one machine (issue 11, ``spread.py``, ``compress --gpus N``).

With no GPU here, the run's device moves cannot be checked. What is checked: a map loads as
it is (the planner's map itself: ``test_planner``); a run through accelerate's per-block
hooks (those ``dispatch_model`` puts on GPU-placed blocks, here with the CPU as every
block's device) plans exactly as a plain run; a run asking for GPUs this machine does not
have is refused before loading. ``test_blocks_across_two_gpus_plan_as_on_one`` runs where
two GPUs are."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import DEMO, WIKI_VALID, tiny_ids, tiny_model
from llrc_core.models import find_blocks
from llrc_core.pipeline import compress_, decompose_model, select_plan


def _block_map(model, split: int) -> dict:
    """Module -> device as accelerate would place a small Llama on two GPUs: the blocks
    before ``split`` with the embeddings on 0, the rest with the norm and head on 1."""
    prefix, blocks = find_blocks(model)
    return {"model.embed_tokens": 0, **{f"{prefix}.{i}": int(i >= split)
                                        for i in range(len(blocks))},
            "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}


def _runs(plain, hooked) -> list[tuple]:
    """Statistics, whitening, 10 LLRC steps, the plan applied and logits, on each model:
    ``(kept indices, step losses, logits)``."""
    windows, ids = tiny_ids(8, 32), tiny_ids(2, 16, seed=1)
    runs = []
    for model in (plain, hooked):
        dec = decompose_model(model, "whiten", windows)
        events = []
        plan = select_plan(model, dec, "llrc", windows, callback=events.append, steps=10,
                           ratio=0.7, mask_every=0, batch_size=2)
        compress_(model, dec, plan)
        with torch.no_grad():
            logits = model(input_ids=ids.to(next(model.parameters()).device)).logits
        runs.append(({n: lp.kept for n, lp in plan.layers.items()},
                     [e["loss"] for e in events if e["type"] == "step"], logits.cpu()))
    assert len(runs[0][1]) == 10
    return runs


def test_a_run_through_accelerates_block_hooks_plans_as_a_plain_run():
    """Through the hooks ``dispatch_model`` puts on each placed block (here every block on
    the CPU), the same to the bit as a plain run of the same model."""
    from accelerate import dispatch_model
    plain = tiny_model("llama")
    hooked = copy.deepcopy(plain)
    dmap = _block_map(hooked, split=1)
    dispatch_model(hooked, {k: "cpu" for k in dmap}, main_device="cpu", force_hooks=True)
    assert all(hasattr(hooked.get_submodule(k), "_hf_hook") for k in dmap)
    (kept, losses, logits), (kept2, losses2, logits2) = _runs(plain, hooked)
    assert kept == kept2 and losses == losses2                  # ==: the same losses
    assert torch.equal(logits, logits2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_blocks_across_two_gpus_plan_as_on_one():
    """Block 0 on GPU 0, block 1 on GPU 1 (statistics, factors and masked layers on each
    block's GPU; masks and loss on GPU 0): the plan of the model on one GPU, losses and
    logits equal up to float32 rounding."""
    from accelerate import dispatch_model
    plain = tiny_model("llama").to("cuda:0")
    spread = copy.deepcopy(plain)
    dispatch_model(spread, _block_map(spread, split=1))
    assert {p.device.index for p in spread.parameters()} == {0, 1}
    (kept, losses, logits), (kept2, losses2, logits2) = _runs(plain, spread)
    assert kept == kept2
    assert losses == pytest.approx(losses2, rel=1e-5)
    assert torch.allclose(logits, logits2, rtol=1e-4, atol=1e-5)


def test_a_map_loads_the_model_it_names():
    """``load_model(device_map=...)`` (what ``compress --gpus N`` calls with the planner's
    map) loads through transformers' dispatch: here every module on the CPU, the logits those
    of a plain load."""
    from llrc_core.models import load_model
    plain = load_model(DEMO, "cpu", "float32")
    names = [n for n, _ in plain.model.named_children()]
    mapped = load_model(DEMO, "cpu", "float32", device_map={n: "cpu" for n in names})
    ids = tiny_ids(2, 16, vocab=1000)
    with torch.no_grad():
        assert torch.equal(plain.model(input_ids=ids).logits, mapped.model(input_ids=ids).logits)
    assert mapped.device == torch.device("cpu")


def test_gpus_this_machine_lacks_are_refused_before_loading(tmp_path, monkeypatch, capsys):
    from llrc_core import models
    from llrc_core.cli import main
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("weights were read"))
    out = tmp_path / "out"
    argv = ["compress", "--model", str(DEMO), "--method", "uniform", "--ratio", "0.8",
            "--calib", str(WIKI_VALID), "--n-calib", "4", "--seq-len", "64", "--out", str(out)]
    assert main([*argv, "--gpus", "2"]) == 2
    err = capsys.readouterr().err
    assert "--gpus 2 places the model's blocks across 2 GPUs" in err
    assert f"this machine shows {torch.cuda.device_count()}" in err and not out.exists()
    assert main([*argv, "--gpus", "0"]) == 2
    assert "--gpus must be at least 1" in capsys.readouterr().err
