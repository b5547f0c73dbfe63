"""llamagraph.bisect and `llamagraph bisect`: HF transformers against the plan, op by op.

Faults are injected into the planned graph through bisect's ``edit_graph`` hook (the public
path); bisect must name the op and layer where they were put, and nothing earlier.
"""

import functools
import os
import shutil
import sys

import numpy as np
import pytest

import llamagraph
from llamagraph.cli import main
from llamagraph.ir import BackendError, ConfigError, InputError, memory

PROMPT = [1, 5, 9, 12, 40, 33, 7, 60]
LAYER_OPS = ["attn_norm", "q_rot", "k_rot", "v", "attention", "o_proj+residual", "ffn_norm", "mlp", "residual"]
UNFUSED = []  # passes=[]: the unfused graph
FUSED = None  # the whole pipeline, as compile() runs it
bisect_module = sys.modules["llamagraph.bisect"]  # `llamagraph.bisect` is the function
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def wrong_eps(layer: int, eps: float):
    """A fault: the RMSNorm before layer ``layer``'s MLP uses ``eps`` (the checkpoint says 1e-5)."""
    def edit(graph):
        # rmsnorm, or in a fused plan the gate/up GEMV it is the prologue of
        [node] = [n for n in graph.nodes if f"l{layer}.ffn_in" in n.outputs
                  or (n.op == "rms_gate_up_silu" and n.layer == layer)]
        node.attrs["eps"] = eps
    return edit


def interleaved_rope(layer: int):
    """A fault: layer ``layer`` rotates (2i, 2i+1) pairs where the HF checkpoint needs (i, i+D/2)."""
    def edit(graph):
        [node] = [n for n in graph.nodes if n.layer == layer
                  and n.op in ("rope", "rope_kv_append", "rms_qkv_rope_kv_append")]
        assert node.attrs["layout"] == "rotate_half"
        node.attrs["layout"] = "interleaved"
        for name in node.inputs:  # the fused QKV GEMV pairs its weight rows by the layout too
            order = graph.values[name].attrs.get("row_order")
            if order:
                graph.values[name].attrs["row_order"] = order[:3] + ["interleaved"]
    return edit


def expected_rows(r, passes) -> list[tuple]:
    """The rows bisect compares: all of them unfused; a fused plan holds no norm output (the norms
    are GEMV prologues; an fp32 plan keeps the attention norm) and no MLP output (the down GEMV
    adds the residual)."""
    skip = set() if passes == UNFUSED else {"ffn_norm", "mlp", "final_norm"}
    if passes != UNFUSED and r.dtype != "float32":
        skip.add("attn_norm")
    rows = [(i, op) for i in range(2) for op in LAYER_OPS if op not in skip]
    return rows + [(None, op) for op in ("final_norm", "logits") if op not in skip]


def ops_compared(result) -> list[tuple]:
    return [(r.layer, r.op) for r in result.rows]


# ---- clean checkpoints --------------------------------------------------------------------------

@pytest.mark.parametrize("passes", [FUSED, UNFUSED], ids=["fused", "unfused"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_clean_checkpoint_passes_every_row(hf_model, dtype, passes):
    r = llamagraph.bisect(hf_model("gqa"), PROMPT, dtype=dtype, passes=passes)
    assert r.ok and r.first_failure is None
    assert ops_compared(r) == expected_rows(r, passes)
    assert all(row.ok for row in r.rows) and len(r.unmapped) == 2 * len(LAYER_OPS) + 2 - len(r.rows)
    assert r.rows[-1].token == len(PROMPT) - 1  # logits exist for the last token only
    errors = np.array([row.error for row in r.rows])
    if dtype == "float16":  # fp16 storage really differs from the fp32 oracle: both sides were read
        assert errors.max() > 1e-4
    fusions = [p for p in r.passes if p.startswith("fuse_")]
    assert (fusions == []) if passes == UNFUSED else ("fuse_rope_kv_append" in fusions)


def test_a_one_token_prompt(hf_model):
    # T == B: the step the CUDA backend runs as its captured decode phase
    r = llamagraph.bisect(hf_model("gqa"), [1], dtype="float32", passes=UNFUSED)
    assert r.ok and len(r.rows) == 2 * len(LAYER_OPS) + 2
    bad = llamagraph.bisect(hf_model("gqa"), [1], dtype="float32", passes=UNFUSED, edit_graph=wrong_eps(1, 1.0))
    assert (bad.first_failure.layer, bad.first_failure.op) == (1, "ffn_norm")
    fused = llamagraph.bisect(hf_model("gqa"), [1], dtype="float32", edit_graph=wrong_eps(1, 1.0))
    assert (fused.first_failure.layer, fused.first_failure.op) == (1, "residual")


def test_fused_plan_with_an_mlp_bias_says_what_it_cannot_compare(hf_model):
    d = hf_model("bias")
    fused = llamagraph.bisect(d, PROMPT, dtype="float32")
    # the down GEMV adds its bias and the residual in its epilogue: no value holds the MLP output
    assert [(r.layer, r.op) for r in fused.rows if r.op == "mlp"] == []
    assert [u.split(":")[0] for u in fused.unmapped] == [f"layer {i} {op}" for i in range(2)
                                                         for op in ("ffn_norm", "mlp")] + ["final_norm"]
    unfused = llamagraph.bisect(d, PROMPT, dtype="float32", passes=[])
    assert [r.layer for r in unfused.rows if r.op == "mlp"] == [0, 1] and not unfused.unmapped
    assert fused.ok and unfused.ok


# ---- injected faults ----------------------------------------------------------------------------

@pytest.mark.parametrize("passes", [FUSED, UNFUSED], ids=["fused", "unfused"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_wrong_rmsnorm_eps_is_named_at_layer_1_ffn_norm(hf_model, dtype, passes):
    r = llamagraph.bisect(hf_model("gqa"), PROMPT, dtype=dtype, passes=passes, edit_graph=wrong_eps(1, 1.0))
    bad = r.first_failure
    # fused, the norm is the gate/up GEMV's prologue: the first value after it is the layer's output
    op, value = ("ffn_norm", "l1.ffn_in") if passes == UNFUSED else ("residual", "l1.x_out")
    assert not r.ok and (bad.layer, bad.op) == (1, op)
    assert bad.value == value and bad.error > bad.tolerance
    before = r.rows[: r.rows.index(bad)]
    expected = expected_rows(r, passes)
    assert [(x.layer, x.op) for x in before] == expected[: expected.index((1, op))]
    assert all(row.ok for row in before)


@pytest.mark.parametrize("passes", [FUSED, UNFUSED], ids=["fused", "unfused"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_interleaved_rope_is_named_at_layer_0_q_and_k(hf_model, dtype, passes):
    r = llamagraph.bisect(hf_model("gqa"), PROMPT, dtype=dtype, passes=passes, edit_graph=interleaved_rope(0))
    assert (r.first_failure.layer, r.first_failure.op) == (0, "q_rot")
    row = {(x.layer, x.op): x for x in r.rows}
    assert (0, "attn_norm") not in row or row[(0, "attn_norm")].ok
    assert not row[(0, "k_rot")].ok
    assert row[(0, "v")].ok  # V is not rotated: the fault is in RoPE, not in the QKV projection
    assert row[(0, "q_rot")].token > 0  # position 0 is not rotated by either layout


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt")
def test_a_nan_is_a_failure(hf_model):
    # eps -10 makes var + eps negative: the norm's output is NaN, which compares as an infinite error
    r = llamagraph.bisect(hf_model("gqa"), PROMPT, dtype="float32", passes=UNFUSED, edit_graph=wrong_eps(0, -10.0))
    assert (r.first_failure.layer, r.first_failure.op) == (0, "ffn_norm") and r.first_failure.error == np.inf


def test_tolerance_grows_with_depth_and_can_be_set(hf_model):
    r = llamagraph.bisect(hf_model("gqa"), PROMPT, dtype="float16", tolerance=1e-3, passes=UNFUSED)
    tol = {(x.layer, x.op): x.tolerance for x in r.rows}
    assert tol[(0, "attn_norm")] == pytest.approx(1e-3)
    assert tol[(1, "attn_norm")] == pytest.approx(1e-3 * 2 ** 0.5)
    assert tol[(None, "logits")] == pytest.approx(1e-3 * 3 ** 0.5)  # as layer num_layers
    assert not r.ok  # fp16 rounding alone exceeds 1e-3 somewhere; the default 2e-2 does not
    assert llamagraph.bisect(hf_model("gqa"), PROMPT, dtype="float16").ok


# ---- keep_values: every intermediate readable after the step -------------------------------------

def test_keep_values_gives_every_activation_its_own_bytes():
    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_hidden_layers": 2, "vocab_size": 100}

    def overlapping(plan) -> int:
        g = plan.graph
        spans = sorted((v.attrs["offset"], v.attrs["offset"] + v.nbytes(g.dims)) for v in g.values.values()
                       if v.kind == "activation")
        return sum(1 for (_, hi), (lo, _) in zip(spans, spans[1:]) if lo < hi)

    shared = llamagraph.compile(cfg, "random", dtype="float32", max_seq=16)
    kept = llamagraph.compile(cfg, "random", dtype="float32", max_seq=16, keep_values=True)
    assert overlapping(shared) > 0 and overlapping(kept) == 0
    n_act = sum(v.kind == "activation" for v in kept.graph.values.values())
    assert len(memory.buffers(kept.graph)) == n_act
    # the plans compute the same logits: keeping values changes where they live, not what they are
    assert np.array_equal(shared.run([[1, 5, 9]]), kept.run([[1, 5, 9]]))


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("ids, match", [
    ([], "non-empty"), ("1,2", "non-empty"), ([1, 96], "token id 96"), ([1, True], "token id True"),
    ([1, -1], "token id -1"), ([1, 2.0], "token id 2.0"),
])
def test_bad_prompt_ids(hf_model, ids, match):
    with pytest.raises(InputError, match=match):
        llamagraph.bisect(hf_model("gqa"), ids)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(dtype="float64"), ConfigError, "dtype 'float64'"),
    (dict(passes="dce"), ConfigError, "passes must be a list"),
    (dict(passes=["fuse_everything"]), ConfigError, "unknown pass 'fuse_everything'"),
    (dict(tolerance=0), InputError, "tolerance"),
    (dict(tolerance=float("nan")), InputError, "tolerance"),
    (dict(backend="tpu"), ConfigError, "backend 'tpu'"),
])
def test_bad_options(hf_model, kwargs, err, match):
    with pytest.raises(err, match=match):
        llamagraph.bisect(hf_model("gqa"), PROMPT, **kwargs)


def test_a_meta_checkpoint_or_a_dict_is_refused(meta_model):
    meta_dir, _ = meta_model()
    with pytest.raises(ConfigError, match="Meta checkpoint"):
        llamagraph.bisect(meta_dir, PROMPT)
    with pytest.raises(ConfigError, match="HF checkpoint directory"):
        llamagraph.bisect({"hidden_size": 64}, PROMPT)


def test_missing_transformers_is_one_line(hf_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    with pytest.raises(BackendError, match="needs torch and transformers .*transformers is missing"):
        llamagraph.bisect(hf_model("gqa"), PROMPT, dtype="float32")


# ---- the command line ---------------------------------------------------------------------------

def test_cli_prints_the_table_and_exits_0_on_a_clean_checkpoint(hf_model, capsys):
    rc = main(["bisect", hf_model("gqa"), "--prompt-ids", ",".join(map(str, PROMPT)), "--backend", "reference",
               "--dtype", "float32", "--unfused"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["layer", "op"])
    table = lines[header + 1: header + 1 + 2 * len(LAYER_OPS) + 2]
    assert [ln.split()[1] for ln in table] == LAYER_OPS * 2 + ["final_norm", "logits"]
    assert all(ln.split()[-1] == "ok" for ln in table)
    assert lines[-1].startswith("ok: all 20 compared values")


def test_cli_exits_1_and_names_the_fault(hf_model, capsys, monkeypatch):
    # the test-only route: the CLI calls llamagraph.bisect.bisect, here with a fault injected
    faulty = functools.partial(bisect_module.bisect, edit_graph=wrong_eps(1, 1.0))
    monkeypatch.setattr(bisect_module, "bisect", faulty)
    rc = main(["bisect", hf_model("gqa"), "--prompt-ids", "1,5,9,12,40,33", "--backend", "reference", "--unfused"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "unfused graph" in out.splitlines()[0]
    failing = [ln.split() for ln in out.splitlines() if ln.endswith("FAIL")]
    assert failing[0][:3] == ["1", "ffn_norm", "l1.ffn_in"]
    assert out.splitlines()[-1].startswith("first failure: layer 1 ffn_norm (l1.ffn_in)")


def test_cli_encodes_a_text_prompt_with_bos(hf_model, tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models as tok_models, pre_tokenizers, trainers

    src = hf_model("gqa")
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), tmp_path / f)
    tok = tokenizers.Tokenizer(tok_models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    rc = main(["bisect", str(tmp_path), "--prompt", "the lazy dog", "--backend", "reference", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert rc == 0, out
    expected = [1] + tok.encode("the lazy dog", add_special_tokens=False).ids
    assert f"prompt ids: {','.join(map(str, expected))}" in out


@pytest.mark.parametrize("args, match", [
    (["--prompt-ids", "1,x"], "expected comma-separated token ids"),
    (["--prompt-ids", "1,500"], "token id 500 at index 1"),
    (["--prompt", "hello"], "no tokenizer.model or tokenizer.json"),
    ([], "one of the arguments --prompt --prompt-ids is required"),
    (["--prompt", "a", "--prompt-ids", "1"], "not allowed with"),
    (["--prompt-ids", "1", "--tolerance", "-1"], "tolerance must be a positive number"),
    (["--prompt-ids", "1", "--dtype", "float64"], "invalid choice"),
])
def test_cli_bad_input_exits_2_with_one_line(hf_model, capsys, args, match):
    rc = main(["bisect", hf_model("gqa"), "--backend", "reference", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("llamagraph: error: ") and len(err.strip().splitlines()) == 1 and match in err, err


def test_cli_refuses_a_config_without_a_checkpoint(capsys):
    rc = main(["bisect", os.path.join(EXAMPLES, "tinyllama-1.1b.json"), "--prompt-ids", "1,2", "--backend", "reference"])
    assert rc == 2 and "needs an HF checkpoint directory" in capsys.readouterr().err
