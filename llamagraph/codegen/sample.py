"""Codegen for the device sampler: one token per row of logits, without host synchronisation.

The numpy reference it implements is ``llamagraph.ir.ops.sample_row``.
"""

from __future__ import annotations

import numpy as np

from .launch import Shape, extent
from .render import Kernel, render

SAMPLE_THREADS = 1024


def sample(V: int) -> Kernel:
    """Temperature / top-k / top-p sampling of one token per row.

    Arguments: logits float32 [B, V], temperature float32 [B], top_k int32 [B], top_p float32 [B],
    seed int64 [B], step int32 [B], want_logprob int32 [B], out int32 [B], logprob float32 [B],
    n_rows int32 B. logprob[b] = log_softmax(logits[b])[out[b]], the token's logprob before
    temperature, where want_logprob[b] != 0, else 0 (the log-sum-exp pass is skipped).
    Semantics of ``llamagraph.ir.ops.sample_row`` with u = ``sample_uniform(seed, step)``:
    temperature <= 0 is greedy (first index of the maximum); top_k <= 0 or >= V and top_p >= 1
    disable those filters; top_p <= 0 keeps only the most likely token(s). Thresholds are found by
    radix selection on the logits' order (logits are monotone in probability) and kept masses are
    summed as 2^-40 fixed point, so the result is deterministic.
    """
    vec = 4 if V % 4 == 0 else 1
    name = f"sample_v{V}"
    return Kernel(name, render("sample", name=name, V=V, vec=vec, threads=SAMPLE_THREADS))


def sample_launch(n_rows: int | str) -> Shape:
    """Grid (B), one 1024-thread block per row."""
    return Shape((extent(n_rows), 1, 1), (SAMPLE_THREADS, 1, 1), 0)


LOGPROB_THREADS = 256


def token_logprobs(V: int) -> Kernel:
    """Each row's log-softmax at its target token: the prompt logprobs of echo.

    Arguments: logits float32 [rows, V] (a chunk of rows), targets int32 [T], out float32 [T],
    rows, row0 (the chunk's first row in the step), T. out[row0 + r] = log_softmax(logits[r])[
    targets[row0 + r]], 0 where the target is < 0; rows at or past T are left alone.
    """
    name = f"token_logprobs_v{V}"
    return Kernel(name, render("token_logprobs", name=name, V=V, threads=LOGPROB_THREADS))


def token_logprobs_launch(rows: int) -> Shape:
    return Shape((extent(rows), 1, 1), (LOGPROB_THREADS, 1, 1), 0)


ADVANCE_THREADS = 128


def advance_decode() -> Kernel:
    """A decode step's inputs moved on to the next step's, on the device (pipelined generation).

    Arguments: next_token int32 [B], tokens int32 [B], positions int32 [B], seq_ids int32 [B],
    seq_lens int32 [slots], sample_step int32 [B], B. Row b: tokens[b] = next_token[b],
    positions[b] += 1, seq_lens[seq_ids[b]] += 1, sample_step[b] += 1 (``advance_decode_ref``).
    """
    name = "advance_decode"
    return Kernel(name, render("advance_decode", name=name, threads=ADVANCE_THREADS))


def advance_decode_launch(n_rows: int | str) -> Shape:
    return Shape((extent(n_rows, 1, ADVANCE_THREADS), 1, 1), (ADVANCE_THREADS, 1, 1), 0)


def advance_decode_ref(inputs: dict) -> dict:
    """The numpy meaning of ``advance_decode`` on a decode step's inputs (a dict of arrays by
    graph input name, with ``next_token``): the next decode step's inputs."""
    out = {k: np.array(v, copy=True) for k, v in inputs.items()}
    out["tokens"] = np.asarray(inputs["next_token"], np.int32).copy()
    out["positions"] = inputs["positions"] + 1
    np.add.at(out["seq_lens"], inputs["seq_ids"], 1)
    out["sample.step"] = inputs["sample.step"] + 1
    return out


# ---- greedy decoding over a vocabulary split across ranks (tensor parallelism) ---------------------
ARGMAX_SLICES = 32  # blocks per row of a rank's chunk: the chunk is read by many SMs at once
ARGMAX_THREADS = 256


def vocab_argmax_partial(chunk: int) -> Kernel:
    """Each rank's greedy candidates: logits fp32 [n, chunk] -> pairs float2 [n, ARGMAX_SLICES]
    (value, local index) of each slice's first maximum. Args: (logits, pairs, n)."""
    name = f"vocab_argmax_partial_c{chunk}_s{ARGMAX_SLICES}"
    return Kernel(name, render("vocab_argmax", name=name, part="partial", chunk=chunk, slices=ARGMAX_SLICES,
                               threads=ARGMAX_THREADS))


def vocab_argmax_partial_launch(n_rows: int | str) -> Shape:
    return Shape((ARGMAX_SLICES, extent(n_rows), 1), (ARGMAX_THREADS, 1, 1), 0)


def vocab_argmax_combine(ranks: int, chunk: int, vocab: int) -> Kernel:
    """The greedy token from every rank's gathered pairs [ranks, n, ARGMAX_SLICES]: the first
    maximum over the whole vocabulary (as the sampler's greedy choice). Args: (pairs, out int32 [n],
    logprob fp32 [n] (set to 0), n)."""
    name = f"vocab_argmax_combine_r{ranks}_c{chunk}_v{vocab}_s{ARGMAX_SLICES}"
    return Kernel(name, render("vocab_argmax", name=name, part="combine", ranks=ranks, chunk=chunk, vocab=vocab,
                               slices=ARGMAX_SLICES, threads=ARGMAX_THREADS))


def vocab_argmax_combine_launch(n_rows: int | str) -> Shape:
    return Shape((extent(n_rows), 1, 1), (ARGMAX_THREADS, 1, 1), 0)
