"""The CUDA sampler against llamagraph.ir.ops.sample_row (with u = sample_uniform(seed, step)).

Exact checks: greedy is the first index of the maximum, a fixed (seed, step) repeats, top_k=1 is
greedy, and on random rows the kernel picks the reference's token in >= 99% of cases (they can
differ only where fp32 rounding of exp / sums lands on a bucket boundary, or at exact ties at
the top-p boundary, which the kernel keeps or drops as a group: "strictly more likely").
Statistical checks: many rows of one small-vocabulary distribution, each with its own step, in one
launch; the empirical token frequencies are within a small total-variation distance of the target.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")

from llamagraph.codegen.sample import sample as sample_kernel  # noqa: E402
from llamagraph.codegen.sample import sample_launch  # noqa: E402
from llamagraph.codegen.render import module_source  # noqa: E402
from llamagraph.ir import ops  # noqa: E402


# tests/gpu/conftest.py skips these without a CUDA device
pytestmark = pytest.mark.gpu

VOCABS = (128256, 32000, 101, 16)


@functools.lru_cache(maxsize=None)
def _sampler(V: int):
    kernel = sample_kernel(V)
    mod = cupy.RawModule(code=module_source([kernel]), backend="nvrtc", options=("--std=c++17",))
    return mod.get_function(kernel.name)


def sample(logits, temperature, top_k, top_p, seed, step, want_logprob=1) -> np.ndarray:
    """Runs the kernel on host arrays; the output is poisoned first."""
    B, V = logits.shape
    full = lambda x, dt: np.broadcast_to(np.asarray(x, dt), (B,)).copy()  # noqa: E731
    args = [cupy.asarray(np.ascontiguousarray(logits, np.float32)), cupy.asarray(full(temperature, np.float32)),
            cupy.asarray(full(top_k, np.int32)), cupy.asarray(full(top_p, np.float32)),
            cupy.asarray(full(seed, np.int64)), cupy.asarray(full(step, np.int32)),
            cupy.asarray(full(want_logprob, np.int32))]
    out = cupy.full(B + 1, -1, cupy.int32)
    logprob = cupy.full(B + 1, np.nan, cupy.float32)
    la = sample_launch(B)
    _sampler(V)(la.grid, la.block, (*args, out, logprob, np.int32(B)))
    got, got_lp = cupy.asnumpy(out), cupy.asnumpy(logprob)
    assert got[B] == -1 and np.isnan(got_lp[B]), "wrote past the last row"
    assert ((got[:B] >= 0) & (got[:B] < V)).all(), got[:B]
    # every sampled token of a row that asks comes with its log-softmax under the raw logits
    # (before temperature); the other rows get 0
    x = np.asarray(logits, np.float64)
    lse = x.max(1) + np.log(np.exp(x - x.max(1, keepdims=True)).sum(1))
    want = np.broadcast_to(np.asarray(want_logprob), (B,)) != 0
    np.testing.assert_allclose(got_lp[:B], np.where(want, x[np.arange(B), got[:B]] - lse, 0.0), rtol=1e-5, atol=1e-4)
    return got[:B]


def reference(logits, temperature, top_k, top_p, seed, step) -> np.ndarray:
    B = logits.shape[0]
    full = lambda x, dt: np.broadcast_to(np.asarray(x, dt), (B,))  # noqa: E731
    out, _logprob = ops._sample_ref([logits, full(temperature, np.float32), full(top_k, np.int32), full(top_p, np.float32),
                              full(seed, np.int64), full(step, np.int32), full(1, np.int32)], {})
    return out


def random_logits(rng, B, V, scale=3.0) -> np.ndarray:
    return (rng.standard_normal((B, V)) * scale).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# exact behaviour
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("V", VOCABS)
def test_the_logprob_is_computed_only_for_rows_that_ask(V):
    rng = np.random.default_rng(7 + V)
    B = 8
    logits = random_logits(rng, B, V)
    want = np.arange(B) % 2  # odd rows ask; sample() checks each row's logprob (or 0)
    temps = np.where(np.arange(B) < 4, 0.0, 0.9).astype(np.float32)  # greedy and sampled rows
    tokens = sample(logits, temps, 0, 1.0, 11, 3, want_logprob=want)
    assert np.array_equal(tokens, sample(logits, temps, 0, 1.0, 11, 3, want_logprob=1))


@pytest.mark.parametrize("V", VOCABS)
def test_greedy_is_argmax_with_ties_to_the_lowest_index(V):
    rng = np.random.default_rng(V)
    B = 64
    logits = random_logits(rng, B, V)
    # rows 0-7: the maximum repeated at several indices; row 8: all equal; row 9: -inf except two
    for b in range(8):
        idx = rng.choice(V, size=min(V, 3 + b), replace=False)
        logits[b, idx] = logits[b].max() + 1.0
    logits[8] = 0.25
    logits[9] = -np.inf
    logits[9, [V - 1, V // 2]] = 1.0
    temperature = np.where(np.arange(B) % 2, 0.0, -1.0)  # 0 and negative are both greedy
    got = sample(logits, temperature, rng.integers(0, V, B), rng.random(B), rng.integers(0, 2**62, B), 0)
    np.testing.assert_array_equal(got, np.argmax(logits, axis=1))


@pytest.mark.parametrize("V", VOCABS)
def test_fixed_seed_and_step_repeat(V):
    rng = np.random.default_rng(V + 1)
    B = 64
    logits = random_logits(rng, B, V, 1.0)
    params = (rng.choice([0.5, 1.0, 1.5], B), rng.choice([0, 5, 50], B), rng.choice([1.0, 0.9], B),
              rng.integers(-2**63, 2**63 - 1, B, dtype=np.int64), rng.integers(0, 10000, B))
    first = sample(logits, *params)
    for _ in range(3):
        np.testing.assert_array_equal(sample(logits, *params), first)
    # another step draws another u: over 64 rows of a spread-out distribution many tokens change
    moved = sample(logits, *params[:4], params[4] + 1)
    assert (moved != first).mean() > 0.3


@pytest.mark.parametrize("V", VOCABS)
def test_top_k_one_is_greedy(V):
    rng = np.random.default_rng(V + 2)
    B = 64
    logits = random_logits(rng, B, V)
    got = sample(logits, rng.choice([0.3, 1.0, 5.0], B), 1, rng.choice([1.0, 0.5], B), rng.integers(0, 2**62, B),
                 rng.integers(0, 1000, B))
    np.testing.assert_array_equal(got, np.argmax(logits, axis=1))


@pytest.mark.parametrize("V", VOCABS)
def test_disabled_filters_change_nothing(V):
    rng = np.random.default_rng(V + 3)
    B = 64
    logits = random_logits(rng, B, V, 1.0)
    seed, step = rng.integers(0, 2**62, B), rng.integers(0, 1000, B)
    plain = sample(logits, 1.0, 0, 1.0, seed, step)
    np.testing.assert_array_equal(sample(logits, 1.0, V, 1.0, seed, step), plain)   # top_k >= V
    np.testing.assert_array_equal(sample(logits, 1.0, -3, 1.5, seed, step), plain)  # top_k < 0, top_p > 1
    # top_p <= 0 keeps only the most likely token
    np.testing.assert_array_equal(sample(logits, 1.0, 0, 0.0, seed, step), np.argmax(logits, axis=1))


@pytest.mark.parametrize("V", VOCABS)
def test_agrees_with_the_reference_on_random_rows(V):
    # The reference draws with a sequential fp32 cumsum over the whole vocabulary, whose rounding
    # (~sqrt(V) * 6e-8 of the total) moves its pick by whole tokens when very many tokens share
    # the mass. Large-vocabulary rows are therefore either filtered to a few tokens by top-k or
    # peaked (logit spread / temperature >= 4), as real next-token distributions are; flat rows
    # are covered by the distribution tests below.
    rng = np.random.default_rng(V + 4)
    B, rounds = 64, (4 if V > 1000 else 16)
    agree = total = 0
    for _ in range(rounds):
        temperature = rng.choice([0.0, 0.4, 0.8, 1.0, 1.3], B)
        top_k = rng.choice([0, 0, 1, 2, 20, 50, max(V // 3, 1), V - 1, V], B)
        top_p = rng.choice([1.0, 1.0, 0.99, 0.95, 0.9, 0.7, 0.3, 0.05], B)
        scale = rng.choice([0.5, 2.0, 4.0], B)
        if V > 1000:
            wide = (top_k == 0) | (top_k > 50)
            scale = np.where(wide, 4.0 * np.maximum(temperature, 0.5) * rng.choice([1.0, 1.5, 2.0], B), scale)
        logits = (rng.standard_normal((B, V)) * scale[:, None]).astype(np.float32)
        seed = rng.integers(-2**63, 2**63 - 1, B, dtype=np.int64)
        step = rng.integers(0, 2**31 - 1, B)
        got = sample(logits, temperature, top_k, top_p, seed, step)
        want = reference(logits, temperature, top_k, top_p, seed, step)
        agree += int((got == want).sum())
        total += B
    assert agree / total >= 0.99, f"{agree} of {total} rows agree"


def test_quantized_logits_with_ties():
    """Exact ties everywhere (logits on a 0.5 grid): top-k keeps every tie of the k-th value."""
    rng = np.random.default_rng(9)
    B, V = 64, 1000
    logits = (np.round(rng.standard_normal((B, V)) * 4) / 2).astype(np.float32)
    top_k = rng.choice([1, 3, 10, 100], B)
    seed, step = rng.integers(0, 2**62, B), rng.integers(0, 1000, B)
    got = sample(logits, 1.0, top_k, 1.0, seed, step)
    want = reference(logits, 1.0, top_k, 1.0, seed, step)
    assert (got == want).mean() >= 0.99
    for b in range(B):  # never outside the top-k set (ties included)
        assert logits[b, got[b]] >= np.sort(logits[b])[-top_k[b]]


# ---------------------------------------------------------------------------------------------
# distributions
# ---------------------------------------------------------------------------------------------

def target_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The distribution sample_row draws from (fp64 here, exact ties impossible in these rows)."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = np.ones(p.size, bool)
    if 0 < top_k < p.size:
        keep &= p >= np.sort(p)[-top_k]
    if top_p < 1.0:
        kept = np.where(keep, p, 0.0)
        above = np.array([kept[kept > x].sum() for x in p])
        keep &= above < top_p * kept.sum()
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (2.0, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.6), (0.8, 5, 0.8), (1.5, 0, 0.9),
])
def test_empirical_frequencies_match_the_target(temperature, top_k, top_p):
    V, N = 16, 20000
    rng = np.random.default_rng(12)
    row = (rng.standard_normal(V) * 1.5).astype(np.float32)
    logits = np.broadcast_to(row, (N, V)).copy()
    seed = 0x5EED
    steps = np.arange(N, dtype=np.int32)  # one u per row, as N decode steps of one sequence would draw
    got = sample(logits, temperature, top_k, top_p, seed, steps)
    freq = np.bincount(got, minlength=V) / N
    target = target_distribution(row, temperature, top_k, top_p)
    assert (freq[target == 0] == 0).all(), "a filtered-out token was drawn"
    tv = 0.5 * np.abs(freq - target).sum()
    assert tv < 0.03, f"total variation {tv:.4f}; freq {np.round(freq, 3)} target {np.round(target, 3)}"
    # and every one of those N draws is the reference's draw (no ties in this row)
    want = reference(logits[:2000], temperature, top_k, top_p, seed, steps[:2000])
    assert (got[:2000] == want).mean() >= 0.99
