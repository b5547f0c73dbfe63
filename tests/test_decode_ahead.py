"""Pipelined decoding: the plan's advance phase and ``generate`` running decode steps ahead.

The advance phase feeds each decode step's sampled tokens back as the next step's inputs on the
device, so the host can queue steps before it has read their tokens. Its meaning is
``advance_decode_ref``; the reference executors run ``decode_ahead`` by it, so ``generate``'s
pipelined bookkeeping (stops, lengths, logprobs) is checked here against the step-by-step loop
(``LLAMAGRAPH_AHEAD=0``) on the CPU. The kernel itself is checked on the GPU
(tests/gpu/test_cuda_e2e.py).
"""

import numpy as np
import pytest

import llamagraph
from llamagraph.api import Segment, Sampling
from llamagraph.codegen.compiled import CompiledPlan
from llamagraph.codegen.launch import ADVANCE
from llamagraph.codegen.nvrtc import compile_source
from llamagraph.codegen.sample import advance_decode_ref


def _plan(hf_model, name="gqa", **kw):
    kw.setdefault("max_batch", 3)
    kw.setdefault("max_seq", 48)
    return llamagraph.compile(hf_model(name), dtype="float32", **kw)


def test_advance_phase_is_one_kernel_captured_behind_decode(hf_model, tmp_path):
    plan = _plan(hf_model)
    (launch,) = plan.compiled.phases[ADVANCE]
    assert launch.fn == "advance_decode" and launch.early
    names = [a.ref for a in launch.args]
    assert names == [plan.next_token_name, "tokens", "positions", "seq_ids", "seq_lens", "sample.step", "B"]
    assert plan.compiled.captured == ("decode", ADVANCE)  # proved graph-safe by the plan check
    assert launch.fn not in [x.fn for x in plan.compiled.phases["decode"]]  # not a decode launch: not counted there
    assert 'extern "C" __global__ void __launch_bounds__(128)\nadvance_decode(' in plan.compiled.source
    plan.compiled.save(str(tmp_path / "p"))
    loaded = CompiledPlan.load(str(tmp_path / "p"))
    assert loaded.phases[ADVANCE] == plan.compiled.phases[ADVANCE] and loaded.captured == plan.compiled.captured


def test_advance_kernel_compiles():
    from llamagraph.codegen.render import module_source
    from llamagraph.codegen.sample import advance_decode

    assert compile_source(module_source([advance_decode()]), "sm_90", jobs=1).cubin


def test_advance_ref_gives_the_inputs_the_host_builds_for_the_next_step(hf_model):
    """The device's next inputs are exactly what ``Plan.step_inputs`` would stage for the next
    decode step: sequences 2 and 0 of 3 slots (slot 1 held, not in the step), sampling rows."""
    plan = _plan(hf_model)
    lengths = [7, 4, 11]
    rows, toks, nxt = [2, 0], [5, 9], np.array([31, 17], np.int32)
    params = Sampling(0.7, 5, 0.9, 3).per_row(rows, [4, 0, 2])
    now = plan.step_inputs([Segment(s, [t], lengths[s]) for s, t in zip(rows, toks)], params, lengths, None, True)
    got = advance_decode_ref({**now, "next_token": nxt})
    after = list(lengths)
    for s in rows:
        after[s] += 1
    params.step = params.step + 1
    want = plan.step_inputs([Segment(s, [int(t)], after[s]) for s, t in zip(rows, nxt)], params, after, None, True)
    assert set(got) - {"next_token"} == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _both(plan, monkeypatch, prompts, n, **kw):
    """generate step by step and pipelined (each from a fresh batch); both results and lengths."""
    out = []
    for ahead in ("0", "1"):
        monkeypatch.setenv("LLAMAGRAPH_AHEAD", ahead)
        got = plan.generate(prompts, n, **kw)
        out.append((got, list(plan.lengths)))
    return out


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.9, top_k=20, top_p=0.95, seed=5)])
def test_pipelined_generate_matches_step_by_step(hf_model, monkeypatch, sampling):
    plan = _plan(hf_model)
    prompts = [[1, 5, 9, 3], [4, 4], [7, 8, 2, 60, 11]]
    monkeypatch.setenv("LLAMAGRAPH_AHEAD", "0")
    free = plan.generate(prompts, 12, **sampling)
    # stop tokens that end sequences at different steps (one maybe never): the later tokens of a
    # stopped row are computed by the queued steps and must be dropped
    stops = [free[0][3], free[1][6]]
    assert len(set(stops)) == 2
    (step_wise, lens_a), (ahead, lens_b) = _both(plan, monkeypatch, prompts, 12, stop_tokens=stops,
                                                 logprobs=True, **sampling)
    # the same tokens; logprobs to float32 rounding (once a sequence stops, the step-by-step loop
    # runs a smaller batch, and a batch of other rows may round differently)
    assert ahead[0] == step_wise[0] and lens_b == lens_a
    for got, want in zip(ahead[1], step_wise[1]):
        np.testing.assert_allclose(got, want, rtol=1e-5)
    assert any(len(t) < 12 for t in ahead[0])  # a sequence did stop early
    # continuing the batch: what each cache holds is the same either way
    monkeypatch.setenv("LLAMAGRAPH_AHEAD", "0")
    plan.generate(prompts, 12, stop_tokens=stops, **sampling)
    cont_a = plan.generate([[3], [5], [6]], 6, append=True, **sampling)
    monkeypatch.setenv("LLAMAGRAPH_AHEAD", "1")
    plan.generate(prompts, 12, stop_tokens=stops, **sampling)
    cont_b = plan.generate([[3], [5], [6]], 6, append=True, **sampling)
    assert cont_b == cont_a


def test_pipelined_generate_stops_all_and_one_token(hf_model, monkeypatch):
    plan = _plan(hf_model, max_batch=1)
    monkeypatch.setenv("LLAMAGRAPH_AHEAD", "0")
    free = plan.generate([[1, 2, 3]], 10)[0]
    for kw in (dict(stop_tokens=[free[2]]), dict(), dict(stop_tokens=[free[0]])):
        for n in (1, 2, 10):
            (a, la), (b, lb) = _both(plan, monkeypatch, [[1, 2, 3]], n, **kw)
            assert a == b and la == lb, (kw, n)


def test_pipelined_generate_on_simulated_ranks(hf_model, monkeypatch):
    plan = llamagraph.compile(hf_model("gqa"), dtype="float32", max_batch=2, max_seq=40, tp=2)
    (a, la), (b, lb) = _both(plan, monkeypatch, [[1, 5, 9], [3, 3, 3, 3]], 9, temperature=0.8, seed=2)
    assert a == b and la == lb


def test_pipelined_generate_streams_every_token_in_order(hf_model, monkeypatch):
    plan = _plan(hf_model, max_batch=2)
    seen = []
    monkeypatch.setenv("LLAMAGRAPH_AHEAD", "1")
    got = plan.generate([[1, 2], [3, 4]], 7, on_token=lambda s, t: seen.append((s, t)))
    assert [t for s, t in seen if s == 0] == got[0] and [t for s, t in seen if s == 1] == got[1]
    assert len(seen) == 14


def test_tp_plan_has_a_greedy_decode_phase_without_the_logits_gather(hf_model):
    """tp 2: decode_greedy runs every rank's candidates through the all-gather instead of the
    logits: no vocab_concat and no sampler; the same kernel count as decode. tp 1 has no such phase."""
    from llamagraph.codegen.launch import DECODE_GREEDY

    two = llamagraph.compile(hf_model("odd_vocab"), dtype="float16", max_batch=2, max_seq=32, tp=2)
    c = two.compiled
    dec, greedy = c.phases["decode"], c.phases[DECODE_GREEDY]
    assert DECODE_GREEDY in c.captured
    fns = [launch.fn for launch in greedy]
    assert not any(f.startswith(("vocab_concat", "sample_")) for f in fns)
    assert any(f.startswith("vocab_argmax_partial") for f in fns) and any(f.startswith("vocab_argmax_combine") for f in fns)
    gathers = [launch for launch in greedy if launch.fn == "allgather"]
    assert len(gathers) == 1 and gathers[0].args[3].ref == 64  # (value, index) of 32 slices per row, not 49 logits
    assert c.kernel_launches(DECODE_GREEDY) == c.kernel_launches("decode")
    assert [f for f in fns if not f.startswith("vocab_argmax") and f != "allgather"] == \
        [launch.fn for launch in dec if not launch.fn.startswith(("vocab_concat", "sample_")) and launch.fn != "allgather"]
    assert "vocab_argmax_combine_r2_c49_v97_s32" in c.kernels  # the padding row past 97 is not a candidate
    one = llamagraph.compile(hf_model("odd_vocab"), dtype="float16", max_batch=2, max_seq=32)
    assert DECODE_GREEDY not in one.compiled.phases


def test_vocab_argmax_kernels_compile():
    from llamagraph.codegen.render import module_source
    from llamagraph.codegen.sample import vocab_argmax_combine, vocab_argmax_partial

    src = module_source([vocab_argmax_partial(64128), vocab_argmax_combine(2, 64128, 128256)])
    assert compile_source(src, "sm_90", jobs=1).cubin
