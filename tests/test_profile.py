"""``llamagraph profile`` on the CPU: the bytes each decode launch must move, the picture drawn
from plain rows, and the command's one-line refusal without a GPU. The timing itself runs in
tests/gpu/test_profile_cuda.py."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest

import llamagraph
from llamagraph.bench import decode_step_bytes
from llamagraph.cli import main
from llamagraph.codegen.launch import Launch, value
from llamagraph.ir import build_graph, load_config
from llamagraph.profile import launch_bytes, layer_label
from llamagraph.viz import profile_html, profile_svg
from models import TINY

# TINY: hidden 64, intermediate 192, 4 heads, 2 KV heads, head_dim 16, vocab 96, 2 layers.
BATCH, CONTEXT, MAX_SEQ = 2, 10, 32
F16 = 2  # bytes


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(json.dumps({**TINY, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return str(path)


@pytest.fixture(scope="module")
def graph(config_path):
    """The unfused graph, so the launches below name the builder's own values."""
    return build_graph(load_config(config_path), dtype="float16", max_batch=BATCH, max_seq=MAX_SEQ, max_tokens=64)


def _launch(graph, op: str, layer: int | None, *values: str) -> Launch:
    node = next(i for i, n in enumerate(graph.nodes) if n.op == op and n.layer == layer)
    return Launch("k", None, tuple(value(v) for v in values), node=node)


def test_gemv_moves_its_weight_and_its_activations(graph):
    launch = _launch(graph, "qkv_gemm", 0, "l0.attn_in", "l0.qkv.w", "l0.qkv")
    weight = (4 + 2 * 2) * 16 * 64 * F16  # [(H + 2 KV) * D, hidden]
    assert launch_bytes(graph, launch, BATCH, CONTEXT) == weight + BATCH * 64 * F16 + BATCH * 128 * F16


def test_embedding_gathers_one_row_per_sequence(graph):
    launch = _launch(graph, "embedding", None, "embed.w", "tokens", "x0")
    assert launch_bytes(graph, launch, BATCH, CONTEXT) == BATCH * 64 * F16 + BATCH * 4 + BATCH * 64 * F16


def test_lm_head_reads_its_whole_matrix_and_writes_fp32_logits(graph):
    launch = _launch(graph, "lm_head", None, "last_hidden", "lm_head.w", "logits")
    assert launch_bytes(graph, launch, BATCH, CONTEXT) == BATCH * 64 * F16 + 96 * 64 * F16 + BATCH * 96 * 4


def test_attention_reads_context_rows_of_each_cache(graph):
    launch = _launch(graph, "sdpa", 1, "l1.qkv_rot", "kv.l1.k.appended", "kv.l1.v.appended", "positions", "seq_ids")
    row = 2 * 16 * F16  # one token of one sequence: [KV, D]
    qkv_rot = BATCH * (4 + 2 * 2) * 16 * F16
    assert launch_bytes(graph, launch, BATCH, CONTEXT) == qkv_rot + 2 * BATCH * CONTEXT * row + 2 * BATCH * 4


def test_kv_append_writes_one_row_per_sequence_and_counts_values_once(graph):
    launch = _launch(graph, "kv_append", 0, "l0.qkv_rot", "positions", "seq_ids", "kv.l0.k", "kv.l0.v",
                     "positions")  # the repeated argument is counted once
    row = 2 * 16 * F16
    expected = BATCH * (4 + 2 * 2) * 16 * F16 + 2 * BATCH * 4 + 2 * BATCH * row
    assert launch_bytes(graph, launch, BATCH, CONTEXT) == expected


def test_compiled_decode_launches_cover_the_step_floor(config_path):
    """Every weight is read by some launch and attention reads the whole context, so the
    launches' bytes together are at least the floor ``bench`` computes."""
    plan = llamagraph.compile(config_path, "random", max_batch=BATCH, max_seq=MAX_SEQ)
    g = plan.graph
    launches = [x for x in plan.compiled.phases["decode"] if not x.on_demand]
    sizes = [launch_bytes(g, x, BATCH, CONTEXT) for x in launches]
    assert all(n > 0 for n in sizes)
    assert sum(sizes) >= decode_step_bytes(g, plan.config, BATCH, CONTEXT)


def test_layer_labels():
    assert [layer_label(None, after_layers=False), layer_label(3, True), layer_label(None, after_layers=True)] == \
        ["embedding", "layer 3", "head"]


# ---- the picture ----------------------------------------------------------------------------

def _rows():
    rows = [dict(group="embedding", op="embedding", node="x0", kernel="gather_rows")]
    for layer in range(3):
        rows += [dict(group=f"layer {layer}", op=op, node=f"l{layer}.{op}", kernel=f"k_{op}")
                 for op in ("add_rmsnorm", "qkv_gemm", "sdpa", "o_proj")]
    rows += [dict(group="head", op="lm_head", node="logits", kernel="gemv<&>")]
    return [dict(r, index=i, us=1.5 + i, bytes=1000 * (i + 1), gb_s=100.0 * i, pct_copy=3.0 * i)
            for i, r in enumerate(rows)]


def test_picture_has_one_bar_per_kernel_grouped_by_layer():
    rows = _rows()
    svg = ET.fromstring(profile_svg(rows))
    ns = "{http://www.w3.org/2000/svg}"
    bars = [e for e in svg.iter(ns + "rect") if e.get("class") == "bar"]
    assert len(bars) == len(rows)
    widths = [float(b.get("width")) for b in bars]
    assert widths == sorted(widths) and widths[-1] > widths[0]  # length follows us (rising here)
    groups = [e for e in svg.iter(ns + "g") if e.get("class") == "group"]
    assert [g.get("data-group") for g in groups] == ["embedding", "layer 0", "layer 1", "layer 2", "head"]
    assert [sum(1 for e in g.iter(ns + "rect") if e.get("class") == "bar") for g in groups] == [1, 4, 4, 4, 1]
    titles = [t.text for t in svg.iter(ns + "title")]
    assert titles[-1].startswith("#13 gemv<&> (lm_head, logits): 14.50 us, 14,000 bytes, 1300 GB/s")


def test_picture_page_is_offline_and_well_formed():
    page = profile_html(_rows(), title="decode step profile: tiny", subtitle=["total: 14 kernels"])
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing fetched
    assert "<script" not in page
    body = page.split("\n", 1)[1]  # the doctype line is not XML
    root = ET.fromstring(body)
    assert root.tag == "html"
    assert re.search(r"total: 14 kernels", page)


# ---- the command without a GPU ----------------------------------------------------------------

def _has_gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.skipif(_has_gpu(), reason="checks the refusal on a machine without a GPU")
def test_profile_without_gpu_is_one_line_exit_2(config_path, tmp_path, capsys):
    rc = main(["profile", config_path, "--random-weights", "-o", str(tmp_path / "p.html")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("llamagraph: error: ") and "cuda" in err
    assert not (tmp_path / "p.html").exists()


def test_profile_requires_random_weights(config_path, capsys):
    assert main(["profile", config_path]) == 2
    assert "--random-weights" in capsys.readouterr().err


def test_profile_context_below_two_is_refused(config_path, capsys):
    assert main(["profile", config_path, "--random-weights", "--context", "1"]) == 2
    assert "--context" in capsys.readouterr().err


def test_tp_totals_give_the_collective_time_per_step():
    from llamagraph.profile import KernelRow, ProfileResult

    rows = [KernelRow(0, 0, "layer 0", "o_proj", "l0.o", "gemv", 4.0, 100, 25.0, 1.0),
            KernelRow(1, 0, "layer 0", "all_reduce_residual", "l0.o.sum", "allreduce_residual", 3.0, 10, 3.3, 0.1),
            KernelRow(2, None, "head", "all_gather_vocab", "logits", "allgather", 5.0, 10, 2.0, 0.1)]
    res = ProfileResult("c.json", 1, 16, "float16", "GPU", 4000.0, 20.0, 1000, rows, tp=2)
    t = res.totals()
    assert t["collectives"] == 2 and t["collectives_us"] == 8.0
    assert "all-reduce and gather: 2 launches of collective ops, 8.0 us per step summed alone (40.0% of the replay)" in res.totals_line()
    assert "tensor parallel over 2 GPUs" in res.header() and res.to_dict()["tp"] == 2
    one = ProfileResult("c.json", 1, 16, "float16", "GPU", 4000.0, 20.0, 1000, rows[:1])
    assert "collectives" not in one.totals() and "all-reduce" not in one.totals_line()


def test_marginal_cost_is_what_the_step_saves_without_an_op():
    from llamagraph.profile import KernelRow, ProfileResult

    rows = [KernelRow(i, i // 2, f"layer {i // 2}", op, f"l{i // 2}.{op}", op, us, 100, 1.0, 1.0)
            for i, (op, us) in enumerate([("gemv", 10.0), ("sdpa", 3.0), ("gemv", 10.0), ("sdpa", 3.0)])]
    res = ProfileResult("c.json", 1, 16, "float16", "GPU", 4000.0, 31.0, 1000, rows, launches_replay_us=30.0,
                        without={"gemv": 6.0, "sdpa": 20.0})
    m = {r["op"]: r for r in res.marginal()}
    assert m["gemv"]["launches"] == 2 and m["gemv"]["marginal_us"] == 24.0 and m["gemv"]["alone_us"] == 20.0
    assert m["gemv"]["boundary_us"] == 2.0 and m["sdpa"]["boundary_us"] == 2.0
    table = res.marginal_table()
    assert "replay of the profiled launches 30.0 us" in table and "sdpa" in table.splitlines()[-1]
    assert res.to_dict()["marginal"][0]["op"] == "gemv"


def test_profile_bad_tp_is_a_usage_error(config_path, capsys):
    rc = main(["profile", config_path, "--random-weights", "--tp", "0"])
    assert rc == 2 and "--tp" in capsys.readouterr().err
