"""GPTQ and AWQ int4 checkpoints, repacked at load into the plan's int4 layout.

Our layout (``llamagraph.ir.quant``) for a weight W [N, K] (N outputs, K inputs) is codes q
[N, K] packed two to a byte along K, with a scale s and a zero z per row and group of G
consecutive columns ([N, K/G] each, in the activation dtype): w' = (q - z) * s. GPTQ and AWQ
store the same numbers (4-bit codes, one scale and zero per group of G input columns,
w' = (q - z) * s) but transposed and packed eight codes to an int32, each in its own order:

GPTQ (AutoGPTQ ``QuantLinear``; checkpoint format "gptq", also called v1), for each linear
``<prefix>`` whose float weight would be ``<prefix>.weight``:
    qweight int32 [K/8, N]   word (r, n) holds the codes of rows k = 8r .. 8r+7 of column n,
                             code of k = 8r + j in bits 4j .. 4j+3 (lowest bits first)
    qzeros  int32 [K/G, N/8] word (g, c) holds the zeros of columns n = 8c .. 8c+7 of group g,
                             n = 8c + j in bits 4j .. 4j+3; the stored number is z - 1, so
                             z = nibble + 1 (1 .. 16; symmetric checkpoints store 7, z = 8)
    scales  fp16 [K/G, N]
    g_idx   int32 [K]        the group of each input column; with desc_act false it is k // G
                             (anything else is an act-order checkpoint and is refused)
AWQ (AutoAWQ ``WQLinear_GEMM``, version "gemm"):
    qweight int32 [K, N/8]   word (k, c) holds columns n = 8c .. 8c+7 of row k, nibble i (bits
                             4i .. 4i+3) holding column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]
    qzeros  int32 [K/G, N/8] the zeros of group g, in the same interleaved order; z = nibble
    scales  fp16 [K/G, N]
A group size of -1 in the config means one group per row (G = K).

Unpacking goes to our unpacked form (codes uint8 [N, K], s and z float32 [N, K/G]); a fused
weight value stacks its parts' rows, puts them in its row order, and packs the codes with
``llamagraph.ir.quant.pack_int4``. Scales and zeros are then stored in the plan's activation
dtype: exact in float32 and float16 plans (GPTQ / AWQ scales are fp16; zeros are whole numbers),
rounded to the nearest bf16 in bfloat16 plans.

Every problem with the tensors is a one-line ``WeightError`` naming the file and tensor.
"""

from __future__ import annotations

import numpy as np

from llamagraph.ir.dtypes import to_float32, to_storage
from llamagraph.ir.errors import WeightError
from llamagraph.ir.graph import Graph
from llamagraph.ir.layout import row_order
from llamagraph.ir.quant import pack_int4, quantize_int4

# AWQ GEMM: nibble i of a word holds column AWQ_ORDER[i] of its eight; and so column j of the
# eight sits in nibble AWQ_NIBBLE_OF[j].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_NIBBLE_OF = tuple(int(i) for i in np.argsort(AWQ_ORDER))  # (0, 4, 1, 5, 2, 6, 3, 7)

_INT32 = ("I32", "int32")  # how safetensors and torch checkpoints name the dtype
_INTEGER = _INT32 + ("I64", "int64")
_FLOAT = ("F16", "float16", "BF16", "bfloat16", "F32", "float32")


# ---- unpacking (pure array functions) ----------------------------------------------------------


def _nibbles(words: np.ndarray) -> np.ndarray:
    """int32 [..., W] -> uint8 [..., W, 8]: nibble j of each word (bits 4j .. 4j+3) at [..., j].
    One uint32 temporary of the words' size at a time: a 70B down_proj is 235 MB of codes."""
    u = np.ascontiguousarray(words).view(np.uint32)
    out = np.empty(u.shape + (8,), np.uint8)
    for j in range(8):
        out[..., j] = (u >> np.uint32(4 * j)) & np.uint32(0xF)
    return out


def unpack_gptq_qweight(qweight: np.ndarray) -> np.ndarray:
    """GPTQ qweight int32 [K/8, N] -> codes uint8 [N, K] (ours: one row per output)."""
    nib = _nibbles(qweight.T)  # nib: [N, K/8, 8]: code of k = 8r + j at [n, r, j]
    return nib.reshape(qweight.shape[1], -1)


def unpack_gptq_qzeros(qzeros: np.ndarray) -> np.ndarray:
    """GPTQ v1 qzeros int32 [K/G, N/8] -> z float32 [N, K/G]; the file holds z - 1 in 4 bits."""
    nib = _nibbles(qzeros)  # nib: [K/G, N/8, 8]: zero of n = 8c + j at [g, c, j]
    return (nib.reshape(qzeros.shape[0], -1).T + np.float32(1)).astype(np.float32)


def unpack_awq(packed: np.ndarray) -> np.ndarray:
    """AWQ GEMM qweight [K, N/8] or qzeros [K/G, N/8] (int32) -> uint8 [N, K] or [N, K/G]:
    transposed, with the eight columns of each word put back from the interleaved order."""
    nib = _nibbles(packed)  # nib: [rows, N/8, 8]: column 8c + AWQ_ORDER[i] at [., c, i]
    cols = nib[:, :, list(AWQ_NIBBLE_OF)]  # [rows, N/8, 8]: column 8c + j at [., c, j]
    return np.ascontiguousarray(cols.reshape(packed.shape[0], -1).T)


# ---- reading one checkpoint linear -------------------------------------------------------------


def group_size_of(qcfg: dict, K: int) -> int:
    """The columns per group of a K-column weight: the config's group size, -1 meaning all K."""
    g = int(qcfg["group_size"])
    return K if g == -1 else g


class _Part:
    """The tensors of one quantized linear, read and checked with errors naming file and tensor."""

    def __init__(self, ckpt, prefix: str, where: str):
        self.ckpt, self.prefix, self.where = ckpt, prefix, where

    def locate(self, suffix: str, optional: bool = False):
        name = self.prefix + suffix
        found = self.ckpt.locate(name)
        if found is None and not optional:
            raise WeightError(f"{self.ckpt.where}: tensor '{name}' is missing (needed for value '{self.where}'; a "
                              f"quantized checkpoint holds {self.prefix}qweight, qzeros and scales)")
        return name, found

    def read(self, suffix: str, shape: tuple[int, ...], dtypes: tuple[str, ...], what: str,
             optional: bool = False) -> np.ndarray | None:
        name, found = self.locate(suffix, optional)
        if found is None:
            return None
        file, got, src = found
        if tuple(got) != tuple(shape):
            raise WeightError(f"{file}: tensor '{name}' has shape {list(got)} but the config expects {list(shape)} "
                              f"({what}; value '{self.where}')")
        if src not in dtypes:
            raise WeightError(f"{file}: tensor '{name}' has dtype {src}; expected {what}")
        arr = self.ckpt.read(name)
        if src in ("BF16", "bfloat16"):
            arr = to_float32(arr, "bfloat16")
        return arr, file, name


def read_int4_part(ckpt, hf_weight_name: str, shape, qcfg: dict, where: str):
    """One checkpoint linear ``<prefix>.weight`` of float shape [N, K], from its GPTQ / AWQ tensors
    -> (q uint8 [N, K] codes 0..15, s float32 [N, K/G], z float32 [N, K/G]), w' = (q - z) * s.

    ``where`` names the graph value the part belongs to, for error messages."""
    N, K = (int(d) for d in shape)
    if not hf_weight_name.endswith(".weight"):
        raise WeightError(f"{ckpt.where}: tensor '{hf_weight_name}' (value '{where}') is not a linear weight; "
                          "it cannot be read from a quantized checkpoint")
    prefix = hf_weight_name[: -len("weight")]
    G = group_size_of(qcfg, K)
    method = qcfg["method"]
    part = _Part(ckpt, prefix, where)
    if K % G or N % 8 or K % 8:
        name, found = part.locate("qweight")
        raise WeightError(f"{found[0]}: tensor '{name}' cannot hold a [{N}, {K}] weight in {method} int4 with group "
                          f"size {G}: K must be a multiple of 8 and of the group size, N a multiple of 8 (value '{where}')")
    groups = K // G
    if method == "gptq":
        qweight, _, _ = part.read("qweight", (K // 8, N), _INT32, "GPTQ codes int32 [K/8, N]")
        qzeros, _, _ = part.read("qzeros", (groups, N // 8), _INT32, "GPTQ zeros int32 [K/G, N/8]")
        q, z = unpack_gptq_qweight(qweight), unpack_gptq_qzeros(qzeros)
        _check_g_idx(part, K, G)
    elif method == "awq":
        qweight, _, _ = part.read("qweight", (K, N // 8), _INT32, "AWQ codes int32 [K, N/8]")
        qzeros, _, _ = part.read("qzeros", (groups, N // 8), _INT32, "AWQ zeros int32 [K/G, N/8]")
        q, z = unpack_awq(qweight), unpack_awq(qzeros).astype(np.float32)
    else:
        raise WeightError(f"value '{where}': unknown quantization method {method!r}; expected gptq or awq")
    scales, file, name = part.read("scales", (groups, N), _FLOAT, "float scales [K/G, N]")
    s = np.ascontiguousarray(np.asarray(scales, np.float32).T)  # s: [N, K/G]
    if not np.isfinite(s).all():
        raise WeightError(f"{file}: tensor '{name}' holds non-finite scales (value '{where}'); the checkpoint is damaged")
    return q, s, z


def _check_g_idx(part: _Part, K: int, G: int) -> None:
    """g_idx, where present, must put column k in group k // G: with desc_act false the groups
    are runs of consecutive columns, which is all our layout can hold. (It says nothing more, so
    a checkpoint without it is read as k // G.)"""
    got = part.read("g_idx", (K,), _INTEGER, "group indices int32 [K]", optional=True)
    if got is None:
        return
    g_idx, file, name = got
    want = np.arange(K) // G
    bad = np.flatnonzero(np.asarray(g_idx) != want)
    if bad.size:
        k = int(bad[0])
        raise WeightError(f"{file}: tensor '{name}' puts input column {k} in group {int(g_idx[k])}, not {k} // {G} = "
                          f"{k // G} (an act-order / desc_act checkpoint?); only groups of consecutive columns are "
                          f"supported (value '{part.where}')")


# ---- a whole weight value ----------------------------------------------------------------------


def holds_int4(ckpt, hf_weight_name: str) -> bool:
    """Whether the checkpoint holds ``<prefix>.weight`` as quantized tensors (``<prefix>.qweight``)."""
    return hf_weight_name.endswith(".weight") and ckpt.locate(hf_weight_name[: -len("weight")] + "qweight") is not None


def load_quantized_value(ckpt, graph: Graph, value_name: str, qcfg: dict):
    """A quantized weight value's arrays from a GPTQ / AWQ checkpoint: (codes packed uint8 [N, K/2],
    scales [N, K/G], zeros [N, K/G]), scales and zeros in the activation dtype's storage.

    Parts are stacked along N and put in the value's row order, as ``llamagraph.ir.layout.assemble``
    does for float weights. A part the checkpoint keeps in float (a module in
    ``modules_to_not_convert``) is quantized by our own int4 scheme with the same group size, so
    the value still has one layout."""
    v = graph.values[value_name]
    quant = v.quant
    if quant is None or quant.scheme != "int4":
        scheme = "float" if quant is None else quant.scheme
        raise WeightError(f"value '{value_name}' is {scheme} in the plan, but a {qcfg['method']} checkpoint holds "
                          "int4 weights; compile it with quantize='int4'")
    N, K = v.concrete_shape(graph.dims)
    act = graph.values[quant.scales].dtype
    G = group_size_of(qcfg, K)
    if quant.group_size != G:
        raise WeightError(f"value '{value_name}' has int4 group size {quant.group_size} in the plan but the "
                          f"checkpoint's is {G} (quantization_config.group_size {qcfg['group_size']})")
    qs, ss, zs = [], [], []
    for hf_name, shape in v.attrs["parts"]:
        if holds_int4(ckpt, hf_name):
            q, s, z = read_int4_part(ckpt, hf_name, shape, qcfg, value_name)
        else:
            q, s, z = _quantize_float_part(ckpt, hf_name, shape, G, act, value_name)
        qs.append(q), ss.append(s), zs.append(z)
    q, s, z = (np.concatenate(a, axis=0) if len(a) > 1 else a[0] for a in (qs, ss, zs))
    if q.shape != (N, K):  # the parts' shapes come from the graph: a builder bug if not
        raise AssertionError((value_name, q.shape, (N, K)))
    order = row_order(v.attrs)
    if order is not None:  # quantization is per row, so the rows of all three move together
        q, s, z = q[order], s[order], z[order]
    return pack_int4(q), to_storage(np.ascontiguousarray(s), act), to_storage(np.ascontiguousarray(z), act)


def _quantize_float_part(ckpt, hf_name: str, shape, G: int, act: str, value_name: str):
    """A float part of a quantized value, quantized by our int4 scheme (``quantize_int4``)."""
    from llamagraph.runtime.weights import _read_part  # the float reader and its checks

    w = _read_part(ckpt, hf_name, tuple(shape), "float32", "hf", value_name)
    return quantize_int4(w, G, act)
