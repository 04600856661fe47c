"""The vote of several rank plans (``llrc_core/vote.py``): what most plans keep, on their
budget."""
from __future__ import annotations

import pytest

from conftest import WIKI_VALID
from llrc_core.counting import break_even
from llrc_core.plan import LayerPlan, RankPlan
from llrc_core.vote import vote_plans, votes

SHAPES = {"b.0.q": (64, 32), "b.0.up": (96, 32), "b.1.q": (64, 32)}
TOTAL = 20_000


def plan(kept: dict, selection: str = "any-k", decomposition: str = "whiten") -> RankPlan:
    return RankPlan({n: LayerPlan(*SHAPES[n], kept[n]) for n in SHAPES}, TOTAL, "llrc",
                    decomposition, selection)


def test_a_vote_of_one_plan_repeated_is_that_plan():
    p = plan({"b.0.q": [0, 2, 5, 7], "b.0.up": None, "b.1.q": [1, 3]})
    assert p.layers["b.0.up"].dense
    v = vote_plans([p, p, p])
    assert {n: lp.kept for n, lp in v.layers.items()} == {n: lp.kept for n, lp in p.layers.items()}
    assert v.kept_linear == p.kept_linear
    assert (v.method, v.decomposition, v.selection) == ("llrc vote", "whiten", "any-k")
    assert v.meta["vote_of"] == 3


def test_the_majority_wins_on_the_same_budget():
    # every plan keeps 4 values a layer; index 9 of b.0.q and 8 of b.1.q are kept by 2 of 3,
    # 10, 11 and 12 by one plan only
    a = plan({"b.0.q": [0, 1, 9, 10], "b.0.up": [0, 1, 2, 3], "b.1.q": [0, 1, 8, 2]})
    b = plan({"b.0.q": [0, 1, 9, 11], "b.0.up": [0, 1, 2, 3], "b.1.q": [0, 1, 8, 3]})
    c = plan({"b.0.q": [0, 1, 2, 12], "b.0.up": [0, 1, 2, 3], "b.1.q": [0, 1, 4, 5]})
    assert votes([a, b, c], "b.0.q")[[0, 1, 2, 9, 10, 11, 12]].tolist() == [3, 3, 1, 2, 1, 1, 1]
    v = vote_plans([a, b, c])
    budget = (a.kept_linear + b.kept_linear + c.kept_linear) // 3
    assert budget - (64 + 32) < v.kept_linear <= budget      # full to within one value
    # 0, 1 and the value two plans keep; the fourth has a single vote: the lowest index
    assert v.layers["b.0.q"].kept == [0, 1, 2, 9]
    assert v.layers["b.1.q"].kept == [0, 1, 2, 8]
    assert v.layers["b.0.up"].kept == [0, 1, 2, 3]           # all three agree


def test_top_k_plans_vote_for_a_prefix():
    ks = [(5, 8, 3), (7, 8, 5), (6, 12, 4)]
    plans = [plan({n: list(range(k)) for n, k in zip(SHAPES, ks_)}, "top-k") for ks_ in ks]
    v = vote_plans(plans)
    assert all(lp.is_prefix for lp in v.layers.values())
    budget = sum(p.kept_linear for p in plans) // 3
    assert budget - (96 + 32) < v.kept_linear <= budget     # full to within one value
    # each layer lands between its smallest and largest count
    for i, n in enumerate(SHAPES):
        assert min(k[i] for k in ks) <= v.layers[n].rank <= max(k[i] for k in ks)


def test_a_dense_layer_votes_for_every_value():
    full = min(SHAPES["b.0.up"])
    dense = plan({"b.0.q": [0], "b.0.up": None, "b.1.q": [0]})
    low = plan({"b.0.q": [0], "b.0.up": [0], "b.1.q": [0]})
    assert votes([dense, dense, low], "b.0.up").tolist() == [3] + [2] * (full - 1)
    assert break_even(*SHAPES["b.0.up"]) <= full
    assert vote_plans([dense, dense, low]).kept_linear <= (2 * dense.kept_linear
                                                           + low.kept_linear) // 3


@pytest.mark.parametrize("other,match", [
    (lambda: RankPlan({"b.0.q": LayerPlan(64, 32, [0])}, TOTAL), "different models"),
    (lambda: plan({n: [0] for n in SHAPES}, decomposition="asvd"), "different factors"),
    (lambda: plan({n: [0] for n in SHAPES}, selection="top-k"), "different factors"),
])
def test_plans_that_cannot_vote_are_refused(other, match):
    with pytest.raises(ValueError, match=match):
        vote_plans([plan({n: [0] for n in SHAPES}), other()])
    with pytest.raises(ValueError, match="at least one"):
        vote_plans([])


def test_a_voted_compression_is_the_vote_of_its_seeds_plans(demo):
    """``compress(..., vote_seeds=...)``: each seed selects as a run of its own would, the
    kept plan is their vote on the same budget, every step event names its seed and one
    ``done`` event carries the vote."""
    from llrc_core.pipeline import calibrate, decompose_model, select_plan
    from llrc_core.workflow import compress
    windows = calibrate(demo, str(WIKI_VALID), 4, 32)
    dec = decompose_model(demo.model, "svd")
    opts = dict(ratio=0.7, selection="any-k", steps=3, objective="lm")
    seeds = [select_plan(demo.model, dec, "llrc", windows, seed=s, **opts) for s in (0, 1, 2)]
    assert len({tuple(sorted(p.ranks().items())) for p in seeds}) > 1
    events = []
    res = compress(demo.model, dec, "llrc", windows, vote_seeds=(0, 1, 2), emit=events.append,
                   **opts)
    expected = vote_plans(seeds)
    assert {n: lp.kept for n, lp in res.plan.layers.items()} == \
        {n: lp.kept for n, lp in expected.layers.items()}
    assert abs(res.plan.ratio() - 0.7) < 0.005
    assert res.plan.meta["vote_seeds"] == [0, 1, 2] and res.report["vote_seeds"] == [0, 1, 2]
    steps = [e for e in events if e["type"] == "step"]
    assert {e["seed"] for e in steps} == {0, 1, 2}
    done = [e for e in events if e["type"] == "done"]
    assert len(done) == 1 and done[0]["plan"]["method"] == "llrc vote"
