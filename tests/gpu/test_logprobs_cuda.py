"""Token logprobs and echo on the GPU: the sampler's logprob output and the on-demand prompt
logprobs (chunked LM head + row log-softmax), against the reference backend."""

import numpy as np
import pytest

import llamagraph

pytestmark = pytest.mark.gpu

PROMPTS = [[1, 17, 33, 5, 60, 2, 9, 41, 77, 12], [1, 88, 3, 50]]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_logprobs_and_echo_match_the_reference(hf_model, dtype):
    d = hf_model("gqa", dtype=dtype)
    kw = dict(dtype=dtype, max_batch=2, max_seq=48, max_tokens=6)  # 6: prompts span several prefill steps
    ref = llamagraph.compile(d, **kw)
    gpu = llamagraph.compile(d, backend="cuda", **kw)
    tol = 1e-4 if dtype == "float32" else 5e-2
    for echo in (False, True):
        want_t, want_lp = ref.generate(PROMPTS, 6, logprobs=True, echo=echo)
        got_t, got_lp = gpu.generate(PROMPTS, 6, logprobs=True, echo=echo)
        if dtype == "float32":
            assert got_t == want_t
        for wt, gt, wl, gl in zip(want_t, got_t, want_lp, got_lp):
            assert len(gl) == len(gt)
            n = next((i for i, (a, b) in enumerate(zip(wt, gt)) if a != b), len(wt))  # compare up to a divergence
            np.testing.assert_allclose(gl[: n + 1], wl[: n + 1], rtol=tol, atol=tol)
    # decode steps asking for the next token's logprob still replay captured graphs (pipelined)
    assert gpu.executor.ahead_graphs


def test_prompt_logprobs_over_many_chunks(hf_model):
    """A 300-token prompt in one step: the LM head runs over 128-row chunks, the last one partial."""
    d = hf_model("gqa")
    rng = np.random.default_rng(0)
    prompt = [1] + rng.integers(3, 96, 299).tolist()
    ref = llamagraph.compile(d, dtype="float32", max_batch=1, max_seq=320)
    gpu = llamagraph.compile(d, dtype="float32", max_batch=1, max_seq=320, backend="cuda")
    want_t, want_lp = ref.generate([prompt], 1, logprobs=True, echo=True)
    got_t, got_lp = gpu.generate([prompt], 1, logprobs=True, echo=True)
    assert got_t == want_t and len(got_lp[0]) == 301
    np.testing.assert_allclose(got_lp[0], want_lp[0], rtol=1e-4, atol=1e-4)


def test_plain_decode_launches_no_prompt_logprob_kernel(hf_model):
    d = hf_model("gqa", dtype="float16")
    plan = llamagraph.compile(d, dtype="float16", max_batch=1, max_seq=32, backend="cuda")
    names = {launch.fn for launch in plan.compiled.phases["decode"] if not launch.on_demand}
    assert not any(n.startswith("token_logprobs") for n in names)
    assert any(launch.fn.startswith("token_logprobs") for launch in plan.compiled.phases["decode"])
