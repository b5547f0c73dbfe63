"""Checkpoint loading (HF safetensors, sharded, Meta .pth), storage rounding, random weights,
and the one-line errors for bad checkpoints. CPU only."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
import models  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from llamagraph.ir import WeightError, build_graph, load_config  # noqa: E402
from llamagraph.runtime import weights as W  # noqa: E402
from llamagraph.ir.dtypes import DTYPES  # noqa: E402


def graph_for(path, dtype="float32"):
    return build_graph(load_config(path), dtype=dtype, max_batch=2, max_seq=32, max_tokens=64)


def bits(t: "torch.Tensor") -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def expected_values(sd: dict, cfg) -> dict:
    """Each graph weight value built by hand from HF tensors: q|k|v and the rest one to one."""
    t = {k: v.float().numpy() for k, v in sd.items()}
    out = {"embed.w": t["model.embed_tokens.weight"], "final_norm.w": t["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.w"] = t["lm_head.weight"]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out[f"l{i}.attn_norm.w"] = t[p + "input_layernorm.weight"]
        out[f"l{i}.ffn_norm.w"] = t[p + "post_attention_layernorm.weight"]
        out[f"l{i}.qkv.w"] = np.concatenate([t[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        out[f"l{i}.o.w"] = t[p + "self_attn.o_proj.weight"]
        for x in ("gate", "up", "down"):
            out[f"l{i}.{x}.w"] = t[p + f"mlp.{x}_proj.weight"]
        if cfg.attention_bias:
            out[f"l{i}.qkv_bias.w"] = np.concatenate([t[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
            out[f"l{i}.o_bias.w"] = t[p + "self_attn.o_proj.bias"]
        if cfg.mlp_bias:
            for x in ("gate", "up", "down"):
                out[f"l{i}.{x}_bias.w"] = t[p + f"mlp.{x}_proj.bias"]
    return out


# ---- HF checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gqa", "bias", "tied", "head_dim"])
def test_single_and_sharded_load_equal_hf_state_dict(hf_model, name):
    single = hf_model(name)
    sharded = hf_model(name, max_shard_size="100KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    g = graph_for(single)
    a, b = W.load_weights(g, single), W.load_weights(g, sharded)
    # the oracle is the model HF itself loads, not our reading of the files
    sd = models.load_hf_model(single).state_dict()
    want = expected_values(sd, g_cfg := load_config(single))
    assert sorted(a) == sorted(b) == sorted(want)
    for k in want:
        assert a[k].dtype == np.float32 and a[k].flags.c_contiguous
        np.testing.assert_array_equal(a[k], want[k], err_msg=k)
        np.testing.assert_array_equal(b[k], want[k], err_msg=k)
    if g_cfg.tie_word_embeddings:
        np.testing.assert_array_equal(sd["lm_head.weight"].numpy(), a["embed.w"])


def test_load_accepts_single_file_and_index_path(hf_model):
    d, sharded = hf_model("gqa"), hf_model("gqa", max_shard_size="100KB")
    g = graph_for(d)
    ref = W.load_weights(g, d)
    for path in (os.path.join(d, "model.safetensors"), os.path.join(sharded, "model.safetensors.index.json")):
        got = W.load_weights(g, path)
        assert all(np.array_equal(got[k], ref[k]) for k in ref)


def test_bf16_checkpoint_keeps_bits_and_widens_exactly(hf_model):
    d = hf_model("bias", "bfloat16")
    sd = models.hf_state_dict(d)
    assert sd["model.embed_tokens.weight"].dtype == torch.bfloat16
    cfg = load_config(d)
    got16 = W.load_weights(graph_for(d, "bfloat16"), d)
    got32 = W.load_weights(graph_for(d, "float32"), d)
    gothalf = W.load_weights(graph_for(d, "float16"), d)
    want_bits = expected_values({k: v.view(torch.int16) for k, v in sd.items()}, cfg)
    want32 = expected_values(sd, cfg)
    for k in want32:
        assert got16[k].dtype == np.uint16
        np.testing.assert_array_equal(got16[k], want_bits[k].astype(np.int16).view(np.uint16), err_msg=k)
        np.testing.assert_array_equal(got32[k], want32[k], err_msg=k)
        np.testing.assert_array_equal(gothalf[k], want32[k].astype(np.float16), err_msg=k)


def test_fp32_checkpoint_rounds_to_fp16_and_bf16_like_torch(hf_model):
    d = hf_model("gqa")
    sd = models.hf_state_dict(d)
    cfg = load_config(d)
    half = expected_values({k: v.half() for k, v in sd.items()}, cfg)
    bf = expected_values({k: v.bfloat16().view(torch.int16) for k, v in sd.items()}, cfg)
    got_half = W.load_weights(graph_for(d, "float16"), d)
    got_bf = W.load_weights(graph_for(d, "bfloat16"), d)
    for k in half:
        assert got_half[k].dtype == np.float16 and got_bf[k].dtype == np.uint16
        np.testing.assert_array_equal(got_half[k], half[k].astype(np.float16), err_msg=k)
        np.testing.assert_array_equal(got_bf[k], bf[k].astype(np.int16).view(np.uint16), err_msg=k)


def test_bf16_rounding_matches_torch_on_ties_and_specials():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(20000) * 10.0 ** rng.integers(-38, 38, 20000)).astype(np.float32)
    # every bf16 word with the dropped half exactly 0x8000: a tie, both parities of the kept bit
    ties = ((np.arange(1 << 16, dtype=np.uint32) << 16) | 0x8000).view(np.float32)
    special = np.array([np.inf, -np.inf, 3.4e38, -3.4e38, 0.0, -0.0, 1e-45, -1e-40], np.float32)
    x = np.concatenate([x, ties[~np.isnan(ties)], special])
    got = W.float32_to_storage(x, "bfloat16")
    np.testing.assert_array_equal(got, bits(torch.from_numpy(x).bfloat16()))
    nan = W.float32_to_storage(np.array([np.nan, -np.nan], np.float32), "bfloat16")
    assert np.isnan(W.weights_to_float32(nan, "bfloat16")).all()
    # widening is exact and round-trips
    words = np.arange(1 << 16, dtype=np.uint16)
    wide = W.weights_to_float32(words, "bfloat16")
    ok = ~np.isnan(wide)
    torch_wide = torch.from_numpy(words.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(wide[ok], torch_wide[ok])
    np.testing.assert_array_equal(W.float32_to_storage(wide, "bfloat16")[ok], words[ok])
    small = x[np.abs(x) < 6e4].astype(np.float16)
    np.testing.assert_array_equal(W.float32_to_storage(small.astype(np.float32), "float16"), small)
    np.testing.assert_array_equal(W.weights_to_float32(small, "float16"), small.astype(np.float32))


def test_progress_reports_every_value_and_reaches_total(hf_model):
    d = hf_model("gqa")
    g = graph_for(d, "float16")
    calls = []
    out = W.load_weights(g, d, progress=lambda done, total, name: calls.append((done, total, name)))
    assert [c[2] for c in calls] == list(out)
    dones = [c[0] for c in calls]
    assert dones == sorted(dones) and dones[-1] == calls[0][1] == sum(a.nbytes for a in out.values())


# ---- Meta checkpoints ---------------------------------------------------------------------------


def interleave_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta row order from HF row order, by index: within each head, Meta row 2j is HF row j
    and Meta row 2j+1 is HF row j + head_dim/2."""
    hd = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for j in range(hd // 2):
            out[h * hd + 2 * j] = w[h * hd + j]
            out[h * hd + 2 * j + 1] = w[h * hd + hd // 2 + j]
    return out


@pytest.mark.parametrize("name", ["meta_compatible", "meta_llama3"])
def test_meta_checkpoint_loads_with_interleaved_qk(meta_model, name):
    meta_dir, hf_dir = meta_model(name)
    cfg = load_config(meta_dir)
    assert cfg.source == "meta" and cfg.rope_layout == "interleaved"
    g = graph_for(meta_dir)
    got = W.load_weights(g, meta_dir)  # source taken from the graph's config
    same = W.load_weights(g, os.path.join(meta_dir, "consolidated.00.pth"), source="meta")
    want = expected_values(models.load_hf_model(hf_dir).state_dict(), load_config(hf_dir))
    assert sorted(got) == sorted(want)
    H, KV, HD = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    for k in want:
        np.testing.assert_array_equal(got[k], same[k])
        if k.endswith(".qkv.w"):
            q, kk, v = np.split(want[k], [H * HD, (H + KV) * HD])
            np.testing.assert_array_equal(got[k][: H * HD], interleave_rows(q, H))
            np.testing.assert_array_equal(got[k][H * HD : (H + KV) * HD], interleave_rows(kk, KV))
            np.testing.assert_array_equal(got[k][(H + KV) * HD :], v)
        else:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _rope(x: np.ndarray, pos: int, theta: float, layout: str) -> np.ndarray:
    hd = x.shape[-1]
    ang = pos * theta ** (-np.arange(0, hd, 2) / hd)
    c, s = np.cos(ang), np.sin(ang)
    if layout == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
        return out
    a, b = x[..., : hd // 2], x[..., hd // 2 :]
    return np.concatenate([a * c - b * s, a * s + b * c], axis=-1)


def test_meta_qk_with_interleaved_rope_gives_hf_attention_scores(meta_model):
    meta_dir, hf_dir = meta_model()
    cfg = load_config(meta_dir)
    gm, gh = graph_for(meta_dir), graph_for(hf_dir)
    wm, wh = W.load_weights(gm, meta_dir)["l0.qkv.w"], W.load_weights(gh, hf_dir)["l0.qkv.w"]
    H, KV, HD = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = np.random.default_rng(0).standard_normal((2, cfg.hidden_size))

    def scores(w, layout):  # q of token 0 at position 5 against k of token 1 at position 2
        qkv = x @ w.T.astype(np.float64)
        q = _rope(qkv[0, : H * HD].reshape(H, HD), 5, cfg.rope_theta, layout)
        k = _rope(qkv[1, H * HD : (H + KV) * HD].reshape(KV, HD), 2, cfg.rope_theta, layout)
        return np.einsum("hd,hd->h", q, np.repeat(k, H // KV, axis=0))

    np.testing.assert_allclose(scores(wm, "interleaved"), scores(wh, "rotate_half"), rtol=1e-10, atol=1e-12)
    assert not np.allclose(scores(wm, "rotate_half"), scores(wh, "rotate_half"))  # the layout matters


def test_directory_with_both_layouts_reads_the_one_source_names(meta_model, tmp_path):
    meta_dir, hf_dir = meta_model()
    both = tmp_path / "both"
    shutil.copytree(hf_dir, both)
    shutil.copy(os.path.join(meta_dir, "consolidated.00.pth"), both)
    gm, gh = graph_for(meta_dir), graph_for(hf_dir)
    np.testing.assert_array_equal(W.load_weights(gm, both)["l0.qkv.w"], W.load_weights(gm, meta_dir)["l0.qkv.w"])
    np.testing.assert_array_equal(W.load_weights(gh, both)["l0.qkv.w"], W.load_weights(gh, hf_dir)["l0.qkv.w"])


def test_meta_bf16_checkpoint_keeps_bits(meta_model):
    meta_dir, hf_dir = meta_model("meta_compatible", "bfloat16")
    got = W.load_weights(graph_for(meta_dir, "bfloat16"), meta_dir)
    ref = W.load_weights(graph_for(hf_dir, "bfloat16"), hf_dir)
    sd = torch.load(os.path.join(meta_dir, "consolidated.00.pth"), weights_only=True)
    np.testing.assert_array_equal(got["l1.o.w"], bits(sd["layers.1.attention.wo.weight"]))
    np.testing.assert_array_equal(got["l1.gate.w"], ref["l1.gate.w"])
    np.testing.assert_array_equal(got["embed.w"], ref["embed.w"])


def test_meta_names():
    assert W.meta_name("model.layers.3.mlp.gate_proj.weight") == "layers.3.feed_forward.w1.weight"
    assert W.meta_name("model.layers.3.mlp.down_proj.weight") == "layers.3.feed_forward.w2.weight"
    assert W.meta_name("model.layers.0.post_attention_layernorm.weight") == "layers.0.ffn_norm.weight"
    assert W.meta_name("lm_head.weight") == "output.weight"
    assert W.meta_name("model.layers.0.self_attn.q_proj.bias") is None


# ---- random weights -----------------------------------------------------------------------------


def regrouped(g):
    """The same parts grouped differently: q, k, v as three values, gate|up as one."""
    g = g.copy()
    vals = {}
    for name, v in g.values.items():
        parts = v.attrs.get("parts")
        if name.endswith(".qkv.w"):
            for part in parts:
                vals[part[0]] = type(v)(part[0], tuple(part[1]), v.dtype, v.kind, {"parts": [part]})
        elif name.endswith(".gate.w"):
            up = g.values[name.replace(".gate.w", ".up.w")]
            gate_up = parts + up.attrs["parts"]
            vals[name.replace(".gate.w", ".gate_up.w")] = type(v)(
                name.replace(".gate.w", ".gate_up.w"), (sum(s[0] for _, s in gate_up), v.shape[1]), v.dtype, v.kind,
                {"parts": gate_up},
            )
        elif not name.endswith(".up.w"):
            vals[name] = v
    g.values = vals
    return g


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_random_weights_same_numbers_for_any_grouping(hf_model, dtype):
    g = graph_for(hf_model("bias"), dtype)
    a, b = W.random_weights(g, seed=3), W.random_weights(g, seed=3)
    fused = W.random_weights(regrouped(g), seed=3)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert a["embed.w"].dtype == DTYPES[dtype].storage
    cfg = load_config(hf_model("bias"))
    H, KV, HD = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}.self_attn."
        split = [fused[p + f"{x}_proj.weight"] for x in "qkv"]
        np.testing.assert_array_equal(a[f"l{i}.qkv.w"], np.concatenate(split))
        assert [s.shape[0] for s in split] == [H * HD, KV * HD, KV * HD]
        np.testing.assert_array_equal(fused[f"l{i}.gate_up.w"], np.concatenate([a[f"l{i}.gate.w"], a[f"l{i}.up.w"]]))
    c = W.random_weights(g, seed=4)
    assert not np.array_equal(a["l0.qkv.w"], c["l0.qkv.w"])


def test_random_weights_statistics_and_storage():
    cfg = load_config({**{k: v for k, v in models.TINY.items() if k != "rope_parameters"},
                       "hidden_size": 256, "intermediate_size": 512, "attention_bias": True})
    g32 = build_graph(cfg, dtype="float32", max_batch=2, max_seq=32, max_tokens=64)
    w = W.random_weights(g32, seed=0, scale=0.05)
    assert abs(w["l0.qkv.w"].std() - 0.05) < 0.002 and abs(w["l0.qkv.w"].mean()) < 0.002
    assert abs(w["l0.attn_norm.w"].mean() - 1) < 0.03 and 0.08 < w["l0.attn_norm.w"].std() < 0.12
    assert abs(w["l0.o_bias.w"].std() - 0.05) < 0.01
    for dtype in ("float16", "bfloat16"):
        g = build_graph(cfg, dtype=dtype, max_batch=2, max_seq=32, max_tokens=64)
        wd = W.random_weights(g, seed=0, scale=0.05)
        for k in w:
            np.testing.assert_array_equal(wd[k], W.float32_to_storage(w[k], dtype))


def test_part_seed_is_stable_and_roles_pick_the_draw():
    # equal in every process (Python's salted hash() would not be), distinct per name and seed
    import subprocess

    names = ["model.norm.weight", "model.layers.0.self_attn.q_proj.weight"]
    here = [W.part_seed(n, s) for n in names for s in (0, 7)]
    code = f"from llamagraph.runtime import weights as W; print([W.part_seed(n, s) for n in {names!r} for s in (0, 7)])"
    for hashseed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": hashseed}).stdout
        assert out.strip() == str(here)
    assert len(set(here)) == 4
    # the builder marks every norm weight (and only those) with the role the random draw reads
    g = build_graph(load_config({**{k: v for k, v in models.TINY.items() if k != "rope_parameters"},
                                 "attention_bias": True}), dtype="float32", max_batch=1, max_seq=8, max_tokens=8)
    norms = {v.name for v in g.values.values() if v.role == "norm"}
    assert norms == {"final_norm.w"} | {f"l{i}.{n}.w" for i in range(2) for n in ("attn_norm", "ffn_norm")}
    assert g.values["l0.qkv_bias.w"].role == "bias" and g.values["embed.w"].role == "embedding_table"
    norm = W.random_part("model.norm.weight", (4096,), role="norm")
    other = W.random_part("model.norm.weight", (4096,), role="matrix", scale=0.02)
    assert abs(norm.mean() - 1) < 0.01 and abs(other.mean()) < 0.002


def test_weight_parts_order_and_shapes(hf_model):
    g = graph_for(hf_model("tied"))
    parts = list(W.weight_parts(g))
    assert parts[0] == ("embed.w", "model.embed_tokens.weight", (96, 64))
    assert [p[1] for p in parts if p[0] == "l0.qkv.w"] == [f"model.layers.0.self_attn.{x}_proj.weight" for x in "qkv"]
    assert not any(p[1] == "lm_head.weight" for p in parts)  # tied: lm_head reuses embed.w


# ---- bad checkpoints ----------------------------------------------------------------------------


def _rewrite(hf_dir, tmp_path, edit):
    """A copy of an HF checkpoint whose tensors went through ``edit(dict)``."""
    d = tmp_path / "ckpt"
    shutil.copytree(hf_dir, d)
    sd = models.hf_state_dict(hf_dir)
    edit(sd)
    save_file(sd, str(d / "model.safetensors"))
    return str(d)


def _case_missing(hf_dir, tmp_path):
    d = _rewrite(hf_dir, tmp_path, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    return d, None, ["model.safetensors", "'model.layers.1.mlp.up_proj.weight'", "missing", "l1.up.w"]


def _case_shape(hf_dir, tmp_path):
    def edit(sd):
        sd["model.layers.0.self_attn.k_proj.weight"] = sd["model.layers.0.self_attn.k_proj.weight"][:16].clone()
    return _rewrite(hf_dir, tmp_path, edit), None, ["'model.layers.0.self_attn.k_proj.weight'", "[16, 64]", "[32, 64]"]


def _case_int_dtype(hf_dir, tmp_path):
    def edit(sd):
        sd["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    return _rewrite(hf_dir, tmp_path, edit), None, ["'model.norm.weight'", "dtype I32", "floating-point"]


def _case_truncated(hf_dir, tmp_path):
    f = tmp_path / "model.safetensors"
    data = open(os.path.join(hf_dir, "model.safetensors"), "rb").read()
    f.write_bytes(data[: len(data) // 2])
    return str(f), None, [str(f), "cannot read safetensors file"]


def _case_garbage(hf_dir, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    return str(tmp_path), None, ["model.safetensors", "cannot read safetensors file"]


def _case_missing_shard(hf_dir, tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(hf_dir, d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["lm_head.weight"]
    os.remove(d / shard)
    return str(d), None, ["model.safetensors.index.json", f"shard '{shard}'", "does not exist"]


def _case_bad_index(hf_dir, tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(hf_dir, d)
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    return str(d), None, ["model.safetensors.index.json", "weight_map"]


def _case_empty_dir(hf_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    return str(tmp_path / "empty"), None, ["empty", "no checkpoint found"]


def _case_no_such_path(hf_dir, tmp_path):
    return str(tmp_path / "nowhere"), None, ["nowhere", "no such checkpoint"]


def _meta_copy(meta_dir, tmp_path):
    d = tmp_path / "meta"
    shutil.copytree(meta_dir, d)
    return d


def _case_two_meta_shards(meta_dir, tmp_path):
    d = _meta_copy(meta_dir, tmp_path)
    shutil.copy(d / "consolidated.00.pth", d / "consolidated.01.pth")
    return str(d), "meta", ["found 2 consolidated", "model-parallel Meta checkpoints are not supported"]


def _case_meta_missing(meta_dir, tmp_path):
    d = _meta_copy(meta_dir, tmp_path)
    sd = torch.load(d / "consolidated.00.pth", weights_only=True)
    del sd["layers.0.attention.wk.weight"]
    torch.save(sd, d / "consolidated.00.pth")
    return str(d), "meta", ["consolidated.00.pth", "'layers.0.attention.wk.weight'",
                            "HF name 'model.layers.0.self_attn.k_proj.weight'", "missing"]


def _case_meta_corrupt(meta_dir, tmp_path):
    d = _meta_copy(meta_dir, tmp_path)
    (d / "consolidated.00.pth").write_bytes(b"PK\x03\x04 definitely not a zip archive")
    return str(d), "meta", ["consolidated.00.pth", "cannot read torch checkpoint"]


HF_CASES = [_case_missing, _case_shape, _case_int_dtype, _case_truncated, _case_garbage, _case_empty_dir,
            _case_no_such_path]
SHARDED_CASES = [_case_missing_shard, _case_bad_index]
META_CASES = [_case_two_meta_shards, _case_meta_missing, _case_meta_corrupt]


@pytest.mark.parametrize("case", HF_CASES + SHARDED_CASES + META_CASES, ids=lambda c: c.__name__[6:])
def test_bad_checkpoint_gives_one_line_error(hf_model, meta_model, tmp_path, case):
    if case in META_CASES:
        base, _ = meta_model()
    else:
        base = hf_model("meta_compatible", max_shard_size="100KB" if case in SHARDED_CASES else None)
    g = graph_for(base)
    path, source, fragments = case(base, tmp_path)
    with pytest.raises(WeightError) as e:
        W.load_weights(g, path, source=source)
    msg = str(e.value)
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)


def test_fp16_overflow_is_an_error_not_inf(hf_model, tmp_path):
    def edit(sd):
        sd["model.layers.1.mlp.down_proj.weight"][3, 5] = 1e5
    d = _rewrite(hf_model("gqa"), tmp_path, edit)
    assert W.load_weights(graph_for(d, "bfloat16"), d)["l1.down.w"].dtype == np.uint16  # fits bf16
    with pytest.raises(WeightError, match=r"'model.layers.1.mlp.down_proj.weight' has values beyond the float16 range"):
        W.load_weights(graph_for(d, "float16"), d)


def test_meta_without_torch_says_how_to_install(meta_model, monkeypatch):
    meta_dir, _ = meta_model()
    g = graph_for(meta_dir)
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    msg = r"reading Meta checkpoint .*consolidated\.00\.pth needs torch \(pip install torch\)"
    with pytest.raises(WeightError, match=msg):
        W.load_weights(g, meta_dir)


# ---- the HF oracle helpers agree with each other -------------------------------------------------


def test_hf_greedy_matches_reference_logits_argmax(hf_model):
    d = hf_model("gqa")
    # this prompt's greedy continuation emits the eos id (2) at step 11: generation must go on
    prompt = [1, 4]
    toks = models.hf_greedy(d, prompt, 16)
    assert len(toks) == 16 and 2 in toks[:-1]
    (logits,) = models.hf_reference_logits(d, [prompt], [toks[:-1]])
    assert logits.shape == (16, 96) and logits.dtype == np.float32
    assert logits.argmax(-1).tolist() == toks


def test_hf_reference_logits_isolates_dynamic_rope_state(hf_model):
    d = hf_model("rope_dynamic")
    long_prompt, short = list(range(3, 27)), [4, 5, 6]
    alone = models.hf_reference_logits(d, [short], [[7, 8]])[0]
    after_long = models.hf_reference_logits(d, [long_prompt, short], [[3], [7, 8]])[1]
    np.testing.assert_array_equal(alone, after_long)
