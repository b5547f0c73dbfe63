"""tools/bench_qgemv.py times each decode GEMV of a plan alone (on a GPU); what it launches is chosen and
built from the lowered plan without one: the launches, their source, and their argument buffers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from llamagraph.codegen import nvrtc
from llamagraph.codegen.compiled import defined_kernels
from llamagraph.compiler import compile_plan
from llamagraph.ir import WEIGHT
from llamagraph.ir.dtypes import to_float32

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    sys.path.insert(0, str(ROOT / "tools"))
    spec = importlib.util.spec_from_file_location("bench_qgemv", ROOT / "tools" / "bench_qgemv.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("quant", ["int4", "int8", None])
def test_it_takes_the_layers_gemvs_and_the_lm_head_with_their_own_source(tool, quant):
    plan = compile_plan(str(ROOT / "examples" / "llama-2-7b.json"), dtype="float16", max_batch=1, max_seq=512,
                        quantize=quant, group_size=128 if quant == "int4" else None)
    chosen = tool.gemv_launches(plan, 10)
    g = plan.graph
    assert [label for label, _ in chosen] == ["rms_qkv_rope_kv_append", "linear_residual", "rms_gate_up_silu",
                                              "linear_residual", "rms_lm_head (head)"]
    assert [g.nodes[la.node].layer for _, la in chosen] == [10, 10, 10, 10, None]
    layer_gemvs = [la.fn for la in plan.phases["decode"] if la.fn.startswith("gemv_") and la.runs(tool.DECODE)
                   and g.nodes[la.node].layer == 10]
    assert [la.fn for _, la in chosen][:4] == layer_gemvs
    names = {la.fn for _, la in chosen}
    src = tool.kernel_source(plan, names)
    assert src.startswith(tool.prelude()) and sorted(defined_kernels(src)) == sorted(names)
    spans = nvrtc.kernel_spans(src)  # each kernel with the helpers it defines: the plan's own text
    assert len(spans) == len(names) and all(src[a:b] in plan.source for a, b in spans)
    if nvrtc.available() is not None and quant == "int4":
        assert set(nvrtc.compile_source(src, "sm_90").kernels) == names


def test_the_buffers_are_the_launch_arguments_with_a_copy_of_the_weights_per_launch(tool):
    plan = compile_plan(str(ROOT / "examples" / "llama-2-7b.json"), dtype="bfloat16", max_batch=1, max_seq=512,
                        quantize="int4", group_size=128)
    g = plan.graph
    label, gate_up = tool.gemv_launches(plan, 3)[2]
    assert label == "rms_gate_up_silu"
    copies = 3
    args = tool.launch_buffers(plan, gate_up, copies)
    weight_bytes = tool.weight_bytes(plan, gate_up)
    assert len(args) == copies and all(len(a) == len(gate_up.args) for a in args)
    expect = 0
    for i, a in enumerate(gate_up.args):
        got = [one[i] for one in args]
        if a.kind == "value":
            v = g.values[a.ref]
            arrays = [arr for arr, offset in got]
            assert all(offset == a.offset for _, offset in got)
            assert all(arr.nbytes >= v.nbytes({"T": 1, "B": 1}) for arr in arrays)
            if v.kind == WEIGHT:
                expect += v.nbytes({"T": 1, "B": 1})
                assert len({id(arr) for arr in arrays}) == copies  # one copy each launch
                assert not np.array_equal(arrays[0], arrays[1])  # random, not one pattern
                assert len(np.unique(arrays[0])) > 100
                if v.dtype == "bfloat16":  # scales, zeros, the norm weight: finite, 2^-8 .. 0.5, in every copy
                    for arr in arrays:
                        f = to_float32(arr.view(np.uint16), "bfloat16")
                        assert np.all(np.isfinite(f)) and f.min() >= 2.0 ** -8 and f.max() <= 0.5
            else:
                assert len({id(arr) for arr in arrays}) == 1
                if v.dtype == "bfloat16":
                    assert np.all(to_float32(arrays[0].view(np.uint16), "bfloat16") == 0.5)
        elif a.kind == "null":
            assert all(x == 0 and isinstance(x, np.uint64) for x in got)
        elif a.kind == "step":
            assert got == [tool.DECODE[a.ref]] * copies
    codes = g.values["l3.gate_up.w"]
    assert weight_bytes == expect and weight_bytes > codes.nbytes({}) == 2 * 11008 * 4096 // 2
    assert tool.copies_for(weight_bytes) * weight_bytes >= tool.ROTATE_BYTES


def _fake_cupy(launched: list):
    """Enough of cupy's surface for bench_plan on the CPU: numpy arrays, streams and graphs that do
    nothing, kernels that record their launches."""
    import types

    cp = types.ModuleType("cupy")
    for name in ("asarray", "full", "zeros", "empty", "uint8", "uint16", "float32"):
        setattr(cp, name, getattr(np, name))

    class Stream:
        ptr = 0

        def __init__(self, non_blocking=False):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def synchronize(self):
            pass

        def begin_capture(self):
            pass

        def end_capture(self):
            return types.SimpleNamespace(launch=lambda stream: None)

    class Event:
        def record(self, stream=None):
            pass

        def synchronize(self):
            pass

    class Function:
        max_dynamic_shared_size_bytes = 0

        def __init__(self, name):
            self.name = name

        def __call__(self, grid, block, args, shared_mem=0):
            launched.append((self.name, tuple(grid), tuple(block), shared_mem, args))

    cp.cuda = types.SimpleNamespace(Stream=Stream, Event=Event, get_elapsed_time=lambda a, b: 1.0,
                                    get_current_stream=Stream)
    cp.RawModule = lambda path=None, **kw: types.SimpleNamespace(get_function=Function)
    cp.get_default_memory_pool = lambda: types.SimpleNamespace(free_all_blocks=lambda: None)
    return cp


def test_bench_plan_launches_each_chosen_kernel_as_the_plan_does(tool, monkeypatch, tmp_path, capsys):
    """The device-only path on a stand-in cupy: every chosen GEMV is launched with its plan grid, block,
    shared memory and argument count, on every weight copy, and gets one line of figures."""
    if nvrtc.available() is None:
        pytest.skip("no NVRTC to compile the kernels with")
    launched: list = []
    cp = _fake_cupy(launched)
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setenv("LLAMAGRAPH_CACHE", str(tmp_path))
    monkeypatch.setattr(tool, "ROTATE_BYTES", 1 << 20)
    monkeypatch.setattr(tool, "pointer", lambda a: np.uint64(a[0].ctypes.data + a[1]) if isinstance(a, tuple) else a)
    cfg = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=2, vocab_size=320, max_position_embeddings=128, rms_norm_eps=1e-5)
    plan = compile_plan(cfg, dtype="float16", max_batch=1, max_seq=64, quantize="int4", group_size=64)
    tool.bench_plan(cp, plan, 1, "int4 base", 3e12, False, "sm_90")
    chosen = tool.gemv_launches(plan, 1)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(chosen) and all(" serial " in ln and "GB/s" in ln for ln in lines)
    for (label, la), line in zip(chosen, lines):
        mine = [x for x in launched if x[0] == la.fn]
        shape = la.shape.at(tool.DECODE)
        assert mine and {x[1:4] for x in mine} == {(tuple(shape.grid), tuple(shape.block), shape.smem)}
        assert {len(x[4]) for x in mine} == {len(la.args)} and line.split()[2] == label.split()[0]
        copies = tool.copies_for(tool.weight_bytes(plan, la))
        weights = {int(x[4][1]) for x in mine}  # the codes' address: one per copy
        assert len(weights) == copies
