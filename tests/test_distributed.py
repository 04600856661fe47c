"""Data parallel mask training (``llrc_core.distributed``) on CPU with gloo: two processes
split every global batch and average the mask gradients; their plan equals one process's
with the same global batch and seed, and only rank 0 writes the checkpoint."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import DEMO, WIKI_TEST
from llrc_core import distributed

OPTIONS = dict(ratio=0.8, selection="any-k", objective="lm", steps=6, batch_size=4,
               hold_steps=2, seed=3)


def _plan(checkpoint: str | None = None) -> dict:
    from llrc_core.models import load_model
    from llrc_core.pipeline import calibrate, decompose_model, select_plan
    torch.manual_seed(0)
    loaded = load_model(DEMO, "cpu")
    windows = calibrate(loaded, WIKI_TEST, 8, 32, seed=0)
    dec = decompose_model(loaded.model, "svd")
    plan = select_plan(loaded.model, dec, "llrc", windows, checkpoint=checkpoint,
                       checkpoint_every=1000, **OPTIONS)
    return plan.to_dict()["layers"]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    assert distributed.init_from_env()
    try:
        assert distributed.world_size() == world and distributed.rank() == rank
        layers = _plan(checkpoint=os.path.join(out, "ck.pt"))
        with open(os.path.join(out, f"plan{rank}.json"), "w") as f:
            json.dump(layers, f)
    finally:
        dist.destroy_process_group()


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


@pytest.mark.slow
def test_two_gloo_processes_give_the_one_process_plan(tmp_path):
    torch.set_num_threads(1)
    one = _plan()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    plans = [json.loads((tmp_path / f"plan{r}.json").read_text()) for r in range(2)]
    assert plans[0] == plans[1]                       # every rank ends with the same plan
    assert plans[0] == json.loads(json.dumps(one))    # ... the one-process plan
    assert (tmp_path / "ck.pt").exists()              # written once, by rank 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt", "plan0.json", "plan1.json"]


@pytest.mark.slow
def test_torchrun_compress_writes_once_with_the_one_process_plan(tmp_path):
    """``torchrun --nproc_per_node 2 -m llrc_core compress``: the folder rank 0 writes holds
    the plan of a one-process run; no other rank writes anything."""
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
                          "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count('"out"') == 1                  # one result, from rank 0
    plans = [json.loads((tmp_path / d / "rank_plan.json").read_text())["layers"]
             for d in ("one", "two")]
    assert plans[0] == plans[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
