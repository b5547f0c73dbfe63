"""Find where a plan first departs from HF transformers: run both on one prompt, compare every
intermediate that maps, layer by layer, and name the first op past the dtype's tolerance.

    result = llamagraph.bisect("ckpt_dir", [1, 15043, 29892], backend="cuda", dtype="float16")
    print(result.table())
    result.first_failure        # a Row (layer, op, plan value, error) or None

The plan is compiled with ``keep_values=True`` (every activation keeps its own buffer, so all
of them can be read after the prefill step) for one sequence of exactly the prompt's length,
and runs one prefill step. By default it is the fused plan ``compile`` builds; ``passes=[]``
bisects the unfused graph, where every op is its own node (if the fused plan fails and the
unfused one passes, a fusion is at fault). HF runs ``LlamaForCausalLM`` in float32 on the CPU
(eager attention), with forward hooks reading the same intermediates.

What is compared, per layer (plan value <- HF module):
  attn_norm        l{i}.attn_in                  <- input_layernorm output (absent from a fused
                                                    16-bit plan: the norm is the QKV GEMV's prologue)
  q_rot            l{i}.qkv_rot[:, :H] / q_rot   <- q_proj output, rotated with HF's own
                                                    apply_rotary_pos_emb and the cos/sin the
                                                    model's rotary_emb produced
  k_rot, v         the KV cache rows written     <- k_proj output (rotated) / v_proj output
  attention        l{i}.attn                     <- o_proj input
  o_proj+residual  l{i}.x_mid                    <- post_attention_layernorm input
  ffn_norm         l{i}.ffn_in                   <- post_attention_layernorm output (absent from
                                                    a fused plan: the gate/up GEMV's prologue)
  mlp              l{i}.down (or down_b)         <- mlp output (absent from a fused plan: the
                                                    down GEMV adds the residual in its epilogue)
  residual         l{i}.x_out                    <- decoder layer output
then final_norm (final_norm_out <- model.norm, the last token's row; absent from a fused plan:
the LM head's prologue) and logits (the last token's row). Rows a plan holds no value for are
listed as not compared (``unmapped``); the unfused plan (``passes=[]``) has them all.

Error of one row: for each token, max |plan - hf| / max |hf| over that token's elements; the
row reports the worst token. It is the accumulated error up to that op, not the op's own, so
the tolerance grows with depth: ``TOLERANCES[dtype] * sqrt(layer + 1)`` (final_norm and logits
count as layer ``num_layers``), as independent rounding errors add up over the layers. The
bases, against the fp32 oracle: float32 1e-4 (only summation order differs), float16 2e-2 and
bfloat16 1e-1 (weights and every stored activation rounded to 11 / 8 significant bits). Over
random checkpoints of 2 to 22 layers (every tests/models.py config, 3 seeds, prompts of 5-48
tokens, fused and unfused) the worst clean error, divided by sqrt(layer + 1), was 1.7e-6 in
fp32, 3.9e-3 in fp16 and 3.3e-2 in bf16: 3-60x below the bases. On an H100 (CUDA backend), a
random TinyLlama-shaped checkpoint (22 layers, HF's default init, 32 tokens) used at most 7%
(fp16) and 11% (bf16) of its tolerance. A wrong RoPE layout gives errors near 1; a wrong RMSNorm
epsilon shows as far as it changes the norm (here eps 1.0 for 1e-5: 0.3).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from llamagraph.api import Segment, bind, greedy_sampling
from llamagraph.compiler import compile_graph, lower
from llamagraph.ir import BackendError, ConfigError, Graph, InputError, ModelConfig, load_config, verify
from llamagraph.ir.dtypes import FLOAT_DTYPES, to_float32

# max relative error per token (max |plan - hf| / max |hf|) a plan of this dtype may show at
# layer 0; layer i allows sqrt(i + 1) times as much (see the module docstring)
TOLERANCES = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}

LAYER_OPS = ("attn_norm", "q_rot", "k_rot", "v", "attention", "o_proj+residual", "ffn_norm", "mlp", "residual")
FINAL_OPS = ("final_norm", "logits")


@dataclass(frozen=True)
class Row:
    """One compared intermediate."""

    layer: int | None  # None for final_norm and logits
    op: str  # the name a user recognizes: attn_norm, q_rot, ..., logits
    value: str  # the plan value read
    error: float  # max over tokens of max |plan - hf| / max |hf|
    token: int  # the token (position in the prompt) where that maximum is
    tolerance: float  # this row's: the base tolerance scaled by its depth

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.tolerance)  # NaN is not ok

    @property
    def where(self) -> str:
        return self.op if self.layer is None else f"layer {self.layer} {self.op}"


@dataclass
class BisectResult:
    rows: list[Row]
    prompt_ids: list[int]
    dtype: str
    backend: str
    passes: list[str]  # the passes the plan ran
    tolerance: float  # the base (layer 0) tolerance
    unmapped: list[str] = field(default_factory=list)  # "layer 0 mlp: why" for rows not compared

    @property
    def first_failure(self) -> Row | None:
        return next((r for r in self.rows if not r.ok), None)

    @property
    def ok(self) -> bool:
        return self.first_failure is None

    def table(self) -> str:
        lines = [f"{'layer':>5}  {'op':<16} {'plan value':<16} {'max rel err':>11}  {'tolerance':>9}  "
                 f"{'token':>5}  status"]
        for r in self.rows:
            layer = "-" if r.layer is None else str(r.layer)
            lines.append(f"{layer:>5}  {r.op:<16} {r.value:<16} {r.error:>11.2e}  {r.tolerance:>9.1e}  {r.token:>5}  "
                         f"{'ok' if r.ok else 'FAIL'}")
        return "\n".join(lines) + "\n"

    def verdict(self) -> str:
        bad = self.first_failure
        if bad is None:
            return f"ok: all {len(self.rows)} compared values within tolerance"
        return (f"first failure: {bad.where} ({bad.value}): max relative error {bad.error:.2e} > "
                f"{bad.tolerance:.1e} at token {bad.token}")


def bisect(
    model: str | os.PathLike,
    prompt_ids: list[int],
    *,
    backend: str = "reference",
    dtype: str = "float16",
    passes: list[str] | None = None,
    tolerance: float | None = None,
    edit_graph: Callable[[Graph], Graph | None] | None = None,
) -> BisectResult:
    """Run HF transformers and the plan on ``prompt_ids`` and compare every mapped intermediate.

    model: an HF checkpoint directory (config.json + safetensors) that both sides load.
    passes: as for ``compile`` (default: the whole pipeline; ``[]``: the unfused graph).
    tolerance: the max relative error allowed at layer 0, scaled by sqrt(layer + 1) deeper
      (default: ``TOLERANCES[dtype]``).
    edit_graph: called with the planned graph before it is lowered (edit it in place or return
      a new one); the result is verified. Tests inject faults through it.
    """
    model_dir, cfg = _hf_checkpoint(model)
    ids = _check_prompt(prompt_ids, cfg)
    if dtype not in FLOAT_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not 0 < tolerance < math.inf):
        raise InputError(f"tolerance must be a positive number, got {tolerance!r}")
    tol = TOLERANCES[dtype] if tolerance is None else float(tolerance)

    T = len(ids)
    graph = compile_graph(cfg, dtype=dtype, max_batch=1, max_seq=T, max_tokens=T, passes=passes, keep_values=True)
    if edit_graph is not None:
        graph = edit_graph(graph) or graph
        verify(graph, "edit_graph")
    plan = bind(lower(graph, model_dir), model_dir, backend=backend)

    probes, unmapped = _probes(plan.graph, cfg, T)
    got = _run_plan(plan, ids, sorted({p.value for p in probes}))
    want = _run_hf(model_dir, ids, cfg)
    rows = []
    for p in probes:
        err, token = _rel_err(p.take(got[p.value]), want[(p.layer, p.op)])
        depth = cfg.num_layers if p.layer is None else p.layer
        if p.op == "logits":
            token = T - 1  # the one row the plan computes logits for
        rows.append(Row(p.layer, p.op, p.value, err, token, tol * math.sqrt(depth + 1)))
    return BisectResult(rows, ids, dtype, plan.backend, list(plan.graph.meta.get("passes", [])), tol, unmapped)


def prompt_ids_from_text(model: str | os.PathLike, text: str) -> list[int]:
    """``text`` encoded by the checkpoint's tokenizer, with the config's BOS token first."""
    from llamagraph.textgen import find_tokenizer

    model_dir, cfg = _hf_checkpoint(model)
    if not any(os.path.isfile(os.path.join(model_dir, f)) for f in ("tokenizer.model", "tokenizer.json")):
        raise ConfigError(f"{model_dir}: no tokenizer.model or tokenizer.json to encode the prompt; give token ids "
                          "instead (--prompt-ids)")
    ids = list(find_tokenizer(model_dir).encode(text))
    return ([cfg.bos_token_id] if cfg.bos_token_id is not None else []) + ids


# ---- checks -------------------------------------------------------------------------------------

def _hf_checkpoint(model) -> tuple[str, ModelConfig]:
    """(directory, config) of an HF checkpoint: HF loads the same files as the plan."""
    if not isinstance(model, (str, os.PathLike)):
        raise ConfigError(f"bisect needs an HF checkpoint directory, got {type(model).__name__}")
    path = os.fspath(model)
    if os.path.isfile(path) and os.path.basename(path) in ("config.json", "params.json"):
        path = os.path.dirname(os.path.abspath(path))
    cfg = load_config(path)
    if cfg.source != "hf":
        raise ConfigError(f"{path}: a Meta checkpoint (params.json); bisect needs an HF checkpoint directory "
                          "(config.json + safetensors) for the transformers oracle")
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: bisect needs an HF checkpoint directory (config.json + safetensors), not a "
                          "config file alone")
    return path, cfg


def _check_prompt(prompt_ids, cfg: ModelConfig) -> list[int]:
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
        raise InputError(f"prompt_ids must be a non-empty list of token ids, got {prompt_ids!r}")
    for j, t in enumerate(prompt_ids):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < cfg.vocab_size:
            raise InputError(f"token id {t!r} at index {j} is outside the vocabulary [0, {cfg.vocab_size})")
    if len(prompt_ids) > cfg.max_position_embeddings:
        raise InputError(f"prompt of {len(prompt_ids)} tokens exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    return [int(t) for t in prompt_ids]


# ---- the plan side ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Probe:
    layer: int | None
    op: str
    value: str  # plan value to fetch
    take: Callable[[np.ndarray], np.ndarray]  # fetched fp32 array -> [T, ...] (logits: [1, V])


def _probes(graph: Graph, cfg: ModelConfig, T: int) -> tuple[list[Probe], list[str]]:
    """What to read from the plan for each row, in schedule order; and the rows that do not map."""
    H = cfg.num_heads
    have = graph.values

    def flat(a):
        return a

    def cache_rows(a):  # a: [max_batch, max_seq, KV, D]; this prompt is in slot 0, positions 0..T-1
        return a[0, :T]

    probes, unmapped = [], []
    for i in range(cfg.num_layers):
        q = f"l{i}.qkv_rot" if f"l{i}.qkv_rot" in have else f"l{i}.q_rot"  # unfused [T, H+2KV, D]; fused [T, H, D]
        mlp = f"l{i}.down_b" if cfg.mlp_bias else f"l{i}.down"
        table = [
            ("attn_norm", f"l{i}.attn_in", flat),
            ("q_rot", q, lambda a: a[:, :H]),
            ("k_rot", f"kv.l{i}.k", cache_rows),
            ("v", f"kv.l{i}.v", cache_rows),
            ("attention", f"l{i}.attn", flat),
            ("o_proj+residual", f"l{i}.x_mid", flat),
            ("ffn_norm", f"l{i}.ffn_in", flat),
            ("mlp", mlp, flat),
            ("residual", f"l{i}.x_out", flat),
        ]
        for op, value, take in table:
            if value in have:
                probes.append(Probe(i, op, value, take))
            else:
                unmapped.append(f"layer {i} {op}: no value {value!r} in this plan")
    if "final_norm_out" in have:  # the last row of each sequence: [B, D]
        probes.append(Probe(None, "final_norm", "final_norm_out", flat))
    else:
        unmapped.append("final_norm: no value 'final_norm_out' in this plan")
    probes.append(Probe(None, "logits", graph.with_role("logits"), flat))
    return probes, unmapped


def _run_plan(plan, ids: list[int], fetch: list[str]) -> dict[str, np.ndarray]:
    """One prefill step of ``ids`` as sequence 0; every fetched value as fp32."""
    inputs = plan.step_inputs([Segment(0, list(ids), 0)], greedy_sampling(1), [0])
    out = plan.executor.step(inputs, len(ids), 1, fetch)
    return {name: to_float32(arr, plan.graph.values[name].dtype) for name, arr in out.items()}


# ---- the HF side --------------------------------------------------------------------------------

def _run_hf(model_dir: str, ids: list[int], cfg: ModelConfig) -> dict[tuple[int | None, str], np.ndarray]:
    """HF's intermediates for one forward of ``ids``, keyed like the rows, as fp32 numpy."""
    try:
        import torch
        from transformers import LlamaForCausalLM
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    except ImportError as e:
        raise BackendError(f"bisect needs torch and transformers for the HF oracle ({e.name} is missing: "
                           "pip install torch transformers)") from None

    from transformers.utils import logging as hf_logging

    H, KV, D, T = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, len(ids)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our table is the output; HF's loading bar is noise in it
    try:
        hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    seen: dict = {}
    hooks = []

    def keep(key, pre=False):
        def hook(_module, args, output=None):
            t = args[0] if pre else output
            seen[key] = (t[0] if isinstance(t, tuple) else t)[0]  # drop the batch dim: [T, ...]
        return hook

    def keep_cos_sin(_module, _args, output):
        seen["cos_sin"] = output  # the (cos, sin) every layer used: [1, T, D] each

    hooks.append(hf.model.rotary_emb.register_forward_hook(keep_cos_sin))
    for i, layer in enumerate(hf.model.layers):
        attn = layer.self_attn
        hooks += [
            layer.input_layernorm.register_forward_hook(keep((i, "attn_norm"))),
            attn.q_proj.register_forward_hook(keep((i, "q"))),
            attn.k_proj.register_forward_hook(keep((i, "k"))),
            attn.v_proj.register_forward_hook(keep((i, "v"))),
            attn.o_proj.register_forward_pre_hook(keep((i, "attention"), pre=True)),
            layer.post_attention_layernorm.register_forward_pre_hook(keep((i, "o_proj+residual"), pre=True)),
            layer.post_attention_layernorm.register_forward_hook(keep((i, "ffn_norm"))),
            layer.mlp.register_forward_hook(keep((i, "mlp"))),
            layer.register_forward_hook(keep((i, "residual"))),
        ]
    hooks.append(hf.model.norm.register_forward_hook(keep((None, "final_norm"))))
    try:
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([ids]), use_cache=False).logits  # [1, T, V]
            cos, sin = seen.pop("cos_sin")
            for i in range(cfg.num_layers):
                q = seen.pop((i, "q")).view(T, H, D).transpose(0, 1)[None]  # q: [1, H, T, D]
                k = seen.pop((i, "k")).view(T, KV, D).transpose(0, 1)[None]  # k: [1, KV, T, D]
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                seen[(i, "q_rot")] = q[0].transpose(0, 1)  # [T, H, D]
                seen[(i, "k_rot")] = k[0].transpose(0, 1)  # [T, KV, D]
    finally:
        for h in hooks:
            h.remove()
    seen[(None, "logits")] = logits[0, -1:]  # the plan computes the last token's logits: [1, V]
    seen[(None, "final_norm")] = seen[(None, "final_norm")][-1:]  # and norms the last row alone: [1, D]
    return {key: t.float().numpy() for key, t in seen.items()}


def _rel_err(got: np.ndarray, want: np.ndarray) -> tuple[float, int]:
    """(max over rows of max |got - want| / max |want|, the row where it is); rows = tokens."""
    got = got.reshape(want.shape[0], -1)
    want = want.reshape(want.shape[0], -1)
    scale = np.maximum(np.abs(want).max(axis=1), np.finfo(np.float32).tiny)
    per_row = np.abs(got - want).max(axis=1) / scale
    per_row = np.where(np.isnan(per_row), np.inf, per_row)  # a NaN anywhere is a failure
    row = int(np.argmax(per_row))
    return float(per_row[row]), row
