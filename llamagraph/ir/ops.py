"""The op registry: for every op, its shape/dtype rule and its numpy reference.

An op is three pieces: ``register(...)`` here (what it computes), one lowering in
``llamagraph.codegen.lowering`` (which kernels, launched how) and its template under
``templates/``. Passes and executors read ops only through this registry.

Shapes use symbolic dims: ``T`` is the number of tokens in the step (all sequences packed
back to back, no padding) and ``B`` the number of sequences in the step. Reference functions
take float32 (or integer) numpy arrays with concrete shapes and return float32 arrays; the
backend rounds each output to its storage dtype, exactly where the GPU would store it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .dtypes import to_float32, to_storage
from .graph import Value
from .layout import rope_pair_order


@dataclass(frozen=True)
class OpDef:
    name: str
    # (input Values, attrs) -> [(shape, dtype), ...] for each output
    infer: Callable[[list[Value], dict], list[tuple[tuple, str]]]
    # (input arrays, attrs) -> output arrays
    reference: Callable[..., list[np.ndarray]]
    # out index -> input indices the output may overwrite (same size, element-wise safe)
    inplace: dict[int, tuple[int, ...]] = field(default_factory=dict)
    effects: bool = False  # writes persistent state (KV cache): never dead code
    n_inputs: tuple[int, int] = (1, 1)  # (min, max) number of inputs
    gemm: bool = False  # y = x @ W^T (+ bias), nothing else: a bias add after it can fold in
    # computed only in a step that fetches its output (its launches wait on wants.<output>)
    on_demand: bool = False
    # reads its weight one row per index (an embedding lookup), not whole
    gather: bool = False
    # a collective over the tensor-parallel ranks: ``reference`` takes every rank's inputs
    # ([rank][input] arrays) and returns every rank's outputs ([rank][output])
    collective: bool = False


OPS: dict[str, OpDef] = {}


def register(name, infer, reference, *, inplace=None, effects=False, n_inputs=(1, 1), gemm=False, on_demand=False,
             gather=False, collective=False):
    OPS[name] = OpDef(name, infer, reference, dict(inplace or {}), effects, n_inputs, gemm, on_demand, gather,
                      collective)


def gemm_ops() -> tuple[str, ...]:
    return tuple(name for name, d in OPS.items() if d.gemm)


# ---------------------------------------------------------------------------------------------
# shared numerics
# ---------------------------------------------------------------------------------------------

def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    # x: [R, D]; statistics in fp32 as HF does
    var = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(var + np.float32(eps))) * w


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, seq_len: int = 0) -> np.ndarray:
    """Inverse frequencies [head_dim/2] for every rope type, following HF's rope init functions.

    ``seq_len`` only matters for dynamic NTK scaling, where the base grows with the sequence.
    """
    kind = (scaling or {}).get("rope_type", "default")
    exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    base = float(theta)
    if kind == "dynamic":
        orig = scaling["original_max_position_embeddings"]
        factor = scaling["factor"]
        L = max(seq_len, orig)
        base = base * ((factor * L / orig) - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv = (1.0 / (np.float32(base) ** exps)).astype(np.float32)
    if kind == "linear":
        inv = (inv / np.float32(scaling["factor"])).astype(np.float32)
    elif kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, layout: str) -> np.ndarray:
    """x: [T, h, D]; cos/sin: [T, D/2]. rotate_half pairs (i, i+D/2); interleaved pairs (2i, 2i+1)."""
    c, s = cos[:, None, :], sin[:, None, :]
    out = np.empty_like(x)
    if layout == "rotate_half":
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        out[..., :half] = x1 * c - x2 * s
        out[..., half:] = x2 * c + x1 * s
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out[..., 0::2] = x1 * c - x2 * s
        out[..., 1::2] = x2 * c + x1 * s
    return out


def rope_tables(positions, seq_ids, seq_lens, head_dim, theta, scaling):
    """cos, sin: [T, D/2] in fp32. Dynamic NTK uses each sequence's length after this step."""
    pos = positions.astype(np.float32)[:, None]
    if (scaling or {}).get("rope_type") == "dynamic":
        inv = np.stack([rope_inv_freq(head_dim, theta, scaling, int(seq_lens[s])) for s in seq_ids]) if len(seq_ids) else np.zeros((0, head_dim // 2), np.float32)
    else:
        inv = rope_inv_freq(head_dim, theta, scaling)[None, :]
    ang = (pos * inv).astype(np.float32)
    return np.cos(ang), np.sin(ang)


def splitmix64(x: int) -> int:
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def sample_uniform(seed: int, step: int) -> np.float32:
    """The uniform draw in [0, 1) for a sequence's seed and step; the CUDA sampler computes the same."""
    x = splitmix64(((seed & ((1 << 64) - 1)) ^ (step * 0xD1B54A32D192ED03)) & ((1 << 64) - 1))
    return np.float32((x >> 40) * (1.0 / (1 << 24)))


def sample_row(logits: np.ndarray, temperature: float, top_k: int, top_p: float, u: float) -> int:
    """One token from one row of logits.

    temperature <= 0 is greedy (first index of the maximum). Otherwise p = softmax(logits / T);
    top-k keeps the k most likely tokens; top-p then keeps, of those, each token whose strictly
    more likely kept tokens hold less than top_p of the kept mass. The token is the first index
    (in vocabulary order) where the running kept mass exceeds u * total kept mass.
    """
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float32) / np.float32(temperature)
    p = np.exp(z - z.max()).astype(np.float32)
    p /= p.sum(dtype=np.float32)
    keep = np.ones(p.shape, bool)
    if 0 < top_k < p.size:
        kth = np.sort(p)[-top_k]
        keep &= p >= kth
    if top_p < 1.0:
        kept = np.where(keep, p, 0.0)
        order = np.argsort(-kept, kind="stable")
        sorted_p = kept[order]
        before = np.cumsum(sorted_p) - sorted_p  # mass ranked above each position
        # tied tokens share the mass of the *strictly* more likely ones: ties stay or go together
        group_start = np.searchsorted(-sorted_p, -sorted_p, side="left")
        in_p = np.zeros(p.shape, bool)
        in_p[order] = before[group_start] < top_p * kept.sum()
        keep &= in_p
    kept = np.where(keep, p, 0.0).astype(np.float32)
    c = np.cumsum(kept, dtype=np.float32)
    idx = int(np.searchsorted(c, np.float32(u) * c[-1], side="right"))
    idx = min(idx, p.size - 1)
    while not keep[idx]:  # u*total landed exactly on a boundary; step to the next kept token
        idx -= 1
    return idx


# ---------------------------------------------------------------------------------------------
# shape rules
# ---------------------------------------------------------------------------------------------

def _same(ins, attrs):
    return [(ins[0].shape, ins[0].dtype)]


def _linear_infer(ins, attrs):
    x, w = ins[0], ins[1]
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"inner dims differ: x {x.shape} vs weight {w.shape}")
    if len(ins) > 2 and ins[2].shape != (w.shape[0],):
        raise ValueError(f"bias shape {ins[2].shape} != ({w.shape[0]},)")
    return [((x.shape[0], w.shape[0]), attrs.get("out_dtype", x.dtype))]


def _gate_up_silu_infer(ins, attrs):
    (shape, dtype), = _linear_infer(ins, attrs)
    return [((shape[0], shape[1] // 2), dtype)]


def _heads(attrs):
    return attrs["num_heads"], attrs["num_kv_heads"], attrs["head_dim"]


def _rope_infer(ins, attrs):
    H, KV, D = _heads(attrs)
    T = ins[0].shape[0]
    if ins[0].shape[1] != (H + 2 * KV) * D:
        raise ValueError(f"qkv width {ins[0].shape[1]} != (H+2KV)*D = {(H + 2 * KV) * D}")
    return [((T, H + 2 * KV, D), ins[0].dtype)]


def _kv_append_infer(ins, attrs):
    return [(ins[3].shape, ins[3].dtype), (ins[4].shape, ins[4].dtype)]


def _rope_kv_append_infer(ins, attrs):
    H, KV, D = _heads(attrs)
    _rope_infer(ins, attrs)
    return [((ins[0].shape[0], H, D), ins[0].dtype), (ins[4].shape, ins[4].dtype), (ins[5].shape, ins[5].dtype)]


def _sdpa_infer(ins, attrs):
    H, KV, D = _heads(attrs)
    q, kc = ins[0], ins[1]
    if q.shape[1] < H or q.shape[2] != D or kc.shape[2:] != (KV, D):
        raise ValueError(f"q {q.shape} / cache {kc.shape} do not match H={H} KV={KV} D={D}")
    return [((q.shape[0], H * D), q.dtype)]


def _add_rmsnorm_infer(ins, attrs):
    y, r, w = ins[0], ins[1], ins[2]
    if y.shape != r.shape or w.shape != (y.shape[-1],):
        raise ValueError(f"shapes differ: {y.shape}, {r.shape}, weight {w.shape}")
    return [(y.shape, y.dtype), (y.shape, y.dtype)]


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------

def _linear_ref(ins, attrs):
    x, w = ins[0], ins[1]
    y = x @ w.T
    if len(ins) > 2:
        y = y + ins[2]
    return [y]


def _gate_up_silu_ref(ins, attrs):
    (h,) = _linear_ref(ins, attrs)  # h: [R, 2I], gate rows first
    inter = h.shape[1] // 2
    return [silu(h[:, :inter]) * h[:, inter:]]


def _rope_ref(ins, attrs):
    qkv, positions, seq_ids, seq_lens = ins[:4]
    H, KV, D = _heads(attrs)
    x = qkv.reshape(qkv.shape[0], H + 2 * KV, D)  # x: [T, H+2KV, D]
    cos, sin = rope_tables(positions, seq_ids, seq_lens, D, attrs["theta"], attrs.get("scaling"))
    out = x.copy()
    out[:, : H + KV] = apply_rope(x[:, : H + KV], cos, sin, attrs["layout"])
    return [out]


def _kv_append_ref(ins, attrs):
    qkv_rot, positions, seq_ids, kcache, vcache = ins
    H, KV, D = _heads(attrs)
    kcache, vcache = kcache.copy(), vcache.copy()
    kcache[seq_ids, positions] = qkv_rot[:, H : H + KV]
    vcache[seq_ids, positions] = qkv_rot[:, H + KV : H + 2 * KV]
    return [kcache, vcache]


def _rope_kv_append_ref(ins, attrs):
    qkv, positions, seq_ids, seq_lens, kcache, vcache = ins
    H = attrs["num_heads"]
    (rot,) = _rope_ref([qkv, positions, seq_ids, seq_lens], attrs)
    k2, v2 = _kv_append_ref([rot, positions, seq_ids, kcache, vcache], attrs)
    return [rot[:, :H].copy(), k2, v2]


def _sdpa_ref(ins, attrs):
    q, kcache, vcache, positions, seq_ids = ins
    H, KV, D = _heads(attrs)
    group = H // KV
    out = np.zeros((q.shape[0], H, D), np.float32)
    for s in np.unique(seq_ids):
        rows = np.nonzero(seq_ids == s)[0]
        n_keys = int(positions[rows].max()) + 1
        k = np.repeat(kcache[s, :n_keys], group, axis=1)  # k: [S, H, D]
        v = np.repeat(vcache[s, :n_keys], group, axis=1)
        scores = np.einsum("thd,shd->hts", q[rows, :H], k) * np.float32(attrs["scale"])  # [H, t, S]
        causal = np.arange(n_keys)[None, :] <= positions[rows][:, None]  # [t, S]
        scores = np.where(causal[None], scores, -np.inf)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        out[rows] = np.einsum("hts,shd->thd", probs, v)
    return [out.reshape(q.shape[0], H * D)]


def _add_rmsnorm_ref(ins, attrs):
    y, r, w = ins[0], ins[1], ins[2]
    s = y + r if len(ins) == 3 else y + ins[3] + r
    return [s, rmsnorm(s, w, attrs["eps"])]


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """x rounded to a storage dtype and back to fp32: where a fused kernel rounds as the unfused
    graph stores an intermediate value."""
    return to_float32(to_storage(x, dtype), dtype)


def _normed(x, w, attrs):
    # the rmsnorm prologue of a fused GEMV: each element rounded as the rmsnorm op stores it
    return rounded(rmsnorm(x, w, attrs["eps"]), attrs["dtype"])


def _linear_residual_ref(ins, attrs):
    x, w, r, *bias = ins  # out = round(x @ W^T + bias) + r: the projection is stored, then added
    (y,) = _linear_ref([x, w, *bias], attrs)
    return [rounded(y, attrs["dtype"]) + r]


def _rms_gate_up_silu_ref(ins, attrs):
    x, norm_w, w, *bias = ins
    return _gate_up_silu_ref([_normed(x, norm_w, attrs), w, *bias], attrs)


def _rms_linear_ref(ins, attrs):
    x, norm_w, w = ins
    return _linear_ref([_normed(x, norm_w, attrs), w], attrs)


def _rms_qkv_rope_ref(ins, attrs):
    x, norm_w, w, positions, seq_ids, seq_lens, kc, vc, *bias = ins
    H, KV, D = _heads(attrs)
    (qkv_perm,) = _linear_ref([_normed(x, norm_w, attrs), w, *bias], attrs)  # columns in rope pair order
    qkv = np.empty_like(qkv_perm)
    qkv[:, rope_pair_order(H + 2 * KV, D, attrs["layout"])] = rounded(qkv_perm, attrs["dtype"])
    return _rope_kv_append_ref([qkv, positions, seq_ids, seq_lens, kc, vc], attrs)


def _linear_residual_infer(ins, attrs):
    x, w, r = ins[:3]
    (shape, dtype), = _linear_infer([x, w] + ins[3:], attrs)
    if r.shape != shape:
        raise ValueError(f"residual {r.shape} != projection {shape}")
    return [(shape, dtype)]


def _rms_infer(inner):
    def infer(ins, attrs):
        x, norm_w = ins[0], ins[1]
        if norm_w.shape != (x.shape[-1],):
            raise ValueError(f"norm weight {norm_w.shape} != ({x.shape[-1]},)")
        return inner([x] + ins[2:], attrs)
    return infer


def _rms_qkv_rope_infer(ins, attrs):
    x, norm_w, w, positions, seq_ids, seq_lens, kc, vc, *bias = ins
    if norm_w.shape != (x.shape[-1],):
        raise ValueError(f"norm weight {norm_w.shape} != ({x.shape[-1]},)")
    ((T, width), dtype), = _linear_infer([x, w, *bias], attrs)
    qkv = Value("qkv", (T, width), dtype)
    return _rope_kv_append_infer([qkv, positions, seq_ids, seq_lens, kc, vc], attrs)


def log_softmax_at(logits: np.ndarray, index: np.ndarray) -> np.ndarray:
    """logits: [R, V] fp32; index: [R] -> log_softmax(logits)[r, index[r]] in fp32 (0 where index < 0)."""
    m = logits.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True, dtype=np.float32)))[:, 0]
    picked = np.take_along_axis(logits, np.maximum(index, 0)[:, None].astype(np.int64), axis=-1)[:, 0]
    return np.where(index >= 0, picked - lse, 0.0).astype(np.float32)


def _sample_ref(ins, attrs):
    logits, temperature, top_k, top_p, seed, step, want_logprob = ins
    out = np.empty(logits.shape[0], np.int32)
    for b in range(logits.shape[0]):
        u = sample_uniform(int(seed[b]), int(step[b]))
        out[b] = sample_row(logits[b], float(temperature[b]), int(top_k[b]), float(top_p[b]), u)
    # the logprob of the token under the model's own distribution, before temperature (as Meta's
    # generate), where the row asks for it; 0 elsewhere
    return [out, np.where(want_logprob != 0, log_softmax_at(logits, out), 0.0).astype(np.float32)]


def _token_logprobs_ref(ins, attrs):
    x, norm_w, w, targets = ins  # x: [T, D] residual rows, w: [V, D], targets: [T] next token of each row or -1
    return [log_softmax_at(_normed(x, norm_w, attrs) @ w.T, targets.astype(np.int64))]


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------

register(
    "embedding",
    lambda ins, a: [((ins[0].shape[0], ins[1].shape[1]), ins[1].dtype)],
    lambda ins, a: [ins[1][ins[0]]],
    n_inputs=(2, 2),
    gather=True,
)
register("rmsnorm", _same, lambda ins, a: [rmsnorm(ins[0], ins[1], a["eps"])], n_inputs=(2, 2))
register(
    "add_rmsnorm",  # (y, residual, weight[, bias]) -> (y + bias + residual, rmsnorm of it)
    _add_rmsnorm_infer,
    _add_rmsnorm_ref,
    # The sum overwrites the residual input, so the residual stream stays in one buffer for
    # the whole network; the normed row may overwrite y, which is fully read before the
    # row's reduction finishes.
    inplace={0: (1, 0), 1: (0,)},
    n_inputs=(3, 4),
)
for _name in ("qkv_gemm", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
    register(_name, _linear_infer, _linear_ref, n_inputs=(2, 3), gemm=True)
register("gate_up_silu", _gate_up_silu_infer, _gate_up_silu_ref, n_inputs=(2, 3))
# GEMMs with the neighbouring element-wise work folded in (attrs["dtype"]: where the unfused graph
# would store an intermediate, the fused kernel rounds to it):
register(
    # (x, W, residual[, bias]) -> round(x W^T + bias) + residual; the new residual stream may overwrite the old
    "linear_residual", _linear_residual_infer, _linear_residual_ref, inplace={0: (2,)}, n_inputs=(3, 4),
)
register("rms_gate_up_silu", _rms_infer(_gate_up_silu_infer), _rms_gate_up_silu_ref, n_inputs=(3, 4))
register("rms_lm_head", _rms_infer(_linear_infer), _rms_linear_ref, n_inputs=(3, 3))
register(
    # (x, norm_w, W_qkv in rope pair row order, positions, seq_ids, seq_lens, kcache, vcache[, bias])
    #   -> (rotated q [T, H, D], kcache', vcache'): rmsnorm, QKV projection, RoPE and the KV append
    "rms_qkv_rope_kv_append", _rms_qkv_rope_infer, _rms_qkv_rope_ref, effects=True, n_inputs=(8, 9),
)
register("bias_add", _same, lambda ins, a: [ins[0] + ins[1]], inplace={0: (0,)}, n_inputs=(2, 2))
register("residual", _same, lambda ins, a: [ins[0] + ins[1]], inplace={0: (0, 1)}, n_inputs=(2, 2))
register("silu", _same, lambda ins, a: [silu(ins[0])], inplace={0: (0,)})
register("mul", _same, lambda ins, a: [ins[0] * ins[1]], inplace={0: (0, 1)}, n_inputs=(2, 2))
register("silu_mul", _same, lambda ins, a: [silu(ins[0]) * ins[1]], inplace={0: (0, 1)}, n_inputs=(2, 2))
register("rope", _rope_infer, _rope_ref, n_inputs=(4, 4))
register("kv_append", _kv_append_infer, _kv_append_ref, effects=True, n_inputs=(5, 5))
register("rope_kv_append", _rope_kv_append_infer, _rope_kv_append_ref, effects=True, n_inputs=(6, 6))
register("sdpa", _sdpa_infer, _sdpa_ref, n_inputs=(5, 5))
register(
    "gather_last",
    lambda ins, a: [((ins[1].shape[0], ins[0].shape[1]), ins[0].dtype)],
    lambda ins, a: [ins[0][ins[1]]],
    n_inputs=(2, 2),
)
register(
    # (logits, temperature, top_k, top_p, seed, step, want_logprob) -> (next token, its logprob or 0) per sequence
    "topk_sample",
    lambda ins, a: [((ins[0].shape[0],), "int32"), ((ins[0].shape[0],), "float32")],
    _sample_ref,
    n_inputs=(7, 7),
)
register(
    # (rows [T, D], final norm weight [D], LM head [V, D], targets [T]) -> log_softmax(rmsnorm(row) @ W^T)[target],
    # 0 where target < 0: the logprob of each prompt token given the tokens before it (echo), computed
    # only when fetched
    "token_logprobs",
    lambda ins, a: [((ins[0].shape[0],), "float32")],
    _token_logprobs_ref,
    n_inputs=(4, 4),
    on_demand=True,
)


# ---------------------------------------------------------------------------------------------
# collectives (tensor parallelism): every rank runs the same graph on its own shard of the weights
# ---------------------------------------------------------------------------------------------

def _all_reduce_ref(per_rank, attrs):
    # partial sums [T, D] of a row-parallel projection, added in rank order in fp32 (the stored
    # result is rounded once, to the value's dtype, by the executor)
    total = per_rank[0][0].astype(np.float32)
    for ins in per_rank[1:]:
        total = total + ins[0]
    return [[total] for _ in per_rank]


def _all_gather_vocab_infer(ins, attrs):
    return [((ins[0].shape[0], attrs["vocab"]), ins[0].dtype)]


def _all_gather_vocab_ref(per_rank, attrs):
    # each rank's logits over its vocabulary chunk [B, chunk] -> every rank's full logits [B, V]
    # (rank r's chunk is columns r*chunk.., the last chunk's padding rows dropped)
    full = np.concatenate([ins[0] for ins in per_rank], axis=1)[:, : attrs["vocab"]]
    return [[full] for _ in per_rank]


def _all_reduce_residual_ref(per_rank, attrs):
    # (partial [T, D], residual [T, D][, bias [D]]) per rank -> residual + bias + the sum of the
    # partials, rounded as the unfused all_reduce -> bias_add -> residual chain stores each step
    dtype = attrs["dtype"]
    (total,) = _all_reduce_ref([[ins[0]] for ins in per_rank], attrs)[0]
    out = rounded(total, dtype)
    _, r, *bias = per_rank[0]
    if bias:
        out = rounded(out + bias[0], dtype)
    return [[out + r] for _ in per_rank]


def _all_reduce_residual_infer(ins, attrs):
    y, r, *bias = ins
    if r.shape != y.shape:
        raise ValueError(f"residual {r.shape} != partial sums {y.shape}")
    if bias and bias[0].shape != (y.shape[-1],):
        raise ValueError(f"bias {bias[0].shape} != ({y.shape[-1]},)")
    return [(y.shape, y.dtype)]


register("all_reduce", _same, _all_reduce_ref, inplace={0: (0,)}, collective=True)
register(
    # (partial sums of a row-parallel projection, residual[, bias]) -> residual + bias + all_reduce(partial):
    # the reduce with the residual add (and the projection's bias) after it, in one collective. The new
    # stream may overwrite either input: a rank's peers read copies of its partial sums, not the value.
    "all_reduce_residual", _all_reduce_residual_infer, _all_reduce_residual_ref, inplace={0: (1, 0)},
    n_inputs=(2, 3), collective=True,
)
register("all_gather_vocab", _all_gather_vocab_infer, _all_gather_vocab_ref, collective=True)
