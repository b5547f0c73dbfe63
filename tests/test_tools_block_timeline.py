"""tools/block_timeline.py's traced source: a recorder in every kernel and after the PDL wait, the
kernel names in the plan's order, and it still compiles (the timeline itself needs a GPU)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from llamagraph.codegen import nvrtc
from llamagraph.compiler import compile_plan

from test_compiled_plan import TINY

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture(scope="module")
def tool():
    path = Path(__file__).resolve().parents[1] / "tools" / "block_timeline.py"
    spec = importlib.util.spec_from_file_location("block_timeline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_kernel_records_its_blocks(tool):
    plan = compile_plan(TINY, dtype="float16", max_batch=2, max_seq=32, quantize="int8")
    src, names = tool.traced(plan.source)
    assert names == plan.kernels
    # each kernel's body opens with its recorder, numbered in source order
    for k, name in enumerate(names):
        assert re.search(rf"\b{name}\([^{{]*\)\s*\{{ LgTrace lg_trace_obj\({k}u\);", src), name
    assert src.count("LgTrace lg_trace_obj(") == len(names)
    assert 'griddepcontrol.wait;" ::: "memory");\n#endif\n    lg_trace_waited();' in src
    if nvrtc.available() is None:
        pytest.skip("no CUDA compiler here: pip install nvidia-cuda-nvrtc (or put nvcc on PATH)")
    assert sorted(nvrtc.compile_source(src, arch="sm_90").kernels) == sorted(names)


def test_a_source_without_the_wait_is_refused(tool):
    with pytest.raises(RuntimeError, match="lg_pdl_wait's body was not found"):
        tool.traced('extern "C" __global__ void k() {}')


def test_timeline_detail_reads_the_records(tmp_path):
    """tools/timeline_detail.py: quantiles from the end of the launch before, late starts, blocks a SM."""
    spec = importlib.util.spec_from_file_location("timeline_detail", TOOLS / "timeline_detail.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # launch 0 (embedding) ends at 1000 ns; launch 1 (layer 0's first op): 4 blocks on SMs 0, 0, 1, 2
    launch = np.array([0, 1, 1, 1, 1])
    start = np.array([0, 500, 600, 1500, 2000])
    waited = np.array([0, 1200, 1200, 1600, 2100])
    end = np.array([1000, 3000, 3000, 4000, 5000])
    path = tmp_path / "t.npz"
    np.savez(path, launch=launch, block=np.arange(5), sm=np.array([0, 0, 0, 1, 2]), start=start, waited=waited,
             end=end, fns=np.array(["a", "b"]), ops=np.array(["embedding", "rms_qkv"]))
    lines = mod.detail(str(path), [0])
    assert lines[0].split() == ["1", "rms_qkv", "blocks", "4", "late", "2"]
    assert [float(x) for x in lines[1].split()[1:]] == pytest.approx([-0.5, -0.47, 0.05, 0.85, 1.0])
    assert lines[-1].endswith("[0, 2, 1]")  # SM 0 holds two blocks, SMs 1 and 2 one each
    # the late blocks on SMs 1 and 2 held no block of launch 0; none on SM 0 started late
    assert not any("slot gap" in line for line in lines)
    sm = np.array([0, 0, 0, 0, 2])  # now the late block on SM 0 starts 500 ns after the embedding ended there
    np.savez(path, launch=launch, block=np.arange(5), sm=sm, start=start, waited=waited, end=end,
             fns=np.array(["a", "b"]), ops=np.array(["embedding", "rms_qkv"]))
    gap = next(line for line in mod.detail(str(path), [0]) if "slot gap" in line)
    assert [float(x) for x in gap.split()[2:]] == pytest.approx([0.5] * 5)
    assert mod.detail(str(path), [3]) == []
    # with each launch's layer recorded (block_timeline.py writes it), layers follow it, not five a layer
    np.savez(path, launch=launch, block=np.arange(5), sm=sm, start=start, waited=waited, end=end,
             fns=np.array(["a", "b"]), ops=np.array(["embedding", "rms_qkv"]), layers=np.array([-1, 3]))
    assert mod.detail(str(path), [0]) == [] and mod.detail(str(path), [3])[0].startswith("  1 rms_qkv")


def test_a_variant_patches_the_kernels_the_timeline_compiles(tool):
    from llamagraph.codegen import dense

    q4 = dict(prologue="rmsnorm", eps=1e-5, quant=dense.GemvQuant("int4", 128))
    gu = ("float16", 2 * 11008, 4096, 1, "silu_mul")
    before = dense.gemv(*gu, **q4).source
    ab = tool.apply_variant("lcngu")
    try:
        assert ab.Q_TRIGGER + "    load_codes(ca, 0," in dense.gemv(*gu, **q4).source
    finally:  # the package's own functions back
        dense._quant_tuning, dense.render = ab.DEFAULTS["quant"], ab.DEFAULTS["render"]
    assert dense.gemv(*gu, **q4).source == before
