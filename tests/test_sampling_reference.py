"""The reference sampler's semantics (the CUDA sampler is tested against these on the GPU)."""

import numpy as np

from llamagraph.ir.ops import sample_row, sample_uniform


def draws(logits, n=4000, **kw):
    return np.array([sample_row(logits, kw.get("t", 1.0), kw.get("k", 0), kw.get("p", 1.0), sample_uniform(9, s))
                     for s in range(n)])


def test_greedy_is_first_index_of_the_max():
    lg = np.array([0.1, 2.0, -1.0, 2.0], np.float32)
    assert sample_row(lg, 0.0, 0, 1.0, 0.7) == 1


def test_top_p_keeps_or_drops_ties_together():
    lg = np.log(np.array([0.3, 0.3, 0.2, 0.2], np.float32))
    assert set(draws(lg, 300, p=0.5)) == {0, 1}  # no token is strictly above either 0.3
    assert set(draws(lg, 300, p=0.65)) == {0, 1, 2, 3}


def test_frequencies_follow_the_filtered_distribution():
    rng = np.random.default_rng(0)
    lg = rng.standard_normal(12).astype(np.float32)
    t, k, p = 0.7, 6, 0.8
    probs = np.exp(lg / t - (lg / t).max())
    probs /= probs.sum()
    keep = probs >= np.sort(probs)[-k]
    kept = np.where(keep, probs, 0)
    order = np.argsort(-kept)
    above = np.cumsum(kept[order]) - kept[order]
    nucleus = np.zeros(12, bool)
    nucleus[order] = above < p * kept.sum()
    target = np.where(keep & nucleus, probs, 0)
    target /= target.sum()
    got = np.bincount(draws(lg, 6000, t=t, k=k, p=p), minlength=12) / 6000
    assert 0.5 * np.abs(got - target).sum() < 0.03  # total variation distance
    assert set(np.flatnonzero(got)) <= set(np.flatnonzero(target))


def test_seeded_draws_repeat_and_differ_by_seed_and_step():
    assert sample_uniform(3, 7) == sample_uniform(3, 7)
    assert len({float(sample_uniform(3, s)) for s in range(100)}) == 100
    assert sample_uniform(3, 7) != sample_uniform(4, 7)
    u = np.array([sample_uniform(1, s) for s in range(20000)])
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
