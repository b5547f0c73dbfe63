"""The compiled plan as an artifact: saved and loaded without recompiling, checked for graph
safety before capture, and the layering that keeps the runtime a plain executor of plans."""

import ast
import dataclasses
import glob
import json
import os

import numpy as np
import pytest

import llamagraph
from llamagraph.cli import main
from llamagraph.codegen import lowering
from llamagraph.codegen.compiled import CompiledPlan, check_capturable, check_early_reads, defined_kernels
from llamagraph.codegen.launch import Cond, Launch, Scaled, Shape, launch_from_dict, launch_to_dict, step, value, workspace
from llamagraph.compiler import compile_plan
from llamagraph.ir import Graph
from numerics import DECODE, PROMPTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 100, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, hf_model):
    """A tiny checkpoint compiled with `llamagraph compile -o DIR` (fp32, batch 2)."""
    ckpt = hf_model("bias")
    out = tmp_path_factory.mktemp("plan")
    assert main(["compile", ckpt, "-o", str(out), "--dtype", "float32", "--max-batch", "2", "--max-seq", "32"]) == 0
    return ckpt, str(out)


def test_load_runs_without_passes_or_lowering(saved, monkeypatch, capsys):
    ckpt, plan_dir = saved
    capsys.readouterr()
    fresh = llamagraph.compile(ckpt, dtype="float32", max_batch=2, max_seq=32)
    want = [fresh.run(PROMPTS)] + [fresh.run([[DECODE[0][s]], [DECODE[1][s]]]) for s in range(3)]

    def forbidden(*a, **k):
        raise AssertionError("load must not compile")

    import llamagraph.compiler as compiler
    import llamagraph.passes.pipeline as pipeline

    monkeypatch.setattr(pipeline, "run_pipeline", forbidden)
    monkeypatch.setattr(compiler, "run_pipeline", forbidden)
    monkeypatch.setattr(compiler, "lower_graph", forbidden)
    monkeypatch.setattr(lowering, "lower_graph", forbidden)
    for weights in (None, ckpt):  # None: the checkpoint the plan was compiled from
        plan = llamagraph.load(plan_dir, weights)
        got = [plan.run(PROMPTS)] + [plan.run([[DECODE[0][s]], [DECODE[1][s]]]) for s in range(3)]
        for a, b in zip(got, want):
            assert np.array_equal(a, b) and np.abs(a).max() > 1e-3
    assert plan.compiled.model == os.path.abspath(ckpt)


def test_saved_plan_round_trips(saved):
    _, plan_dir = saved
    plan = CompiledPlan.load(plan_dir)
    again = json.loads(json.dumps(plan.to_dict()))
    with open(os.path.join(plan_dir, "plan.json")) as f:
        assert again == json.load(f)
    assert set(plan.kernels) == set(defined_kernels(plan.source)) and len(plan.kernels) >= 10
    assert plan.captured == ("decode", "advance") and plan.kernel_launches("decode") > 0
    with open(os.path.join(plan_dir, "graph.txt")) as f:
        assert plan.graph == Graph.from_text(f.read())
    # plan.json reads one launch a line
    lines = {line.strip().rstrip(",") for line in open(os.path.join(plan_dir, "plan.json"))}
    decode = again["phases"]["decode"]
    assert decode and all(json.dumps(x) in lines for x in decode)


@pytest.mark.parametrize("damage, message", [
    (lambda d: os.remove(os.path.join(d, "plan.json")), "no plan.json"),
    (lambda d: open(os.path.join(d, "kernels.cu"), "a").write("// edited\n"), "does not match the source"),
    (lambda d: _edit_json(d, lambda p: p.update(format="llamagraph-plan/0")), "recompile"),
    (lambda d: _edit_json(d, lambda p: p["kernels"].append("gemv_nowhere")), "disagree on kernel 'gemv_nowhere'"),
    (lambda d: _edit_json(d, lambda p: p["phases"]["decode"][3]["args"].__setitem__(0, ["value", "ghost", "ptr"])),
     "names no value of the graph: %ghost"),
    (lambda d: open(os.path.join(d, "plan.json"), "w").write("{"), "not valid JSON"),
    (lambda d: _edit_json(d, lambda p: p["phases"]["decode"][0].update(reads_early=[0])),
     "decode launch 0 .*before its wait, but it is the first launch of the phase"),
    (lambda d: _edit_json(d, lambda p: p["phases"]["decode"][1].update(reads_early=["x"])), "malformed plan"),
])
def test_damaged_plan_is_a_one_line_error(saved, tmp_path, damage, message, capsys):
    import shutil

    _, plan_dir = saved
    d = tmp_path / "copy"
    shutil.copytree(plan_dir, d)
    damage(str(d))
    with pytest.raises(llamagraph.PlanError, match=message) as e:
        llamagraph.load(str(d), "random")
    assert "\n" not in str(e.value)
    assert main(["run", str(d), "--random-weights", "--backend", "reference", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llamagraph: error: ") and str(d) in err[0]


def _edit_json(d: str, fn) -> None:
    path = os.path.join(d, "plan.json")
    with open(path) as f:
        plan = json.load(f)
    fn(plan)
    with open(path, "w") as f:
        json.dump(plan, f)


def test_run_a_plan_directory_with_weights(saved, capsys):
    ckpt, plan_dir = saved
    assert main(["run", plan_dir, "--weights", ckpt, "--random-weights"]) == 2  # they exclude each other
    capsys.readouterr()
    assert main(["run", plan_dir, "--random-weights", "--backend", "reference", "--prompt-len", "3",
                 "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert len(out.split("generated ids:")[1].split()) == 4


# ---------------------------------------------------------------------------------------------
# graph safety
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plan():
    return compile_plan(TINY, dtype="float16", max_batch=2, max_seq=32)


def _with(plan: CompiledPlan, k: int, launch: Launch, graph=None) -> CompiledPlan:
    decode = list(plan.phases["decode"])
    decode[k] = launch
    return dataclasses.replace(plan, phases={**plan.phases, "decode": decode}, graph=graph or plan.graph)


def test_the_compiled_decode_phase_is_graph_safe(plan):
    check_capturable(plan, "decode")
    with pytest.raises(llamagraph.PlanError, match="library call"):
        check_capturable(plan, "prefill")  # prefill uses cuBLAS: it must never be captured


def test_a_library_call_in_a_captured_phase_is_refused(plan):
    gemm = next(x for x in plan.phases["prefill"] if x.kind == "library")
    with pytest.raises(llamagraph.PlanError, match=r"decode launch 5 \(library gemm, node 1 'l0.qkv_rot'\): a library call cannot be captured"):
        check_capturable(_with(plan, 5, gemm), "decode")


def _decode_attention(plan):
    """(index, launch) of layer 0's decode attention kernel."""
    return next((k, x) for k, x in enumerate(plan.phases["decode"]) if plan.graph.nodes[x.node].op == "sdpa")


def test_a_step_varying_scalar_baked_into_an_argument_is_refused(plan):
    k, launch = _decode_attention(plan)
    broken = dataclasses.replace(launch, args=launch.args[:-1] + (step("max_position"),))
    msg = rf"decode launch {k} \(kernel attn_decode_.*, node \d+ 'l0.attn'\): argument 8 \(step 'max_position'\).*baked in"
    with pytest.raises(llamagraph.PlanError, match=msg):
        check_capturable(_with(plan, k, broken), "decode")


def test_a_grid_that_follows_a_step_varying_scalar_is_refused(plan):
    launch = plan.phases["decode"][0]
    broken = dataclasses.replace(launch, shape=Shape((Scaled("seq_tiles.r64.n"), 1, 1), launch.shape.block))
    with pytest.raises(llamagraph.PlanError, match="decode launch 0 .*grid follows step scalar 'seq_tiles.r64.n'"):
        check_capturable(_with(plan, 0, broken), "decode")


def test_a_host_rebuilt_workspace_in_a_captured_phase_is_refused(plan):
    k, launch = _decode_attention(plan)
    broken = dataclasses.replace(launch, args=launch.args[:5] + (workspace("seq_tiles.r64"),) + launch.args[6:])
    with pytest.raises(llamagraph.PlanError, match=r"argument 5 \(workspace 'seq_tiles.r64'\): the host rebuilds"):
        check_capturable(_with(plan, k, broken), "decode")


# ---------------------------------------------------------------------------------------------
# reads before the PDL wait
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quant_plan():
    return compile_plan(TINY, dtype="float16", max_batch=2, max_seq=32, quantize="int8")


def _residual_gemvs(plan, phase="decode"):
    """(index, launch) of every launch that reads an argument before its wait."""
    return [(k, x) for k, x in enumerate(plan.phases[phase]) if x.reads_early]


def test_quantized_residual_gemvs_read_the_residual_before_their_wait(quant_plan):
    g = quant_plan.graph
    for phase in ("decode", "prefill"):
        early = _residual_gemvs(quant_plan, phase)
        assert early and {g.nodes[x.node].op for _, x in early} == {"linear_residual"}, phase
        for _, x in early:
            assert [x.args[j].ref for j in x.reads_early] == [g.nodes[x.node].inputs[2]]  # the residual stream
            assert x.fn.endswith("_re") and "constexpr bool RES_EARLY = true" in quant_plan.source
        check_early_reads(quant_plan, phase)
    # 16-bit weights: the wait comes first (the kernel is not written for it)
    assert not any(x.reads_early for ls in compile_plan(TINY, dtype="float16", max_batch=2, max_seq=32).phases.values()
                   for x in ls)
    round_trip = launch_from_dict(json.loads(json.dumps(launch_to_dict(early[0][1]))))
    assert round_trip == early[0][1]


def _decode_with(plan, k, launch):
    decode = list(plan.phases["decode"])
    decode[k] = launch
    return dataclasses.replace(plan, phases={**plan.phases, "decode": decode})


def test_a_read_before_the_wait_of_what_the_launch_before_writes_is_refused(quant_plan):
    (k_o, o_proj), (k_down, down) = _residual_gemvs(quant_plan)[:2]
    # down_proj adds to the stream o_proj wrote: put o_proj's launch just before it (one that reads
    # nothing early itself)
    o_proj = dataclasses.replace(o_proj, reads_early=())
    broken = _decode_with(quant_plan, k_down - 1, o_proj)
    out = quant_plan.graph.nodes[o_proj.node].outputs[0]
    msg = (rf"decode launch {k_down} \(kernel {down.fn}\): reads argument {down.reads_early[0]} \(%{down.args[down.reads_early[0]].ref}\) "
           rf"before its wait, but launch {k_down - 1} \(kernel {o_proj.fn}\) before it writes %{out}")
    with pytest.raises(llamagraph.PlanError, match=msg):
        check_early_reads(broken, "decode")
    with pytest.raises(llamagraph.PlanError, match=msg):
        broken.check()  # the plan's own check runs it on every phase
    # a conditional launch that may run in between counts too; one that never runs in the same step does not
    def inserted(before_down, down_launch):
        decode = list(quant_plan.phases["decode"])
        decode[k_down:k_down + 1] = [before_down, down_launch]
        return dataclasses.replace(quant_plan, phases={**quant_plan.phases, "decode": decode})

    maybe = dataclasses.replace(o_proj, when=(Cond("T", ">", 1),))
    with pytest.raises(llamagraph.PlanError, match=rf"decode launch {k_down + 1} .*before it writes %{out}"):
        check_early_reads(inserted(maybe, down), "decode")
    check_early_reads(inserted(maybe, dataclasses.replace(down, when=(Cond("T", "<=", 1),))), "decode")
    # the first launch of a phase follows whatever ran last
    with pytest.raises(llamagraph.PlanError, match="first launch of the phase"):
        check_early_reads(_decode_with(quant_plan, 0, _residual_gemvs(quant_plan)[0][1]), "decode")


@pytest.mark.parametrize("arg, message", [
    (value("nowhere"), "no such value"),
    (workspace("nowhere"), "no such workspace"),
    (value("l0.attn"), "no planned arena offset"),
])
def test_an_address_that_is_not_fixed_is_refused(plan, arg, message):
    graph = plan.graph.copy()
    del graph.values["l0.attn"].attrs["offset"]  # as if an activation had escaped the memory plan
    launch = plan.phases["decode"][1]
    broken = dataclasses.replace(launch, args=(arg,) + launch.args[1:])
    with pytest.raises(llamagraph.PlanError, match=rf"decode launch 1 .*argument 0 .*{message}"):
        check_capturable(_with(plan, 1, broken, graph), "decode")


def test_compile_refuses_a_lowering_that_is_not_graph_safe(monkeypatch, tmp_path, capsys):
    real = lowering.LOWERINGS["topk_sample"]

    def leaky(node, ctx):
        low = real(node, ctx)
        bad = dataclasses.replace(low.decode[0], args=low.decode[0].args[:-1] + (step("sample.step_host"),))
        return dataclasses.replace(low, decode=[bad])

    monkeypatch.setitem(lowering.LOWERINGS, "topk_sample", leaky)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    assert main(["compile", str(cfg), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "decode launch" in err[0] and "node 13 'next_token'" in err[0]
    assert "argument 9 (step 'sample.step_host')" in err[0]


# ---------------------------------------------------------------------------------------------
# layering
# ---------------------------------------------------------------------------------------------

def _imports(path: str, root: str = ROOT) -> set[str]:
    """The llamagraph modules a file imports (relative imports resolved)."""
    rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
    package = rel.rsplit(".", 1)[0] if not rel.endswith("__init__") else rel[: -len(".__init__")]
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
            elif node.module:
                out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("llamagraph")}


def _files(sub: str) -> list[str]:
    return glob.glob(os.path.join(ROOT, "llamagraph", sub, "*.py")) if sub else \
        glob.glob(os.path.join(ROOT, "llamagraph", "*.py"))


ALLOWED = {  # package -> the llamagraph packages it may import (besides itself)
    "ir": set(),
    "passes": {"ir"},
    "codegen": {"ir"},
    "runtime": {"ir", "codegen"},
    "viz": {"ir"},
}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_layering(package):
    files = _files(package)
    assert files
    for path in files:
        for mod in _imports(path):
            parts = mod.split(".")  # llamagraph.<part>...: the package (or top-level module) imported
            if len(parts) > 1 and parts[1] != package and parts[1] not in ALLOWED[package]:
                pytest.fail(f"{os.path.relpath(path, ROOT)} imports {mod}: {package}/ may import only "
                            f"{sorted(ALLOWED[package]) or 'nothing else of llamagraph'}")


def test_reports_and_pictures_need_no_runtime_and_the_compiler_only_orchestrates():
    for name in ("report.py", "compiler.py"):
        mods = _imports(os.path.join(ROOT, "llamagraph", name))
        assert not any(m.startswith(("llamagraph.runtime", "llamagraph.api")) for m in mods), (name, mods)
    # nothing imports the CLI
    for path in glob.glob(os.path.join(ROOT, "llamagraph", "**", "*.py"), recursive=True):
        if not path.endswith(("cli.py", "__main__.py")):
            assert "llamagraph.cli" not in _imports(path), path


def test_the_layering_check_sees_a_bad_import(tmp_path):
    bad = tmp_path / "llamagraph" / "runtime" / "x.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from ..passes import run_pipeline\nfrom llamagraph.compiler import lower\n")
    assert _imports(str(bad), str(tmp_path)) >= {"llamagraph.passes", "llamagraph.compiler"}
