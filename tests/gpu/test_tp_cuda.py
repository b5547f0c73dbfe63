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
    greedy_one, greedy_two = one.generate(PROMPTS, 32), two.generate(PROMPTS, 32)
    if dtype == "float16":
        assert greedy_two == greedy_one  # greedy-32, as the issue asks of fp16
    else:
        _diverge_only_at_near_ties(one, two, greedy_one, greedy_two)


def _diverge_only_at_near_ties(one, two, greedy_one, greedy_two):
    """bf16 keeps 8 bits of mantissa, so two plans that round differently may pick different
    tokens where a random model's top two logits (nearly) tie. Where the greedy tokens first
    differ, the gap between the two tokens' logits must be within the difference between the
    plans' logits at that step (and no larger than bf16 rounding of the logits)."""
    for s, (a, b) in enumerate(zip(greedy_one, greedy_two)):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if k is None:
            continue
        logits = []
        for plan in (one, two):
            plan.reset()
            logits.append(plan.run([PROMPTS[s] + a[:k]])[0])
        gap = abs(logits[0][a[k]] - logits[0][b[k]])
        noise = np.abs(logits[1] - logits[0]).max()
        assert gap <= 2 * noise and gap <= 2 ** -7 * np.abs(logits[0]).max() * 4, (s, k, gap, noise)


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


@pytest.mark.parametrize("p2p", ["1", "0"])
def test_tp1_runs_through_nccl_on_one_gpu(hf_model, monkeypatch, p2p):
    """The collective path with one rank (a clique of one): the rank graph with its
    all_reduce_residual and all_gather_vocab nodes, the tensor-parallel runner, collectives inside
    the captured graph, on any machine with a GPU; the same numbers as the plan without
    collectives. LLAMAGRAPH_P2P=0: the all-reduces take their NCCL alternative."""
    monkeypatch.setenv("LLAMAGRAPH_P2P", p2p)
    from llamagraph.compiler import build_unfused, lower
    from llamagraph.ir import ModelConfig, load_config
    from llamagraph.passes import run_pipeline
    from llamagraph.runtime.tensor_parallel import CudaTensorParallel
    from llamagraph.runtime.weights import load_weights

    model = hf_model("gqa", dtype="float16")
    graph = build_unfused(load_config(model), dtype="float16", max_batch=2, max_seq=48)
    graph.meta["tp"] = 1  # the shard pass runs: one rank holding everything
    compiled = lower(run_pipeline(graph), model)
    assert {"all_reduce_residual", "all_gather_vocab"} <= set(compiled.graph.op_counts())
    runner = CudaTensorParallel(compiled, [load_weights(compiled.graph, model)])
    assert runner.peer_access == (p2p == "1")
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


@two_gpus
def test_tp2_peer_all_reduce_and_its_nccl_alternative_agree(hf_model, monkeypatch):
    """The same tp2 plan with the all-reduce over peer memory (decode, and prompts of up to 64
    tokens) and with NCCL everywhere (LLAMAGRAPH_P2P=0); a prefill of 85 packed tokens takes NCCL in both."""
    model = hf_model("bias", dtype="float16")
    sizes = dict(dtype="float16", max_batch=2, max_seq=64, backend="cuda", tp=2)
    peer = llamagraph.compile(model, **sizes)
    monkeypatch.setenv("LLAMAGRAPH_P2P", "0")
    nccl = llamagraph.compile(model, **sizes)
    assert peer.executor.peer_access and not nccl.executor.peer_access
    one = llamagraph.compile(model, **{**sizes, "tp": 1})
    for a, b, c in zip(_steps(peer, 12), _steps(nccl, 12), _steps(one, 12)):
        for s in range(2):
            assert rel_err(a[s], b[s]) <= 1e-2 and rel_err(a[s], c[s]) <= 3e-2
    long = [[(7 * i) % 96 for i in range(40)], [(5 * i + 3) % 96 for i in range(45)]]
    for plan in (peer, nccl, one):
        plan.reset()
    a, b, c = peer.run(long), nccl.run(long), one.run(long)
    for s in range(2):
        assert rel_err(a[s], b[s]) <= 1e-2 and rel_err(a[s], c[s]) <= 3e-2
    assert peer.generate(PROMPTS, 16) == one.generate(PROMPTS, 16)
    peer.executor.close()
    nccl.executor.close()


@two_gpus
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_peer_all_reduce_kernel_against_numpy(dtype):
    """The allreduce_residual kernel alone on two GPUs: random partials, residual and bias, the
    output poisoned first; several calls in a row (the epochs and parity slots turn over), rows
    from 1 to the mailbox's 64, with and without a bias; and the local (no peer) form."""
    import cupy as cp

    from llamagraph.codegen import dense
    from llamagraph.codegen.launch import Shape
    from llamagraph.codegen.render import module_source
    from llamagraph.ir.dtypes import DTYPES, to_float32, to_storage
    from llamagraph.runtime.calls import launch_kernel
    from llamagraph.runtime.cuda import load_module

    D, ranks, cap_rows = 256, 2, 64
    mailbox = dense.PeerMailbox(ranks, cap_rows * D, dtype)
    k = dense.allreduce_residual(dtype, D, mailbox)
    storage = DTYPES[dtype].storage
    shape = dense.allreduce_residual_launch()
    dev = []
    for r in range(ranks):
        with cp.cuda.Device(r):
            for q in range(ranks):
                if q != r:
                    try:
                        cp.cuda.runtime.deviceEnablePeerAccess(q)
                    except cp.cuda.runtime.CUDARuntimeError:
                        pass  # enabled already
            fn = load_module(module_source([k]), f"sm_{cp.cuda.Device().compute_capability}").get_function(k.name)
            dev.append({"fn": fn, "box": cp.zeros(mailbox.nbytes, np.uint8), "stream": cp.cuda.Stream(non_blocking=True)})
    for r in range(ranks):
        with cp.cuda.Device(r):
            table = [r] + [d["box"].data.ptr for d in dev]
            dev[r]["table"] = cp.asarray(np.asarray(table, np.uint64))
    rng = np.random.default_rng(0)

    def rounded(x):
        return to_float32(to_storage(x, dtype), dtype)

    for call, (rows, with_bias, local) in enumerate([(1, True, False), (3, False, False), (64, True, False),
                                                     (1, False, False), (17, True, False), (5, True, True)]):
        ys = [rounded(rng.standard_normal((rows, D)).astype(np.float32)) for _ in range(ranks)]
        res = rounded(rng.standard_normal((rows, D)).astype(np.float32))
        bias = rounded(rng.standard_normal(D).astype(np.float32))

        def expected(total):  # as the unfused all_reduce -> bias_add -> residual chain stores each step
            out = rounded(total)
            return rounded(rounded(out + bias) + res) if with_bias else rounded(out + res)
        outs = []
        for r in range(ranks):
            with cp.cuda.Device(r):
                d = dev[r]
                y, rr = cp.asarray(to_storage(ys[r], dtype)), cp.asarray(to_storage(res, dtype))
                b = cp.asarray(to_storage(bias, dtype)) if with_bias else None
                out = cp.full((rows, D), np.iinfo(np.uint16).max if storage == np.uint16 else np.nan, storage)  # poison
                d["keep"] = (y, rr, b, out)
                launch_kernel(d["fn"], Shape(shape.grid, shape.block, 0),
                              [y, rr, b if b is not None else np.uint64(0), out, rows,
                               np.uint64(0) if local else d["table"], 1 if local else 0], d["stream"])
                outs.append(out)
        for r in range(ranks):
            with cp.cuda.Device(r):
                dev[r]["stream"].synchronize()
                got = to_float32(cp.asnumpy(outs[r]), dtype)
                expect = expected(ys[r] if local else ys[0] + ys[1])  # local: each rank's own sums
                assert np.array_equal(got, expect), (call, r, np.abs(got - expect).max())


@two_gpus
@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int8", None)])
def test_tp2_quantized_matches_tp1(hf_model, scheme, group):
    """Compile-time quantization with tp: each rank quantizes its slice of the checkpoint on its
    GPU. int4 groups of 32 stay inside the slices (the tp1 plan's codes exactly): greedy-32 as
    tp1; int8's row scales are the slice's, a slightly finer model: logits close."""
    model = hf_model("gqa", dtype="float16")
    sizes = dict(dtype="float16", max_batch=2, max_seq=64, backend="cuda", quantize=scheme, group_size=group)
    one, two = llamagraph.compile(model, **sizes), llamagraph.compile(model, tp=2, **sizes)
    ref = llamagraph.compile(model, **{**sizes, "backend": "reference", "tp": 2})  # the simulated ranks
    for a, b, c in zip(_steps(one), _steps(two), _steps(ref)):
        for s in range(2):
            assert rel_err(b[s], a[s]) <= 3e-2 and rel_err(b[s], c[s]) <= 3e-2
    if scheme == "int4":
        assert two.generate(PROMPTS, 32) == one.generate(PROMPTS, 32)
    two.executor.close()



@two_gpus
def test_tp2_pipelined_generate_matches_step_by_step(hf_model, monkeypatch):
    """tp 2: every rank's graph of decode + advance feeds its own tokens back; the tokens are those
    of the step-by-step loop, greedy and sampled, with a stop."""
    plan = llamagraph.compile(hf_model("gqa", dtype="float16"), dtype="float16", max_batch=2, max_seq=64,
                              backend="cuda", tp=2)
    for sampling in (dict(), dict(temperature=0.8, top_k=40, seed=3)):
        monkeypatch.setenv("LLAMAGRAPH_AHEAD", "0")
        free = plan.generate(PROMPTS, 20, **sampling)
        runs = []
        for ahead in ("0", "1"):
            monkeypatch.setenv("LLAMAGRAPH_AHEAD", ahead)
            runs.append((plan.generate(PROMPTS, 20, stop_tokens=[free[1][6]], **sampling), list(plan.lengths)))
        assert runs[1] == runs[0], sampling
    # greedy steps ran decode_greedy (no logits gathered), sampled ones decode
    assert set(plan.executor.ahead_graphs) == {2, ("decode_greedy", 2)}


def test_vocab_argmax_kernels_against_numpy():
    """decode_greedy's two kernels (one GPU is enough: the ranks' chunks are arrays here): the first
    maximum over the whole vocabulary, ties across slices and ranks to the lower row, the last
    chunk's padding row never chosen even when it holds the largest value."""
    import cupy as cp

    from llamagraph.codegen.render import module_source
    from llamagraph.codegen.sample import (
        ARGMAX_SLICES, vocab_argmax_combine, vocab_argmax_combine_launch, vocab_argmax_partial,
        vocab_argmax_partial_launch,
    )
    from llamagraph.runtime.calls import launch_kernel

    ranks, chunk, vocab, n = 2, 5000, 9999, 4
    part, comb = vocab_argmax_partial(chunk), vocab_argmax_combine(ranks, chunk, vocab)
    mod = cp.RawModule(code=module_source([part, comb]), backend="nvrtc", options=("--std=c++17",))
    rng = np.random.default_rng(3)
    chunks = [rng.standard_normal((n, chunk)).astype(np.float32) - 10 for _ in range(ranks)]
    chunks[1][:, chunk - 1] = 100.0  # padding row 9999 (past the vocabulary) holds the largest value
    chunks[0][1, [7, 4000]] = 5.0  # a tie inside rank 0, across slices
    chunks[1][1, 3] = 5.0  # and with rank 1
    chunks[1][2, [10, 20]] = 7.0  # a tie inside rank 1 only
    every = cp.full((ranks, n, ARGMAX_SLICES, 2), np.nan, np.float32)  # poisoned
    for r, x in enumerate(chunks):
        pairs = cp.full((n, ARGMAX_SLICES, 2), np.nan, np.float32)
        launch_kernel(mod.get_function(part.name), vocab_argmax_partial_launch(n).at({}), (cp.asarray(x), pairs, n))
        every[r] = pairs
    out, lp = cp.full(n, -7, np.int32), cp.full(n, np.nan, np.float32)
    launch_kernel(mod.get_function(comb.name), vocab_argmax_combine_launch(n).at({}), (every, out, lp, n))
    want = np.concatenate(chunks, axis=1)[:, :vocab].argmax(axis=1)
    assert want[1] == 7 and want[2] == chunk + 10
    np.testing.assert_array_equal(out.get(), want)
    np.testing.assert_array_equal(lp.get(), 0.0)
