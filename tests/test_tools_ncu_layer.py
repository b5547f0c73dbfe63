"""tools/ncu_layer.py selects exactly one decoder layer's decode launches for ncu (the profiling
needs a GPU and Nsight Compute; the selection is computed from the lowered plan, without either)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from llamagraph.compiler import compile_plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("ncu_layer", ROOT / "tools" / "ncu_layer.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (its dataclass looks its module up there)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("quant", ["int4", "none"])
def test_the_selection_is_the_layers_launches_in_the_eager_decode_order(tool, quant):
    config = str(ROOT / "examples" / "llama-2-7b.json")
    plan = compile_plan(config, **tool.plan_kwargs(quant))
    launches = [la for la in plan.phases["decode"] if la.runs(tool.DECODE)]
    spec = tool.layer_spec(plan, 10)
    pattern = re.compile(spec.regex[len("regex:"):])
    matched = [i for i, la in enumerate(launches) if pattern.match(la.fn)]
    # ncu's launch-skip / launch-count over the launches its regex matches: layer 10's, every one of them
    chosen = matched[spec.skip: spec.skip + spec.count]
    assert [plan.graph.nodes[launches[i].node].layer for i in chosen] == [10] * spec.count
    assert [launches[i].fn for i in chosen] == list(spec.names)
    assert spec.count == len([la for la in launches if plan.graph.nodes[la.node].layer == 10]) == 5
    ops = [plan.graph.nodes[launches[i].node].op for i in chosen]
    assert ops == ["rms_qkv_rope_kv_append", "sdpa", "linear_residual", "rms_gate_up_silu", "linear_residual"]
    assert not pattern.match(launches[-2].fn) and not pattern.match(spec.names[0] + "x")  # (the LM head; exact)
    tag = "_i4g128_" if quant == "int4" else "gemv_f16_n"
    assert all(tag in n for n in spec.names if n.startswith("gemv_"))
    cmd = tool.ncu_command(spec, "rep", config, quant)
    assert cmd[cmd.index("--launch-skip") + 1] == str(spec.skip) and cmd[cmd.index("--kernel-name") + 1] == spec.regex
    assert cmd[cmd.index("--profile-from-start") + 1] == "off" and cmd[-3:] == ["--step", config, quant]


def test_a_layer_outside_the_model_is_a_one_line_error(tool):
    plan = compile_plan(str(ROOT / "examples" / "llama-2-7b.json"), **tool.plan_kwargs("int4"))
    with pytest.raises(SystemExit, match="layer 32 is not in the plan"):
        tool.layer_spec(plan, 32)
