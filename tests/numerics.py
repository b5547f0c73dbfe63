"""Shared end-to-end checks against HF transformers, used by the reference and CUDA tests."""

import numpy as np

import llamagraph
import models

# Unequal prompt lengths; rope_dynamic's max_position_embeddings is 16, so the long prompt plus
# 8 decode steps runs well past it and exercises the per-sequence NTK rescaling.
PROMPTS = [[3 + (7 * i) % 90 for i in range(19)], [5, 9, 11, 2, 7, 41]]
DECODE = [[(11 * i + 4) % 96 for i in range(8)], [(5 * i + 17) % 96 for i in range(8)]]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_against_hf(model_dir: str, *, backend: str, dtype: str, tol: float, weights=None,
                     hf_dir: str | None = None, max_tokens: int | None = None, **compile_kwargs) -> float:
    """Prefill both prompts as one packed batch, then 8 decode steps; every step's logits of
    every sequence must be within ``tol`` relative error of HF's (with HF's own KV cache).
    Returns the worst relative error seen."""
    import torch

    plan = llamagraph.compile(model_dir, weights, dtype=dtype, max_batch=2, max_seq=32, max_tokens=max_tokens,
                              backend=backend, **compile_kwargs)
    ref = models.hf_reference_logits(hf_dir or model_dir, PROMPTS, DECODE, dtype=getattr(torch, dtype))
    worst = 0.0
    got = plan.run(PROMPTS)
    for step in range(len(DECODE[0]) + 1):
        for b in range(2):
            err = rel_err(got[b], ref[b][step])
            worst = max(worst, err)
            assert err <= tol, f"step {step} sequence {b}: relative error {err:.3g} > {tol}"
        if step < len(DECODE[0]):
            got = plan.run([[DECODE[0][step]], [DECODE[1][step]]])
    assert np.isfinite(got).all()
    return worst
