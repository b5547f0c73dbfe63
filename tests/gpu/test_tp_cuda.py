"""Tensor parallelism on the CUDA backend (NCCL, one process driving N GPUs): against the one-GPU
plan, against the simulated ranks of the reference backend, against HF, graph replay, and the
N = 1 NCCL path. Tests that need two GPUs skip on a one-GPU machine."""

import numpy as np
import pytest

import llamagraph
import models
from numerics import DECODE, PROMPTS, check_against_hf, rel_err

pytestmark = pytest.mark.gpu


def _gpus() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no cupy, no driver: the conftest skips every test here anyway
        return 0


two_gpus = pytest.mark.skipif("_gpus() < 2", reason="needs two GPUs")

def _steps(plan, n=8):
    """Logits of the packed prefill of PROMPTS, then of n decode steps (the first captures the graph)."""
    out = [plan.run(PROMPTS)]
    for step in range(n):
        out.append(plan.run([[DECODE[0][step % len(DECODE[0])]], [DECODE[1][step % len(DECODE[1])]]]))
    return out


@two_gpus
@pytest.mark.parametrize("name,dtype", [("gqa", "float16"), ("mqa", "float16"), ("tied", "float16"),
                                        ("odd_vocab", "float16"), ("bias", "bfloat16")])
def test_tp2_matches_tp1_and_greedy_tokens_agree(hf_model, name, dtype):
    model = hf_model(name, dtype=dtype)
    sizes = dict(dtype=dtype, max_batch=2, max_seq=64, backend="cuda")
    one, two = llamagraph.compile(model, **sizes), llamagraph.compile(model, tp=2, **sizes)
    for k, (a, b) in enumerate(zip(_steps(one), _steps(two))):
        for s in range(2):
            assert rel_err(b[s], a[s]) <= 3e-2, f"step {k} sequence {s}"
    assert two.generate(PROMPTS, 32) == one.generate(PROMPTS, 32)  # greedy-32


@two_gpus
@pytest.mark.parametrize("name", ["gqa", "odd_vocab"])
def test_tp2_fp32_matches_hf(hf_model, name):
    check_against_hf(hf_model(name), backend="cuda", dtype="float32", tol=1e-4, tp=2)


@two_gpus
def test_tp2_matches_the_simulated_ranks(hf_model):
    """The reference backend's simulation of the same rank graph (partials added in rank order)."""
    model = hf_model("gqa", dtype="float16")
    sizes = dict(dtype="float16", max_batch=2, max_seq=48, tp=2)
    ref, gpu = llamagraph.compile(model, **sizes), llamagraph.compile(model, backend="cuda", **sizes)
    for a, b in zip(_steps(ref), _steps(gpu)):
        for s in range(2):
            assert rel_err(b[s], a[s]) <= 3e-2


@two_gpus
def test_tp2_graph_replay_is_bit_identical(hf_model):
    """A decode step replayed from the captured graphs (all-reduces inside) gives the bits of the
    same step launched eagerly."""
    model = hf_model("gqa", dtype="float16")
    plan = llamagraph.compile(model, dtype="float16", max_batch=2, max_seq=48, backend="cuda", tp=2)
    replayed = plan.generate(PROMPTS, 12)
    plan.compiled.captured = ()  # the same steps, every one launched eagerly
    for rank in plan.executor.ranks:
        rank.plan.captured = ()
    eager = plan.generate(PROMPTS, 12)
    assert replayed == eager
    plan.reset()
    a = plan.run(PROMPTS)
    plan.compiled.captured = ("decode",)
    plan.reset()
    b = plan.run(PROMPTS)
    assert np.array_equal(a, b)


@two_gpus
def test_tp2_random_weights_equal_tp1_random_weights():
    """Random weights drawn on the GPU part by part: rank slices of the same model."""
    cfg = {**models.TINY, "num_attention_heads": 4, "num_key_value_heads": 2}
    cfg = {k: v for k, v in cfg.items() if k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                  "num_key_value_heads", "num_hidden_layers", "vocab_size",
                                                  "max_position_embeddings", "rms_norm_eps")}
    sizes = dict(dtype="float32", max_batch=2, max_seq=48, backend="cuda")
    one = llamagraph.compile(cfg, "random", **sizes)
    two = llamagraph.compile(cfg, "random", tp=2, **sizes)
    a, b = one.run(PROMPTS), two.run(PROMPTS)
    assert rel_err(b[0], a[0]) <= 1e-4 and rel_err(b[1], a[1]) <= 1e-4


def test_tp1_runs_through_nccl_on_one_gpu(hf_model):
    """The NCCL path with one rank (a clique of one): the rank graph with its all_reduce and
    all_gather_vocab nodes, the tensor-parallel runner, collectives inside the captured graph, on
    any machine with a GPU; the same numbers as the plan without collectives."""
    from llamagraph.compiler import build_unfused, lower
    from llamagraph.ir import ModelConfig, load_config
    from llamagraph.passes import run_pipeline
    from llamagraph.runtime.tensor_parallel import CudaTensorParallel
    from llamagraph.runtime.weights import load_weights

    model = hf_model("gqa", dtype="float16")
    graph = build_unfused(load_config(model), dtype="float16", max_batch=2, max_seq=48)
    graph.meta["tp"] = 1  # the shard pass runs: one rank holding everything
    compiled = lower(run_pipeline(graph), model)
    assert {"all_reduce", "all_gather_vocab"} <= set(compiled.graph.op_counts())
    runner = CudaTensorParallel(compiled, [load_weights(compiled.graph, model)])
    plan = llamagraph.api.Plan(compiled, ModelConfig(**compiled.graph.meta["config"]), runner)
    ref = llamagraph.compile(model, dtype="float16", max_batch=2, max_seq=48, backend="cuda")
    for a, b in zip(_steps(ref), _steps(plan)):
        assert rel_err(b[0], a[0]) <= 1e-3 and rel_err(b[1], a[1]) <= 1e-3
    assert plan.generate(PROMPTS, 16) == ref.generate(PROMPTS, 16)


def test_tp_needs_as_many_gpus(hf_model):
    n = _gpus()
    cfg = dict(hidden_size=64, intermediate_size=192, num_attention_heads=8, num_key_value_heads=8,
               num_hidden_layers=1, vocab_size=96, max_position_embeddings=64)
    with pytest.raises(llamagraph.BackendError, match=f"tp 8 needs 8 GPUs .one per rank.; this machine has {n}"):
        if n >= 8:
            pytest.skip("has 8 GPUs")
        llamagraph.compile(cfg, "random", tp=8, backend="cuda", max_seq=32)
