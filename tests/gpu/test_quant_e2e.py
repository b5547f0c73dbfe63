"""Quantized plans on the CUDA backend end to end: against the quantized reference plan, against
HF with the dequantized weights, graph replay, prefill through the dequantize + cuBLAS path, and
the fit check of a shape that cannot fit."""

import numpy as np
import pytest

import llamagraph
import quant_oracle
from numerics import DECODE, PROMPTS, check_against_hf, rel_err

pytestmark = pytest.mark.gpu

SCHEMES = [("int8", None), ("int4", 32), ("int4", 64), ("int4", -1)]


def _pair(model, dtype, scheme, group, **kw):
    sizes = dict(max_batch=2, max_seq=48, **kw)
    ref = llamagraph.compile(model, dtype=dtype, quantize=scheme, group_size=group, **sizes)
    gpu = llamagraph.compile(model, dtype=dtype, quantize=scheme, group_size=group, backend="cuda", **sizes)
    return ref, gpu


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("scheme,group", SCHEMES)
@pytest.mark.parametrize("name", ["gqa", "bias", "tied"])
def test_cuda_quantized_matches_the_quantized_reference(hf_model, name, scheme, group, dtype):
    """Prefill of two packed prompts (19 and 6 tokens: the 19-token step runs above two GEMV row
    tiles, through dequantize + cuBLAS), then 8 decode steps through the quantized GEMVs."""
    ref, gpu = _pair(hf_model(name, dtype=dtype), dtype, scheme, group)
    a, b = ref.run(PROMPTS), gpu.run(PROMPTS)
    for step in range(len(DECODE[0]) + 1):
        for s in range(2):
            err = rel_err(b[s], a[s])
            assert err <= 3e-2, f"step {step} sequence {s}: {err:.3g}"
        if step < len(DECODE[0]):
            feed = [[DECODE[0][step]], [DECODE[1][step]]]
            a, b = ref.run(feed), gpu.run(feed)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int4", 64), ("int8", None)])  # (the tiny models' K is 64)
def test_tile16_codes_give_the_row_order_plans_bits(hf_model, monkeypatch, dtype, scheme, group):
    """int8 / int4 codes stored "tile16" (opt-in, repacked at upload) are read by the same arithmetic in the
    same order: prefill (dequantize + cuBLAS) and decode (the GEMVs) logits bit-identical to the row-order
    plan's, and within 3e-2 of the quantized reference."""
    import importlib

    model = hf_model("gqa", dtype=dtype)
    ref, rows = _pair(model, dtype, scheme, group)
    monkeypatch.setitem(importlib.import_module("llamagraph.passes.quantize_weights").CODE_ORDER, scheme, "tile16")
    tiled = llamagraph.compile(model, dtype=dtype, quantize=scheme, group_size=group, backend="cuda", max_batch=2,
                               max_seq=48)
    assert any(v.quant is not None and v.quant.code_order == "tile16" for v in tiled.graph.values.values())
    feeds = [PROMPTS] + [[[DECODE[0][i]], [DECODE[1][i]]] for i in range(len(DECODE[0]))]
    for step, feed in enumerate(feeds):
        a, b, c = ref.run(feed), rows.run(feed), tiled.run(feed)
        for s in range(2):
            assert np.array_equal(np.asarray(c[s]), np.asarray(b[s])), f"step {step} sequence {s}"
            assert rel_err(c[s], a[s]) <= 3e-2, f"step {step} sequence {s}"


@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_fp32_cuda_quantized_matches_hf_with_dequantized_weights(hf_model, tmp_path, scheme, group):
    model = hf_model("gqa")
    oracle = quant_oracle.write_dequantized(model, str(tmp_path / "deq"), scheme, group or 128)
    check_against_hf(model, backend="cuda", dtype="float32", tol=1e-3, hf_dir=oracle, quantize=scheme,
                     group_size=group)


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32)])
def test_quantized_graph_replay_is_bit_identical_to_eager(hf_model, scheme, group):
    """One decode step replayed from the captured graph and launched eagerly gives the same bits."""
    plan = llamagraph.compile(hf_model("gqa", dtype="float16"), dtype="float16", quantize=scheme, group_size=group,
                              max_batch=2, max_seq=32, backend="cuda")
    ex = plan.executor
    plan.run(PROMPTS)
    snapshot = {k: v.copy() for k, v in ex.persistent.items()}
    lengths = list(plan.lengths)
    replayed = plan.run([[DECODE[0][0]], [DECODE[1][0]]])
    assert 2 in ex.graphs
    for k, v in snapshot.items():
        ex.persistent[k][...] = v
    ex.cp.cuda.Device().synchronize()
    plan.lengths = lengths
    ex.graphs.clear()
    ex._capture = lambda scalars, phases=("decode",): _Eager(ex, scalars)
    assert np.array_equal(replayed, plan.run([[DECODE[0][0]], [DECODE[1][0]]]))


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32)])
def test_quantized_greedy_tokens_match_the_reference_backend(hf_model, scheme, group):
    model = hf_model("gqa")
    ref = llamagraph.compile(model, dtype="float32", quantize=scheme, group_size=group, max_batch=2, max_seq=64)
    gpu = llamagraph.compile(model, dtype="float32", quantize=scheme, group_size=group, max_batch=2, max_seq=64,
                             backend="cuda")
    assert gpu.generate(PROMPTS, 32) == ref.generate(PROMPTS, 32)


def test_quantized_logprobs_on_gpu(hf_model):
    """token_logprobs reads the quantized LM head in decode (GEMV) and in prefill (dequantize + cuBLAS)."""
    model = hf_model("gqa", dtype="float16")
    ref = llamagraph.compile(model, dtype="float16", quantize="int4", group_size=32, max_batch=1, max_seq=48)
    gpu = llamagraph.compile(model, dtype="float16", quantize="int4", group_size=32, max_batch=1, max_seq=48,
                             backend="cuda")
    a = ref.generate([PROMPTS[0]], 6, logprobs=True)
    b = gpu.generate([PROMPTS[0]], 6, logprobs=True)
    assert a[0] == b[0]
    np.testing.assert_allclose(np.array(b[1][0], dtype=float), np.array(a[1][0], dtype=float), atol=5e-2)


def test_shape_that_cannot_fit_fails_before_allocating():
    """70B in fp16 (about 141 GB of weights) does not fit one GPU: one line, bytes needed against free."""
    import os

    cfg = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "llama-3-70b.json")
    with pytest.raises(llamagraph.BackendError, match=r"needs \d+ bytes .* but only \d+ .* are free"):
        llamagraph.compile(cfg, "random", dtype="float16", max_seq=128, backend="cuda")


class _Eager:
    """Stands in for a captured graph: launching it launches the decode phase's kernels one by one."""

    def __init__(self, ex, scalars):
        self.ex, self.scalars = ex, scalars

    def launch(self, stream):
        self.ex.launch_phase("decode", self.scalars)
