"""GPTQ and AWQ int4 checkpoints (issue #8): config parsing, the published packings on hand-worked
words, checkpoints built from known integer weights loading to exactly those weights, the
one-line errors, and plans against HF transformers run with the dequantized weights.

The checkpoints are written here by the packings as AutoGPTQ and AutoAWQ describe them (slot by
slot, in the packing direction), not by ``llamagraph.runtime.quant_checkpoints``, which only
unpacks:
  GPTQ v1: qweight int32 [K/8, N], code of input k = 8r + j in bits 4j of word (r, n);
           qzeros int32 [K/G, N/8], zero of output n = 8c + j in bits 4j of word (g, c), stored
           as z - 1; scales fp16 [K/G, N]; g_idx int32 [K] = k // G.
  AWQ GEMM: qweight int32 [K, N/8], nibble i of word (k, c) holds output 8c + [0,2,4,6,1,3,5,7][i];
           qzeros int32 [K/G, N/8] in the same order, z itself; scales fp16 [K/G, N].
"""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

import llamagraph
import models
import quant_oracle
from llamagraph.compiler import compile_graph
from llamagraph.ir import ConfigError, ModelConfig, WeightError, load_config
from llamagraph.ir.dtypes import to_float32
from llamagraph.ir.layout import assemble
from llamagraph.ir.quant import dequantize
from llamagraph.runtime.quant_checkpoints import (
    load_quantized_value, read_int4_part, unpack_awq, unpack_gptq_qweight, unpack_gptq_qzeros,
)
from llamagraph.runtime.weights import load_weights, open_checkpoint
from numerics import check_against_hf

# K = 128 and 384 take group sizes 32, 64 and 128; head_dim 32 gives fp16 plans the rope-pair row
# order on the fused QKV weight, so the loader's row permutation is exercised.
WIDE = dict(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2,
            initializer_range=128 ** -0.5)
LINEAR_SUFFIXES = quant_oracle.LINEAR_SUFFIXES
AWQ_PUBLISHED_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ WQLinear_GEMM: nibble i holds column order[i]

GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "damp_percent": 0.01, "desc_act": False,
               "true_sequential": True, "checkpoint_format": "gptq"}
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "zero_point": True, "version": "gemm", "modules_to_not_convert": None}


# ---- building quantized checkpoints -------------------------------------------------------------

def rtn_int4(w: np.ndarray, G: int, sym: bool, method: str):
    """Round-to-nearest 4-bit codes of w [N, K] by the quantizers' own parameter rules (GPTQ's
    Quantizer.find_params; AutoAWQ's pseudo_quantize_tensor): (q [N, K], z [N, K/G], s fp16 [N, K/G]).
    The packing does not care how the codes were found (GPTQ's Hessian updates change the codes,
    not their layout)."""
    N, K = w.shape
    g = w.reshape(N, K // G, G).astype(np.float32)
    lo, hi = g.min(axis=2), g.max(axis=2)
    if method == "gptq":  # the range always holds 0
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        if sym:
            hi = np.maximum(-lo, hi)
            lo = np.where(lo < 0, -hi, lo)
    s = ((hi - lo) / 15).astype(np.float16)
    s = np.where(s == 0, np.float16(1), s)
    s32 = s.astype(np.float32)
    if sym:
        z = np.full(s.shape, 8.0, np.float32)  # GPTQ: (maxq + 1) / 2
    else:  # GPTQ v1 stores z - 1 in 4 bits, so its writers cannot hold z = 0: keep z >= 1 there
        z = np.clip(np.rint(-lo / s32), 1 if method == "gptq" else 0, 15).astype(np.float32)
    q = np.clip(np.rint(g / s32[:, :, None]) + z[:, :, None], 0, 15).astype(np.float32)
    return q.reshape(N, K), z, s


def dequantized(q, z, s, G):
    """w' = (q - z) * s [N, K] float32, written out with numpy (the truth a loader must reproduce)."""
    N, K = q.shape
    g = (q.reshape(N, K // G, G) - z[:, :, None]) * s.astype(np.float32)[:, :, None]
    return g.reshape(N, K).astype(np.float32)


def pack_gptq(q, z, s, G) -> dict[str, np.ndarray]:
    N, K = q.shape
    codes = q.T.astype(np.uint32)  # [K, N]
    qweight = np.zeros((K // 8, N), np.uint32)
    for j in range(8):  # input k = 8r + j goes to bits 4j of row r
        qweight |= codes[j::8] << np.uint32(4 * j)
    stored = ((z.T.astype(np.int64) - 1) & 0xF).astype(np.uint32)  # [K/G, N]: v1 stores z - 1
    qzeros = np.zeros((K // G, N // 8), np.uint32)
    for j in range(8):  # output n = 8c + j goes to bits 4j of column c
        qzeros |= stored[:, j::8] << np.uint32(4 * j)
    return {"qweight": qweight.view(np.int32), "qzeros": qzeros.view(np.int32),
            "scales": np.ascontiguousarray(s.T.astype(np.float16)), "g_idx": (np.arange(K) // G).astype(np.int32)}


def pack_awq(q, z, s, G) -> dict[str, np.ndarray]:
    N, K = q.shape

    def pack_columns(a):  # [rows, N] -> [rows, N/8]: nibble i of word c holds column 8c + order[i]
        a = a.astype(np.uint32)
        out = np.zeros((a.shape[0], N // 8), np.uint32)
        for i, col in enumerate(AWQ_PUBLISHED_ORDER):
            out |= a[:, col::8] << np.uint32(4 * i)
        return out.view(np.int32)

    return {"qweight": pack_columns(q.T), "qzeros": pack_columns(z.T), "scales": np.ascontiguousarray(s.T.astype(np.float16))}


def write_quantized(base_dir: str, out_dir: str, method: str, group: int, sym: bool = False,
                    float_modules: tuple[str, ...] = (), shards: int = 1, lm_head: bool = False,
                    **config_over) -> dict[str, np.ndarray]:
    """A GPTQ / AWQ copy of an HF checkpoint (every linear of the decoder layers quantized, the
    embedding, norms and lm_head left in float as the quantizers do, unless ``lm_head``: GPTQModel's
    lm_head=true); returns each quantized linear's w' by its float name (``<prefix>.weight``)."""
    sd = {k: v.float().numpy() for k, v in models.hf_state_dict(base_dir).items()}
    tensors, truth = {}, {}
    for name, w in sd.items():
        quantized = name.endswith(LINEAR_SUFFIXES) or (lm_head and name == "lm_head.weight")
        if not quantized or any(m in name for m in float_modules):
            tensors[name] = w
            continue
        G = w.shape[1] if group == -1 else group
        q, z, s = rtn_int4(w, G, sym, method)
        truth[name] = dequantized(q, z, s, G)
        packed = (pack_gptq if method == "gptq" else pack_awq)(q, z, s, G)
        tensors.update({name[: -len("weight")] + k: v for k, v in packed.items()})
    with open(os.path.join(base_dir, "config.json")) as f:
        config = json.load(f)
    qc = dict(GPTQ_CONFIG, sym=sym) if method == "gptq" else dict(AWQ_CONFIG)
    config["quantization_config"] = {**qc, "group_size": group, **({"lm_head": True} if lm_head else {}), **config_over}
    _save(out_dir, config, tensors, shards)
    return truth


def _save(out_dir: str, config: dict, tensors: dict[str, np.ndarray], shards: int = 1) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)
    if shards == 1:
        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        mine = names[i::shards]  # a linear's qweight, qzeros and scales land in different shards
        save_file({n: tensors[n] for n in mine}, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in mine})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def write_oracle(base_dir: str, out_dir: str, truth: dict[str, np.ndarray], lm_head_group: int | None) -> str:
    """The float checkpoint HF runs: the base one with each quantized linear replaced by its w', and
    the untied lm_head by our int4 scheme's w' when the plan quantizes it (``lm_head_group``)."""
    import torch

    sd = {k: v.clone() for k, v in models.hf_state_dict(base_dir).items()}
    for name, w in truth.items():
        sd[name] = torch.from_numpy(w)
    if lm_head_group is not None and "lm_head.weight" in sd:
        sd["lm_head.weight"] = quant_oracle.dequantized_int4(sd["lm_head.weight"], lm_head_group)
    with open(os.path.join(base_dir, "config.json")) as f:
        config = json.load(f)
    _save(out_dir, config, {k: v.float().contiguous().numpy() for k, v in sd.items()})
    return out_dir


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """base(name) -> a float checkpoint of the WIDE shape (cached): "wide", "bias" or "tied"."""
    built = {}
    over = {"wide": {}, "bias": dict(attention_bias=True, mlp_bias=True), "tied": dict(tie_word_embeddings=True)}

    def get(name: str = "wide") -> str:
        if name not in built:
            built[name] = models.make_hf_model(tmp_path_factory.mktemp(f"base-{name}"), {**WIDE, **over[name]})
        return built[name]

    return get


@pytest.fixture
def lowerable(monkeypatch):
    """Lowering refuses quantized layouts until their kernels land (codegen.lowering._float_only);
    the reference backend runs no kernels, so these tests lift that check. Remove this fixture
    (and its uses) once quantized plans lower on their own."""
    from llamagraph.codegen import lowering

    monkeypatch.setattr(lowering, "_float_only", lambda *a, **k: None, raising=False)


# ---- config ---------------------------------------------------------------------------------------

def _hf_config(tmp_path, qc) -> str:
    config = models.hf_config(WIDE).to_dict()
    config["quantization_config"] = qc
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("qc,want", [
    (dict(GPTQ_CONFIG, sym=True, group_size=128),
     {"method": "gptq", "bits": 4, "group_size": 128, "sym": True, "format": "gptq"}),
    (dict(GPTQ_CONFIG, sym=False, group_size=-1), {"method": "gptq", "group_size": -1, "sym": False}),
    # transformers 5 writes "format"; old AutoGPTQ configs have no format and no sym (HF: sym true)
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "format": "gptq"}, {"group_size": 32, "sym": True}),
    ({"quant_method": "GPTQ", "bits": 4, "group_size": 64, "desc_act": False}, {"method": "gptq", "format": "gptq"}),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "lm_head": True}, {"lm_head": True}),
    (dict(AWQ_CONFIG, group_size=128), {"method": "awq", "bits": 4, "group_size": 128, "sym": False, "format": "gemm"}),
    ({"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "version": "GEMM"}, {"method": "awq", "group_size": 64}),
    ({"quant_method": "awq", "bits": 4, "group_size": -1, "format": "gemm",
      "modules_to_not_convert": ["lm_head"]}, {"group_size": -1, "modules_to_not_convert": ["lm_head"]}),
])
def test_supported_quantization_configs(tmp_path, qc, want):
    cfg = load_config(_hf_config(tmp_path, qc))
    assert {k: cfg.quantization[k] for k in want} == want


def test_float_config_has_no_quantization(hf_model):
    assert load_config(hf_model("gqa")).quantization is None


def test_quantization_round_trips_through_plan_json(tmp_path):
    cfg = load_config(_hf_config(tmp_path, dict(GPTQ_CONFIG, sym=False, group_size=-1)))
    back = ModelConfig(**json.loads(json.dumps(cfg.to_dict())))  # what bind() does with plan.json's config
    assert back == cfg and back.quantization["group_size"] == -1


@pytest.mark.parametrize("qc,key,value", [
    (dict(GPTQ_CONFIG, group_size=128, desc_act=True), "desc_act", "true"),
    (dict(GPTQ_CONFIG, group_size=128, bits=8), "bits", "8"),
    (dict(GPTQ_CONFIG, group_size=128, bits=3), "bits", "3"),
    (dict(GPTQ_CONFIG, group_size=128, checkpoint_format="gptq_v2"), "checkpoint_format", "'gptq_v2'"),
    (dict(GPTQ_CONFIG, group_size=128, checkpoint_format="marlin"), "checkpoint_format", "'marlin'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "format": "gptq_v2"}, "format", "'gptq_v2'"),
    (dict(GPTQ_CONFIG, group_size=128, is_marlin_format=True), "is_marlin_format", "true"),
    (dict(GPTQ_CONFIG, group_size=128, dynamic={"-:.*down.*": {}}), "dynamic", "down"),
    (dict(AWQ_CONFIG, group_size=128, version="gemv"), "version", "'gemv'"),
    (dict(AWQ_CONFIG, group_size=128, version="gemv_fast"), "version", "'gemv_fast'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "format": "gemv"}, "format", "'gemv'"),
    (dict(AWQ_CONFIG, group_size=128, bits=8), "bits", "8"),
    (dict(AWQ_CONFIG, group_size=128, zero_point=False), "zero_point", "false"),
    (dict(AWQ_CONFIG, group_size=128, backend="llm-awq"), "backend", "'llm-awq'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method", "'bitsandbytes'"),
    ({"quant_method": "fp8"}, "quant_method", "'fp8'"),
    ({"bits": 4, "group_size": 128}, "quant_method", "missing"),
    (dict(GPTQ_CONFIG), "group_size", "missing"),
    (dict(GPTQ_CONFIG, group_size=0), "group_size", "0"),
    (dict(GPTQ_CONFIG, group_size=128, bits="4"), "bits", "'4'"),
    (dict(GPTQ_CONFIG, group_size=128, sym="yes"), "sym", "'yes'"),
])
def test_unsupported_quantization_configs_are_one_line(tmp_path, qc, key, value):
    path = _hf_config(tmp_path, qc)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "\n" not in msg and path in msg
    assert f"'quantization_config.{key}'" in msg and value in msg, msg


def test_quantization_config_must_be_an_object(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'quantization_config' must be an object, got 'gptq'"):
        load_config(_hf_config(tmp_path, "gptq"))


# ---- the packings on hand-worked words ------------------------------------------------------------

def test_gptq_qweight_packs_eight_inputs_low_bits_first():
    # column 0 holds codes 0, 1, ..., 7 for inputs k = 0..7: 0x76543210; column 1 holds
    # 15, 14, ..., 8: 0x89ABCDEF (negative as int32). Row 1 (inputs 8..15) is 0x0000000F /
    # 0xF0000000: input 8 is 15 in column 0, input 15 is 15 in column 1.
    words = np.array([[0x76543210, 0x89ABCDEF], [0x0000000F, 0xF0000000]], np.uint32).view(np.int32)
    codes = unpack_gptq_qweight(words)  # [N = 2, K = 16]
    assert codes.dtype == np.uint8
    assert codes.tolist() == [list(range(8)) + [15] + [0] * 7, list(range(15, 7, -1)) + [0] * 7 + [15]]


def test_gptq_v1_qzeros_hold_z_minus_one_along_outputs():
    # group 0: outputs 0..7 store 0..7, so z = 1..8; group 1: 0xF0000007 stores 7 for output 0
    # (z = 8, every symmetric checkpoint's zero) and 15 for output 7: z = 16, as AutoGPTQ's and
    # vLLM's v1 readers add one to the 4-bit number.
    words = np.array([[0x76543210], [0xF0000007]], np.uint32).view(np.int32)  # [K/G = 2, N/8 = 1]
    z = unpack_gptq_qzeros(words)  # [N = 8, K/G = 2]
    assert z.dtype == np.float32
    assert z[:, 0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert z[:, 1].tolist() == [8, 1, 1, 1, 1, 1, 1, 16]


def test_awq_packs_eight_outputs_interleaved():
    # nibble i holds output [0, 2, 4, 6, 1, 3, 5, 7][i]. Outputs 0..7 with values 0..7 put
    # 0, 2, 4, 6, 1, 3, 5, 7 in nibbles 0..7: 0x75316420. Read the other way, 0x76543210 (nibble
    # i = i) gives outputs 0..7 the values 0, 4, 1, 5, 2, 6, 3, 7.
    words = np.array([[0x75316420, 0x76543210]], np.uint32).view(np.int32)  # [K = 1, N/8 = 2]
    out = unpack_awq(words)  # [N = 16, 1]
    assert out[:, 0].tolist() == list(range(8)) + [0, 4, 1, 5, 2, 6, 3, 7]


def test_test_packers_agree_with_the_hand_worked_words():
    """The packers that build this file's checkpoints, on the hand-worked numbers above."""
    q = np.zeros((8, 8), np.float32)
    q[0] = np.arange(8)  # output 0, inputs 0..7
    z = np.arange(1, 9, dtype=np.float32)[:, None]  # [N, 1]
    s = np.ones((8, 1), np.float16)
    gptq = pack_gptq(q, z, s, 8)
    assert gptq["qweight"].view(np.uint32)[0, 0] == 0x76543210
    assert gptq["qzeros"].view(np.uint32)[0, 0] == 0x76543210
    awq = pack_awq(q.T.copy(), np.arange(8, dtype=np.float32)[:, None], s, 8)  # output n has code n at input 0
    assert awq["qweight"].view(np.uint32)[0, 0] == 0x75316420
    assert awq["qzeros"].view(np.uint32)[0, 0] == 0x75316420


def test_read_int4_part_by_hand(tmp_path):
    """One GPTQ linear [N = 8, K = 16], G = 8, written as words by hand, read back."""
    qweight = np.zeros((2, 8), np.uint32)
    qweight[0, 0] = 0x76543210  # output 0, inputs 0..7: codes 0..7
    qweight[1, 3] = 0xF0000001  # output 3: input 8 -> 1, input 15 -> 15
    qzeros = np.array([[0x77777777], [0x00000043]], np.uint32)  # group 0: z = 8; group 1: z = 4, 5, 1, ...
    scales = np.array([[0.5] * 8, [0.25] * 4 + [2.0] * 4], np.float16)  # [K/G, N]
    path = str(tmp_path / "model.safetensors")
    save_file({"x.qweight": qweight.view(np.int32), "x.qzeros": qzeros.view(np.int32), "x.scales": scales,
               "x.g_idx": np.array([0] * 8 + [1] * 8, np.int32)}, path)
    q, s, z = read_int4_part(open_checkpoint(path), "x.weight", (8, 16), {"method": "gptq", "group_size": 8}, "x")
    assert q.shape == (8, 16) and s.shape == z.shape == (8, 2)
    assert q[0, :8].tolist() == list(range(8)) and q[3, 8] == 1 and q[3, 15] == 15
    assert q.sum() == sum(range(8)) + 16
    assert z[:, 0].tolist() == [8] * 8 and z[:, 1].tolist() == [4, 5] + [1] * 6
    assert s[:, 0].tolist() == [0.5] * 8 and s[:, 1].tolist() == [0.25] * 4 + [2.0] * 4
    w = dequantized(q.astype(np.float32), z, s, 8)
    assert w[0, :8].tolist() == [(k - 8) * 0.5 for k in range(8)]
    assert w[3, 15] == (15 - 1) * 0.25 and w[3, 8] == (1 - 1) * 0.25


# ---- checkpoints load to exactly the weights they were made from ----------------------------------

CASES = [("gptq", sym, g) for sym in (True, False) for g in (32, 64, 128, -1)] + [("awq", False, g) for g in (32, 64, 128, -1)]


def _quantized_linears(graph):
    return [v for v in graph.values.values() if v.quant is not None and v.name != "lm_head.w"]


@pytest.mark.parametrize("method,sym,group", CASES)
def test_checkpoint_loads_to_exactly_its_weights(base, tmp_path, method, sym, group):
    ckpt = str(tmp_path / "q")
    truth = write_quantized(base(), ckpt, method, group, sym=sym, shards=2 if group == 64 else 1)
    cfg = load_config(ckpt)
    assert (cfg.quantization["method"], cfg.quantization["group_size"], cfg.quantization["sym"]) == (method, group, sym)
    row_ordered = 0
    for dtype in ("float32", "float16"):
        graph = compile_graph(cfg, dtype=dtype)  # the checkpoint's config makes it int4 with its group size
        loaded = load_weights(graph, ckpt)
        reader = open_checkpoint(ckpt)
        values = _quantized_linears(graph)
        assert len(values) == 4 * cfg.num_layers  # qkv, o, gate_up, down
        for v in values:
            N, K = v.shape
            assert v.quant.group_size == (K if group == -1 else group)
            want = assemble(v.attrs, [truth[name] for name, _ in v.attrs["parts"]])
            codes, scales, zeros = (loaded[n] for n in (v.name, v.quant.scales, v.quant.zeros))
            assert codes.dtype == np.uint8 and codes.shape == (N, K // 2)
            assert scales.dtype == zeros.dtype == np.dtype(dtype)
            got = dequantize(codes, to_float32(scales, dtype), to_float32(zeros, dtype), "int4", v.quant.group_size)
            np.testing.assert_array_equal(got, want, err_msg=f"{method} sym={sym} G={group} {dtype} {v.name}")
            direct = load_quantized_value(reader, graph, v.name, cfg.quantization)
            for a, b in zip(direct, (codes, scales, zeros), strict=True):
                np.testing.assert_array_equal(a, b)
            row_ordered += "row_order" in v.attrs
    assert row_ordered == cfg.num_layers  # the fp16 plans' QKV weights are in rope pair order


def test_float_lm_head_embedding_and_norms_load_as_floats(base, tmp_path):
    ckpt = str(tmp_path / "q")
    write_quantized(base(), ckpt, "gptq", 64, sym=True)
    graph = compile_graph(load_config(ckpt), dtype="float32")
    loaded = load_weights(graph, ckpt)
    sd = models.hf_state_dict(base())
    np.testing.assert_array_equal(loaded["embed.w"], sd["model.embed_tokens.weight"].numpy())
    np.testing.assert_array_equal(loaded["l1.attn_norm.w"], sd["model.layers.1.input_layernorm.weight"].numpy())


def test_bfloat16_plan_rounds_the_fp16_scales_to_bf16(base, tmp_path):
    """bf16 plans store scales in bf16: the checkpoint's fp16 scales rounded to nearest (the codes
    and the whole-number zeros are unchanged)."""
    import torch

    ckpt = str(tmp_path / "q")
    write_quantized(base(), ckpt, "gptq", 32, sym=False)
    cfg = load_config(ckpt)
    f32 = load_weights(compile_graph(cfg, dtype="float32"), ckpt)
    bf16 = load_weights(compile_graph(cfg, dtype="bfloat16"), ckpt)
    for name in ("l0.o.w", "l1.down.w"):
        np.testing.assert_array_equal(bf16[name], f32[name])
        np.testing.assert_array_equal(to_float32(bf16[name + ".zeros"], "bfloat16"), f32[name + ".zeros"])
        want = torch.from_numpy(f32[name + ".scales"]).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(to_float32(bf16[name + ".scales"], "bfloat16"), want)


def test_quantized_lm_head_loads_from_its_int4_tensors(base, tmp_path):
    """GPTQModel's lm_head=true writes lm_head.qweight / qzeros / scales: the plan's int4 lm_head
    takes those numbers, not a requantization of a float tensor (there is none)."""
    ckpt = str(tmp_path / "q")
    truth = write_quantized(base(), ckpt, "gptq", 64, sym=True, lm_head=True)
    assert "lm_head.weight" in truth
    cfg = load_config(ckpt)
    assert cfg.quantization["lm_head"] is True
    graph = compile_graph(cfg, dtype="float32")
    head = graph.values["lm_head.w"]
    loaded = load_weights(graph, ckpt)
    got = dequantize(loaded["lm_head.w"], loaded[head.quant.scales], loaded[head.quant.zeros], "int4", 64)
    np.testing.assert_array_equal(got, truth["lm_head.weight"])


def test_a_part_left_in_float_is_quantized_by_our_scheme(base, tmp_path):
    """modules_to_not_convert: k_proj stays float in the checkpoint; the fused QKV weight still has
    one int4 layout, its k rows quantized by our own scheme, its q and v rows the checkpoint's."""
    import torch

    ckpt = str(tmp_path / "q")
    truth = write_quantized(base(), ckpt, "awq", 32, float_modules=("k_proj",), modules_to_not_convert=["k_proj"])
    cfg = load_config(ckpt)
    graph = compile_graph(cfg, dtype="float32")
    v = graph.values["l0.qkv.w"]
    codes, scales, zeros = load_quantized_value(open_checkpoint(ckpt), graph, v.name, cfg.quantization)
    got = dequantize(codes, scales, zeros, "int4", 32)
    k_float = models.hf_state_dict(base())["model.layers.0.self_attn.k_proj.weight"]
    parts = [truth.get(name) for name, _ in v.attrs["parts"]]
    parts[1] = quant_oracle.dequantized_int4(k_float, 32).numpy()
    np.testing.assert_allclose(got, np.concatenate(parts), rtol=0, atol=1e-7)
    assert not np.array_equal(parts[1], k_float.to(torch.float32).numpy())


# ---- one-line errors for damaged tensors ----------------------------------------------------------

def _damaged(base_dir, tmp_path, method, damage):
    ckpt = str(tmp_path / "q")
    write_quantized(base_dir, ckpt, method, 32, sym=False)
    path = os.path.join(ckpt, "model.safetensors")
    from safetensors.numpy import load_file

    tensors = load_file(path)
    damage(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return ckpt, path


O1 = "model.layers.1.self_attn.o_proj."


@pytest.mark.parametrize("method,damage,names", [
    ("gptq", lambda t: t.pop(O1 + "qzeros"), [O1 + "qzeros", "is missing"]),
    ("awq", lambda t: t.pop(O1 + "scales"), [O1 + "scales", "is missing"]),
    ("gptq", lambda t: t.update({O1 + "scales": t[O1 + "scales"][:, :64]}), [O1 + "scales", "[4, 64]", "[4, 128]"]),
    ("awq", lambda t: t.update({O1 + "qweight": t[O1 + "qweight"].T.copy()}), [O1 + "qweight", "[16, 128]"]),
    ("gptq", lambda t: t.update({O1 + "qweight": t[O1 + "qweight"].astype(np.float32)}), [O1 + "qweight", "dtype"]),
    ("gptq", lambda t: t.update({O1 + "g_idx": t[O1 + "g_idx"][::-1].copy()}), [O1 + "g_idx", "act-order"]),
    ("awq", lambda t: t.update({O1 + "scales": np.full_like(t[O1 + "scales"], np.inf)}), [O1 + "scales", "non-finite"]),
])
def test_damaged_tensors_are_one_line_errors_naming_file_and_tensor(base, tmp_path, method, damage, names):
    ckpt, path = _damaged(base(), tmp_path, method, damage)
    graph = compile_graph(load_config(ckpt), dtype="float32")
    with pytest.raises(WeightError) as e:
        load_weights(graph, ckpt)
    msg = str(e.value)
    assert "\n" not in msg and path in msg, msg
    for n in names:
        assert n in msg, msg


def test_config_group_size_not_matching_the_tensors_is_one_line(base, tmp_path):
    ckpt = str(tmp_path / "q")
    write_quantized(base(), ckpt, "gptq", 32, sym=True)
    with open(os.path.join(ckpt, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"]["group_size"] = 64  # the tensors hold groups of 32
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(config, f)
    graph = compile_graph(load_config(ckpt), dtype="float32")
    with pytest.raises(WeightError, match=r"q_proj.qzeros' has shape \[4, 16\] but the config expects \[2, 16\]") as e:
        load_weights(graph, ckpt)
    assert "\n" not in str(e.value)


def test_a_plan_of_another_group_size_is_refused(base, tmp_path):
    ckpt = str(tmp_path / "q")
    write_quantized(base(), ckpt, "awq", 32)
    cfg = load_config(ckpt)
    with pytest.raises(ConfigError, match="group_size 64: this checkpoint's quantization_config.group_size is 32"):
        compile_graph(cfg, dtype="float32", group_size=64)
    graph = compile_graph(ModelConfig(**{**cfg.to_dict(), "quantization": None}), dtype="float32",
                          quantize="int4", group_size=64)
    with pytest.raises(WeightError, match="group size 64 in the plan but the checkpoint's is 32"):
        load_quantized_value(open_checkpoint(ckpt), graph, "l0.o.w", cfg.quantization)


# ---- plans against HF transformers with the dequantized weights -----------------------------------

E2E = [("wide", "gptq", True, 32), ("wide", "gptq", False, -1), ("wide", "awq", False, 64),
       ("bias", "gptq", False, 128), ("tied", "awq", False, 32)]


@pytest.mark.parametrize("name,method,sym,group", E2E)
def test_plan_matches_hf_with_dequantized_weights(base, tmp_path, lowerable, name, method, sym, group):
    ckpt = str(tmp_path / "q")
    truth = write_quantized(base(name), ckpt, method, group, sym=sym)
    plan = llamagraph.compile(ckpt, dtype="float32", max_batch=2, max_seq=32)
    head = plan.graph.values.get("lm_head.w")
    lm_group = None
    if head is not None and head.quant is not None:  # the plan quantizes the float lm_head by our scheme
        lm_group = head.quant.group_size
    oracle = write_oracle(base(name), str(tmp_path / "oracle"), truth, lm_group)
    check_against_hf(ckpt, backend="reference", dtype="float32", tol=5e-4, hf_dir=oracle)


def test_dequantized_plan_is_not_the_float_model(base, tmp_path, lowerable):
    """The comparison above would pass for a loader ignoring the codes only if the quantization
    error were below the tolerance: it is far above it."""
    ckpt = str(tmp_path / "q")
    write_quantized(base(), ckpt, "gptq", 32, sym=True)
    prompt = [3, 9, 27, 81, 50, 11]
    got = llamagraph.compile(ckpt, dtype="float32").run([prompt])[0]
    want = models.hf_reference_logits(base(), [prompt], [[]])[0][0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) > 5e-3
