"""The ``torch.compile (gpt-fast style)`` peer of ``llamagraph bench``: a compact static-cache Llama
in PyTorch, written the way gpt-fast writes one, so the benchmark compares against the plain
PyTorch decode a performance-minded user would actually pick.

- Fused weights: one ``[(H + 2*KV) * D, hidden]`` QKV matrix and one ``[2 * ffn, hidden]``
  gate/up matrix per layer, so a decode step runs one GEMV for each instead of three and two.
- A static KV cache per layer, ``[B, KV, max_seq, D]``, written with ``index_copy_`` at the
  step's positions: every decode step has the same shapes and addresses, so it captures.
- The decode step (one token per sequence, greedy argmax included) is compiled once per batch
  size with ``torch.compile(mode="reduce-overhead", fullgraph=True)``: Inductor fuses the
  element-wise work and the step replays as one CUDA graph. The prompt's prefill runs eagerly
  (cuBLAS GEMMs and flash attention dominate it; compiling every prompt shape would cost more
  compile time than it saves).
- Attention is ``F.scaled_dot_product_attention``. A prefill from position 0 attends causally
  over the prompt's own keys (``is_causal``: the flash kernel), K/V repeated per query head as
  HF does. A decode step (or a later chunk) attends over the whole cache with a positional mask;
  GQA there copies nothing: the G query heads sharing a KV head become G query rows of it.
- RoPE from llamagraph's own frequency tables (``rope_inv_freq``: default, linear, dynamic NTK,
  llama3) in the rotate-half layout of HF checkpoints; RMSNorm in fp32 as HF computes it.
- Weight-only quantization (``quantize_model``), as gpt-fast's ``quantize.py`` does it: after the
  model is built, every linear layer (the LM head too, unless tied) is swapped for

  - ``Int8Linear``: int8 weight [N, K] and one scale per row; ``F.linear(x, w.to(x.dtype)) * s``,
    which Inductor fuses into one GEMV reading the int8 bytes (gpt-fast's WeightOnlyInt8Linear);
  - ``Int4Linear``: ``torch.ops.aten._weight_int4pack_mm`` (the tinygemm kernel) on CUDA, or
    ``_weight_int4pack_mm_for_cpu`` on the CPU, on the codes packed by
    ``_convert_weight_to_int4pack`` (``..._for_cpu``) with a scale and zero per group of G.

  The codes and scales are llamagraph's schemes (``llamagraph.ir.quant``: int8 symmetric per row,
  int4 asymmetric per group, scales rounded to the activation dtype first), computed here in torch
  on the device. torch's int4 kernels dequantize ``(q - 8) * scale + zero`` where ours is
  ``(q - z) * s``: the same codes q, scale s, and zero ``(8 - z) * s`` (``int4_scales_and_zeros``).
  ``check_int4`` probes the kernels on small weights of the model's K before a benchmark builds
  the int4 peer: torch versions differ in what they accept (bfloat16 activations only on CUDA,
  group sizes 32..256, packed-byte layout), and the probe also checks the results against the
  dequantized weights.

It is a benchmark peer, not part of the compiler: only ``llamagraph.bench`` imports it, and
only while a benchmark runs, so importing llamagraph never imports torch.
``tests/test_gptfast_peer.py`` checks its logits and greedy tokens against HF transformers.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llamagraph.ir import ModelConfig
from llamagraph.ir.ops import rope_inv_freq

CACHE_ALIGN = 16  # cache rows rounded up: a mask row of 16-aligned length keeps SDPA on its fused kernels

# gpt-fast's Inductor settings for its decode step (coordinate descent tunes the generated reductions)
INDUCTOR_CONFIG = {"coordinate_descent_tuning": True}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        # as HF: normalise in fp32, round to x's dtype, then scale in that dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Rope(nn.Module):
    """cos / sin tables [T, D] for the step's positions, from llamagraph's inverse frequencies."""

    def __init__(self, cfg: ModelConfig, device):
        super().__init__()
        scaling = cfg.rope_scaling or {}
        self.dynamic = scaling.get("rope_type") == "dynamic"
        inv = torch.from_numpy(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)).to(device)
        self.register_buffer("inv_freq", inv, persistent=False)  # [D/2] fp32
        if self.dynamic:
            # dynamic NTK grows the base with the sequence (rope_inv_freq's formula, computed on the
            # device so the step still captures): length L = the step's last position + 1
            self.theta, self.factor = cfg.rope_theta, scaling["factor"]
            self.orig = scaling["original_max_position_embeddings"]
            exps = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim
            self.register_buffer("exps", exps.to(device), persistent=False)
            self.power = cfg.head_dim / (cfg.head_dim - 2)

    def forward(self, input_pos: Tensor, dtype) -> tuple[Tensor, Tensor]:
        inv = self.inv_freq
        if self.dynamic:
            length = torch.clamp(input_pos.max() + 1, min=self.orig).float()
            base = self.theta * (self.factor * length / self.orig - (self.factor - 1)) ** self.power
            inv = 1.0 / base ** self.exps
        freqs = input_pos.float()[:, None] * inv[None, :]  # [T, D/2], fp32 as HF
        emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half: dims i and i + D/2 share a frequency
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, h, T, D]; cos, sin: [T, D]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache(nn.Module):
    def __init__(self, batch: int, kv_heads: int, max_seq: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # input_pos: [T]; k, v: [B, KV, T, D] written at rows input_pos of every sequence
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = {"dtype": dtype, "device": device}
        self.wqkv = nn.Linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim,
                              bias=cfg.attention_bias, **kw)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.attention_bias, **kw)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, mask: Tensor | None,
                prefill: bool) -> Tensor:
        B, T, _ = x.shape
        H, KV, D = self.n_head, self.n_kv, self.head_dim
        G = H // KV
        q, k, v = self.wqkv(x).split([H * D, KV * D, KV * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # q: [B, H, T, D]
        k = k.view(B, T, KV, D).transpose(1, 2)  # k, v: [B, KV, T, D]
        v = v.view(B, T, KV, D).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_all, v_all = self.kv_cache.update(input_pos, k, v)  # [B, KV, S, D]
        if prefill:
            # the prompt from position 0 sees only its own keys: causal SDPA runs the flash kernel
            y = F.scaled_dot_product_attention(q, k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1),
                                               is_causal=True)
        else:
            # head h reads KV head h // G: fold the G heads of a group into G*T query rows of it
            qg = q.reshape(B, KV, G * T, D)  # rows g*T + t; mask: [G*T, S]
            y = F.scaled_dot_product_attention(qg, k_all, v_all, attn_mask=mask).reshape(B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * D))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.w13 = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias, **kw)  # gate; up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias, **kw)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.attention = Attention(cfg, dtype, device)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.feed_forward = FeedForward(cfg, dtype, device)

    def forward(self, x, cos, sin, input_pos, mask, prefill: bool) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, mask, prefill)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """A Llama with HF's math on llamagraph's ``ModelConfig``; call ``setup_caches`` before use."""

    def __init__(self, cfg: ModelConfig, dtype=torch.float16, device="cuda"):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(Block(cfg, dtype, device) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, device=device)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rope = Rope(cfg, device)
        self.max_batch = self.max_seq = 0

    def setup_caches(self, max_batch: int, max_seq: int) -> None:
        """Fresh zeroed caches for ``max_batch`` sequences of up to ``max_seq`` tokens."""
        max_seq = -(-max_seq // CACHE_ALIGN) * CACHE_ALIGN
        p = self.tok_embeddings.weight
        self.max_batch, self.max_seq = max_batch, max_seq
        for layer in self.layers:
            layer.attention.kv_cache = None  # free the old cache before the new one is allocated
            layer.attention.kv_cache = KVCache(max_batch, self.config.num_kv_heads, max_seq, self.config.head_dim,
                                               p.dtype, p.device)
        self.register_buffer("cache_rows", torch.arange(max_seq, device=p.device), persistent=False)

    def forward(self, idx: Tensor, input_pos: Tensor, prefill: bool = False, last_only: bool = False) -> Tensor:
        """idx: [B, T] token ids at positions input_pos: [T] (the same for every sequence).
        ``prefill``: input_pos is 0..T-1 (a new prompt). Returns logits [B, T or 1, V]."""
        x = self.tok_embeddings(idx)  # [B, T, hidden]
        cos, sin = self.rope(input_pos, x.dtype)
        mask = None
        if not prefill:
            group = self.config.num_heads // self.config.num_kv_heads
            # row t sees cache rows 0..input_pos[t]; repeated for the G heads folded into rows
            mask = (self.cache_rows[None, :] <= input_pos[:, None]).repeat(group, 1)  # [G*T, S]
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask, prefill)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x))

    # ---- weights -------------------------------------------------------------------------------
    @torch.no_grad()
    def init_random(self, seed: int = 0, std: float = 0.02) -> "Transformer":
        """HF's initialisation: matrices and embeddings N(0, std), biases 0, norm weights 1."""
        gen = torch.Generator(device=self.tok_embeddings.weight.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=gen)
        return self

    @torch.no_grad()
    def load_hf_state_dict(self, sd: dict[str, Tensor]) -> "Transformer":
        """Copy an HF ``LlamaForCausalLM`` state dict in, fusing q/k/v and gate/up."""
        def get(name: str) -> Tensor:
            return sd[name].to(self.tok_embeddings.weight.dtype)

        self.tok_embeddings.weight.copy_(get("model.embed_tokens.weight"))
        self.norm.weight.copy_(get("model.norm.weight"))
        if not self.config.tie_word_embeddings:
            self.output.weight.copy_(get("lm_head.weight"))
        for i, layer in enumerate(self.layers):
            pre = f"model.layers.{i}."
            att, ffn = layer.attention, layer.feed_forward
            layer.attention_norm.weight.copy_(get(pre + "input_layernorm.weight"))
            layer.ffn_norm.weight.copy_(get(pre + "post_attention_layernorm.weight"))
            for kind in ("weight", "bias") if self.config.attention_bias else ("weight",):
                getattr(att.wqkv, kind).copy_(torch.cat([get(f"{pre}self_attn.{p}_proj.{kind}") for p in "qkv"]))
                getattr(att.wo, kind).copy_(get(f"{pre}self_attn.o_proj.{kind}"))
            for kind in ("weight", "bias") if self.config.mlp_bias else ("weight",):
                getattr(ffn.w13, kind).copy_(torch.cat([get(f"{pre}mlp.{p}_proj.{kind}") for p in ("gate", "up")]))
                getattr(ffn.w2, kind).copy_(get(f"{pre}mlp.down_proj.{kind}"))
        return self


# ---- weight-only quantization ------------------------------------------------------------------
# llamagraph.ir.quant's schemes, computed in torch where the peer's weights live (a host round trip
# of an 8B model's floats would cost more than the benchmark). All arithmetic in fp32.

QUANT_ROWS = 16384  # rows quantized at once: bounds the fp32 temporaries of a large LM head


def _stored_scale(s: Tensor, dtype) -> Tensor:
    """fp32 scales -> the numbers stored in ``dtype`` (a zero range, or a scale the dtype rounds
    to zero, gets 1), back in fp32: the codes are computed with exactly the stored scale."""
    s = torch.where(s == 0, torch.ones_like(s), s).to(dtype).float()
    return torch.where(s == 0, torch.ones_like(s), s)


def quantize_int8(w: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """w: [N, K] -> (q int8 [N, K], s fp32 [N]): s = max|w| / 127 rounded to ``dtype``,
    q = clamp(rint(w / s), -127, 127); w' = q * s."""
    w = w.float()
    s = _stored_scale(w.abs().amax(dim=1) / 127.0, dtype)
    q = torch.clamp(torch.round(w / s[:, None]), -127, 127).to(torch.int8)  # torch.round: half to even
    return q, s


def quantize_int4(w: Tensor, group_size: int, dtype) -> tuple[Tensor, Tensor, Tensor]:
    """w: [N, K] -> (q int32 [N, K] codes 0..15, s fp32 [N, K/G], z fp32 [N, K/G]) per group of G
    columns: s = (max - min) / 15 rounded to ``dtype``, z = clamp(rint(-min / s), 0, 15),
    q = clamp(rint(w / s) + z, 0, 15); w' = (q - z) * s."""
    N, K = w.shape
    g = w.float().reshape(N, K // group_size, group_size)  # g: [N, groups, G]
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    s = _stored_scale((hi - lo) / 15.0, dtype)
    z = torch.clamp(torch.round(-lo / s), 0, 15)
    q = torch.clamp(torch.round(g / s[:, :, None]) + z[:, :, None], 0, 15).to(torch.int32)
    return q.reshape(N, K), s, z


def int4_scales_and_zeros(s: Tensor, z: Tensor, dtype) -> Tensor:
    """Our (s, z) [N, K/G] -> torch's qScaleAndZeros [K/G, N, 2] in ``dtype``.

    torch's int4 kernels compute w = (q - 8) * scale + zero; ours is w' = (q - z) * s
                                   = (q - 8) * s + (8 - z) * s,
    so scale = s and zero = (8 - z) * s for the same codes q. s is stored exactly (it was rounded to
    ``dtype`` before the codes were made); (8 - z) * s is rounded once to ``dtype``: exact to a
    rounding in fp32, within s / 64 of ours in bfloat16 (8 bits of mantissa)."""
    return torch.stack([s, (8.0 - z) * s], dim=-1).transpose(0, 1).contiguous().to(dtype)


def inner_k_tiles(K: int) -> int:
    """tinygemm's k-tiles packed per 16-byte load: the largest of 8, 4, 2 whose 16-column tiles divide K."""
    return next((t for t in (8, 4, 2) if K % (16 * t) == 0), 2)


def pack_int4_for_torch(q: Tensor) -> Tensor:
    """codes [N, K] (0..15) -> the packed weight torch's int4 kernel reads on q's device.

    CUDA: ``_convert_weight_to_int4pack`` takes uint8 [N, K/2] with column 2j in the *high* nibble
    (llamagraph's packing puts it in the low one); the CPU's ``..._for_cpu`` takes the int32 codes."""
    K = q.shape[1]
    if q.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), inner_k_tiles(K))
    q8 = q.to(torch.uint8)
    pairs = ((q8[:, 0::2] << 4) | q8[:, 1::2]).contiguous()  # [N, K/2]
    return torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles(K))


def int4_mm(x: Tensor, packed: Tensor, group_size: int, scales_and_zeros: Tensor) -> Tensor:
    """x: [M, K] @ the packed weight^T -> [M, N]."""
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scales_and_zeros)


class Int8Linear(nn.Module):
    """gpt-fast's WeightOnlyInt8Linear: int8 weight [N, K], a scale per output row."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight
        q, s = _rows_quantized(w, lambda rows: quantize_int8(rows, w.dtype))
        self.register_buffer("weight", q)  # [N, K] int8
        self.register_buffer("scales", s.to(w.dtype))  # [N], exact in the activation dtype
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight.to(dtype=x.dtype)) * self.scales
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """int4 codes packed for torch's kernel, a scale and zero per group of G input columns."""

    def __init__(self, linear: nn.Linear, group_size: int):
        super().__init__()
        w = linear.weight
        N, K = w.shape
        self.out_features, self.in_features = N, K
        self.group_size = K if group_size == -1 else group_size  # -1: one group per row
        q, s, z = _rows_quantized(w, lambda rows: quantize_int4(rows, self.group_size, w.dtype))
        self.register_buffer("packed", pack_int4_for_torch(q))
        self.register_buffer("scales_and_zeros", int4_scales_and_zeros(s, z, w.dtype))  # [K/G, N, 2]
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        # the kernels take a contiguous 2-D activation: [B, T, K] -> [B*T, K]
        y = int4_mm(x.reshape(-1, self.in_features).contiguous(), self.packed, self.group_size,
                    self.scales_and_zeros)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


def _rows_quantized(w: Tensor, fn) -> tuple[Tensor, ...]:
    """``fn`` over blocks of ``QUANT_ROWS`` rows of w, its outputs concatenated along the rows."""
    parts = [fn(w[i:i + QUANT_ROWS]) for i in range(0, w.shape[0], QUANT_ROWS)]
    return tuple(torch.cat(p) for p in zip(*parts))


def linear_layers(model: "Transformer") -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every linear layer quantization swaps: each layer's QKV, O, gate/up
    and down, and the LM head unless it is the embedding table (tied), which stays in its dtype."""
    out = []
    for layer in model.layers:
        out += [(layer.attention, "wqkv"), (layer.attention, "wo"), (layer.feed_forward, "w13"),
                (layer.feed_forward, "w2")]
    if not model.config.tie_word_embeddings:
        out.append((model, "output"))
    return out


@torch.no_grad()
def quantize_model(model: "Transformer", scheme: str, group_size: int | None = None) -> "Transformer":
    """Swap every linear layer for its int8 or int4 version, in place (gpt-fast's quantize.py).
    int4 ``group_size``: columns per scale and zero (default 128; -1: one group per row)."""
    if scheme not in ("int8", "int4"):
        raise ValueError(f"unknown quantization scheme {scheme!r}; schemes are int8, int4")
    G = 128 if group_size is None else group_size
    for parent, name in linear_layers(model):
        old = getattr(parent, name)
        setattr(parent, name, Int8Linear(old) if scheme == "int8" else Int4Linear(old, G))
        del old  # the float weight goes as soon as its replacement exists
    return model


class Int4Unsupported(Exception):
    """torch's int4 kernels do not run this case on this machine; the message is one line."""


def _first_line(e: BaseException) -> str:
    text = str(e).split("(Could this error message be improved?")[0]  # TORCH_CHECK's boilerplate
    line = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return line[:140]


@torch.no_grad()
def check_int4(device, dtype, ks: list[int], group_size: int | None, seed: int = 0) -> None:
    """Probe torch's int4 kernels on ``device`` with ``dtype`` activations, on a 16-row weight of
    each input width K in ``ks`` (the K of every weight the peer quantizes): they must run and
    agree with x @ w'^T for w' = (q - z) * s. Raises ``Int4Unsupported`` saying why not."""
    dev = torch.device(device)
    names = (("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu") if dev.type == "cpu"
             else ("_convert_weight_to_int4pack", "_weight_int4pack_mm"))
    missing = [n for n in names if not hasattr(torch.ops.aten, n)]
    if missing:
        raise Int4Unsupported(f"torch {torch.__version__} has no torch.ops.aten.{missing[0]}")
    gen = torch.Generator(device=dev).manual_seed(seed)
    for K in sorted(set(ks)):
        G = 128 if group_size is None else K if group_size == -1 else group_size
        if K % G:
            raise Int4Unsupported(f"group size {G} does not divide K={K}")
        lin = nn.Linear(K, 16, bias=False, dtype=dtype, device=dev)
        lin.weight.copy_(torch.randn(16, K, generator=gen, device=dev).to(dtype))
        x = torch.randn(3, K, generator=gen, device=dev).to(dtype)
        try:
            got = Int4Linear(lin, G)(x).float()
        except (RuntimeError, NotImplementedError) as e:
            raise Int4Unsupported(f"{names[1]} ({str(dtype).removeprefix('torch.')}, K={K}, G={G}): "
                                  f"{_first_line(e)}") from None
        q, s, z = quantize_int4(lin.weight, G, dtype)
        w = ((q.float().reshape(16, K // G, G) - z[:, :, None]) * s[:, :, None]).reshape(16, K)
        want = x.float() @ w.t()
        err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
        if not err < (1e-4 if dtype == torch.float32 else 3e-2):
            raise Int4Unsupported(f"{names[1]} (K={K}, G={G}) differs from the dequantized weights "
                                  f"(max error {err:.2g} of max |y|): a packing convention this code does not know")


def decode_one(model: Transformer, tok: Tensor, input_pos: Tensor) -> Tensor:
    """One decode step: tok [B, 1] at position input_pos [1] -> the greedy next token [B, 1]."""
    logits = model(tok, input_pos)  # [B, 1, V]
    return logits[:, -1].argmax(dim=-1, keepdim=True)


class GPTFastPeer:
    """The model with its compiled decode step: ``prefill`` a batch of equal-length prompts, then
    ``decode`` greedily, gpt-fast's generate loop (no host synchronisation between steps)."""

    def __init__(self, model: Transformer, compile: bool = True, backend: str = "inductor"):
        """``backend`` other than inductor (e.g. "aot_eager") traces the step without Inductor or
        CUDA graphs: tests use it to count compiles on the CPU."""
        self.model = model
        self.compiled = compile
        # compiled once; Dynamo recompiles (and re-captures) only when a new batch size's caches change shapes
        how = {"mode": "reduce-overhead"} if backend == "inductor" else {"backend": backend}
        self.step = torch.compile(decode_one, fullgraph=True, dynamic=False, **how) if compile else decode_one

    def setup(self, batch: int, max_seq: int) -> None:
        self.model.setup_caches(batch, max_seq)

    @torch.no_grad()
    def prefill(self, ids: Tensor) -> Tensor:
        """ids: [B, P] new prompts -> the first generated token [B, 1]."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        logits = self.model(ids, pos, prefill=True, last_only=True)  # [B, 1, V]
        return logits[:, -1].argmax(dim=-1, keepdim=True)

    @torch.no_grad()
    def decode(self, tok: Tensor, start: int, n: int) -> Tensor:
        """Feed tok [B, 1] at position ``start`` and the n - 1 tokens it leads to; return the n
        tokens generated after it, [B, n]."""
        pos = torch.tensor([start], device=tok.device)
        tokens = []
        with _inductor_config() if self.compiled else nullcontext():
            for _ in range(n):
                if self.compiled:
                    torch.compiler.cudagraph_mark_step_begin()
                nxt = self.step(self.model, tok, pos)
                pos += 1
                # a copy: the next replay overwrites the graph's output. Every call sees the same
                # input layout (tok [B, 1] contiguous, pos [1]), so Dynamo never recompiles mid-run
                tok = nxt.clone()
                tokens.append(tok)
        return torch.cat(tokens, dim=1)

    def generate(self, ids: Tensor, n_new: int) -> Tensor:
        """Greedy: ``n_new`` new tokens per prompt, [B, n_new]."""
        first = self.prefill(ids)
        if n_new <= 1:
            return first[:, :n_new]
        return torch.cat([first, self.decode(first, ids.shape[1], n_new - 1)], dim=1)


def _inductor_config():
    """gpt-fast's Inductor settings, for the compiles its decode step triggers."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(INDUCTOR_CONFIG)
