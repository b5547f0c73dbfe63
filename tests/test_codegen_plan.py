"""Every kernel of every bundled example compiles (NVRTC from the pip wheel, or nvcc)."""

import glob
import os

import pytest

from llamagraph.codegen import nvrtc
from llamagraph.codegen.plan import decode_launches, plan_kernels, plan_source
from llamagraph.ir import load_config
from llamagraph.runtime.plan import compile_graph

EXAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "*.json")))

needs_compiler = pytest.mark.skipif(nvrtc.available() is None, reason="no NVRTC library or nvcc on this machine")


@needs_compiler
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("example", EXAMPLES, ids=os.path.basename)
def test_every_kernel_of_every_example_compiles(example, dtype):
    graph = compile_graph(load_config(example), dtype=dtype, max_batch=4, max_seq=2048)
    source = plan_source(graph)
    result = nvrtc.compile_source(source, "sm_90")
    names = {k.name for nk in plan_kernels(graph) for k in nk.kernels.values()}
    assert names and names <= set(result.kernels), names - set(result.kernels)
    spilling = {k: r for k, r in result.kernels.items() if r.spill_stores or r.spill_loads}
    assert not spilling, spilling


def test_every_fused_node_gets_a_kernel_and_source_is_deterministic():
    graph = compile_graph(load_config(EXAMPLES[0]), dtype="float16", max_batch=2, max_seq=256)
    plan = plan_kernels(graph)
    assert len(plan) == len(graph.nodes) and all(nk.kernels for nk in plan)
    # the fused kernels are there
    ops = {nk.node.op: nk for nk in plan}
    assert "_silu" in ops["gate_up_silu"].kernels["main"].name
    assert ops["rope_kv_append"].kernels["main"].name.startswith("rope_kv_append_fused")
    assert ops["add_rmsnorm"].kernels["main"].name.startswith("add_rmsnorm")
    assert plan_source(graph) == plan_source(compile_graph(load_config(EXAMPLES[0]), dtype="float16",
                                                           max_batch=2, max_seq=256))
    assert decode_launches(graph) == len(graph.nodes) + graph.op_counts()["sdpa"]
