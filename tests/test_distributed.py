"""Data parallel mask training (``llrc_core.distributed``) on CPU with gloo: two processes
split every global batch and average the mask gradients; their plan equals one process's
with the same global batch and seed, and only rank 0 writes the checkpoint."""
from __future__ import annotations

import json
import os
import socket
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import DEMO, WIKI_TEST
from llrc_core import distributed

OPTIONS = dict(ratio=0.8, selection="any-k", objective="lm", steps=6, batch_size=4,
               hold_steps=2, seed=3)


def _plan(checkpoint: str | None = None, shard_over: int = 1, seen: dict | None = None,
          offload: str = "none", decomposition: str = "svd") -> dict:
    """The demo model's plan; ``shard_over`` > 1: factors sharded over that many processes,
    and ``seen`` gets, at the first step, each masked layer's local rows of U and V;
    ``offload="weights"``: the blocks onloaded in turn (``onload.py``)."""
    from llrc_core.models import load_model
    from llrc_core.onload import load_sequential
    from llrc_core.pipeline import calibrate, decompose_model, select_plan
    from llrc_core.placement import Placement
    torch.manual_seed(0)
    loaded = (load_sequential if offload == "weights" else load_model)(DEMO, "cpu")
    windows = calibrate(loaded, WIKI_TEST, 8, 32, seed=0)
    placement = Placement.for_run(torch.float32, "cpu", offload, shard_over=shard_over)
    dec = decompose_model(loaded.model, decomposition, windows, placement=placement)

    def look(event: dict) -> None:
        if seen is not None and event["type"] == "step" and event["step"] == 1:
            for t in dec.targets:                  # on the device, in CPU memory, whole
                layer, f = loaded.model.get_submodule(t.name), dec.factors[t.name]
                seen[t.name] = [list(layer.U.to_local().shape), list(layer.V.to_local().shape),
                                list(f.U.shape), list(f.V.shape), [t.m, f.rank, t.n]]
    plan = select_plan(loaded.model, dec, "llrc", windows, checkpoint=checkpoint,
                       checkpoint_every=1000, callback=look, **OPTIONS)
    return plan.to_dict()["layers"]


@contextmanager
def process_group(rank: int, world: int, port: int):
    """This spawned process as ``rank`` of a gloo group of ``world`` on ``port``, one thread,
    the group destroyed on the way out (every multi-process test's worker runs inside)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    assert distributed.init_from_env()
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, out: str, shard: bool = False,
            offload: str = "none") -> None:
    with process_group(rank, world, port):
        assert distributed.world_size() == world and distributed.rank() == rank
        seen: dict = {}
        from llrc_core import pipeline            # count the layers this process decomposes
        real, made = pipeline.decompose, []
        pipeline.decompose = lambda W, *a, **k: made.append(1) or real(W, *a, **k)
        layers = _plan(checkpoint=None if shard else os.path.join(out, "ck.pt"),
                       shard_over=world if shard else 1, seen=seen if shard else None,
                       offload=offload, decomposition="svd" if shard else "asvd")
        with open(os.path.join(out, f"plan{rank}.json"), "w") as f:
            json.dump(layers, f)
        seen["decomposed"] = len(made)
        if shard:
            seen["whole_after_forward"] = _whole_after_forward()
        with open(os.path.join(out, f"{'shards' if shard else 'made'}{rank}.json"), "w") as f:
            json.dump(seen, f)


def _block_stats() -> tuple[dict, int]:
    """The demo model's whitening and ASVD statistics over 8 windows (of the first layers of
    block 0 and the last layer), and the windows this process ran through each block."""
    from llrc_core import stats
    from llrc_core.models import find_targets, load_model
    from llrc_core.pipeline import calibrate
    loaded = load_model(DEMO, "cpu")
    windows = calibrate(loaded, WIKI_TEST, 8, 32, seed=0)
    targets = find_targets(loaded.model)
    real, rows = stats.run_block, []
    stats.run_block = lambda block, inp: rows.append(inp.hidden.shape[0]) or real(block, inp)
    try:
        got = stats.collect_stats(loaded.model, targets, windows, batch_size=3)
    finally:
        stats.run_block = real
    q, k, v = (got[t.name] for t in targets[:3])      # BERT's query, key, value: one input
    assert q is k is v and got[targets[3].name] is not q
    keep = [t.name for t in targets[:4]] + [targets[-1].name]
    return ({n: (got[n].tokens, got[n].gram, got[n].abs_sum) for n in keep},
            sum(rows) // (1 + targets[-1].block))


def _stats_worker(rank: int, world: int, port: int, out: str) -> None:
    with process_group(rank, world, port):
        with pytest.raises(ValueError, match="1 windows cannot be split over 2 processes: "
                           "raise --n-calib to at least 2"):
            distributed.my_share(torch.zeros(1, 8))
        made = (*_block_stats(), _unlike_sharing(rank))
        torch.save(made, os.path.join(out, f"stats{rank}.pt"))


def _unlike_sharing(rank: int) -> list[torch.Tensor]:
    """Two layers fed one tensor on rank 0 and two on rank 1: the ranks do not share alike,
    so each layer's statistics are summed alone (``distributed.agreed``)."""
    from llrc_core.stats import _Accumulator
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    acc = _Accumulator({"a": a, "b": b}, gram=True, absmean=False)
    x, y = torch.full((2, 3), 1.0 + rank), torch.full((2, 3), 10.0)
    with torch.no_grad():
        a(x), b(x if rank == 0 else y)
    acc.close()
    assert (acc.stats["a"] is acc.stats["b"]) == (rank == 0)
    got = acc.summed({"a": 3, "b": 3})
    assert got["a"] is not got["b"] and got["a"].tokens == got["b"].tokens == 4
    return [got["a"].gram, got["b"].gram]


def _whole_after_forward() -> bool:
    """Whether a sharded masked layer keeps its factors whole after a forward pass (FSDP2
    does so for a root module unless told to reshard)."""
    from torch.distributed.tensor import DTensor
    from llrc_core.decompose import Factors
    from llrc_core.masked import MaskedLowRank
    layer = MaskedLowRank(Factors(torch.ones(6, 3), torch.ones(3), torch.ones(3, 5), 0.0),
                          None, torch.float32, "cpu", sharded=True)
    distributed.shard_(layer, torch.device("cpu"))
    layer.mask = torch.ones(3, requires_grad=True)
    y = layer(torch.ones(2, 5))
    whole = not isinstance(layer.U, DTensor)
    y.sum().backward()
    return whole


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_share_and_grads_are_identities_outside_a_group():
    idx = torch.arange(5)
    assert not distributed.active() and distributed.world_size() == 1
    assert torch.equal(distributed.local(idx), idx) and distributed.share(idx) == 1.0
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    distributed.average_grads([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    assert distributed.mean(1.5) == 1.5 and not distributed.init_from_env()


def test_work_is_dealt_costliest_first_to_the_least_loaded_rank():
    """``deal``: the same owners on every rank from the costs alone, each rank's load as
    even as the items allow; a Llama-7B block's whitening puts the down layer (its 11008 x
    11008 Gram) alone on one of two processes, the other six on the other."""
    from llrc_core.decompose import work
    assert distributed.deal([1, 5, 2, 2], 2) == [1, 0, 1, 1]          # loads 5 and 5
    assert distributed.deal([3, 3, 3], 3) == [0, 1, 2]
    assert distributed.deal([4, 1, 2]) == [0, 0, 0]                    # outside a group
    d, i = 4096, 11008
    block = [(d, d)] * 4 + [(i, d), (i, d), (d, i)]                    # q k v o gate up down
    assert distributed.deal([work(m, n, "whiten") for m, n in block], 2) == [1] * 6 + [0]
    assert work(d, i, "whiten") > work(d, i, "svd") == d * i * d


@pytest.mark.slow
def test_two_gloo_processes_give_the_one_process_plan(tmp_path):
    """Two processes share the ASVD statistics (4 of the 8 windows each) and the
    decomposition (18 of the 36 layers each), then split every batch: the one-process plan."""
    torch.set_num_threads(1)
    one = _plan(decomposition="asvd")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    plans = [json.loads((tmp_path / f"plan{r}.json").read_text()) for r in range(2)]
    assert plans[0] == plans[1]                       # every rank ends with the same plan
    assert plans[0] == json.loads(json.dumps(one))    # ... the one-process plan
    assert [json.loads((tmp_path / f"made{r}.json").read_text())["decomposed"]
            for r in range(2)] == [18, 18]
    assert (tmp_path / "ck.pt").exists()              # written once, by rank 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ck.pt", "made0.json", "made1.json", "plan0.json", "plan1.json"]


def _polished() -> dict:
    """Uniform ranks at rho 0.6 on the demo model's SVD factors, polished for 2 rounds on 8
    windows of 64 tokens, 2 a batch: the plan's layers and its loss before and after."""
    from llrc_core.models import load_model
    from llrc_core.pipeline import calibrate, decompose_model, select_plan
    from llrc_core.polish import PolishConfig, polish_plan
    loaded = load_model(DEMO, "cpu")
    dec = decompose_model(loaded.model, "svd", None)
    start = select_plan(loaded.model, dec, "uniform", ratio=0.6)
    ids = calibrate(loaded, WIKI_TEST, 8, 64, seed=1)
    plan = polish_plan(loaded.model, dec, start, ids,
                       PolishConfig(rounds=2, pairs=3, batch_size=2))
    meta = plan.meta["polish"]
    return {"layers": plan.to_dict()["layers"], "moves": meta["moves"],
            "losses": [meta["loss_before"], meta["loss_after"]]}


def _polish_worker(rank: int, world: int, port: int, out: str) -> None:
    with process_group(rank, world, port):
        with open(os.path.join(out, f"polish{rank}.json"), "w") as f:
            json.dump(_polished(), f)
        from llrc_core.polish import PolishConfig, polish_plan
        with pytest.raises(ValueError, match="last batch of 1 for 2 processes"):
            polish_plan(_Causal(), None, None, torch.zeros(5, 4, dtype=torch.long),
                        PolishConfig(batch_size=2))


class _Causal(torch.nn.Linear):
    def __init__(self):
        super().__init__(2, 2)

    def can_generate(self) -> bool:
        return True


def test_two_processes_polish_to_the_one_process_plan(tmp_path):
    """Under torchrun each process measures the loss on its part of every batch and the sums
    are all-reduced: both processes make the one-process moves, the same losses to float
    rounding; a window count that leaves a process no window in the last batch is refused."""
    torch.set_num_threads(1)
    one = _polished()
    mp.spawn(_polish_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    two = [json.loads((tmp_path / f"polish{r}.json").read_text()) for r in range(2)]
    assert two[0] == two[1] and one["moves"] >= 1
    assert two[0]["layers"] == json.loads(json.dumps(one["layers"]))
    assert two[0]["losses"] == pytest.approx(one["losses"], abs=1e-5)


@pytest.mark.slow
def test_two_processes_share_the_statistics_pass(tmp_path):
    """Each of two processes runs 4 of the 8 calibration windows through every block (one
    process: all 8), and both end with the one-process sums: the same token counts, and
    Gram matrices and absolute sums equal up to float32 rounding (each batch's product runs
    in float32, and the batches are cut differently), the same on both processes."""
    torch.set_num_threads(1)
    one, rows = _block_stats()
    assert rows == 8
    mp.spawn(_stats_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    two = [torch.load(tmp_path / f"stats{r}.pt", weights_only=True) for r in range(2)]
    assert [r for _, r, _ in two] == [4, 4]
    for _, _, (a, b) in two:           # rank 0: 2 rows of 1s (a, b); rank 1: of 2s (a), 10s (b)
        assert torch.equal(a, torch.full((3, 3), 2.0 + 8.0, dtype=torch.float64))
        assert torch.equal(b, torch.full((3, 3), 2.0 + 200.0, dtype=torch.float64))
    for name, (tokens, gram, abs_sum) in one.items():
        for got, _, _ in two:
            t, g, a = got[name]
            assert t == tokens == 8 * 32
            assert ((g - gram).norm() / gram.norm()).item() < 1e-6
            assert ((a - abs_sum).norm() / abs_sum.norm()).item() < 1e-6
        assert torch.equal(two[0][0][name][1], two[1][0][name][1])


@pytest.mark.slow
@pytest.mark.parametrize("offload", ["none", "weights"])
def test_factors_sharded_over_two_processes_give_the_one_process_plan(tmp_path, offload):
    """FSDP2 (``--shard-factors``): each process decomposes half the layers and receives the
    others, keeps its half of every layer's U and V rows (split as ``torch.chunk`` splits
    them), in CPU memory after decomposing and on the device while masks train, and the plan
    is the one-process plan, unsharded. Also with the dense blocks onloaded in turn
    (``--offload weights``: the 70B case)."""
    torch.set_num_threads(1)
    one = _plan()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), True, offload), nprocs=2,
             join=True)
    plans = [json.loads((tmp_path / f"plan{r}.json").read_text()) for r in range(2)]
    assert plans[0] == plans[1] == json.loads(json.dumps(one))
    shards = [json.loads((tmp_path / f"shards{r}.json").read_text()) for r in range(2)]
    assert [s.pop("whole_after_forward") for s in shards] == [False, False]
    assert [s.pop("decomposed") for s in shards] == [18, 18]   # the 36 layers dealt out
    assert len(shards[0]) == 36
    for name, (*_, (m, r, n)) in shards[0].items():
        rows_u, rows_v = [len(c) for c in torch.empty(m).chunk(2)], \
            [len(c) for c in torch.empty(r).chunk(2)]
        for k in range(2):
            u, v, u_host, v_host, _ = shards[k][name]
            assert u == u_host == [rows_u[k], r] and v == v_host == [rows_v[k], n]


def test_sharded_factors_need_a_process_group_and_replace_offloaded_ones(tmp_path, capsys):
    from llrc_core.cli import main
    from llrc_core.placement import Placement
    out = tmp_path / "out"
    assert main(["compress", "--model", str(DEMO), "--method", "llrc", "--ratio", "0.8",
                 "--calib", str(WIKI_TEST), "--out", str(out), "--shard-factors"]) == 2
    assert "launch with torchrun --nproc_per_node N" in capsys.readouterr().err
    assert not out.exists()
    assert main(["compress", "--model", str(DEMO), "--method", "strs", "--ratio", "0.8",
                 "--calib", str(WIKI_TEST), "--out", str(out), "--shard-factors"]) == 2
    assert "strs trains none" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ValueError, match="torchrun --nproc_per_node"):
        distributed.shard_(torch.nn.Linear(2, 2), torch.device("cpu"))
    with pytest.raises(ValueError, match="replace --offload factors"):
        Placement.for_run(torch.float32, "cpu", "factors", shard_over=2)
    p = Placement.for_run(torch.bfloat16, "cpu", "targets", shard_over=4)
    assert p.sharded and not p.offload_factors and p.to_dict()["shard_factors_over"] == 4
    p = Placement.for_run(torch.bfloat16, "cuda", "weights", shard_over=4)
    assert (p.offload, p.offload_factors, p.offload_targets) == ("weights", False, True)


@pytest.mark.slow
@pytest.mark.parametrize("shard", [[], ["--shard-factors"]], ids=["replicated", "sharded"])
def test_torchrun_compress_writes_once_with_the_one_process_plan(tmp_path, shard):
    """``torchrun --nproc_per_node 2 -m llrc_core compress``: the folder rank 0 writes holds
    the plan of a one-process run; no other rank writes anything. With ``--shard-factors``
    (FSDP2) too, and its report says so."""
    import subprocess
    import sys
    args = ["compress", "--model", str(DEMO), "--method", "llrc", "--ratio", "0.8",
            "--selection", "any-k", "--calib", str(WIKI_TEST), "--n-calib", "8",
            "--seq-len", "32", "--decomposition", "svd", "--batch-size", "4",
            "--opt", "objective=lm", "--opt", "steps=4", "--opt", "hold_steps=2",
            "--opt", "batch_size=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "llrc_core", *args, "--out",
                          str(tmp_path / "one")], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                          "2", "--master_port", str(_free_port()), "-m", "llrc_core", *args,
                          *shard, "--out", str(tmp_path / "two")], capture_output=True,
                         text=True, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["placement"]["shard_factors_over"] == (2 if shard else 1)
    assert two.stdout.count('"out"') == 1                  # one result, from rank 0
    plans = [json.loads((tmp_path / d / "rank_plan.json").read_text())["layers"]
             for d in ("one", "two")]
    assert plans[0] == plans[1]
    from safetensors.torch import load_file      # sharded: each layer gathered whole to apply
    one_w, two_w = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert one_w.keys() == two_w.keys()
    assert all(torch.equal(one_w[k], two_w[k]) for k in one_w)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
