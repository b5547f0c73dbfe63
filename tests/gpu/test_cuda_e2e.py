"""The CUDA backend end to end: against HF transformers, against itself, and its errors."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import llamagraph
import models
from numerics import DECODE, PROMPTS, check_against_hf, rel_err

pytestmark = pytest.mark.gpu

MATRIX = ["mha", "gqa", "mqa", "bias", "tied", "rope_linear", "rope_dynamic", "rope_llama3", "head_dim"]


@pytest.mark.parametrize("name", MATRIX)
def test_fp32_logits_match_hf(hf_model, name):
    check_against_hf(hf_model(name), backend="cuda", dtype="float32", tol=1e-3)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", MATRIX)
def test_half_precision_logits_match_hf(hf_model, name, dtype):
    # the checkpoint holds the rounded weights; HF computes in fp32 from them
    d = hf_model(name, dtype=dtype)
    check_against_hf(d, backend="cuda", dtype=dtype, tol=3e-2)


def test_meta_checkpoint_on_gpu(meta_model):
    meta_dir, hf_dir = meta_model("meta_llama3")
    check_against_hf(meta_dir, backend="cuda", dtype="float32", tol=1e-3, hf_dir=hf_dir)


def test_chunked_and_long_prefill(hf_model):
    # max_tokens 8 forces chunked prefill through the cuBLAS path and the tiled attention
    check_against_hf(hf_model("gqa"), backend="cuda", dtype="float32", tol=1e-3, max_tokens=8)


@pytest.mark.parametrize("name", ["gqa", "bias", "head_dim"])
def test_greedy_32_tokens_identical_to_hf(hf_model, name):
    d = hf_model(name)
    plan = llamagraph.compile(d, dtype="float32", max_batch=2, max_seq=64, backend="cuda")
    outs = plan.generate(PROMPTS, max_new_tokens=32)
    for prompt, out in zip(PROMPTS, outs):
        assert out == models.hf_greedy(d, prompt, 32)


@pytest.mark.parametrize("passes", [None, []], ids=["fused", "unfused"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_matches_reference_backend(hf_model, dtype, passes):
    # unfused: every op of the builder's graph (bias_add, residual, silu, mul, rope, kv_append...)
    # runs through its own lowering
    d = hf_model("bias", dtype=dtype)
    ref = llamagraph.compile(d, dtype=dtype, max_batch=2, max_seq=32, passes=passes)
    gpu = llamagraph.compile(d, dtype=dtype, max_batch=2, max_seq=32, backend="cuda", passes=passes)
    if passes == []:
        assert "bias_add" in gpu.graph.op_counts() and "kv_append" in gpu.graph.op_counts()
    tol = 1e-4 if dtype == "float32" else 2e-2
    assert rel_err(gpu.run(PROMPTS), ref.run(PROMPTS)) < tol
    for step in range(4):
        feed = [[DECODE[0][step]], [DECODE[1][step]]]
        assert rel_err(gpu.run(feed), ref.run(feed)) < tol


def test_graph_replay_bit_identical_to_eager(hf_model):
    d = hf_model("gqa", dtype="float16")
    plan = llamagraph.compile(d, dtype="float16", max_batch=2, max_seq=32, backend="cuda")
    ex = plan.executor
    plan.run(PROMPTS)
    snapshot = {k: v.copy() for k, v in ex.persistent.items()}
    lengths = list(plan.lengths)
    replayed = plan.run([[DECODE[0][0]], [DECODE[1][0]]])  # a captured graph replay
    assert 2 in ex.graphs
    replay_arena = ex.arena.get()
    # restore the cache and run the same step's kernels eagerly, without the graph
    for k, v in snapshot.items():
        ex.persistent[k][...] = v
    ex.cp.cuda.Device().synchronize()  # the executor's stream does not wait for the default stream
    plan.lengths = lengths
    ex.graphs.clear()
    ex._capture = lambda scalars, phases=("decode",): _EagerGraph(ex, scalars)
    eager = plan.run([[DECODE[0][0]], [DECODE[1][0]]])
    assert np.array_equal(replayed, eager)
    assert np.array_equal(replay_arena, ex.arena.get())


class _EagerGraph:
    def __init__(self, ex, scalars):
        self.ex, self.scalars = ex, scalars

    def launch(self, stream):
        self.ex.launch_phase("decode", self.scalars)


def test_saved_plan_runs_on_the_gpu(hf_model, tmp_path):
    """`llamagraph compile -o DIR` then llamagraph.load(DIR, backend="cuda"): the same numbers as
    compiling in process, without recompiling."""
    from llamagraph.cli import main

    d = hf_model("gqa", dtype="float16")
    assert main(["compile", d, "-o", str(tmp_path / "plan"), "--max-batch", "2", "--max-seq", "32"]) == 0
    fresh = llamagraph.compile(d, dtype="float16", max_batch=2, max_seq=32, backend="cuda")
    loaded = llamagraph.load(tmp_path / "plan", backend="cuda")
    assert np.array_equal(loaded.run(PROMPTS), fresh.run(PROMPTS))
    for step in range(3):
        feed = [[DECODE[0][step]], [DECODE[1][step]]]
        assert np.array_equal(loaded.run(feed), fresh.run(feed))
    assert 2 in loaded.executor.graphs
    assert loaded.generate(PROMPTS, 8, temperature=0.7, seed=3) == fresh.generate(PROMPTS, 8, temperature=0.7, seed=3)


@pytest.mark.parametrize("ahead", ["0", "1"], ids=["step_by_step", "pipelined"])
def test_decode_graphs_per_batch_size(hf_model, monkeypatch, ahead):
    monkeypatch.setenv("LLAMAGRAPH_AHEAD", ahead)
    d = hf_model("gqa")
    plan = llamagraph.compile(d, dtype="float32", max_batch=2, max_seq=64, backend="cuda")
    ref = llamagraph.compile(d, dtype="float32", max_batch=2, max_seq=64)
    # different stop points: step by step, the batch shrinks from 2 to 1 mid-generation; pipelined,
    # the stopped row runs on in the queued steps and its tokens are dropped
    full = plan.generate(PROMPTS, 12)
    stop = full[1][4]
    assert plan.generate(PROMPTS, 12, stop_tokens=[stop]) == ref.generate(PROMPTS, 12, stop_tokens=[stop])
    graphs = plan.executor.graphs if ahead == "0" else plan.executor.ahead_graphs
    assert set(graphs) >= ({1, 2} if ahead == "0" else {2})


def test_advance_kernel_against_reference(hf_model):
    """The advance phase on the device against ``advance_decode_ref``: 3 of 4 slots in the step,
    random tokens, positions, lengths and sampler steps (no zeros to pass by accident)."""
    from llamagraph.api import Segment, Sampling
    from llamagraph.codegen.launch import ADVANCE
    from llamagraph.codegen.sample import advance_decode_ref

    plan = llamagraph.compile(hf_model("gqa"), dtype="float16", max_batch=4, max_seq=64, backend="cuda")
    ex, rng = plan.executor, np.random.default_rng(7)
    lengths = [int(x) for x in rng.integers(3, 40, 4)]
    rows = [3, 0, 2]
    step = [Segment(s, [int(rng.integers(1, 90))], lengths[s]) for s in rows]
    params = Sampling(0.5, 3, 0.9, 1).per_row(rows, [int(x) for x in rng.integers(1, 50, 4)])
    inputs = plan.step_inputs(step, params, lengths)
    nxt = rng.integers(1, 90, 3).astype(np.int32)
    names = ["tokens", "positions", "seq_ids", "seq_lens", "sample.step", "last_index", "sample.seed"]
    _, scalars, _ = ex.stage(inputs, 3, 3, [])
    ex.cp.cuda.runtime.memcpyAsync(int(ex.addr[plan.next_token_name]), nxt.ctypes.data, nxt.nbytes,
                                   ex.cp.cuda.runtime.memcpyHostToDevice, ex.stream.ptr)
    ex.stream.synchronize()
    ex.launch_phase(ADVANCE, scalars)
    got = ex.collect(names, scalars)
    want = advance_decode_ref({**inputs, "next_token": nxt})
    for name in names:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert not np.array_equal(got["seq_lens"], inputs["seq_lens"])


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_k=40, top_p=0.95, seed=11)],
                         ids=["greedy", "sampled"])
def test_pipelined_generate_matches_step_by_step(hf_model, monkeypatch, sampling):
    """The same tokens whether the host waits for each decode step or queues steps ahead while the
    device feeds its tokens back; stops at different steps; then the batch continues (append)."""
    d = hf_model("gqa", dtype="float16")
    plan = llamagraph.compile(d, dtype="float16", max_batch=3, max_seq=96, backend="cuda")
    prompts = [[1, 5, 9, 3], [4, 4], [7, 8, 2, 60, 11]]
    monkeypatch.setenv("LLAMAGRAPH_AHEAD", "0")
    free = plan.generate(prompts, 24, **sampling)
    stops = [free[0][5], free[2][11]]
    runs = []
    for ahead in ("0", "1"):
        monkeypatch.setenv("LLAMAGRAPH_AHEAD", ahead)
        toks = plan.generate(prompts, 24, stop_tokens=stops, **sampling)
        lengths = list(plan.lengths)
        more = plan.generate([[3], [5], [6]], 10, append=True, **sampling)
        runs.append((toks, lengths, more))
    assert runs[1] == runs[0]
    assert any(len(t) < 24 for t in runs[0][0])
    assert set(plan.executor.ahead_graphs) == {3}


def test_sampling_seeded_and_topk1_is_greedy(hf_model):
    d = hf_model("gqa")
    plan = llamagraph.compile(d, dtype="float32", max_batch=2, max_seq=64, backend="cuda")
    a = plan.generate(PROMPTS, 16, temperature=0.8, top_k=40, top_p=0.95, seed=11)
    b = plan.generate(PROMPTS, 16, temperature=0.8, top_k=40, top_p=0.95, seed=11)
    c = plan.generate(PROMPTS, 16, temperature=0.8, top_k=40, top_p=0.95, seed=12)
    assert a == b and a != c
    assert plan.generate(PROMPTS, 16, temperature=1.0, top_k=1, seed=5) == plan.generate(PROMPTS, 16)


def test_compiled_module_cached_on_disk_by_source_hash(hf_model, tmp_path, monkeypatch):
    from llamagraph.codegen import nvrtc

    monkeypatch.setenv("LLAMAGRAPH_CACHE", str(tmp_path))
    d = hf_model("gqa")
    llamagraph.compile(d, dtype="float16", max_batch=2, max_seq=32, backend="cuda")
    (cubin,) = list((tmp_path / "kernels").iterdir())
    stamp = cubin.stat().st_mtime_ns
    calls = []
    real = nvrtc.compile_source
    monkeypatch.setattr(nvrtc, "compile_source", lambda *a, **k: calls.append(1) or real(*a, **k))
    plan = llamagraph.compile(d, dtype="float16", max_batch=2, max_seq=32, backend="cuda")
    assert calls == [] and cubin.stat().st_mtime_ns == stamp  # loaded, not recompiled
    assert np.isfinite(plan.run(PROMPTS)).all()
    llamagraph.compile(d, dtype="bfloat16", max_batch=2, max_seq=32, backend="cuda")  # other source, other file
    assert len(list((tmp_path / "kernels").iterdir())) == 2 and calls == [1]


def test_checkpoint_streams_to_gpu_with_progress(hf_model, capfd):
    d = hf_model("bias", dtype="bfloat16")
    plan = llamagraph.compile(d, dtype="bfloat16", max_batch=2, max_seq=32, backend="cuda", progress=True)
    err = capfd.readouterr().err
    assert "uploading weights" in err and "100.0%" in err
    ref = llamagraph.compile(d, dtype="bfloat16", max_batch=2, max_seq=32)
    assert rel_err(plan.run(PROMPTS), ref.run(PROMPTS)) < 2e-2


def test_bad_weights_on_gpu_are_one_line_errors(hf_model, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = hf_model("gqa")
    tensors = load_file(os.path.join(d, "model.safetensors"))
    shutil.copy(os.path.join(d, "config.json"), tmp_path / "config.json")
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(llamagraph.WeightError, match="model.layers.1.mlp.up_proj.weight") as e:
        llamagraph.compile(str(tmp_path), dtype="float16", backend="cuda")
    assert "\n" not in str(e.value)
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:-1]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(llamagraph.WeightError, match="k_proj.weight.*shape"):
        llamagraph.compile(str(tmp_path), dtype="float16", backend="cuda")


def test_user_errors_on_gpu(hf_model):
    d = hf_model("gqa")
    plan = llamagraph.compile(d, dtype="float32", max_batch=2, max_seq=16, backend="cuda")
    with pytest.raises(llamagraph.InputError, match="max_seq"):
        plan.run([list(range(20))])
    with pytest.raises(llamagraph.InputError, match="max_batch"):
        plan.run([[1], [2], [3]])
    with pytest.raises(llamagraph.InputError, match="outside the vocabulary"):
        plan.run([[1, 96]])


def _sanitized(tool: str, script: str, tmp_path) -> str:
    """Run ``script`` (Python source ending with print('SANITIZER-RUN-OK')) under compute-sanitizer's
    ``tool``; its exit must be clean; return everything it printed."""
    path = tmp_path / "step.py"
    path.write_text(script)
    env = dict(os.environ, LLAMAGRAPH_CACHE=str(tmp_path / "cache"))
    res = subprocess.run(
        # --report-api-errors no: cuda-bindings probes driver entry points (cuGetProcAddress) that
        # this driver lacks; those host API results are not memory errors
        ["compute-sanitizer", "--tool", tool, "--report-api-errors", "no", "--error-exitcode", "7",
         sys.executable, str(path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "SANITIZER-RUN-OK" in res.stdout
    return res.stdout + res.stderr


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not installed")
def test_compute_sanitizer_memcheck_clean(hf_model, tmp_path):
    d = hf_model("bias", dtype="float16")
    out = _sanitized("memcheck", (
        "import llamagraph\n"
        f"plan = llamagraph.compile({d!r}, dtype='float16', max_batch=2, max_seq=32, backend='cuda')\n"
        f"plan.run({PROMPTS!r})\n"
        "plan.run([[3], [4]])\n"
        "plan.generate([[1, 2, 3]], 3, temperature=1.0, top_p=0.9)\n"
        "print('SANITIZER-RUN-OK')\n"
    ), tmp_path)
    assert "ERROR SUMMARY: 0 errors" in out


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not installed")
def test_compute_sanitizer_racecheck_clean(hf_model, tmp_path):
    """Shared-memory hazards of a prefill (tensor-core attention: head_dim 16, fewer tile copies than
    threads, the case that once wrote past its tile), a decode step, and pipelined sampled decode
    steps (the sampler's shared histograms; the advance kernel)."""
    d = hf_model("bias", dtype="float16")
    out = _sanitized("racecheck", (
        "import llamagraph\n"
        f"plan = llamagraph.compile({d!r}, dtype='float16', max_batch=2, max_seq=64, backend='cuda')\n"
        "plan.run([list(range(1, 40)), list(range(5, 60))])\n"
        "plan.run([[3], [4]])\n"
        "plan.generate([[1, 2, 3], [4, 5]], 4, temperature=0.8, top_k=20, top_p=0.9)\n"
        "print('SANITIZER-RUN-OK')\n"
    ), tmp_path)
    assert "RACECHECK SUMMARY: 0 hazards" in out
