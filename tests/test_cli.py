"""The ``llamagraph`` CLI: compile / dump over the bundled examples, and one-line errors.

Everything runs through ``main([...])`` in-process (fast), plus one real subprocess run of
``python -m llamagraph`` to prove a bad config exits 2 without a traceback.
"""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

from llamagraph.cli import main
from llamagraph.codegen.compiled import CompiledPlan, defined_kernels
from llamagraph.compiler import compile_graph
from llamagraph.ir import Graph, load_config
from llamagraph.passes import PASS_NAMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.json")))
ARTIFACTS = ["plan.json", "kernels.cu", "graph.txt", "graph.json", "graph_unfused.txt", "memory_plan.json",
             "memory_plan.txt", "graph.html", "memory_plan.html"]
SMALL = "llama-3.2-1b.json"  # the example the single-case tests use

# A tiny valid HF config: bad-input cases each break one thing of it.
TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 100,
    "max_position_embeddings": 64,
}


def example(name: str) -> str:
    return os.path.join(ROOT, "examples", name)


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def report_number(report: str, label: str) -> int:
    m = re.search(rf"^\s*{label}\s+(\d+) bytes", report, re.M)
    assert m, f"no '{label}' line in report:\n{report}"
    return int(m.group(1))


def test_examples_are_bundled():
    assert len(EXAMPLES) >= 4


# ---------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_compile_example(path, tmp_path, capsys):
    outdir = tmp_path / "out"
    rc, report, err = run(capsys, "compile", path, "-o", outdir)
    assert rc == 0, err
    assert err == ""
    for name in ARTIFACTS:
        assert (outdir / name).is_file() and (outdir / name).stat().st_size > 0, name
        assert name in report

    # graph.json round-trips and is the fused graph (fp16 is the default dtype)
    expected = compile_graph(load_config(path))
    text = (outdir / "graph.json").read_text()
    g = Graph.from_json(text)
    assert g.structure() == expected.structure()
    assert g.meta["dtype"] == "float16"
    assert g.to_json() + "\n" == text
    assert (outdir / "graph.txt").read_text() == str(expected)
    assert Graph.from_text((outdir / "graph.txt").read_text()) == g
    assert "add_rmsnorm" not in (outdir / "graph_unfused.txt").read_text()

    # the report's memory numbers are the plan's, and the plan is near the lower bound
    plan = json.loads((outdir / "memory_plan.json").read_text())
    arena, lb = report_number(report, "arena"), report_number(report, "lower bound")
    assert (arena, lb) == (plan["arena_bytes"], plan["lower_bound_bytes"])
    assert arena <= 1.10 * lb
    assert report_number(report, "weights") == plan["weight_bytes"]
    assert report_number(report, "kv cache") == plan["kv_cache_bytes"]
    assert [s["op"] for s in plan["schedule"]] == [n.op for n in expected.nodes]

    # op counts before/after fusion and kernels per decode step
    total = re.search(r"^\s*total\s+(\d+)\s+(\d+)$", report, re.M)
    assert total and int(total.group(2)) == len(expected.nodes)
    assert int(total.group(1)) > int(total.group(2))
    n_kernels = int(re.search(r"kernels per decode step: (\d+)", report).group(1))
    saved = CompiledPlan.load(str(outdir))
    # one kernel per node; the on-demand prompt logprobs are not part of a decode step
    assert n_kernels == saved.kernel_launches("decode") == len(expected.nodes) - 1
    # every kernel plan.json names is defined in kernels.cu
    named = {launch.fn for launches in saved.phases.values() for launch in launches if launch.kind == "kernel"}
    assert named and named <= set(defined_kernels((outdir / "kernels.cu").read_text()))
    assert saved.graph == g

    # memory_plan.txt: a header and one row per buffer
    rows = [ln for ln in (outdir / "memory_plan.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert rows[0].split()[:5] == ["buffer", "offset", "size", "first", "last"]
    assert len(rows) - 1 == len(plan["buffers"])
    first = rows[1].split()
    b0 = plan["buffers"][0]
    assert [int(x) for x in first[:5]] == [b0["id"], b0["offset"], b0["size"], b0["first"], b0["last"]]


def test_compile_bf16_batch4(tmp_path, capsys):
    outdir = tmp_path / "bf16"
    rc, report, err = run(capsys, "compile", example("llama-3-8b.json"), "-o", outdir,
                          "--dtype", "bfloat16", "--max-batch", "4", "--max-seq", "512")
    assert rc == 0, err
    g = Graph.from_json((outdir / "graph.json").read_text())
    assert g.meta["dtype"] == "bfloat16" and g.meta["max_batch"] == 4 and g.meta["max_seq"] == 512
    assert g.dims["B"] == 4
    expected = compile_graph(load_config(example("llama-3-8b.json")), dtype="bfloat16", max_batch=4, max_seq=512)
    assert g.structure() == expected.structure()
    assert "bf16[" in (outdir / "graph.txt").read_text()
    plan = json.loads((outdir / "memory_plan.json").read_text())
    assert report_number(report, "arena") == plan["arena_bytes"] <= 1.10 * plan["lower_bound_bytes"]
    assert "bfloat16, max_batch 4, max_seq 512" in report


def test_compile_default_outdir(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, report, err = run(capsys, "compile", example("tinyllama-1.1b.json"), "--max-seq", "256")
    assert rc == 0, err
    for name in ARTIFACTS:
        assert (tmp_path / "tinyllama-1.1b.llamagraph" / name).is_file()


def test_compile_checkpoint_dir(tmp_path, capsys, monkeypatch):
    """CONFIG may be a checkpoint directory; the default outdir is named after it."""
    ckpt = tmp_path / "my-model"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(TINY))
    monkeypatch.chdir(tmp_path)
    rc, report, err = run(capsys, "compile", ckpt)
    assert rc == 0, err
    assert (tmp_path / "my-model.llamagraph" / "graph.json").is_file()


def test_compile_dump_dir(tmp_path, capsys):
    dump = tmp_path / "dumps"
    rc, report, err = run(capsys, "compile", example(SMALL), "-o", tmp_path / "out", "--dump-dir", dump)
    assert rc == 0, err
    stages = ["build", *PASS_NAMES]
    assert sorted(f for f in os.listdir(dump) if f.endswith(".txt")) == [f"{k:02d}_{name}.txt" for k, name in enumerate(stages)]
    for k, name in enumerate(stages):
        lines = (dump / f"{k:02d}_{name}.txt").read_text().splitlines()
        assert lines[0] == f"# after {name}"
        assert lines[1].startswith("# ") and len(lines[1]) > 3  # the change note
    note = (dump / f"{stages.index('fuse_linear_residual'):02d}_fuse_linear_residual.txt").read_text()
    assert "# linear_residual: 0 -> 32" in note and "# residual: 32 -> 0" in note
    assert "arena" in (dump / f"{len(stages) - 1:02d}_plan_memory.txt").read_text().splitlines()[1]
    assert f"{len(stages)} files in {dump}" in report


# ---------------------------------------------------------------------------------------------
# dump
# ---------------------------------------------------------------------------------------------

def test_dump_after_residual_rmsnorm(capsys):
    rc, out, err = run(capsys, "dump", example(SMALL), "--after", "fuse_residual_rmsnorm")
    assert rc == 0, err
    assert " = linear_residual(" in out and " = rmsnorm(" in out  # the adds went into the projections
    assert " = silu(" in out and " = mul(" in out  # later fusions have not run yet
    assert " = rope(" in out


def test_dump_build_and_default(capsys):
    rc, build, _ = run(capsys, "dump", example(SMALL), "--after", "build")
    assert rc == 0 and " = add_rmsnorm(" not in build and " = residual(" in build
    rc, last, _ = run(capsys, "dump", example(SMALL))
    assert rc == 0
    assert last == str(compile_graph(load_config(example(SMALL))))


def test_dump_json(capsys):
    rc, out, err = run(capsys, "dump", example(SMALL), "--after", "fuse_gate_up_silu", "--json",
                       "--dtype", "float32", "--max-batch", "2", "--max-seq", "128")
    assert rc == 0, err
    g = Graph.from_json(out)
    ops = g.op_counts()
    assert ops.get("gate_up_silu") == 16 and "silu_mul" not in ops and "rope" in ops
    assert g.meta["dtype"] == "float32" and g.meta["max_batch"] == 2 and g.meta["max_seq"] == 128
    assert g.meta["passes"] == PASS_NAMES[: PASS_NAMES.index("fuse_gate_up_silu") + 1]


# ---------------------------------------------------------------------------------------------
# bad inputs: each exits 2 with one line on stderr naming the culprit
# ---------------------------------------------------------------------------------------------

def _write(tmp_path, name: str, content) -> str:
    p = tmp_path / name
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(p)


def _tiny(tmp_path, **changes) -> str:
    cfg = dict(TINY)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    return _write(tmp_path, "config.json", cfg)


# (id, argv builder given tmp_path, text the error line must contain)
BAD_INPUTS = [
    ("missing-file", lambda t: ["compile", str(t / "nope.json")], "nope.json: no such config file"),
    ("empty-dir", lambda t: ["compile", str(t)], "neither config.json nor params.json"),
    ("invalid-json", lambda t: ["compile", _write(t, "c.json", '{"hidden_size": 64,')], "not valid JSON"),
    ("json-array", lambda t: ["compile", _write(t, "c.json", "[1, 2]")], "expected a JSON object"),
    ("missing-hidden-size", lambda t: ["compile", _tiny(t, hidden_size=None)], "'hidden_size' is missing"),
    ("rope-parameters-yarn", lambda t: ["compile", _tiny(t, rope_parameters={"rope_type": "yarn", "factor": 4.0})],
     "'yarn'"),
    ("rope-scaling-yarn", lambda t: ["compile", _tiny(t, rope_scaling={"type": "yarn", "factor": 4.0})],
     "rope_scaling.rope_type' is 'yarn'"),
    ("hidden-act-gelu", lambda t: ["compile", _tiny(t, hidden_act="gelu")], "'hidden_act' is 'gelu'"),
    ("heads-not-multiple-of-kv", lambda t: ["compile", _tiny(t, num_key_value_heads=3)],
     "not a multiple of num_key_value_heads (3)"),
    ("odd-head-dim", lambda t: ["compile", _tiny(t, head_dim=7)], "head_dim (7) must be even"),
    ("model-type-mistral", lambda t: ["compile", _tiny(t, model_type="mistral")], "'model_type' is 'mistral'"),
    ("layers-not-int", lambda t: ["compile", _tiny(t, num_hidden_layers="2")], "'num_hidden_layers' must be an integer, got '2'"),
    ("layers-float", lambda t: ["compile", _tiny(t, num_hidden_layers=2.5)], "'num_hidden_layers' must be an integer, got 2.5"),
    ("meta-vocab-minus-1", lambda t: ["compile", _write(t, "params.json", {"dim": 64, "n_layers": 2, "n_heads": 4,
                                                                           "vocab_size": -1})],
     "'vocab_size' is -1"),
    ("bad-dtype", lambda t: ["compile", _tiny(t), "--dtype", "float64"], "--dtype: invalid choice: 'float64'"),
    ("unknown-after", lambda t: ["dump", _tiny(t), "--after", "fuse_everything"],
     "unknown pass 'fuse_everything'; valid names: build, shard_tensor_parallel, fuse_all_reduce_residual, "
     "fuse_linear_residual"),
    ("zero-max-batch", lambda t: ["compile", _tiny(t), "--max-batch", "0"], "--max-batch: must be a positive integer"),
    ("negative-max-batch", lambda t: ["compile", _tiny(t), "--max-batch=-4"], "--max-batch: must be a positive integer, got '-4'"),
    ("max-seq-not-int", lambda t: ["dump", _tiny(t), "--max-seq", "lots"], "--max-seq: must be a positive integer, got 'lots'"),
    ("bad-arch", lambda t: ["compile", _tiny(t), "--arch", "hopper"], "--arch: expected a CUDA arch like sm_90, got 'hopper'"),
    ("outdir-is-a-file", lambda t: ["compile", _tiny(t), "-o", _write(t, "taken", "x")],
     "taken: output directory exists and is not a directory"),
    ("unknown-command", lambda t: ["frobnicate"], "invalid choice: 'frobnicate'"),
    ("no-config", lambda t: ["compile"], "required: CONFIG"),
]


def test_bad_inputs_are_distinct():
    assert len({case[0] for case in BAD_INPUTS}) == len({case[2] for case in BAD_INPUTS}) == len(BAD_INPUTS) >= 10


@pytest.mark.parametrize("argv,culprit", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(argv, culprit, tmp_path, capsys):
    rc, out, err = run(capsys, *argv(tmp_path))
    assert rc == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("llamagraph: error: ")
    assert culprit in lines[0]


def test_help_exits_zero(capsys):
    rc, out, _ = run(capsys, "compile", "--help")
    assert rc == 0 and "--max-batch" in out and "--dump-dir" in out


# ---------------------------------------------------------------------------------------------
# the real entry point
# ---------------------------------------------------------------------------------------------

def _python_m(*argv, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "llamagraph", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_python_m_bad_config_exits_2_without_traceback(tmp_path):
    bad = _tiny(tmp_path, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    p = _python_m("compile", bad, "-o", tmp_path / "out", cwd=tmp_path)
    assert p.returncode == 2
    assert p.stdout == ""
    assert "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("llamagraph: error: ")
    assert "yarn" in p.stderr
    assert not (tmp_path / "out").exists()


def test_python_m_compile(tmp_path):
    p = _python_m("compile", example(SMALL), "-o", tmp_path / "out", "--max-seq", "256", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    # 16 layers x (norm+qkv+rope+append, attention, o_proj+residual, norm+gate_up+silu, down+residual)
    # + embedding, last rows, final norm+LM head, sampler
    assert f"kernels per decode step: {16 * 5 + 4}" in p.stdout
    assert (tmp_path / "out" / "graph.html").is_file()
