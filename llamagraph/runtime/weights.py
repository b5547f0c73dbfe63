"""Checkpoint loading and deterministic random weights.

Every weight value of a graph lists the checkpoint tensors it is made of
(``attrs["parts"] = [[hf_name, shape], ...]``, concatenated along axis 0), so loading is:
find each part, check its shape, convert it to the value's storage dtype, concatenate, and put
the rows in the value's ``row_order`` if it has one (``llamagraph.ir.layout.assemble``).
Storage is float32 -> np.float32, float16 -> np.float16, bfloat16 -> np.uint16 raw bits.

Checkpoints: HF safetensors (one file, or shards named by ``model.safetensors.index.json``)
and Meta ``consolidated.00.pth``. Part names are always HF names; ``source="meta"`` maps them to
Meta's names. Meta q/k rows stay in Meta's interleaved order: graphs built from params.json apply
interleaved rope, so no permutation happens here.

A quantized weight value (``Value.quant``, set by the ``quantize_weights`` pass) is assembled in
float32 from its float parts and quantized here by the exact scheme (``llamagraph.ir.quant``):
its codes and its scales / zeros (weight values of their own, ``attrs["quant_of"]``) come out
together. A GPTQ / AWQ checkpoint's int4 tensors are repacked instead
(``llamagraph.runtime.quant_checkpoints``).

Every problem a user can cause is a one-line ``WeightError`` naming the file and tensor.
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import numpy as np

from llamagraph.ir.dtypes import DTYPES, to_float32, to_storage
from llamagraph.ir.errors import BackendError, WeightError
from llamagraph.ir.graph import WEIGHT, Graph
from llamagraph.ir.layout import assemble, stacked_row
from llamagraph.ir.quant import quantize
from llamagraph.runtime.quant_checkpoints import holds_int4, load_quantized_value

Progress = Callable[[int, int, str], None]  # progress(done_bytes, total_bytes, value_name)


# ---- dtype conversion -------------------------------------------------------------------------


# The storage conversions live in dtypes.py; these names are the loader's vocabulary for them.
float32_to_storage = to_storage
weights_to_float32 = to_float32


def _to_storage(arr: np.ndarray, src: str, dtype: str) -> np.ndarray:
    """A checkpoint tensor of dtype ``src`` (bf16 given as uint16 bits) -> a new storage array."""
    if src == "bfloat16":
        if dtype == "bfloat16":
            return np.array(arr, dtype=np.uint16)  # keep the file's bits exactly
        arr = weights_to_float32(arr, "bfloat16")
    if dtype == "float16":
        return np.array(arr, dtype=np.float16)  # numpy rounds once, from any float width
    return np.array(float32_to_storage(np.asarray(arr, dtype=np.float32), dtype))


# ---- checkpoint names ---------------------------------------------------------------------------

_META_TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_META_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def meta_name(hf_name: str) -> str | None:
    """The Meta checkpoint name of an HF tensor name, or None when Meta has no such tensor."""
    if hf_name in _META_TOP:
        return _META_TOP[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if m and m.group(2) in _META_LAYER:
        return f"layers.{m.group(1)}.{_META_LAYER[m.group(2)]}"
    return None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---- non-finite values --------------------------------------------------------------------------


def nonfinite_counts(arr, dtype: str, xp=np) -> tuple[int, int]:
    """(NaN count, inf count) of a float array in checkpoint or storage form (bf16 as uint16
    words); (0, 0) quickly when every value is finite. ``xp``: numpy, or cupy on the device."""
    if dtype == "bfloat16":  # exponent bits all ones: inf when the mantissa is 0, else NaN
        special = (arr & 0x7F80) == 0x7F80
        if not bool(special.any()):
            return 0, 0
        inf = int((special & ((arr & 0x7F) == 0)).sum())
        return int(special.sum()) - inf, inf
    if bool(xp.isfinite(arr).all()):
        return 0, 0
    return int(xp.isnan(arr).sum()), int(xp.isinf(arr).sum())


def _nonfinite_text(nan: int, inf: int) -> str:
    return f"non-finite values ({nan} NaN, {inf} inf)"


def nonfinite_error(graph: Graph, value: str, arr: np.ndarray, where: str = "") -> WeightError | None:
    """A one-line error naming the checkpoint tensor (the part of ``value``) that holds NaN or
    inf, or None when ``arr`` (the value's host storage array) is finite."""
    v = graph.values[value]
    nan, inf = nonfinite_counts(arr, v.dtype)
    if not nan and not inf:
        return None
    bad = ~np.isfinite(weights_to_float32(arr, v.dtype))
    row = stacked_row(v.attrs, int(np.argwhere(bad)[0][0])) if bad.ndim else 0
    part, first = v.name, 0
    for name, shape in v.attrs.get("parts", []):  # parts are stacked along axis 0
        if row < first + shape[0]:
            part = name
            break
        first += shape[0]
    return WeightError(f"{where}weight '{value}' (checkpoint tensor '{part}') holds {_nonfinite_text(nan, inf)}; "
                       "the checkpoint is damaged or was saved from a diverged model")


# ---- checkpoint readers -------------------------------------------------------------------------
# A reader maps checkpoint tensor names to (file, shape) and reads a tensor as numpy
# (bf16 as uint16 bits) together with its dtype name.

_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


class _SafetensorsFile:
    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        try:
            self.handle = safe_open(path, framework="numpy")
            self.names = set(self.handle.keys())
        except Exception as e:  # SafetensorError, OSError: corrupt, truncated, unreadable
            raise WeightError(f"{path}: cannot read safetensors file ({_one_line(e)})") from None
        self._header: dict | None = None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        st = self.handle.get_slice(name).get_dtype()
        return _ST_DTYPES.get(st, st)

    def read(self, name: str) -> np.ndarray:
        try:
            if self.dtype(name) == "bfloat16":
                return self._read_raw_u16(name)  # numpy has no bfloat16
            return self.handle.get_tensor(name)
        except WeightError:
            raise
        except Exception as e:
            raise WeightError(f"{self.path}: cannot read tensor '{name}' ({_one_line(e)})") from None

    def _read_raw_u16(self, name: str) -> np.ndarray:
        # Layout: u64 little-endian header length n, n bytes of JSON header, then the data;
        # each entry's data_offsets are relative to the first data byte.
        if self._header is None:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self._header = {"start": 8 + n, "entries": json.loads(f.read(n))}
        entry = self._header["entries"][name]
        begin, end = entry["data_offsets"]
        count = (end - begin) // 2
        data = np.fromfile(self.path, dtype="<u2", count=count, offset=self._header["start"] + begin)
        if data.size != count:
            raise WeightError(f"{self.path}: tensor '{name}' is truncated ({data.size} of {count} values present)")
        return data.astype(np.uint16).reshape(entry["shape"])


class _Safetensors:
    """One or more safetensors files; ``where`` names the checkpoint in missing-tensor errors."""

    def __init__(self, files: dict[str, _SafetensorsFile], weight_map: dict[str, str], where: str):
        self.files, self.weight_map, self.where = files, weight_map, where

    def locate(self, name: str) -> tuple[str, tuple[int, ...], str] | None:
        fname = self.weight_map.get(name)
        if fname is None:
            return None
        f = self.files[fname]
        if name not in f.names:
            raise WeightError(f"{f.path}: tensor '{name}' is missing although {self.where} lists it in this shard")
        return f.path, f.shape(name), f.dtype(name)

    def read(self, name: str) -> np.ndarray:
        return self.files[self.weight_map[name]].read(name)


class _TorchFile:
    def __init__(self, path: str):
        try:
            import torch
        except ImportError:
            raise WeightError(f"reading Meta checkpoint {path} needs torch (pip install torch)") from None
        self.path, self.where, self._torch = path, path, torch
        try:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightError(f"{path}: cannot read torch checkpoint ({_one_line(e)})") from None
        if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
            sd = sd["model"]
        if not isinstance(sd, dict):
            raise WeightError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
        self.tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}

    def locate(self, name: str) -> tuple[str, tuple[int, ...], str] | None:
        t = self.tensors.get(name)
        if t is None:
            return None
        return self.path, tuple(t.shape), str(t.dtype).removeprefix("torch.")

    def read(self, name: str) -> np.ndarray:
        t = self.tensors[name].contiguous()
        if t.dtype == self._torch.bfloat16:
            return t.view(self._torch.int16).numpy().view(np.uint16)
        return t.numpy()


def _open_index(index: str) -> _Safetensors:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("'weight_map' must map tensor names to file names")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        what = "no 'weight_map' key" if isinstance(e, (KeyError, TypeError)) else _one_line(e)
        raise WeightError(f"{index}: cannot read safetensors index ({what})") from None
    folder = os.path.dirname(index)
    files = {}
    for tensor, shard in weight_map.items():
        if shard in files:
            continue
        # Judged by the name, not by where links lead: the HF hub cache links every file of a
        # snapshot to ../../blobs/, and those checkpoints are fine.
        inside = os.path.normpath(shard)
        if os.path.isabs(shard) or inside == ".." or inside.startswith(".." + os.sep) or os.path.isabs(inside):
            raise WeightError(f"{index}: shard '{shard}' (holding tensor '{tensor}') is outside the checkpoint "
                              f"directory {folder or '.'}; an index may only name files inside it")
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise WeightError(f"{index}: shard '{shard}' (holding tensor '{tensor}') does not exist in {folder}")
        files[shard] = _SafetensorsFile(shard_path)
    return _Safetensors(files, weight_map, index)


def _open_single(path: str):
    if path.endswith(".safetensors"):
        f = _SafetensorsFile(path)
        return _Safetensors({path: f}, {n: path for n in f.names}, path)
    if path.endswith((".pth", ".pt", ".bin")):
        return _TorchFile(path)
    raise WeightError(f"{path}: unknown checkpoint format (expected .safetensors or .pth)")


def open_checkpoint(path: str | os.PathLike, source: str = "hf"):
    """A reader for a checkpoint file or directory (see the module docstring for layouts).

    A directory holding both layouts (HF repos ship Meta's files too) is read in ``source``'s."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.endswith(".index.json"):
            return _open_index(path)
        return _open_single(path)
    if not os.path.isdir(path):
        raise WeightError(f"{path}: no such checkpoint file or directory")
    shards = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if source == "meta" and len(shards) == 1:
        return _open_single(shards[0])
    hf_files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if source == "meta" and not shards and hf_files:
        raise WeightError(f"{path}: holds HF weights ({os.path.basename(hf_files[0])}) but the model's config is a "
                          "Meta params.json, which names Meta tensors; use the checkpoint's config.json instead")
    if source == "hf" and shards and not hf_files:
        raise WeightError(f"{path}: holds Meta weights ({os.path.basename(shards[0])}) but the model's config is an "
                          "HF config.json, which names HF tensors; use the checkpoint's params.json instead")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        return _open_index(index)
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return _open_single(os.path.join(path, "model.safetensors"))
    if len(shards) > 1:
        raise WeightError(
            f"{path}: found {len(shards)} consolidated.*.pth shards; model-parallel Meta checkpoints are not "
            "supported (merge them into one consolidated.00.pth)"
        )
    if shards:
        return _open_single(shards[0])
    if len(hf_files) == 1:
        return _open_single(hf_files[0])
    found = ", ".join(sorted(os.listdir(path))[:6]) or "nothing"
    raise WeightError(
        f"{path}: no checkpoint found (expected model.safetensors, model.safetensors.index.json or "
        f"consolidated.00.pth; found {found})"
    )


# ---- loading ------------------------------------------------------------------------------------


def _weight_values(graph: Graph):
    return [v for v in graph.values.values() if v.kind == WEIGHT]


def _source_values(graph: Graph):
    """The weight values made from checkpoint parts: all but quantization scales and zeros, which
    come out of quantizing (or repacking) the weight they belong to."""
    return [v for v in _weight_values(graph) if "quant_of" not in v.attrs]


def quantize_value(graph: Graph, name: str, w, xp=np) -> list[tuple[str, np.ndarray]]:
    """[(name, codes), (scales, ...), (zeros, ...)] for quantized weight ``name`` from its float
    array ``w`` [N, K] (already in the value's row order)."""
    q = graph.values[name].quant
    act = graph.values[q.scales].dtype
    codes, scales, zeros = quantize(w, q.scheme, q.group_size, act, xp)
    out = [(name, codes), (q.scales, scales)]
    if q.zeros:
        out.append((q.zeros, zeros))
    return out


def _storage_nbytes(graph: Graph) -> int:
    return sum(v.nbytes(graph.dims) for v in _weight_values(graph))


def _read_part(ckpt, hf_name: str, shape: tuple[int, ...], dtype: str, source: str, value: str,
               check_finite: bool = True) -> np.ndarray:
    name = hf_name if source == "hf" else meta_name(hf_name)
    if name is None:
        raise WeightError(
            f"{ckpt.where}: tensor '{hf_name}' (for value '{value}') has no Meta checkpoint equivalent"
        )
    found = ckpt.locate(name)
    if found is None:
        label = f"'{name}'" if source == "hf" else f"'{name}' (HF name '{hf_name}')"
        raise WeightError(f"{ckpt.where}: tensor {label} is missing (needed for value '{value}')")
    file, got, src = found
    if got != shape:
        raise WeightError(
            f"{file}: tensor '{name}' has shape {list(got)} but the config expects {list(shape)} (value '{value}')"
        )
    if src not in ("float32", "float16", "bfloat16", "float64"):
        raise WeightError(f"{file}: tensor '{name}' has dtype {src}; expected a floating-point tensor")
    src_arr = ckpt.read(name)
    if check_finite:
        nan, inf = nonfinite_counts(src_arr, src)
        if nan or inf:
            raise WeightError(f"{file}: tensor '{name}' holds {_nonfinite_text(nan, inf)} (value '{value}'); "
                              "the checkpoint is damaged or was saved from a diverged model")
    with np.errstate(over="ignore"):
        arr = _to_storage(src_arr, src, dtype)
    if dtype == "float16" and src != "float16" and np.isinf(arr).any():
        wide = weights_to_float32(src_arr, "bfloat16") if src == "bfloat16" else src_arr
        if np.isinf(arr).sum() > np.isinf(wide).sum():
            raise WeightError(
                f"{file}: tensor '{name}' has values beyond the float16 range (max |x| = "
                f"{float(np.nanmax(np.abs(wide))):.4g}); use bfloat16 or float32"
            )
    return arr


def iter_weights(
    graph: Graph, path: str | os.PathLike, *, source: str | None = None, progress: Progress | None = None,
    check_finite: bool = True, rank: int = 0,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (value_name, storage array) for each weight value, one value in memory at a time.

    A tensor holding NaN or inf is an error; ``check_finite=False`` leaves that check to the
    caller (the CUDA executor checks on the device after upload, where it is cheap). In a
    tensor-parallel graph a sharded value is rank ``rank``'s slice (``Value.shard``)."""
    source = source or graph.meta.get("config", {}).get("source", "hf")
    if source not in ("hf", "meta"):
        raise ValueError(f"source must be 'hf' or 'meta', got {source!r}")
    ckpt = open_checkpoint(path, source)
    total, done = _storage_nbytes(graph), 0
    qcfg = graph.meta.get("config", {}).get("quantization")  # a GPTQ / AWQ checkpoint's int4 tensors
    for v in _source_values(graph):
        if v.quant is not None and qcfg and _holds_int4(ckpt, v, source):
            codes, scales, zeros = load_quantized_value(ckpt, graph, v.name, qcfg)
            items = [(v.name, codes), (v.quant.scales, scales)] + ([(v.quant.zeros, zeros)] if v.quant.zeros else [])
        else:
            dtype = "float32" if v.quant is not None else v.dtype  # quantized from the checkpoint's numbers
            parts = [_read_part(ckpt, n, tuple(s), dtype, source, v.name, check_finite) for n, s in v.attrs["parts"]]
            arr = assemble(v.attrs, parts, v.shard, rank)
            assert arr.shape == v.concrete_shape(graph.dims), (v.name, arr.shape, v.shape)  # builder bug if not
            items = [(v.name, arr)] if v.quant is None else quantize_value(graph, v.name, arr)
        for name, arr in items:
            done += arr.nbytes
            if progress is not None:
                progress(done, total, name)
            yield name, arr


def _holds_int4(ckpt, v, source: str) -> bool:
    """Whether the checkpoint holds any of ``v``'s parts as GPTQ / AWQ int4 tensors
    (``<prefix>.qweight``) rather than float ``<prefix>.weight``; a value mixing both is
    repacked part by part (``load_quantized_value`` quantizes the float parts)."""
    return source == "hf" and any(holds_int4(ckpt, name) for name, _ in v.attrs["parts"])


def load_weights(
    graph: Graph, path: str | os.PathLike, *, source: str | None = None, progress: Progress | None = None,
    rank: int = 0,
) -> dict[str, np.ndarray]:
    """Every weight value of ``graph`` read from a checkpoint, in the value's storage dtype.

    ``source`` ("hf" or "meta") says which tensor names the checkpoint uses; by default the one
    recorded in the graph's config (``graph.meta["config"]["source"]``), else "hf".
    """
    return dict(iter_weights(graph, path, source=source, progress=progress, rank=rank))


def check_weights_dict(graph: Graph, weights: dict) -> dict[str, np.ndarray]:
    """A dict of weight arrays (``compile(..., weights=dict)``) checked against the graph and in
    storage form: every weight value present, with the value's shape, numeric and finite. Float
    arrays are rounded to the value's dtype; a bfloat16 value also takes a uint16 array of raw bits."""
    out = {}
    for v in _source_values(graph):
        if v.name not in weights:
            raise WeightError(f"weights dict has no array for graph weight {v.name!r}")
        if v.quant is not None:
            out.update(_quantized_from_dict(graph, v, weights))
            continue
        try:
            arr = np.asarray(weights[v.name])
        except Exception as e:  # a GPU array, a ragged list, ...
            raise WeightError(f"weights dict: {v.name!r} is not an array numpy can read ({_one_line(e)})") from None
        want = v.concrete_shape(graph.dims)
        if arr.shape != want:
            raise WeightError(f"weights dict: {v.name!r} has shape {list(arr.shape)} but the graph expects {list(want)}")
        storage = np.dtype(DTYPES[v.dtype].storage)
        is_float = DTYPES[v.dtype].kind == "float"
        if is_float and arr.dtype.kind == "f":
            given = str(arr.dtype)
            with np.errstate(over="ignore", invalid="ignore"):
                stored = _to_storage(arr, given, v.dtype) if arr.dtype != storage else arr
        elif arr.dtype == storage:  # storage form already (bf16: raw uint16 words)
            given, stored = v.dtype, arr
        else:
            also = " (or any float array)" if is_float else ""
            raise WeightError(f"weights dict: {v.name!r} has dtype {arr.dtype} but the graph expects {v.dtype}, "
                              f"numpy {storage}{also}")
        if is_float:
            nan, inf = nonfinite_counts(arr, given)
            if nan or inf:
                raise WeightError(f"weights dict: {v.name!r} holds {_nonfinite_text(nan, inf)}")
            if nonfinite_counts(stored, v.dtype) != (0, 0):
                raise WeightError(f"weights dict: {v.name!r} has values beyond the {v.dtype} range (max |x| = "
                                  f"{float(np.abs(arr).max()):.4g}); use bfloat16 or float32")
        out[v.name] = stored
    return out


def _quantized_from_dict(graph: Graph, v, weights: dict) -> dict[str, np.ndarray]:
    """A quantized weight from a weights dict: a float [N, K] array is quantized by the plan's scheme;
    an array already in code form (int8 [N, K], or packed uint8 [N, K/2] for int4) is taken as
    it is, with its scales (and zeros) from the dict."""
    arr = np.asarray(weights[v.name])
    shape = v.concrete_shape(graph.dims)
    if arr.dtype.kind == "f":
        if arr.shape != shape:
            raise WeightError(f"weights dict: {v.name!r} has shape {list(arr.shape)} but the graph expects {list(shape)}")
        w = arr.astype(np.float32)
        if not np.isfinite(w).all():
            raise WeightError(f"weights dict: {v.name!r} holds NaN or inf")
        return dict(quantize_value(graph, v.name, w))
    storage = np.dtype(DTYPES[v.dtype].storage)
    packed = (shape[0], shape[1] // 2) if v.dtype == "int4" else shape
    if arr.dtype != storage or arr.shape != packed:
        raise WeightError(f"weights dict: {v.name!r} is {v.dtype} {list(shape)}: give a float array {list(shape)} "
                          f"or its codes as numpy {storage} {list(packed)}, got {arr.dtype} {list(arr.shape)}")
    out = {v.name: arr}
    for ref in (v.quant.scales, v.quant.zeros):
        if ref is None:
            continue
        rv = graph.values[ref]
        if ref not in weights:
            raise WeightError(f"weights dict: {v.name!r} is given as codes, so it needs {ref!r} too")
        got = np.asarray(weights[ref])
        if got.shape != rv.concrete_shape(graph.dims):
            raise WeightError(f"weights dict: {ref!r} has shape {list(got.shape)} but the graph expects "
                              f"{list(rv.concrete_shape(graph.dims))}")
        out[ref] = np.array(to_storage(got.astype(np.float32), rv.dtype)) if got.dtype.kind == "f" else got
    return out


# ---- memory -------------------------------------------------------------------------------------


def free_host_bytes() -> int | None:
    """Host memory a new allocation can take: the kernel's MemAvailable (free plus reclaimable
    caches), capped by a cgroup v2 memory limit; None where neither can be read."""
    free = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            pass
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            used = int(f.read())
        if limit != "max":
            room = max(int(limit) - used, 0)
            free = room if free is None else min(free, room)
    except (OSError, ValueError):
        pass
    return free


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def check_fits(what: str, needed: int, free: int | None, detail: str = "") -> None:
    """Raise a one-line error when ``needed`` bytes exceed ``free`` (unknown free: no check)."""
    if free is not None and needed > free:
        raise BackendError(f"{what} needs {needed} bytes ({_gib(needed)}) but only {free} ({_gib(free)}) are free"
                           + (f" ({detail})" if detail else "") + "; use a smaller max_seq, max_batch or model")


def reference_host_bytes(graph: Graph, weights_in_hand: bool) -> tuple[int, str]:
    """Host bytes the numpy reference executor allocates for ``graph``, with a breakdown: the
    weights as loaded (unless already in hand) and widened to float32, the activation arena,
    the KV caches and the step inputs."""
    mem = graph.meta["memory"]
    f32 = sum(4 * int(np.prod(v.concrete_shape(graph.dims))) for v in _weight_values(graph))
    loaded = 0 if weights_in_hand else mem["weight_bytes"]
    parts = {"weights": loaded + f32, "kv cache": mem["kv_cache_bytes"], "arena": mem["arena_bytes"],
             "inputs": mem["input_bytes"]}
    return sum(parts.values()), ", ".join(f"{k} {_gib(n)}" for k, n in parts.items())


def check_reference_memory(graph: Graph, weights_in_hand: bool = False) -> None:
    """Fail with one line, before anything is allocated, when the reference executor would not fit
    in the host memory available."""
    needed, detail = reference_host_bytes(graph, weights_in_hand)
    check_fits("the reference backend", needed, free_host_bytes(), detail)


# ---- deterministic random weights ---------------------------------------------------------------


def weight_parts(graph: Graph) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(value_name, part_name, part_shape) for every part of every weight value, in graph order."""
    for v in _source_values(graph):
        for name, shape in v.attrs["parts"]:
            yield v.name, name, tuple(shape)


def part_seed(part_name: str, seed: int) -> int:
    """A seed per (part, seed) that is stable across processes (crc32, not hash())."""
    return (int(seed) % 2**32) << 32 | zlib.crc32(part_name.encode("utf-8"))


def random_part(part_name: str, shape: Iterable[int], seed: int = 0, scale: float = 0.02,
                role: str | None = "matrix") -> np.ndarray:
    """One part's fp32 values, drawn by the role of the weight it belongs to (norm weights
    around 1, everything else around 0); a part's numbers do not depend on how parts are grouped."""
    x = np.random.default_rng(part_seed(part_name, seed)).standard_normal(tuple(shape), dtype=np.float32)
    if role == "norm":
        x *= np.float32(0.1)
        x += np.float32(1.0)
    else:
        x *= np.float32(scale)
    return x


def random_weights(graph: Graph, seed: int = 0, scale: float = 0.02, rank: int = 0) -> dict[str, np.ndarray]:
    """Deterministic random weights in ``load_weights``' format: matrices and biases N(0, scale),
    norm weights 1 + 0.1 N(0, 1). Fused and unfused graphs get the same numbers per part, a
    quantized graph the quantization of those numbers, and rank r of a tensor-parallel graph its
    slice of them."""

    def one(v) -> list[tuple[str, np.ndarray]]:
        parts = [random_part(n, s, seed, scale, v.role) for n, s in v.attrs["parts"]]
        arr = assemble(v.attrs, parts, v.shard, rank)
        if v.quant is not None:  # the same draws as the unquantized plan's, then quantized
            return quantize_value(graph, v.name, arr)
        return [(v.name, float32_to_storage(arr, v.dtype))]

    # numpy's generators release the GIL while filling, and every part has its own generator,
    # so threads speed up large models without changing a single number.
    values = _source_values(graph)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return {name: arr for items in pool.map(one, values) for name, arr in items}
