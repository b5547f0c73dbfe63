"""tools/block_timeline.py's traced source: a recorder in every kernel and after the PDL wait, the
kernel names in the plan's order, and it still compiles (the timeline itself needs a GPU)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from llamagraph.codegen import nvrtc
from llamagraph.compiler import compile_plan

from test_compiled_plan import TINY


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
