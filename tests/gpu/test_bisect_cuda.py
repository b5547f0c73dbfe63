"""llamagraph.bisect on the CUDA backend: every intermediate fetched from the device."""

import pytest

import llamagraph
from test_bisect import expected_rows, interleaved_rope, wrong_eps  # the faults and rows of the CPU tests

pytestmark = pytest.mark.gpu

PROMPT = [1, 5, 9, 12, 40, 33, 7, 60]
ONE_TOKEN = [1]  # T == B: the decode phase, replayed from a captured CUDA graph


@pytest.mark.parametrize("passes", [None, []], ids=["fused", "unfused"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("prompt", [PROMPT, ONE_TOKEN], ids=["prefill", "one_token"])
def test_clean_checkpoint_passes_on_cuda(hf_model, dtype, passes, prompt):
    d = hf_model("gqa", dtype="float32" if dtype == "float32" else dtype)
    r = llamagraph.bisect(d, prompt, backend="cuda", dtype=dtype, passes=passes)
    print(r.table())
    # a fused plan holds no norm or MLP output (GEMV prologues and epilogues): fewer rows
    assert r.backend == "cuda" and [(x.layer, x.op) for x in r.rows] == expected_rows(r, passes)
    assert r.ok, r.verdict()


@pytest.mark.parametrize("passes", [None, []], ids=["fused", "unfused"])
@pytest.mark.parametrize("fault, where", [(wrong_eps(1, 1.0), {None: (1, "residual"), (): (1, "ffn_norm")}),
                                          (interleaved_rope(0), {None: (0, "q_rot"), (): (0, "q_rot")})])
def test_faults_are_named_on_cuda(hf_model, passes, fault, where):
    r = llamagraph.bisect(hf_model("gqa"), PROMPT, backend="cuda", dtype="float16", passes=passes, edit_graph=fault)
    print(r.table())
    assert (r.first_failure.layer, r.first_failure.op) == where[None if passes is None else ()], r.verdict()
