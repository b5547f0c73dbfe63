"""Model hyper-parameters, read from an HF ``config.json`` or a Meta ``params.json``.

``ModelConfig`` is the one normalised form the builder reads. Both readers reject, with a
one-line message naming the key and value, anything that would change the math and that we do
not implement (an unknown rope type, a non-SiLU activation, inconsistent head counts).

An HF config's ``quantization_config`` (a GPTQ or AWQ int4 checkpoint) becomes
``ModelConfig.quantization``: ``{"method": "gptq" | "awq", "bits": 4, "group_size": G (-1: one
group per row), "sym": bool, "format": "gptq" | "gemm", "lm_head": bool, "modules_to_not_convert":
[...] | None}``. Only the layouts ``llamagraph.runtime.quant_checkpoints`` repacks are accepted.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .dtypes import FLOAT_DTYPES
from .errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
DTYPES = FLOAT_DTYPES  # the dtypes a plan computes in

# Upper bounds on sizes. The largest released Llama (3.1 405B) has hidden 16384, ffn 53248,
# 126 layers, 128 heads and a 128256-token vocabulary; kernels take sizes as 32-bit ints. A
# config beyond these is a typo or a damaged file, and fails before a graph is built (a graph
# of 10**6 layers would take minutes to build; hidden 2**40 would reach the compiler).
MAX_SIZES = {
    "hidden_size": 2**16,
    "intermediate_size": 2**18,
    "num_layers": 2**10,
    "num_heads": 2**10,
    "num_kv_heads": 2**10,
    "head_dim": 2**10,
    "vocab_size": 2**22,
    "max_position_embeddings": 2**31 - 1,  # positions are int32
}
MAX_PARAMETERS = 2**40  # about 1.1e12; 405B is 4.1e11
# The key each reader takes a ModelConfig field from, to name it in errors.
_HF_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads"}
_META_KEYS = {"hidden_size": "dim", "num_layers": "n_layers", "num_heads": "n_heads", "num_kv_heads": "n_kv_heads",
              "max_position_embeddings": "max_seq_len", "head_dim": "dim / n_heads",
              "intermediate_size": "intermediate size (from dim, multiple_of, ffn_dim_multiplier)"}

# Meta's reference code hard-codes the Llama 3.1 scaling when params.json says use_scaled_rope.
META_LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass
class ModelConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": ..., "factor": ..., ...} or None
    rope_layout: str = "rotate_half"  # HF checkpoints; Meta checkpoints use "interleaved"
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    dtype: str = "float16"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    source: str = "hf"  # "hf" or "meta": which tensor names the checkpoint uses
    path: str = "<dict>"  # where the config came from, for error messages
    quantization: dict | None = None  # a GPTQ / AWQ checkpoint's int4 layout (module docstring); None: float

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    def to_dict(self) -> dict:
        return asdict(self)

    def num_parameters(self) -> int:
        """Parameters of the model this config describes (as HF's ``LlamaForCausalLM`` counts them)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv + h) if self.attention_bias else 0)
        mlp = 3 * h * self.intermediate_size + ((2 * self.intermediate_size + h) if self.mlp_bias else 0)
        layer = attn + mlp + 2 * h  # two norms
        lm_head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * layer + h + lm_head


def load_config(model: str | os.PathLike | dict) -> ModelConfig:
    """Read a config from a dict, a ``config.json``/``params.json`` file, or a checkpoint dir."""
    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, dict):
        return _from_dict(model, "<dict>")
    path = os.fspath(model)
    if os.path.isdir(path):
        path = os.path.join(path, _config_file_of(path))
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at top level, got {type(data).__name__}")
    return _from_dict(data, path)


def _config_file_of(folder: str) -> str:
    """The config file of a checkpoint directory, chosen by the weights it holds: HF weights
    (safetensors, .bin) go with ``config.json``, Meta's ``consolidated.*.pth`` with ``params.json``
    (HF repos of Llama ship both; each config names tensors its own way)."""
    names = os.listdir(folder)
    has = {n: n in names for n in ("config.json", "params.json")}
    if not any(has.values()):
        raise ConfigError(f"{folder}: directory has neither config.json nor params.json")
    hf_weights = [n for n in names if n.endswith((".safetensors", ".bin")) or n == "model.safetensors.index.json"]
    meta_weights = sorted(n for n in names if n.startswith("consolidated.") and n.endswith(".pth"))
    if has["config.json"] and (hf_weights or not meta_weights):
        return "config.json"
    if has["params.json"] and (meta_weights or not hf_weights):
        return "params.json"
    if has["config.json"]:  # only Meta weights, and no params.json to read their shapes and names with
        raise ConfigError(
            f"{folder}: holds Meta weights ({meta_weights[0]}) but no params.json to go with them; config.json "
            "describes HF weights (model.safetensors), which are not here"
        )
    raise ConfigError(
        f"{folder}: holds HF weights ({sorted(hf_weights)[0]}) but no config.json to go with them; params.json "
        "describes Meta weights (consolidated.00.pth), which are not here"
    )


def _from_dict(data: dict, path: str) -> ModelConfig:
    if "dim" in data and "n_layers" in data:
        cfg = _from_meta(data, path)
    else:
        cfg = _from_hf(data, path)
    validate(cfg)
    return cfg


class _Reader:
    """Typed access to config keys, with errors that name the file and key."""

    def __init__(self, data: dict, path: str):
        self.data, self.path = data, path

    def err(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.path}: key '{key}' {msg}")

    def int(self, key: str, default: Any = ..., *, positive: bool = True) -> int:
        if key not in self.data or self.data[key] is None:
            if default is ...:
                raise self.err(key, "is missing")
            return default
        v = self.data[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.err(key, f"must be an integer, got {v!r}")
        if positive and v <= 0:
            raise self.err(key, f"must be positive, got {v}")
        return v

    def float(self, key: str, default: Any = ..., *, positive: bool = True) -> float:
        if key not in self.data or self.data[key] is None:
            if default is ...:
                raise self.err(key, "is missing")
            return default
        v = self.data[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.err(key, f"must be a number, got {v!r}")
        if positive and v <= 0:
            raise self.err(key, f"must be positive, got {v}")
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self.data.get(key, default)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.err(key, f"must be true or false, got {v!r}")
        return v


def _token_ids(r: _Reader, key: str) -> list[int]:
    v = r.data.get(key)
    if v is None:
        return []
    ids = v if isinstance(v, list) else [v]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise r.err(key, f"must be a token id or a list of token ids, got {v!r}")
    return list(ids)


def _from_hf(data: dict, path: str) -> ModelConfig:
    r = _Reader(data, path)
    model_type = data.get("model_type", "llama")
    if model_type != "llama":
        raise r.err("model_type", f"is {model_type!r}; only 'llama' (LlamaForCausalLM) is supported")
    archs = data.get("architectures") or ["LlamaForCausalLM"]
    if "LlamaForCausalLM" not in archs:
        raise r.err("architectures", f"is {archs!r}; only LlamaForCausalLM is supported")
    act = data.get("hidden_act", "silu")
    if act != "silu":
        raise r.err("hidden_act", f"is {act!r}; Llama's SwiGLU needs 'silu'")
    hidden = r.int("hidden_size")
    heads = r.int("num_attention_heads")
    head_dim = r.int("head_dim", None)
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(
                f"{path}: key 'hidden_size' ({hidden}) is not divisible by 'num_attention_heads' ({heads}) "
                "and no 'head_dim' is given"
            )
        head_dim = hidden // heads
    max_pos = r.int("max_position_embeddings", 4096)

    # transformers >= 5 writes rope_parameters (with rope_theta inside); 4.x writes
    # rope_theta + rope_scaling. Read both.
    rope = data.get("rope_parameters")
    rope_key = "rope_parameters"
    if rope is None:
        rope = dict(data.get("rope_scaling") or {})
        rope_key = "rope_scaling"
        if "rope_theta" in data:
            rope["rope_theta"] = data["rope_theta"]
    if not isinstance(rope, dict):
        raise r.err(rope_key, f"must be an object, got {rope!r}")
    theta = _Reader(rope, path).float("rope_theta", 10000.0)
    scaling = _rope_scaling(rope, path, rope_key, max_pos)

    dtype = data.get("dtype", data.get("torch_dtype")) or "float32"
    if dtype not in DTYPES:
        raise r.err("dtype" if "dtype" in data else "torch_dtype", f"is {dtype!r}; expected one of {DTYPES}")
    if r.int("pretraining_tp", 1) < 1:
        raise r.err("pretraining_tp", "must be >= 1")
    return ModelConfig(
        hidden_size=hidden,
        intermediate_size=r.int("intermediate_size"),
        num_layers=r.int("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=r.int("num_key_value_heads", heads),
        head_dim=head_dim,
        vocab_size=r.int("vocab_size"),
        rms_norm_eps=r.float("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        rope_layout="rotate_half",
        max_position_embeddings=max_pos,
        tie_word_embeddings=r.bool("tie_word_embeddings", False),
        attention_bias=r.bool("attention_bias", False),
        mlp_bias=r.bool("mlp_bias", False),
        dtype=dtype,
        bos_token_id=(_token_ids(r, "bos_token_id") or [None])[0],
        eos_token_ids=_token_ids(r, "eos_token_id"),
        source="hf",
        path=path,
        quantization=quantization_config(data.get("quantization_config"), path),
    )


# ---- quantized checkpoints ----------------------------------------------------------------------

QUANT_METHODS = ("gptq", "awq")


def quantization_config(qc: Any, path: str) -> dict | None:
    """An HF ``quantization_config`` block normalised to ``ModelConfig.quantization``, or None.

    Accepted: GPTQ (bits 4, sym or not, desc_act false, checkpoint format "gptq", i.e. v1 with
    zeros stored minus one) and AWQ (bits 4, zero_point, version "gemm"). Anything else changes
    how the tensors are to be read, so it fails here with the key and value, before any loading.
    Keys are read under every name HF and the quantizers write them (``checkpoint_format`` /
    ``format``, ``version`` / ``format``, ``w_bit`` / ``bits``, ``q_group_size`` / ``group_size``)."""
    if qc is None:
        return None
    where = "quantization_config"
    if not isinstance(qc, dict):
        raise ConfigError(f"{path}: key '{where}' must be an object, got {qc!r}")
    r = _QuantReader(qc, path, where)
    method = r.choice("quant_method", None)
    if method is None:
        raise r.err("quant_method", "is missing; supported methods are " + ", ".join(QUANT_METHODS))
    if method not in QUANT_METHODS:
        raise r.err("quant_method", f"is {qc['quant_method']!r}; supported quantized checkpoints are "
                    + ", ".join(QUANT_METHODS) + " (int4)")
    bits_key = r.first("bits", "w_bit")
    bits = r.int(bits_key, 4)
    if bits != 4:
        raise r.err(bits_key, f"is {bits}; only 4-bit {method.upper()} checkpoints are supported")
    group_key = r.first("group_size", "q_group_size")
    group = r.int(group_key, ...)
    if group != -1 and group <= 0:
        raise r.err(group_key, f"is {group}; expected a positive group size or -1 (one group per row)")
    if method == "gptq":
        return _gptq(r, group)
    return _awq(r, group)


def _gptq(r: "_QuantReader", group: int) -> dict:
    if r.bool("desc_act", False):
        raise r.err("desc_act", "is true; act-order GPTQ checkpoints (g_idx permuting the input columns) are not "
                    "supported; use one quantized with desc_act false")
    fmt_key = r.first("checkpoint_format", "format")  # HF: checkpoint_format (legacy) wins over format
    fmt = r.choice(fmt_key, "gptq")
    if fmt != "gptq":
        raise r.err(fmt_key, f"is {r.data[fmt_key]!r}; only the 'gptq' (v1) checkpoint format is supported")
    if r.bool("is_marlin_format", False):
        raise r.err("is_marlin_format", "is true; Marlin-packed GPTQ checkpoints are not supported")
    dynamic = r.data.get("dynamic")
    if dynamic:  # GPTQModel: per-module overrides of bits / group size
        raise r.err("dynamic", f"is {dynamic!r}; per-module quantization overrides are not supported")
    return {"method": "gptq", "bits": 4, "group_size": group, "sym": r.bool("sym", True), "format": "gptq",
            "lm_head": r.bool("lm_head", False), "modules_to_not_convert": r.names("modules_to_not_convert")}


def _awq(r: "_QuantReader", group: int) -> dict:
    if not r.bool("zero_point", True):
        raise r.err("zero_point", "is false; AWQ GEMM checkpoints without zero points are not supported")
    fmt_key = "version" if r.data.get("version") is not None else "format"  # HF: version (legacy) wins
    fmt = r.choice(fmt_key, "gemm")
    if fmt != "gemm":
        raise r.err(fmt_key, f"is {r.data[fmt_key]!r}; only the AWQ 'gemm' layout is supported")
    backend = r.choice("backend", None)
    if backend == "llm-awq":  # HF reads it as the llm-awq layout
        raise r.err("backend", f"is {r.data['backend']!r}; the llm-awq layout is not supported, only AutoAWQ 'gemm'")
    return {"method": "awq", "bits": 4, "group_size": group, "sym": False, "format": "gemm",
            "lm_head": False, "modules_to_not_convert": r.names("modules_to_not_convert")}


class _QuantReader:
    """Typed access to the keys of a ``quantization_config`` block, errors naming them in full."""

    def __init__(self, data: dict, path: str, where: str):
        self.data, self.path, self.where = data, path, where
        self._reader = _Reader(data, path)
        self._reader.err = self.err  # the scalar readers report 'quantization_config.<key>'

    def err(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.path}: key '{self.where}.{key}' {msg}")

    def first(self, *keys: str) -> str:
        """The first of ``keys`` the block sets (the first one when it sets none)."""
        return next((k for k in keys if self.data.get(k) is not None), keys[0])

    def int(self, key: str, default: Any) -> int:
        return self._reader.int(key, default, positive=False)

    def bool(self, key: str, default: bool) -> bool:
        return self._reader.bool(key, default)

    def choice(self, key: str, default: str | None) -> str | None:
        v = self.data.get(key)
        if v is None:
            return default
        if not isinstance(v, str):
            raise self.err(key, f"must be a string, got {v!r}")
        return v.lower()

    def names(self, key: str) -> list[str] | None:
        v = self.data.get(key)
        if v is None:
            return None
        if not isinstance(v, list) or not all(isinstance(n, str) for n in v):
            raise self.err(key, f"must be a list of module names, got {v!r}")
        return list(v)


def _rope_scaling(rope: dict, path: str, key: str, max_pos: int) -> dict | None:
    """Normalise a rope scaling block to {"rope_type": ..., params...}, or None for plain rope."""
    r = _Reader(rope, f"{path}: {key}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"{path}: key '{key}.rope_type' is {rope_type!r}; supported rope types are {', '.join(ROPE_TYPES)}"
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{path}: key '{key}.partial_rotary_factor' is {rope['partial_rotary_factor']!r}; only 1.0 is supported")
    if rope_type == "default":
        return None
    out: dict[str, Any] = {"rope_type": rope_type, "factor": r.float("factor")}
    if rope_type in ("linear", "dynamic") and out["factor"] < 1.0:
        raise ConfigError(f"{path}: key '{key}.factor' is {out['factor']}; must be >= 1")
    if rope_type == "llama3":
        out["low_freq_factor"] = r.float("low_freq_factor")
        out["high_freq_factor"] = r.float("high_freq_factor")
        out["original_max_position_embeddings"] = r.int("original_max_position_embeddings")
        if out["high_freq_factor"] <= out["low_freq_factor"]:
            raise ConfigError(
                f"{path}: key '{key}.high_freq_factor' ({out['high_freq_factor']}) must exceed "
                f"'low_freq_factor' ({out['low_freq_factor']})"
            )
    if rope_type == "dynamic":
        # HF's dynamic NTK rescales against max_position_embeddings as the original length.
        out["original_max_position_embeddings"] = max_pos
    return out


def meta_intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The FFN width Meta's reference ``FeedForward`` derives from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _from_meta(data: dict, path: str) -> ModelConfig:
    r = _Reader(data, path)
    dim = r.int("dim")
    heads = r.int("n_heads")
    if dim % heads:
        raise ConfigError(f"{path}: key 'dim' ({dim}) is not divisible by 'n_heads' ({heads})")
    vocab = r.int("vocab_size", -1, positive=False)
    if vocab <= 0:
        raise r.err("vocab_size", f"is {vocab}; set it to the tokenizer's vocabulary size")
    scaled = r.bool("use_scaled_rope", False)
    return ModelConfig(
        hidden_size=dim,
        intermediate_size=meta_intermediate_size(
            dim, r.int("multiple_of", 256), r.float("ffn_dim_multiplier", None)
        ),
        num_layers=r.int("n_layers"),
        num_heads=heads,
        num_kv_heads=r.int("n_kv_heads", heads),
        head_dim=dim // heads,
        vocab_size=vocab,
        rms_norm_eps=r.float("norm_eps", 1e-5),
        rope_theta=r.float("rope_theta", 10000.0),
        rope_scaling=dict(META_LLAMA3_SCALING) if scaled else None,
        rope_layout="interleaved",
        max_position_embeddings=r.int("max_seq_len", 8192 if scaled else 4096),
        dtype="bfloat16",
        source="meta",
        path=path,
    )


def validate(cfg: ModelConfig) -> None:
    """Size bounds and cross-key consistency checks shared by both readers."""
    p = cfg.path
    keys = _META_KEYS if cfg.source == "meta" else _HF_KEYS
    for name, most in MAX_SIZES.items():
        v = getattr(cfg, name)
        if v > most:
            raise ConfigError(f"{p}: key '{keys.get(name, name)}' is {v}; at most {most} is supported")
    n = cfg.num_parameters()
    if n > MAX_PARAMETERS:
        raise ConfigError(
            f"{p}: the model would have {n} parameters ({n * 2 / 2**40:.1f} TiB in float16), more than the "
            f"{MAX_PARAMETERS} llamagraph accepts"
        )
    if cfg.num_heads % cfg.num_kv_heads:
        raise ConfigError(
            f"{p}: num_attention_heads ({cfg.num_heads}) is not a multiple of num_key_value_heads ({cfg.num_kv_heads})"
        )
    if cfg.head_dim % 2:
        raise ConfigError(f"{p}: head_dim ({cfg.head_dim}) must be even for rotary embeddings")
    if cfg.rope_layout not in ("rotate_half", "interleaved"):
        raise ConfigError(f"{p}: rope layout {cfg.rope_layout!r} is not 'rotate_half' or 'interleaved'")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"{p}: dtype {cfg.dtype!r} is not one of {DTYPES}")
    for tok in ([cfg.bos_token_id] if cfg.bos_token_id is not None else []) + cfg.eos_token_ids:
        if tok >= cfg.vocab_size:
            raise ConfigError(f"{p}: special token id {tok} is outside vocab_size {cfg.vocab_size}")
