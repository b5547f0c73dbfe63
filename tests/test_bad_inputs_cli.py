"""Bad input to the CLI and the loaders is one clear line (issue #10, item 6, CLI/loader half).

The tables below are the full list of bad inputs tried; each names what it breaks and the
words its one-line error must hold. CLI cases call ``llamagraph.cli.main([...])`` and check the
exit code (2; 130 for Ctrl-C) and that stderr is exactly one line starting ``llamagraph: error:``.
Loader cases check the ``LlamagraphError`` subclass and its one line. HF transformers is the
oracle wherever numbers are compared (parameter counts, logits of a checkpoint read another way).
"""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
import models  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import llamagraph  # noqa: E402
from llamagraph import viz  # noqa: E402
from llamagraph.cli import main  # noqa: E402
from llamagraph.codegen.compiled import CompiledPlan  # noqa: E402
from llamagraph.ir import BackendError, ConfigError, PlanError, WeightError, build_graph, load_config  # noqa: E402
from llamagraph.ir.layout import row_order  # noqa: E402
from llamagraph.runtime import weights as W  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINYLLAMA = os.path.join(ROOT, "examples", "tinyllama-1.1b.json")  # 22 layers, 4 kv heads x 64

# A small valid HF config; the bad-config cases each break one key of it.
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 100, "max_position_embeddings": 64}
META_TINY = {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 100}


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(rc: int, err: str, fragments) -> str:
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("llamagraph: error: "), err
    for frag in [fragments] if isinstance(fragments, str) else fragments:
        assert frag in lines[0], (frag, lines[0])
    return lines[0]


def write_json(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


# ---------------------------------------------------------------------------------------------
# command-line arguments
# ---------------------------------------------------------------------------------------------

RUN = ["run", TINYLLAMA, "--random-weights", "--backend", "reference", "--dtype", "float32", "--max-seq", "32"]

# (id, argv, words the error line must hold)
BAD_ARGUMENTS = [
    ("seed-negative", RUN + ["--seed", "-5"], "--seed: must be a non-negative integer"),
    ("seed-2**32", RUN + ["--seed", str(2**32)], "--seed: must be a non-negative integer up to 4294967295"),
    ("seed-float", RUN + ["--seed", "1.5"], "--seed: must be a non-negative integer"),
    ("top-k-10**12", RUN + ["--top-k", str(10**12)], "--top-k: must be a non-negative integer up to 2147483647"),
    ("top-k-negative", RUN + ["--top-k", "-1"], "--top-k: must be a non-negative integer"),
    ("temperature-nan", RUN + ["--temperature", "nan"], "--temperature: must be a finite non-negative number"),
    ("temperature-inf", RUN + ["--temperature", "inf"], "--temperature: must be a finite non-negative number"),
    ("temperature-minus-inf", RUN + ["--temperature=-inf"], "--temperature: must be a finite"),
    ("temperature-negative", RUN + ["--temperature", "-0.5"], "--temperature: must be a finite"),
    ("temperature-word", RUN + ["--temperature", "hot"], "--temperature: must be a finite"),
    ("top-p-nan", RUN + ["--top-p", "nan"], "--top-p: must be a number in (0, 1]"),
    ("top-p-inf", RUN + ["--top-p", "inf"], "--top-p: must be a number in (0, 1]"),
    ("top-p-zero", RUN + ["--top-p", "0"], "--top-p: must be a number in (0, 1]"),
    ("run-max-seq-10**9", RUN + ["--max-seq", str(10**9)], "--max-seq: must be at most 16777216"),
    ("run-max-new-tokens-10**12", RUN + ["--max-new-tokens", str(10**12)], "--max-new-tokens: must be at most"),
    ("run-prompt-len-10**12", RUN + ["--prompt-len", str(10**12)], "--prompt-len: must be at most"),
    ("compile-max-seq-10**9", ["compile", TINYLLAMA, "--max-seq", str(10**9)], "--max-seq: must be at most"),
    ("compile-max-batch-10**9", ["compile", TINYLLAMA, "--max-batch", str(10**9)], "--max-batch: must be at most"),
    ("compile-max-tokens-10**12", ["compile", TINYLLAMA, "--max-tokens", str(10**12)], "--max-tokens: must be at most"),
    ("dump-max-seq-10**9", ["dump", TINYLLAMA, "--max-seq", str(10**9)], "--max-seq: must be at most"),
    ("bench-batch-10**9", ["bench", TINYLLAMA, "--random-weights", "--batch", str(10**9)], "--batch: must be at most"),
]


@pytest.mark.parametrize("argv,words", [c[1:] for c in BAD_ARGUMENTS], ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_argument_is_one_line(argv, words, capsys):
    rc, out, err = cli(capsys, *argv)
    assert out == ""
    assert_one_error_line(rc, err, words)


def test_good_sampling_arguments_still_run(capsys):
    rc, out, err = cli(capsys, *RUN, "--seed", str(2**32 - 1), "--top-k", "5", "--temperature", "0.7", "--top-p", "0.9",
                       "--prompt-len", "3", "--max-new-tokens", "2")
    assert rc == 0, err
    assert len(out.split("generated ids:")[1].split()) == 2


# ---------------------------------------------------------------------------------------------
# absurd configs fail fast, naming the key
# ---------------------------------------------------------------------------------------------

# (id, file name, config, words the error line must hold)
ABSURD_CONFIGS = [
    ("hidden-2**40", "config.json", {**TINY, "hidden_size": 2**40, "num_attention_heads": 2**34},
     "key 'hidden_size' is 1099511627776; at most 65536"),
    ("layers-10**6", "config.json", {**TINY, "num_hidden_layers": 10**6}, "key 'num_hidden_layers' is 1000000; at most 1024"),
    ("vocab-10**12", "config.json", {**TINY, "vocab_size": 10**12}, "key 'vocab_size' is 1000000000000"),
    ("ffn-2**30", "config.json", {**TINY, "intermediate_size": 2**30}, "key 'intermediate_size' is 1073741824"),
    ("heads-2**20", "config.json", {**TINY, "hidden_size": 2**20 * 2, "num_attention_heads": 2**20,
                                    "num_key_value_heads": 2**20}, "key 'hidden_size'"),
    ("head-dim-2**12", "config.json", {**TINY, "head_dim": 2**12}, "key 'head_dim' is 4096; at most 1024"),
    ("max-positions-2**40", "config.json", {**TINY, "max_position_embeddings": 2**40}, "key 'max_position_embeddings'"),
    ("parameters-beyond-2**40", "config.json",
     {**TINY, "hidden_size": 16384, "intermediate_size": 2**18, "num_hidden_layers": 200, "num_attention_heads": 128,
      "num_key_value_heads": 8}, ["parameters", "more than the 1099511627776 llamagraph accepts"]),
    ("meta-layers-10**6", "params.json", {**META_TINY, "n_layers": 10**6}, "key 'n_layers' is 1000000"),
    ("meta-dim-2**40", "params.json", {**META_TINY, "dim": 2**40}, "key 'dim' is 1099511627776"),
]


@pytest.mark.parametrize("name,config,words", [c[1:] for c in ABSURD_CONFIGS], ids=[c[0] for c in ABSURD_CONFIGS])
def test_absurd_config_fails_fast_naming_the_key(name, config, words, tmp_path, capsys):
    path = write_json(tmp_path / name, config)
    rc, out, err = cli(capsys, "compile", path, "-o", tmp_path / "out")
    line = assert_one_error_line(rc, err, words)
    assert path in line
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError):
        load_config(path)


@pytest.mark.parametrize("name", ["gqa", "mqa", "bias", "tied", "head_dim"])
def test_parameter_count_matches_hf(name):
    hf = models.hf_config(name)
    with torch.device("meta"):  # shapes only, no memory
        expected = sum(p.numel() for p in models.LlamaForCausalLM(hf).parameters())
    assert load_config(hf.to_dict()).num_parameters() == expected


def test_the_largest_llama_is_within_bounds():
    cfg = load_config({"hidden_size": 16384, "intermediate_size": 53248, "num_attention_heads": 128,
                       "num_key_value_heads": 8, "num_hidden_layers": 126, "vocab_size": 128256,
                       "max_position_embeddings": 131072})
    assert 4.0e11 < cfg.num_parameters() < 4.1e11  # Llama 3.1 405B


# ---------------------------------------------------------------------------------------------
# sizes beyond memory: checked before allocating
# ---------------------------------------------------------------------------------------------

NEEDS = re.compile(r"needs (\d+) bytes \(([\d,.]+) GiB\) but only (\d+) \(([\d,.]+) GiB\) are free")


def test_run_beyond_host_memory_says_how_many_bytes(capsys):
    # tinyllama with 1024 sequences of 2**24 tokens: a KV cache of about 3 PiB, beyond any host
    rc, out, err = cli(capsys, "run", TINYLLAMA, "--random-weights", "--backend", "reference", "--dtype", "float16",
                       "--max-seq", str(2**24), "--prompt-len", "2", "--max-new-tokens", "1")
    line = assert_one_error_line(rc, err, ["the reference backend needs", "are free"])
    needed, needed_gib, free, _ = NEEDS.search(line).groups()
    kv = 2 * 22 * 1 * 2**24 * 4 * 64 * 2  # k and v, layers, batch, max_seq, kv heads, head_dim, fp16 bytes
    assert f"kv cache {kv / 2**30:,.2f} GiB" in line
    assert int(needed) > kv and int(needed) > int(free)
    assert float(needed_gib.replace(",", "")) == pytest.approx(int(needed) / 2**30, abs=0.01)


def test_reference_memory_is_checked_before_the_weights_are_made(monkeypatch):
    calls = []
    monkeypatch.setattr(W, "free_host_bytes", lambda: 1000)
    monkeypatch.setattr(W, "random_weights", lambda *a, **k: calls.append(1))
    with pytest.raises(BackendError, match=r"the reference backend needs \d+ bytes .* but only 1000 \(0.00 GiB\) are free"):
        llamagraph.compile(TINY, "random", dtype="float32", max_seq=16)
    assert calls == []


def test_reference_memory_counts_the_kv_cache_and_float32_weights():
    cfg = load_config(TINY)
    g = llamagraph.compile_graph(cfg, dtype="float16", max_batch=3, max_seq=40)
    needed, _ = W.reference_host_bytes(g, weights_in_hand=True)
    with torch.device("meta"):  # HF counts the parameters
        params = sum(p.numel() for p in models.LlamaForCausalLM(models.LlamaConfig(**TINY)).parameters())
    kv = 2 * 2 * 3 * 40 * 2 * 16 * 2  # k and v, layers, batch, max_seq, kv heads, head_dim, fp16 bytes
    # float32 copies of every parameter (the reference computes in fp32) + the KV caches + arena + inputs
    assert needed >= 4 * params + kv
    assert needed - (4 * params + kv) == g.meta["memory"]["arena_bytes"] + g.meta["memory"]["input_bytes"]


def test_free_host_bytes_is_plausible():
    free = W.free_host_bytes()
    assert free is not None and 0 < free <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---------------------------------------------------------------------------------------------
# non-finite weights: one line naming the tensor
# ---------------------------------------------------------------------------------------------

def _with_tensors(hf_dir, dest, edit, dtype=None) -> str:
    """A copy of a checkpoint whose tensors went through ``edit(state_dict)`` (saved as ``dtype``)."""
    shutil.copytree(hf_dir, dest)
    sd = models.hf_state_dict(hf_dir)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    edit(sd)
    save_file(sd, str(dest / "model.safetensors"))
    return str(dest)


def _set(name, index, value):
    def edit(sd):
        sd[name][index] = value
    return edit


# (id, edit, checkpoint dtype, plan dtype, tensor named, value named, NaN count, inf count)
NONFINITE = [
    ("nan-in-k-proj", _set("model.layers.1.self_attn.k_proj.weight", (3, 5), float("nan")), torch.float32,
     "float32", "model.layers.1.self_attn.k_proj.weight", "l1.qkv.w", 1, 0),
    ("inf-in-norm", _set("model.norm.weight", (7,), float("inf")), torch.float32, "float32", "model.norm.weight",
     "final_norm.w", 0, 1),
    ("minus-inf-in-embedding", _set("model.embed_tokens.weight", (0, slice(0, 3)), float("-inf")), torch.float32,
     "float16", "model.embed_tokens.weight", "embed.w", 0, 3),
    ("nan-in-bf16-checkpoint", _set("model.layers.0.mlp.down_proj.weight", (1, 1), float("nan")), torch.bfloat16,
     "bfloat16", "model.layers.0.mlp.down_proj.weight", "l0.down.w", 1, 0),
    ("inf-in-fp16-checkpoint", _set("lm_head.weight", (2, 2), float("inf")), torch.float16, "float16",
     "lm_head.weight", "lm_head.w", 0, 1),
]


@pytest.mark.parametrize("edit,ckpt_dtype,dtype,tensor,value,nan,inf", [c[1:] for c in NONFINITE],
                         ids=[c[0] for c in NONFINITE])
def test_nonfinite_checkpoint_tensor_is_named(edit, ckpt_dtype, dtype, tensor, value, nan, inf, hf_model, tmp_path):
    ckpt = _with_tensors(hf_model("gqa"), tmp_path / "ckpt", edit, ckpt_dtype)
    with pytest.raises(WeightError) as e:
        llamagraph.compile(ckpt, dtype=dtype, max_seq=16)
    msg = str(e.value)
    assert "\n" not in msg
    for words in ("model.safetensors", f"tensor '{tensor}'", f"({nan} NaN, {inf} inf)", f"value '{value}'"):
        assert words in msg, (words, msg)


def test_nonfinite_meta_tensor_is_named(meta_model, tmp_path):
    meta_dir, _ = meta_model()
    d = tmp_path / "meta"
    shutil.copytree(meta_dir, d)
    sd = torch.load(d / "consolidated.00.pth", weights_only=True)
    sd["layers.0.feed_forward.w3.weight"][4, 4] = float("nan")
    torch.save(sd, d / "consolidated.00.pth")
    with pytest.raises(WeightError, match=r"consolidated\.00\.pth: tensor 'layers\.0\.feed_forward\.w3\.weight' holds "
                                          r"non-finite values \(1 NaN, 0 inf\) \(value 'l0\.gate_up\.w'\)"):
        llamagraph.compile(str(d), dtype="float32", max_seq=16)


def test_nonfinite_checkpoint_through_the_cli(hf_model, tmp_path, capsys):
    ckpt = _with_tensors(hf_model("gqa"), tmp_path / "ckpt", _set("model.layers.0.mlp.gate_proj.weight", (0, 0),
                                                                   float("nan")))
    _write_tokenizer(tmp_path / "ckpt")
    rc, out, err = cli(capsys, "run", ckpt, "--prompt", "the lazy dog", "--backend", "reference", "--dtype", "float32")
    assert_one_error_line(rc, err, ["tensor 'model.layers.0.mlp.gate_proj.weight'", "1 NaN"])


def _write_tokenizer(folder) -> None:
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, trainers

    tok = Tokenizer(tok_models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nonfinite_counts_agree_with_torch(dtype):
    t = torch.randn(64, 32).to(dtype)
    t[3, 4], t[5, 6], t[7, 8], t[0, 0] = float("nan"), float("inf"), float("-inf"), float("nan")
    arr = t.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else t.numpy()
    name = str(dtype).removeprefix("torch.")
    assert W.nonfinite_counts(arr, name) == (int(torch.isnan(t).sum()), int(torch.isinf(t).sum())) == (2, 2)
    assert W.nonfinite_counts(arr[8:], name) == (0, 0)


def test_nonfinite_error_names_the_part_of_a_stacked_value(hf_model):
    """The CUDA executor finds NaN on the device and names the checkpoint tensor from the host copy."""
    ckpt = hf_model("gqa")
    g = build_graph(load_config(ckpt), dtype="bfloat16", max_batch=1, max_seq=16, max_tokens=16)
    qkv = W.load_weights(g, ckpt)["l1.qkv.w"].copy()  # q rows, then k rows, then v rows
    sd = models.hf_state_dict(ckpt)
    q_rows = sd["model.layers.1.self_attn.q_proj.weight"].shape[0]
    k_rows = sd["model.layers.1.self_attn.k_proj.weight"].shape[0]
    assert W.nonfinite_error(g, "l1.qkv.w", qkv) is None
    qkv[q_rows + k_rows + 1, 3] = 0x7FC0  # a bf16 NaN in the first rows of v
    err = W.nonfinite_error(g, "l1.qkv.w", qkv)
    assert isinstance(err, WeightError)
    assert "weight 'l1.qkv.w' (checkpoint tensor 'model.layers.1.self_attn.v_proj.weight') holds non-finite " \
           "values (1 NaN, 0 inf)" in str(err)


# ---------------------------------------------------------------------------------------------
# a weights dict passed to compile(): shape, dtype and values checked
# ---------------------------------------------------------------------------------------------

def _graph():
    return llamagraph.compile_graph(load_config(TINY), dtype="float16", max_seq=16)


def _replace(name, make):
    def edit(w):
        w[name] = make(w[name])
        return w
    return edit


def _drop(name):
    def edit(w):
        del w[name]
        return w
    return edit


def _poke(name, value):
    def make(a):
        a = a.astype(np.float32)
        a.flat[5] = value
        return a
    return _replace(name, make)


# (id, edit of a good storage dict, words the error must hold)
BAD_WEIGHT_DICTS = [
    ("missing", _drop("l1.o.w"), "weights dict has no array for graph weight 'l1.o.w'"),
    ("wrong-shape", _replace("l0.o.w", lambda a: a[:-1]), "'l0.o.w' has shape [63, 64] but the graph expects [64, 64]"),
    ("transposed", _replace("l0.down.w", lambda a: a.T), "'l0.down.w' has shape [128, 64] but the graph expects [64, 128]"),
    ("scalar", _replace("final_norm.w", lambda a: 1.0), "'final_norm.w' has shape [] but the graph expects [64]"),
    ("int32", _replace("l0.gate_up.w", lambda a: a.astype(np.int32)), "'l0.gate_up.w' has dtype int32 but the graph expects float16"),
    ("bool", _replace("l0.gate_up.w", lambda a: a > 0), "'l0.gate_up.w' has dtype bool"),
    ("strings", _replace("final_norm.w", lambda a: np.array(["x"] * 64)), "'final_norm.w' has dtype <U1"),
    ("ragged-list", _replace("final_norm.w", lambda a: [[1.0], [1.0, 2.0]]), "'final_norm.w' is not an array numpy can read"),
    ("nan", _poke("l1.gate_up.w", np.nan), "'l1.gate_up.w' holds non-finite values (1 NaN, 0 inf)"),
    ("inf", _poke("embed.w", -np.inf), "'embed.w' holds non-finite values (0 NaN, 1 inf)"),
    ("beyond-float16", _poke("l0.o.w", 1e6), "'l0.o.w' has values beyond the float16 range (max |x| = 1e+06)"),
]


@pytest.mark.parametrize("edit,words", [c[1:] for c in BAD_WEIGHT_DICTS], ids=[c[0] for c in BAD_WEIGHT_DICTS])
def test_bad_weights_dict_is_one_line(edit, words):
    weights = edit(llamagraph.random_weights(_graph(), seed=1))
    with pytest.raises(WeightError) as e:
        llamagraph.compile(TINY, weights, dtype="float16", max_seq=16)
    assert "\n" not in str(e.value)
    assert words in str(e.value)


def test_weights_dict_of_any_float_width_gives_hf_logits(hf_model):
    """A float64 dict for a float32 plan and a float32 dict for a bfloat16 plan are rounded to storage."""
    ckpt = hf_model("gqa")
    g32 = llamagraph.compile_graph(load_config(ckpt), dtype="float32", max_seq=16)  # fused: the names compile() wants
    as_f64 = {k: v.astype(np.float64) for k, v in W.load_weights(g32, ckpt).items()}
    prompt = [1, 7, 19, 4]
    ref = models.hf_reference_logits(ckpt, [prompt], [[]])[0][0]
    got = llamagraph.compile(ckpt, as_f64, dtype="float32", max_seq=16).run([prompt])[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    # a 16-bit plan holds its qkv rows in rope pair order, under another name: the dict follows its graph
    g16 = llamagraph.compile_graph(load_config(ckpt), dtype="bfloat16", max_seq=16)
    as_f32 = {}
    for k, v in g16.values.items():
        if v.kind == "weight":
            order = row_order(v.attrs)
            base = as_f64[k.replace(".rope_pairs", "")]
            as_f32[k] = (base if order is None else base[order]).astype(np.float32)
    from_dict = llamagraph.compile(ckpt, as_f32, dtype="bfloat16", max_seq=16).run([prompt])[0]
    from_ckpt = llamagraph.compile(ckpt, dtype="bfloat16", max_seq=16).run([prompt])[0]
    np.testing.assert_array_equal(from_dict, from_ckpt)  # the same rounding as the loader's


# ---------------------------------------------------------------------------------------------
# a shard index may only name files inside the checkpoint directory
# ---------------------------------------------------------------------------------------------

def _sharded_copy(hf_model, dest):
    shutil.copytree(hf_model("gqa", max_shard_size="100KB"), dest)
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    return index, sorted(set(index["weight_map"].values()))


# (id, how the first shard is renamed in the index)
OUTSIDE_SHARDS = [
    ("parent", lambda shard, outside: "../" + shard),
    ("absolute", lambda shard, outside: str(outside / shard)),
    ("down-and-out", lambda shard, outside: "sub/../../" + shard),
    ("dot-parent", lambda shard, outside: "./../" + shard),
]


@pytest.mark.parametrize("rename", [c[1] for c in OUTSIDE_SHARDS], ids=[c[0] for c in OUTSIDE_SHARDS])
def test_shard_outside_the_checkpoint_is_refused(rename, hf_model, tmp_path):
    d = tmp_path / "ckpt"
    index, shards = _sharded_copy(hf_model, d)
    shutil.copy(d / shards[0], tmp_path / shards[0])  # the file exists out there: still refused
    bad = rename(shards[0], tmp_path)
    index["weight_map"] = {k: (bad if v == shards[0] else v) for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightError, match=rf"shard '{re.escape(bad)}' .* is outside the checkpoint directory"):
        llamagraph.compile(str(d), dtype="float32", max_seq=16)


def test_shards_in_a_subfolder_or_linked_like_the_hf_cache_load(hf_model, tmp_path):
    """The HF hub cache links each snapshot file to ../../blobs/: judged by name, that is inside."""
    d = tmp_path / "snapshots" / "abc"
    index, shards = _sharded_copy(hf_model, d)
    (tmp_path / "blobs").mkdir()
    shutil.move(str(d / shards[0]), tmp_path / "blobs" / "0001")
    os.symlink(os.path.join("..", "..", "blobs", "0001"), d / shards[0])
    (d / "sub").mkdir()
    shutil.move(str(d / shards[1]), d / "sub" / shards[1])
    index["weight_map"] = {k: ("sub/" + v if v == shards[1] else v) for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    prompt = [1, 5, 9]
    got = llamagraph.compile(str(d), dtype="float32", max_seq=16).run([prompt])[0]
    np.testing.assert_allclose(got, models.hf_reference_logits(hf_model("gqa"), [prompt], [[]])[0][0],
                               rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# compile -o: a plan directory is whole or absent
# ---------------------------------------------------------------------------------------------

def _snapshot(folder) -> dict:
    return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder))}


def _no_temporaries(parent) -> None:
    assert [n for n in os.listdir(parent) if n.startswith(".")] == []


def _fail_writing(monkeypatch, exc):
    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(viz, "graph_html", boom)  # the sixth of the ten files


def test_full_disk_leaves_no_plan_directory(tmp_path, monkeypatch, capsys):
    cfg = write_json(tmp_path / "tiny.json", TINY)
    out = tmp_path / "out"
    _fail_writing(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "graph.html")))
    rc, stdout, err = cli(capsys, "compile", cfg, "-o", out)
    assert_one_error_line(rc, err, "graph.html: No space left on device")
    assert not out.exists()
    _no_temporaries(tmp_path)


def test_full_disk_keeps_the_old_plan_whole(tmp_path, monkeypatch, capsys):
    cfg = write_json(tmp_path / "tiny.json", TINY)
    out = tmp_path / "out"
    assert cli(capsys, "compile", cfg, "-o", out)[0] == 0
    before = _snapshot(out)
    _fail_writing(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "graph.html"))
    rc, _, err = cli(capsys, "compile", cfg, "-o", out, "--max-seq", "32")
    assert_one_error_line(rc, err, "No space left on device")
    assert _snapshot(out) == before
    _no_temporaries(tmp_path)


def test_ctrl_c_while_writing_leaves_nothing(tmp_path, monkeypatch, capsys):
    cfg = write_json(tmp_path / "tiny.json", TINY)
    _fail_writing(monkeypatch, KeyboardInterrupt())
    rc, _, err = cli(capsys, "compile", cfg, "-o", tmp_path / "out")
    assert rc == 130 and err == "llamagraph: interrupted\n"
    assert not (tmp_path / "out").exists()
    _no_temporaries(tmp_path)


def test_recompiling_replaces_the_plan_directory_whole(tmp_path, capsys):
    cfg = write_json(tmp_path / "tiny.json", TINY)
    out = tmp_path / "out"
    assert cli(capsys, "compile", cfg, "-o", out, "--max-seq", "32")[0] == 0
    (out / "notes.txt").write_text("left from before")
    assert cli(capsys, "compile", cfg, "-o", out, "--max-seq", "48")[0] == 0
    assert not (out / "notes.txt").exists()
    assert CompiledPlan.load(str(out)).graph.meta["max_seq"] == 48
    _no_temporaries(tmp_path)


def test_a_directory_that_is_not_a_plan_is_not_replaced(tmp_path, capsys):
    cfg = write_json(tmp_path / "tiny.json", TINY)
    rc, _, err = cli(capsys, "compile", cfg, "-o", tmp_path)  # the folder holding tiny.json
    assert_one_error_line(rc, err, [f"{tmp_path}: exists and is not a plan directory (it holds tiny.json)"])
    assert os.listdir(tmp_path) == ["tiny.json"]
    with pytest.raises(PlanError, match="is not a plan directory"):
        llamagraph.compile_plan(TINY, dtype="float32", max_seq=16).save(str(tmp_path))
    assert os.listdir(tmp_path) == ["tiny.json"]


def test_dump_dir_inside_the_plan_directory_is_refused_up_front(tmp_path, capsys):
    cfg = write_json(tmp_path / "tiny.json", TINY)
    rc, _, err = cli(capsys, "compile", cfg, "-o", tmp_path / "out", "--dump-dir", tmp_path / "out" / "passes")
    assert_one_error_line(rc, err, "--dump-dir")
    assert "is inside the output directory" in err
    assert not (tmp_path / "out").exists()


def test_compiled_plan_save_is_whole_too(tmp_path, monkeypatch):
    plan = llamagraph.compile_plan(TINY, dtype="float32", max_seq=16)
    plan.save(str(tmp_path / "p"))
    before = _snapshot(tmp_path / "p")

    def boom():
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(plan, "to_dict", boom)  # kernels.cu written, plan.json not
    with pytest.raises(OSError):
        plan.save(str(tmp_path / "p"))
    assert _snapshot(tmp_path / "p") == before
    _no_temporaries(tmp_path)


# ---------------------------------------------------------------------------------------------
# config.json + params.json: the config is chosen by the weights present
# ---------------------------------------------------------------------------------------------

def _folder(tmp_path, name, *files) -> str:
    d = tmp_path / name
    d.mkdir()
    for f in files:
        shutil.copy(f, d)
    return str(d)


def test_both_configs_with_only_meta_weights_reads_params_json(meta_model, tmp_path):
    meta_dir, hf_dir = meta_model()
    d = _folder(tmp_path, "both", os.path.join(hf_dir, "config.json"), *(os.path.join(meta_dir, f) for f in
                                                                        ("params.json", "consolidated.00.pth")))
    assert load_config(d).source == "meta"
    prompt = [1, 8, 3, 22]
    got = llamagraph.compile(d, dtype="float32", max_seq=16).run([prompt])[0]
    np.testing.assert_allclose(got, models.hf_reference_logits(hf_dir, [prompt], [[]])[0][0], rtol=1e-4, atol=1e-4)


def test_both_configs_with_hf_weights_reads_config_json(meta_model, tmp_path):
    meta_dir, hf_dir = meta_model()
    d = _folder(tmp_path, "both", *(os.path.join(hf_dir, f) for f in ("config.json", "model.safetensors")),
                os.path.join(meta_dir, "params.json"))
    assert load_config(d).source == "hf"


# (id, files taken from (meta_dir, hf_dir), words the error must hold)
MISMATCHED_FOLDERS = [
    ("hf-config-meta-weights", [("hf", "config.json"), ("meta", "consolidated.00.pth")],
     ["holds Meta weights (consolidated.00.pth) but no params.json"]),
    ("meta-config-hf-weights", [("meta", "params.json"), ("hf", "model.safetensors")],
     ["holds HF weights (model.safetensors) but no config.json"]),
]


@pytest.mark.parametrize("files,words", [c[1:] for c in MISMATCHED_FOLDERS], ids=[c[0] for c in MISMATCHED_FOLDERS])
def test_config_without_its_weights_says_why(files, words, meta_model, tmp_path, capsys):
    meta_dir, hf_dir = meta_model()
    d = _folder(tmp_path, "ckpt", *(os.path.join(meta_dir if kind == "meta" else hf_dir, f) for kind, f in files))
    rc, _, err = cli(capsys, "compile", d, "-o", tmp_path / "out")
    assert_one_error_line(rc, err, [d, *words])


def test_weights_path_in_the_other_layout_says_why(meta_model):
    meta_dir, hf_dir = meta_model()
    with pytest.raises(WeightError, match="holds Meta weights .* but the model's config is an HF config.json"):
        llamagraph.compile(hf_dir, meta_dir, dtype="float32", max_seq=16)
    with pytest.raises(WeightError, match="holds HF weights .* but the model's config is a Meta params.json"):
        llamagraph.compile(meta_dir, hf_dir, dtype="float32", max_seq=16)


# ---------------------------------------------------------------------------------------------
# Ctrl-C: one line, exit 130
# ---------------------------------------------------------------------------------------------

def test_ctrl_c_in_main_is_one_line(tmp_path, monkeypatch, capsys):
    from llamagraph import report

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(report, "compile_model", interrupted)
    rc, out, err = cli(capsys, "compile", write_json(tmp_path / "tiny.json", TINY))
    assert (rc, out, err) == (130, "", "llamagraph: interrupted\n")


def test_ctrl_c_in_a_real_process(tmp_path):
    """SIGINT while `llamagraph run` streams tokens: exit 130, one line, no traceback."""
    cfg = write_json(tmp_path / "c.json", {**TINY, "hidden_size": 256, "intermediate_size": 512,
                                           "num_hidden_layers": 4, "max_position_embeddings": 4096})
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "llamagraph", "run", cfg, "--random-weights", "--backend",
                          "reference", "--dtype", "float32", "--max-seq", "4096", "--prompt-len", "2",
                          "--max-new-tokens", "4000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         # a shell's background job starts with SIGINT ignored, and Python keeps it so: the
                         # child gets the default disposition, as a process in a terminal has
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = b""
    while not re.search(rb"generated ids: \d+ ", seen):  # streaming: tokens are flushed one by one
        byte = p.stdout.read(1)
        assert byte, p.stderr.read()
        seen += byte
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err.decode() == "llamagraph: interrupted\n"


# ---------------------------------------------------------------------------------------------
# the CUDA path (run by the lead on a GPU machine)
# ---------------------------------------------------------------------------------------------

def _gpu_missing() -> str | None:
    try:
        import cupy
        return None if cupy.cuda.runtime.getDeviceCount() > 0 else "no CUDA device"
    except Exception as e:  # no cupy, no driver
        return f"no usable GPU ({type(e).__name__})"


needs_gpu = pytest.mark.skipif(_gpu_missing() is not None, reason=str(_gpu_missing()))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", [NONFINITE[0], NONFINITE[3]], ids=[NONFINITE[0][0], NONFINITE[3][0]])
def test_cuda_nonfinite_weight_found_on_the_device(case, hf_model, tmp_path):
    _, edit, ckpt_dtype, dtype, tensor, value, nan, inf = case
    ckpt = _with_tensors(hf_model("gqa"), tmp_path / "ckpt", edit, ckpt_dtype)
    with pytest.raises(WeightError) as e:
        llamagraph.compile(ckpt, dtype=dtype, max_seq=16, backend="cuda")
    assert f"weight '{value}' (checkpoint tensor '{tensor}') holds non-finite values ({nan} NaN, {inf} inf)" \
        in str(e.value)


@pytest.mark.gpu
@needs_gpu
def test_cuda_plan_beyond_device_memory_says_how_many_bytes():
    import cupy

    free = cupy.cuda.runtime.memGetInfo()[0]
    with pytest.raises(BackendError) as e:  # about 3 PiB of KV cache
        llamagraph.compile(TINYLLAMA, "random", max_batch=1024, max_seq=2**24, max_tokens=4096, backend="cuda")
    assert str(e.value).startswith("the plan on GPU 0 needs")
    needed, _, said_free, _ = NEEDS.search(str(e.value)).groups()
    assert int(needed) > 2 * 22 * 1024 * 2**24 * 4 * 64 * 2  # more than the KV caches alone
    assert abs(int(said_free) - free) < 2**30
    assert cupy.cuda.runtime.memGetInfo()[0] >= free - 2**30  # nothing big was allocated


# ---------------------------------------------------------------------------------------------
# tensor parallelism (issue #9): --tp
# ---------------------------------------------------------------------------------------------

# (id, argv, words the error line must hold); TINY has 4 heads, 2 kv heads, ffn 128
BAD_TP_ARGUMENTS = [
    ("tp-zero", RUN + ["--tp", "0"], "argument --tp: must be a positive integer, got '0'"),
    ("tp-negative", RUN + ["--tp=-1"], "argument --tp: must be a positive integer, got '-1'"),
    ("tp-word", ["compile", TINYLLAMA, "--tp", "two"], "argument --tp: must be a positive integer, got 'two'"),
    ("tp-float", ["dump", TINYLLAMA, "--tp", "2.0"], "argument --tp: must be a positive integer, got '2.0'"),
    ("tp-10**9", ["bench", TINYLLAMA, "--random-weights", "--tp", str(10**9)], "argument --tp: must be at most"),
    ("tp-heads", ["compile", TINYLLAMA, "--tp", "3"], "num_attention_heads 32 is not divisible by 3"),
    ("no-tp1-alone", ["bench", TINYLLAMA, "--random-weights", "--no-tp1"], "argument --no-tp1: only with --tp N > 1"),
]


@pytest.mark.parametrize("argv,words", [c[1:] for c in BAD_TP_ARGUMENTS], ids=[c[0] for c in BAD_TP_ARGUMENTS])
def test_bad_tp_argument_is_one_line(argv, words, capsys):
    rc, out, err = cli(capsys, *argv)
    assert out == ""
    assert_one_error_line(rc, err, words)
