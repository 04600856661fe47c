"""The memory planner counts from the config alone (a folder with only config.json), asserted
against counts worked out by hand for Llama-2-7B, 13B and 70B; ``compress`` refuses a run
whose plan does not fit, before any weight is read."""
from __future__ import annotations

import json
import math

import pytest
import transformers

from llrc_core import models, planner, preflight, spread
from llrc_core.cli import main
from llrc_core.errors import LLRCError
from llrc_core.polish import PolishConfig

# name -> (hidden, intermediate, blocks, heads, kv heads, vocab, params as published)
LLAMA2 = {"7b": (4096, 11008, 32, 32, 32, 32000, 6_738_415_616),
          "13b": (5120, 13824, 40, 40, 40, 32000, 13_015_864_320),
          "70b": (8192, 28672, 80, 64, 8, 32000, 68_976_648_192)}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    for name, (d, i, n, h, kv, v, _) in LLAMA2.items():
        transformers.LlamaConfig(hidden_size=d, intermediate_size=i, num_hidden_layers=n,
                                 num_attention_heads=h, num_key_value_heads=kv,
                                 vocab_size=v).save_pretrained(root / name)
    return root


def by_hand(d, i, n, kv_dim):
    """Per model: target layers, dense weights and full-rank factor numbers r (m + n)."""
    shapes = [(d, d), (kv_dim, d), (kv_dim, d), (d, d), (i, d), (i, d), (d, i)]  # q k v o g u d
    dense = n * sum(m * k for m, k in shapes)
    factors = n * sum(min(m, k) * (m + k) for m, k in shapes)
    return 7 * n, dense, factors, n * sum(min(m, k) for m, k in shapes)


@pytest.mark.parametrize("name", list(LLAMA2))
def test_counts_match_the_hand_count(configs, name):
    """Everything on one GPU (offload none): bf16 factors stored once and used in place by
    the masked layers, the dense originals of the swapped layers parked in CPU memory."""
    d, i, n, h, kv, v, params = LLAMA2[name]
    plan = planner.plan_memory(str(configs / name), "bfloat16", "llrc", "whiten",
                               n_calib=64, seq_len=512, batch_size=4, gpus=1, gpu_memory=80,
                               offload="none")
    f = plan.facts
    targets, dense, factors, spectrum = by_hand(d, i, n, kv * d // h)
    assert (f["params"], f["targets"], f["dense_linear"], f["factor_numbers"]) == \
        (params, targets, dense, factors)
    assert f["placement"] == {"factor_dtype": "bfloat16", "offload": "none",
                              "park_dense": True, "shard_factors_over": 1,
                              "device": "one GPU"}
    assert plan.phases["load"] == 2 * params                                   # bf16 weights
    assert f["factors_stored_bytes"] == 2 * factors + 4 * spectrum
    tokens = 64 * 512
    # a float64 Gram per input: q/k/v share one, gate/up one, o and down their own
    assert f["stats_block_bytes"] == 8 * (3 * d * d + i * i)
    assert f["distill_targets_bytes"] == 2 * tokens * d * 2     # middle + last, bf16
    assert plan.phases["statistics"] == 2 * params + 2 * tokens * d * 2 + \
        f["stats_block_bytes"]
    # float64 whitening of the widest layer (down_proj, m = d, n = i, r = d): L (n x n),
    # W L (m x n) and LAPACK's copy of it, U, Vh, V and its solve, the SVD's 7 r^2 workspace,
    # then the float32 factors
    work = 8 * (i * i + 2 * d * i + d * d + 3 * d * i + 7 * d * d) + 4 * d * (d + i)
    assert f["svd_work_bytes"] == work
    assert plan.phases["decomposition"] == 2 * params + 2 * factors + 4 * spectrum + \
        f["stats_block_bytes"] + 2 * tokens * d * 2 + work
    # LLRC trains on 128 tokens of each window (train_seq_len) in batches of 4; every masked
    # layer keeps two rank-size values per token for the backward
    assert f["train_tokens_per_step"] == 4 * 128
    assert f["activations_bytes_estimate"] == 4 * 128 * 2 * (n * (12 * d + 5 * i)
                                                             + 2 * spectrum)
    sel = (2 * params - 2 * dense + 2 * factors + 4 * spectrum + 2 * spectrum
           + f["distill_targets_bytes"] + f["activations_bytes_estimate"] + 12 * spectrum)
    assert plan.phases["selection"] == sel
    assert plan.cpu_phases["selection"] == 2 * dense                  # the parked originals
    shapes = [(d, d), (kv * d // h, d), (kv * d // h, d), (d, d), (i, d), (i, d), (d, i)]
    kept_layers = [2 * min(m * k, min(m, k) * (m + k)) for m, k in shapes]
    kept = n * sum(kept_layers)                  # kept-rank factors: at most the dense size
    # apply: the factors on the GPU and one layer's kept-rank factors being made; after it,
    # the dense originals wait in CPU memory
    assert plan.phases["apply"] == 2 * params + 2 * factors + 4 * spectrum + max(kept_layers)
    assert plan.phases["export"] == 2 * params - 2 * dense + kept
    logits_and_block = 4 * 512 * (4 * v + 2 * (4 * d + 3 * i))       # one evaluation batch
    assert plan.phases["evaluate"] == plan.phases["export"] + logits_and_block
    assert plan.cpu_phases["evaluate"] == 2 * dense
    assert plan.peak_gpu_bytes == max(plan.phases.values())


def test_factors_sharded_over_processes_hold_a_share_and_one_layer_whole(configs):
    """``--shard-factors N``: each process keeps its 1/N of the factors in CPU memory; while
    masks train its GPU holds that share (bf16) and one layer's whole factors (the largest:
    gate, up or down of 7B, 4096 x (11008 + 4096)), in place of all of them."""
    d, i, n, h, kv, v, params = LLAMA2["7b"]
    path = str(configs / "7b")
    full = planner.plan_memory(path, gpu_memory=80, offload="none")
    four = planner.plan_memory(path, gpu_memory=80, offload="none", shard_over=4)
    _, dense, factors, spectrum = by_hand(d, i, n, d)
    assert four.placement.sharded and four.facts["placement"]["shard_factors_over"] == 4
    # decomposing, the layers of a block are dealt by their whitening work: down alone, up
    # alone, gate with o, q with k and v; the fullest holds q's, k's and v's factors in
    # bf16, and the hidden states of its 16 of the 64 windows (input and output of a block)
    held = 2 * 3 * d * 2 * d
    assert four.phases["decomposition"] == full.phases["decomposition"] - 2 * factors - \
        4 * spectrum + held - 2 * 2 * (64 - 16) * 512 * d
    assert four.facts["hidden_states_block_bytes"] == 2 * 2 * 16 * 512 * d
    assert four.phases["selection"] == full.phases["selection"] - 2 * factors - \
        4 * spectrum + -(-2 * factors // 4) + 2 * d * (i + d)
    assert four.cpu_phases["selection"] == full.cpu_phases["selection"] + \
        -(-2 * factors // 4) + 4 * spectrum           # this process's rows, the whole spectra
    # four replicated processes (data parallel): the same share of the statistics and of the
    # decomposition; each holds every factor while masks train, as one process does
    dp = planner.plan_memory(path, gpu_memory=80, offload="none", processes=4)
    assert not dp.placement.sharded and dp.facts["processes"] == 4
    assert dp.phases["decomposition"] == full.phases["decomposition"] + held - \
        2 * 2 * (64 - 16) * 512 * d
    assert dp.phases["selection"] == full.phases["selection"]
    assert "each of the 4 processes" in dp.table()
    assert planner.plan_memory(path, gpu_memory=80, shard_over=4).placement.offload == "none"
    with pytest.raises(ValueError, match="one GPU per process"):
        planner.plan_memory(path, gpus=2, shard_over=4)
    with pytest.raises(ValueError, match="replace --offload factors"):
        planner.plan_memory(path, offload="factors", shard_over=4)
    # 70B with its blocks onloaded in turn and the factors sharded: on 4 x 80 GB each GPU
    # holds the frame, its quarter of the factors and one layer whole, besides the step
    d, i, n, h, kv, v, params = LLAMA2["70b"]
    seventy = str(configs / "70b")
    one = planner.plan_memory(seventy, gpu_memory=80, offload="weights")
    four = planner.plan_memory(seventy, gpu_memory=80, offload="weights", shard_over=4)
    _, _, factors, _ = by_hand(d, i, n, kv * d // h)
    block = sum(min(m, k) * (m + k) for m, k in
                [(d, d), (kv * d // h, d), (kv * d // h, d), (d, d), (i, d), (i, d), (d, i)])
    assert four.phases["selection"] == one.phases["selection"] - 2 * block + \
        -(-2 * factors // 4) + 2 * d * (i + d)
    assert four.fits and four.peak_phase == "selection" and four.peak_bytes < 0.95 * 80 * 2 ** 30


def test_seven_b_figures_of_the_issue(configs):
    """Issue 11's own count of the old data path: U and V of Llama-2-7B hold 10.2 G numbers
    (41 GB in float32) next to 13.5 GB of bf16 weights; stored once in bf16 they are 20.5 GB.
    Its goals, as planned: 7B within 40 GB on one GPU, 13B within 75 GB. Whitening (float64
    work on the widest layer, at the end of decomposition) with everything on the GPU just
    meets 7B's (39.95 GB: q/k/v and gate/up share one Gram) and misses 13B's by 0.5 %; ASVD
    meets both; with the ceiling given, the planner offloads the factors."""
    f = planner.plan_memory(str(configs / "7b")).facts
    assert round(f["factor_numbers"] / 1e9, 1) == 10.2
    assert round(4 * f["factor_numbers"] / 1e9) == 41
    assert round(f["weights_bytes"] / 1e9, 1) == 13.5
    assert round(f["factors_stored_bytes"] / 1e9, 1) == 20.5
    for name, goal, whitened in (("7b", 40e9, (0.99, 1.0)), ("13b", 75e9, (1.0, 1.01))):
        whiten = planner.plan_memory(str(configs / name), gpu_memory=80, offload="none")
        asvd = planner.plan_memory(str(configs / name), decomposition="asvd", gpu_memory=80,
                                   offload="none")
        low, high = whitened
        assert whiten.peak_phase == "decomposition"
        assert low * goal < whiten.peak_bytes < high * goal
        assert asvd.peak_bytes <= goal
        capped = planner.plan_memory(str(configs / name), gpu_memory=goal / 2 ** 30)
        assert capped.fits and capped.placement.offload == "factors"
        assert capped.peak_bytes <= 0.95 * goal


def test_auto_offload_takes_the_least_that_fits(configs):
    """On smaller GPUs the planner moves targets, then factors, to CPU memory; the selection
    phase then holds no factors but one block's fetched copies."""
    path = str(configs / "7b")
    full = planner.plan_memory(path, gpu_memory=80, offload="none")
    lean = planner.plan_memory(path, gpu_memory=30)
    assert lean.placement.offload == "factors" and lean.fits
    assert lean.phases["selection"] < full.phases["selection"] - 15 * 2 ** 30
    assert lean.cpu_phases["selection"] == lean.facts["factors_stored_bytes"] + \
        lean.facts["parked_dense_bytes"] + lean.facts["distill_targets_bytes"]
    d, inter = 4096, 11008
    block = 4 * d * 2 * d + 3 * d * (d + inter)                      # one block's factors
    assert lean.facts["factor_copies_bytes"] == 2 * block + 2 * lean.facts["spectrum_numbers"]
    seventy = planner.plan_memory(str(configs / "70b"), gpu_memory=80)
    assert seventy.fits and seventy.placement.offload == "weights"   # blocks onloaded in turn
    assert not planner.plan_memory(str(configs / "70b"), gpu_memory=80, offload="factors").fits
    cpu = planner.plan_memory(path, gpus=0, gpu_memory=None)
    assert cpu.placement.to_dict() == {"factor_dtype": "float32", "offload": "none",
                                       "park_dense": False, "shard_factors_over": 1}


def test_the_refit_pass_is_counted_by_hand(configs, capsys):
    """``compress --refit`` on Llama-2-7B (bf16, 64 x 512 tokens, 8 windows a batch): the
    applied model, three block states of every window, two float64 Grams of down_proj's
    11008 inputs, one batch's inputs of it (bf16 and float64, dense and compressed) with a
    block's intermediates, the solve of down_proj (at one value under break-even, the most
    a low-rank layer keeps), and on a GPU one block's dense originals fetched back. It rules
    out sequential onloading, so a 70B on one 80 GB GPU no longer fits, and without --refit
    no refit phase is counted."""
    d, i = 4096, 11008
    path = str(configs / "7b")
    base = planner.plan_memory(path, gpu_memory=80, offload="none")
    plan = planner.plan_memory(path, gpu_memory=80, offload="none", refit_batch_size=8)
    assert "refit" not in base.phases and base.phases == {k: v for k, v in plan.phases.items()
                                                          if k != "refit"}
    tokens, batch = 64 * 512, 8 * 512
    k = math.ceil(d * i / (d + i)) - 1          # the most values a low-rank down_proj keeps
    work = (3 * tokens * d * 2 + 2 * 8 * i * i + batch * (2 * 10 * i + 2 * (4 * d + 3 * i))
            + 18 * d * i + 8 * k * (2 * i + d))
    block = 2 * (4 * d * d + 3 * d * i)
    assert plan.facts["refit_bytes"] == work
    assert plan.phases["refit"] == plan.phases["export"] + work + block
    assert 17.5 * 2 ** 30 < plan.phases["refit"] < 18.5 * 2 ** 30        # about 18 GiB
    assert plan.cpu_phases["refit"] == plan.cpu_phases["evaluate"]      # the parked originals
    cpu = planner.plan_memory(path, gpus=0, gpu_memory=None, refit_batch_size=8)
    assert cpu.phases["refit"] == cpu.phases["export"] + work            # originals in memory
    seventy = planner.plan_memory(str(configs / "70b"), gpu_memory=80, refit_batch_size=8)
    assert seventy.placement.offload != "weights" and not seventy.fits
    with pytest.raises(ValueError, match="--refit needs the weights in memory"):
        planner.plan_memory(path, offload="weights", refit_batch_size=8)
    assert main(["plan-memory", "--model", path, "--refit", "--batch-size", "8", "--json",
                 "--offload", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["phases"]["refit"] == plan.phases["refit"]
    # Refitted on 512 windows of its own (--refit-windows): the three block states are of
    # 512 x 512 tokens; the rest of the pass is the same.
    own = planner.plan_memory(path, gpu_memory=80, offload="none", refit_batch_size=8,
                              refit_windows=512)
    assert own.facts["refit_bytes"] == work + 3 * (512 - 64) * 512 * d * 2
    assert own.phases["refit"] == plan.phases["refit"] + 3 * (512 - 64) * 512 * d * 2
    assert {k: v for k, v in own.phases.items() if k != "refit"} == base.phases
    assert main(["plan-memory", "--model", path, "--refit", "--refit-windows", "512",
                 "--batch-size", "8", "--json", "--offload", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["phases"]["refit"] == own.phases["refit"]


def test_the_polish_pass_is_counted_by_hand(configs, capsys):
    """``compress --polish`` on Llama-2-7B (bf16, one GPU): the masked layers of a learned
    selection (the dense originals parked in CPU memory, a bf16 copy of every spectrum) with
    no distillation targets and no optimiser state, for one polish batch of 8 x 256 tokens:
    per token 12 hidden-size and 5 intermediate-size values a block and two rank-size values
    a layer, the logits and their gradient in bf16 with four float32 arrays of their size,
    a 0/1 mask and its gradient per layer.
    Also for a method that trains nothing (SVD-LLM), and only when asked."""
    d, i, n, v = 4096, 11008, 32, 32000
    path = str(configs / "7b")
    _, dense, _, spectrum = by_hand(d, i, n, d)
    tokens = 8 * 256
    act = tokens * 2 * (n * (12 * d + 5 * i) + 2 * spectrum) + tokens * v * (2 * 2 + 16)
    for method in ("llrc", "svdllm"):
        base = planner.plan_memory(path, method=method, gpu_memory=80, offload="none")
        plan = planner.plan_memory(path, method=method, gpu_memory=80, offload="none",
                                   polish=PolishConfig(windows=12))
        assert "polish" not in base.phases and "polish" not in base.cpu_phases
        assert base.phases == {k: v for k, v in plan.phases.items() if k != "polish"}
        f = plan.facts
        assert plan.phases["polish"] == (f["weights_bytes"] - 2 * dense
                                         + f["factors_stored_bytes"] + 2 * spectrum + act
                                         + 2 * 2 * spectrum)
        assert plan.cpu_phases["polish"] == 2 * dense                  # the parked originals
    assert 40 * 2 ** 30 < plan.phases["polish"] < 41 * 2 ** 30         # about 40.5 GiB
    llrc = planner.plan_memory(path, gpu_memory=80, offload="none")
    lf = llrc.facts                     # polish: LLRC's selection less its training state
    assert plan.phases["polish"] - llrc.phases["selection"] == act + 4 * spectrum - (
        lf["distill_targets_bytes"] + lf["activations_bytes_estimate"] + lf["mask_state_bytes"])
    assert main(["plan-memory", "--model", path, "--method", "svdllm", "--polish", "12",
                 "--offload", "none", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["phases"]["polish"] == plan.phases["polish"]


def test_an_encoders_polish_counts_the_dense_last_states_and_no_logits():
    """MiniLM (float32, on the host): an encoder's polish keeps the dense model's last state
    of every polish window as its targets (windows x tokens x 384 x 4 bytes) and has no
    logits: a bigger batch adds its activations alone (per token 12 hidden-size and 5
    intermediate-size values a block, two rank-size values a layer), not 30,522 logits a
    token."""
    from llrc_core.fidelity import resolve_model
    minilm = resolve_model("minilm")

    def polish(**kw):
        return planner.plan_memory(minilm, "float32", "llrc", "asvd", gpus=0, gpu_memory=None,
                                   polish=PolishConfig(**kw)).phases["polish"]
    d, i, blocks = 384, 1536, 6
    spectrum = blocks * (4 * d + 2 * d)                  # q, k, v, o; intermediate, output
    assert polish(windows=64) - polish(windows=32) == 32 * 256 * d * 4
    assert polish(windows=64, batch_size=8) - polish(windows=64, batch_size=4) == \
        4 * 256 * 4 * (blocks * (12 * d + 5 * i) + 2 * spectrum)


def test_sequential_onloading_holds_the_frame_and_one_layer(configs):
    """Llama-2-70B on one 80 GB GPU with its blocks in CPU memory (``onload.py``), counted by
    hand: the device holds the embeddings, LM head and final norm, plus one layer's weights
    (gate/up/down: 28672 x 8192) with one block's calibration work at a time; everything
    else waits in CPU memory."""
    d, i, n, h, kv, v, params = LLAMA2["70b"]
    plan = planner.plan_memory(str(configs / "70b"), gpu_memory=80, offload="weights")
    f = plan.facts
    frame, layer = 2 * (2 * v * d + d), 2 * i * d                   # bf16 bytes
    tokens = 64 * 512
    work = 2 * tokens * d * 2 + f["stats_block_bytes"]             # hidden states in and out
    assert (f["frame_bytes"], f["layer_bytes"]) == (frame, layer)
    assert f["block_rest_bytes"] == 2 * n * 2 * d                  # two RMSNorms per block
    assert plan.phases["load"] == frame and plan.phases["export"] == 0
    assert plan.phases["statistics"] == frame + layer + work
    assert plan.phases["decomposition"] == frame + layer + work + f["svd_work_bytes"]
    assert plan.phases["selection"] == frame + f["block_rest_bytes"] + \
        f["factor_copies_bytes"] + f["activations_bytes_estimate"] + f["mask_state_bytes"]
    home = 2 * params - frame
    assert plan.cpu_phases["load"] == home
    assert plan.cpu_phases["selection"] == home + f["factors_stored_bytes"] + \
        f["distill_targets_bytes"]
    # export: the dense weights (kept for restore_), the kept-rank factors, and one 5 GB
    # shard being written (shards.py), not the state dict a second time
    assert plan.cpu_phases["export"] == 2 * params + f["kept_bound_bytes"] + 5 * 10 ** 9
    assert plan.fits and plan.peak_bytes < 32 * 2 ** 30 and plan.peak_phase == "decomposition"
    assert "onloaded one layer at a time" in plan.table()


def test_seventy_b_is_planned_on_four_gpus_with_accelerate(configs):
    """``--gpus 4``: accelerate places whole blocks across the GPUs (balanced); with factors
    offloaded every GPU fits in 80 GB; each GPU's load is the weights of what it was given,
    and together they are the whole model."""
    plan = planner.plan_memory(str(configs / "70b"), gpus=4, gpu_memory=80)
    f = plan.facts
    assert plan.fits and plan.placement.offload == "factors"
    assert set(f["device_map"]) == {"0", "1", "2", "3"} and sum(f["device_map"].values()) == 80
    assert f["unplaced_bytes"] == 0
    per = f["per_gpu"]
    assert sum(per[g]["load"] for g in per) == 2 * LLAMA2["70b"][-1]
    work = f["hidden_states_block_bytes"] + f["stats_block_bytes"] + f["svd_work_bytes"]
    assert all(per[g]["decomposition"] == per[g]["load"] + work for g in per)
    assert plan.peak_bytes == max(p for g in per for p in per[g].values()) < 0.95 * 80 * 2 ** 30
    full = planner.plan_memory(str(configs / "70b"), gpus=4, gpu_memory=80, offload="none")
    assert not full.fits and full.facts["unplaced_bytes"] > 0      # weights + factors: too big
    eight = planner.plan_memory(str(configs / "70b"), gpus=8, gpu_memory=80)
    assert eight.fits and eight.placement.offload == "none"
    assert "blocks per GPU (accelerate)" in plan.table()
    dmap = spread.placed(plan.facts)             # the map `compress --gpus 4` loads with
    names = [n for n, _ in models.skeleton(str(configs / "70b")).named_parameters()]
    owners = {n: [k for k in dmap if not k or n == k or n.startswith(k + ".")] for n in names}
    assert all(len(o) == 1 for o in owners.values())              # every weight, once
    assert {dmap[k] for k in dmap if k.startswith("model.layers.")} == {0, 1, 2, 3}
    with pytest.raises(LLRCError, match=r"left \['lm_head'\] in CPU memory.*--offload weights"):
        spread.placed({**plan.facts, "placed_modules": {**dmap, "lm_head": "cpu"}})


def test_a_non_learned_method_selects_with_the_weights_and_factors_only(configs):
    """No targets, activations or mask state: SVD-LLM's selection phase is the weights and
    the stored factors; LLRC's adds them and parks the dense originals."""
    svdllm = planner.plan_memory(str(configs / "7b"), method="svdllm", offload="none")
    llrc = planner.plan_memory(str(configs / "7b"), method="llrc", offload="none")
    f = llrc.facts
    assert svdllm.phases["selection"] == f["weights_bytes"] + f["factors_stored_bytes"]
    assert "distill_targets_bytes" in f and "parked_dense_bytes" not in svdllm.facts
    assert llrc.phases["selection"] - svdllm.phases["selection"] == \
        (f["factor_copies_bytes"] - f["parked_dense_bytes"] + f["distill_targets_bytes"]
         + f["activations_bytes_estimate"] + f["mask_state_bytes"])


def test_cli_plan_memory_json(configs, capsys):
    assert main(["plan-memory", "--model", str(configs / "70b"), "--json",
                 "--gpu-memory", "24"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"peak_gpu_bytes", "fits", "phases", "placement"} <= set(out)
    assert set(out["phases"]) == set(planner.PHASES) - {"refit", "polish"}
    assert out["fits"] is False
    assert out["peak_gpu_bytes"] == max(out["phases"].values())
    assert main(["plan-memory", "--model", str(configs / "7b"), "--offload", "targets",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["placement"]["offload"] == "targets"
    assert main(["plan-memory", "--model", str(configs / "70b"), "--gpu-memory", "24"]) == 0
    table = capsys.readouterr().out
    assert "does NOT fit" in table and "offload weights" in table


def test_compress_refuses_a_plan_that_does_not_fit(configs, tmp_path, monkeypatch, capsys):
    from conftest import WIKI_VALID, tiny_model, tiny_tokenizer
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    monkeypatch.setattr(preflight, "device_memory_gib", lambda device, gpus=1: (0, 1e-4))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("weights were read"))
    argv = ["compress", "--model", str(tmp_path / "tiny"), "--calib", str(WIKI_VALID),
            "--n-calib", "4", "--seq-len", "16", "--ratio", "0.8", "--method", "llrc",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs" in err and "more than this machine's" in err and "--batch-size" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seq_len,expected", [(2048, 16), (128, 108), (512, 27)])
def test_default_calibration_makes_every_gram_full_rank(configs, seq_len, expected):
    """``compare``'s default window count: 1.25 x the widest input (Llama-2-7B's down_proj,
    11008) in tokens, at least 16 windows."""
    from llrc_core.models import skeleton
    from llrc_core.pipeline import full_rank_windows
    n = full_rank_windows(skeleton(configs / "7b"), seq_len)
    assert n == expected and n * seq_len >= 1.25 * 11008


@pytest.mark.slow
def test_measured_peaks_match_the_plan_on_a_medium_llama():
    """``bench/memory.py`` on llama-medium (167 M parameters, float32, random weights): the
    loaded weights, LLRC's selection phase (the phase the issue's CPU goal names), a polish
    round and the refit pass within 15 % of the planner's host bytes. The other phases are reported in
    bench/README.md (decomposition 1.16x and apply 1.18x there)."""
    import subprocess
    import sys
    from conftest import ROOT
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--worker",
                           "--preset", "llama-medium", "--dtype", "float32", "--decomposition",
                           "svd", "--steps", "2", "--refit", "--polish"],
                          capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    phases = json.loads(proc.stdout.strip().splitlines()[-1])["phases"]
    assert 0.95 <= phases["load"]["measured_over_planned"] <= 1.05
    assert 0.85 <= phases["selection"]["measured_over_planned"] <= 1.15
    assert 0.85 <= phases["refit"]["measured_over_planned"] <= 1.15
    assert 0.85 <= phases["polish"]["measured_over_planned"] <= 1.15
