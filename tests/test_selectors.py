"""One table over every registered method (``SELECTORS``): the ratio is met in both scopes,
the model comes back bit-exactly, the plan survives a JSON round trip, a stop gives a valid
plan or the shared ``Stopped``, unsupported pairs are refused, and learned methods resume
from a checkpoint to the plan of an unbroken run. A method registered without a row fails."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import tiny_ids, tiny_model
from llrc_core.errors import Stopped
from llrc_core.pipeline import decompose_model, select_plan
from llrc_core.plan import RankPlan
from llrc_core.selectors import SELECTORS, get_selector, register_selector

# method -> fast options on a tiny model (every method runs on whitened factors here).
ROWS = {
    "uniform": {},
    "energy": {},
    "svdllm": {},
    "svdllm2": {},
    "drank": {},
    "strs": dict(candidates=[0.3, 0.6], max_windows=2),
    "llrc": dict(steps=12, lr=0.2, batch_size=4, train_seq_len=0, hold_steps=3),
    "ars": dict(steps=4, batch_size=4),
    "ara": dict(steps=4, batch_size=4),
}
TOL = 0.01          # a tiny model's largest rank step is ~1 % of its linear weights


@pytest.fixture(scope="module")
def tiny():
    model, ids = tiny_model("llama"), tiny_ids(8, 16)
    return model, ids, decompose_model(model, "whiten", ids)


def test_every_registered_method_has_a_row():
    assert set(ROWS) == set(SELECTORS), "add a row for each new method to ROWS"


def snapshot(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits.clone()
    return (logits, dict(model.named_modules()), [p.requires_grad for p in model.parameters()],
            model.training)


def assert_restored(model, ids, before):
    logits, modules, flags, training = before
    assert model.training == training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(m is modules[n] for n, m in model.named_modules()) and \
        dict(model.named_modules()).keys() == modules.keys()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)


@pytest.mark.parametrize("method", sorted(ROWS))
@pytest.mark.parametrize("scope,ratio", [("linear", 0.6), ("model", 0.8)])
def test_ratio_restore_and_round_trip(tiny, tmp_path, method, scope, ratio):
    model, ids, dec = tiny
    spec = get_selector(method)
    before = snapshot(model, ids)
    for selection in spec.selections:
        plan = select_plan(model, dec, method, ids, ratio=ratio, scope=scope,
                           selection=selection, cache_dir=str(tmp_path), **ROWS[method])
        got = plan.ratio(scope)
        assert ratio - TOL <= got <= ratio + 1e-9, f"{method} {selection}: {scope} {got}"
        assert (plan.method, plan.selection, plan.decomposition) == (method, selection, "whiten")
        if selection == "top-k":
            assert all(lp.is_prefix for lp in plan.layers.values())
        again = RankPlan.from_json(plan.to_json())
        assert again.to_dict() == plan.to_dict() and again.ratio(scope) == got
        assert_restored(model, ids, before)


@pytest.mark.parametrize("method", sorted(ROWS))
def test_stop_gives_a_valid_plan_or_stopped(tiny, tmp_path, method):
    model, ids, dec = tiny
    before = snapshot(model, ids)
    try:
        plan = select_plan(model, dec, method, ids, ratio=0.6, should_stop=lambda: True,
                           cache_dir=str(tmp_path), **ROWS[method])
    except Stopped:
        assert not get_selector(method).trains      # learned methods always have a plan
    else:
        assert 0.6 - TOL <= plan.ratio("linear") <= 0.6
        if get_selector(method).trains:
            assert plan.meta["stopped"] is True and plan.meta["steps"] == 0
    assert_restored(model, ids, before)


@pytest.mark.parametrize("method", sorted(m for m in ROWS if get_selector(m).trains))
def test_learned_methods_resume_to_the_same_plan(tiny, tmp_path, method):
    model, ids, dec = tiny
    opts = {**ROWS[method], "steps": 8, "ratio": 0.6}
    if method == "llrc":
        opts["hold_steps"] = 100                     # run all 8 steps
    full = select_plan(model, dec, method, ids, **opts)
    ckpt, seen = str(tmp_path / "state.pt"), []
    stopped = select_plan(model, dec, method, ids, callback=seen.append, checkpoint=ckpt,
                          should_stop=lambda: sum(e["type"] == "step" for e in seen) >= 3,
                          **opts)
    assert stopped.meta["stopped"] and stopped.meta["steps"] == 3
    resumed = select_plan(model, dec, method, ids, checkpoint=ckpt, **opts)
    assert resumed.meta["steps"] == 8 and not resumed.meta["stopped"]
    assert resumed.to_dict()["layers"] == full.to_dict()["layers"]
    with pytest.raises(Exception, match="another run"):    # options differ: refused
        select_plan(model, dec, method, ids, checkpoint=ckpt, **{**opts, "ratio": 0.5})


@pytest.mark.parametrize("method", sorted(ROWS))
def test_unsupported_pairs_are_refused(tiny, method):
    model, ids, dec = tiny
    spec = get_selector(method)
    for selection in {"top-k", "any-k"} - set(spec.selections):
        with pytest.raises(ValueError, match=f"supports selection.*not '{selection}'"):
            select_plan(model, dec, method, ids, ratio=0.6, selection=selection)
    if "svd" not in spec.allowed_decompositions:
        with pytest.raises(ValueError, match=f"--decomposition {spec.preferred}"):
            select_plan(model, decompose_model(model, "svd"), method, ids, ratio=0.6)


def test_registry_refuses_a_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        register_selector("uniform")(lambda ctx, cfg: None)
    assert SELECTORS["uniform"].select.__name__ == "select_uniform"


def test_importing_the_package_is_light():
    code = ("import sys, llrc_core, llrc_core.cli; llrc_core.cli.build_parser(); "
            "import torch; "
            "print('transformers' in sys.modules, torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["False", "False"]


def test_a_stop_without_a_plan_is_stopped_not_an_error(tmp_path):
    """``Stopped`` (STRS before its table is complete) reaches a job as "stopped"."""
    from llrc_core.jobs import start_job

    def work(emit, should_stop):
        raise Stopped("STRS stopped before its sensitivity table was complete")
    job = start_job(work)
    assert job.wait(30)
    assert (job.status, job.error, job.result) == ("stopped", None, None)
