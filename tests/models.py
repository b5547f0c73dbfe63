"""Real random checkpoints and HF reference outputs for tests (needs torch + transformers).

``make_hf_model`` writes a random-initialised ``LlamaForCausalLM`` with ``save_pretrained``, so
tests read real safetensors files with real tensor names; ``write_meta_checkpoint`` turns one
into a Meta ``params.json`` + ``consolidated.00.pth``; ``hf_reference_logits`` and ``hf_greedy``
run HF transformers itself as the oracle.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

# initializer_range 1/sqrt(hidden) keeps activations O(1): attention is peaked (so rope and
# masking matter) and logits spread out (so greedy tokens are not near-ties).
TINY = dict(
    hidden_size=64,
    intermediate_size=192,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    vocab_size=96,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    initializer_range=0.125,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    bos_token_id=1,
    eos_token_id=2,
)

# Meta's reference code hard-codes these when params.json says use_scaled_rope.
META_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

CONFIG_MATRIX: dict[str, dict] = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(),
    "mqa": dict(num_key_value_heads=1),
    "bias": dict(attention_bias=True, mlp_bias=True),
    "tied": dict(tie_word_embeddings=True),
    "rope_linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    # short max_position_embeddings: sequences of 20+ positions run past it and rescale
    "rope_dynamic": dict(
        max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    ),
    # with head_dim 16 and original length 32 the wavelengths (6.3, 20, 63, ...) fall in all three
    # llama3 bands: kept (< 8), smoothed (8..32) and divided by the factor (> 32)
    "rope_llama3": dict(
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
        }
    ),
    "head_dim": dict(head_dim=48),
    # a vocabulary no rank count divides: the vocabulary-parallel LM head's last chunk is padded
    "odd_vocab": dict(vocab_size=97),
    # no bias, untied, intermediate == meta_intermediate_size(64, 32, None) == 192
    "meta_compatible": dict(),
    "meta_llama3": dict(rope_parameters={**META_LLAMA3_ROPE, "rope_theta": 500000.0}),
}
META_COMPATIBLE = ("meta_compatible", "meta_llama3")


def hf_config(name_or_overrides: str | dict) -> LlamaConfig:
    over = CONFIG_MATRIX[name_or_overrides] if isinstance(name_or_overrides, str) else name_or_overrides
    return LlamaConfig(**{**TINY, **over})


def make_hf_model(
    dirpath: str | os.PathLike,
    name_or_overrides: str | dict,
    *,
    dtype: str = "float32",
    seed: int = 0,
    max_shard_size: str | int | None = None,
) -> str:
    """Save a random LlamaForCausalLM under ``dirpath`` (created) and return the directory.

    Norm weights (1 at init) and biases (0 at init) get noise too, so a loader or kernel that
    ignores them cannot pass by accident.
    """
    dirpath = os.fspath(dirpath)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config(name_or_overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model = model.to(getattr(torch, dtype))
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    os.makedirs(dirpath, exist_ok=True)
    model.save_pretrained(dirpath, **kw)
    return dirpath


def load_hf_model(model_dir: str, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager").eval()


def hf_state_dict(model_dir: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as HF saved them (all shards), in their stored dtype."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(model_dir)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(model_dir, f)))
    return out


@torch.no_grad()
def hf_reference_logits(
    model_dir: str,
    prompts: list[list[int]],
    decode_tokens: list[list[int]],
    dtype: torch.dtype = torch.float32,
) -> list[np.ndarray]:
    """Per sequence, [1 + n_decode, vocab] fp32 logits of the last token after the prefill and
    after each decode token, from HF with its KV cache.

    Each sequence runs on its own fresh copy of the model: dynamic rope keeps per-module state
    (the longest length seen) that would otherwise leak from one sequence into the next.
    """
    base = load_hf_model(model_dir, dtype)
    out = []
    for prompt, decode in zip(prompts, decode_tokens, strict=True):
        model = copy.deepcopy(base)
        res = model(input_ids=torch.tensor([prompt]), use_cache=True)
        rows = [res.logits[0, -1].float()]
        past = res.past_key_values
        for tok in decode:
            res = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = res.past_key_values
            rows.append(res.logits[0, -1].float())
        out.append(torch.stack(rows).numpy())
    return out


@torch.no_grad()
def hf_greedy(model_dir: str, prompt: list[int], n_new: int, dtype: torch.dtype = torch.float32) -> list[int]:
    """Exactly ``n_new`` greedy tokens from HF generate (no eos stop, eos logits untouched)."""
    model = load_hf_model(model_dir, dtype)
    # generate() fills unset fields from the model's saved generation config, so its eos id
    # must be removed there, not only left out here; min_new_tokens would instead mask eos.
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    gen = GenerationConfig(max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = model.generate(torch.tensor([prompt]), generation_config=gen)
    return ids[0, len(prompt):].tolist()


# ---- Meta checkpoints ---------------------------------------------------------------------------

_TO_META = {
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's conversion permute: per head, rows [first halves..., second halves...] (rotate
    half) go back to interleaved pairs (x0, y0, x1, y1, ...)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _meta_ffn_params(dim: int, intermediate: int) -> dict:
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        hidden = int(2 * (4 * dim) / 3)
        if multiple_of * ((hidden + multiple_of - 1) // multiple_of) == intermediate:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": None}
    raise ValueError(f"intermediate_size {intermediate} is not Meta's FFN width for dim {dim} with any multiple_of")


def write_meta_checkpoint(hf_dir: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Convert a make_hf_model checkpoint into Meta's layout (params.json + consolidated.00.pth)."""
    hf_dir, out_dir = os.fspath(hf_dir), os.fspath(out_dir)
    with open(os.path.join(hf_dir, "config.json")) as f:
        c = json.load(f)
    dim, heads = c["hidden_size"], c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise ValueError("Meta checkpoints have no biases")
    if c.get("head_dim") not in (None, dim // heads):
        raise ValueError(f"Meta checkpoints need head_dim == dim / n_heads, got {c['head_dim']}")
    rope = c.get("rope_parameters") or {"rope_type": "default", "rope_theta": 10000.0}
    scaled = rope.get("rope_type", "default") != "default"
    if scaled and {k: rope.get(k) for k in META_LLAMA3_ROPE} != META_LLAMA3_ROPE:
        raise ValueError(f"rope {rope} is not plain rope nor Meta's use_scaled_rope constants")
    params = {
        "dim": dim,
        "n_layers": c["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": kv,
        "vocab_size": c["vocab_size"],
        **_meta_ffn_params(dim, c["intermediate_size"]),
        "norm_eps": c["rms_norm_eps"],
        "rope_theta": rope.get("rope_theta", 10000.0),
        "use_scaled_rope": scaled,
        "max_seq_len": c["max_position_embeddings"],
    }
    sd = hf_state_dict(hf_dir)
    out = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"]),
    }
    for i in range(c["num_hidden_layers"]):
        for hf_suffix, meta_suffix in _TO_META.items():
            w = sd[f"model.layers.{i}.{hf_suffix}"]
            if hf_suffix.startswith("self_attn.q_proj"):
                w = hf_to_meta_rows(w, heads)
            elif hf_suffix.startswith("self_attn.k_proj"):
                w = hf_to_meta_rows(w, kv)
            out[f"layers.{i}.{meta_suffix}"] = w
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "params.json"), "w") as f:
        json.dump(params, f, indent=2)
    torch.save({k: v.contiguous().clone() for k, v in out.items()}, os.path.join(out_dir, "consolidated.00.pth"))
    return out_dir
