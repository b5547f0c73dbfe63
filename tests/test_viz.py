"""The offline pictures: well-formed, complete (one rect per buffer, one box per drawn op),
geometrically faithful to the plan, and byte-for-byte deterministic."""

import hashlib
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from llamagraph import viz
from llamagraph.ir import load_config
from llamagraph.compiler import compile_graph
from llamagraph.ir.memory import buffers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SVG = "{http://www.w3.org/2000/svg}"
TINY_BIAS = {
    "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_hidden_layers": 3, "vocab_size": 100, "max_position_embeddings": 64,
    "attention_bias": True, "mlp_bias": True,
}


def compiled(name: str, **kw):
    return compile_graph(load_config(os.path.join(ROOT, "examples", name)), **kw)


@pytest.fixture(scope="module")
def g1b():
    return compiled("llama-3.2-1b.json", max_seq=512)


@pytest.fixture(scope="module")
def tiny_fused():
    return compile_graph(load_config(TINY_BIAS), dtype="float32", max_batch=2)


@pytest.fixture(scope="module")
def tiny_unfused():
    return compile_graph(load_config(TINY_BIAS), dtype="float32", max_batch=2, passes=[])


class _TagBalance(HTMLParser):
    """Checks every non-void element is closed in order (what a browser would have to repair)."""

    VOID = {"meta", "br", "hr", "img", "input", "link"}

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def parse(page: str) -> ET.Element:
    assert page.startswith("<!DOCTYPE html>")
    root = ET.fromstring(page)  # well-formed XML (so also unambiguous HTML)
    checker = _TagBalance()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page  # nothing fetched: viewable offline
    return root


def by_class(root: ET.Element, tag: str, cls: str) -> list[ET.Element]:
    return [e for e in root.iter(SVG + tag) if cls in e.get("class", "").split()]


# ---------------------------------------------------------------------------------------------
# memory plan
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["g1b", "tiny_fused"])
def test_memory_plan_one_rect_per_buffer(which, request):
    g = request.getfixturevalue(which)
    root = parse(viz.memory_plan_html(g))
    rects = by_class(root, "rect", "buf")
    assert len(rects) == len(buffers(g)) == g.meta["memory"]["buffers"]
    assert sorted(int(r.get("data-buffer")) for r in rects) == sorted(b.id for b in buffers(g))
    assert len(by_class(root, "line", "lower-bound")) == 1


def test_memory_plan_geometry(g1b):
    """x spans steps first..last, y is the offset (0 at the bottom), height is the size."""
    mem = g1b.meta["memory"]
    root = parse(viz.memory_plan_html(g1b))
    n = len(g1b.nodes)
    ymax = max(mem["arena_bytes"], mem["lower_bound_bytes"]) * 1.08
    step_w = viz.PLOT_W / (n + 1)
    bufs = {b.id: b.as_dict() for b in buffers(g1b)}
    for r in by_class(root, "rect", "buf"):
        b = bufs[int(r.get("data-buffer"))]
        x, w = float(r.get("x")), float(r.get("width"))
        y, h = float(r.get("y")), float(r.get("height"))
        assert x == pytest.approx(viz.M_LEFT + step_w * b["first"], abs=0.01)
        assert w == pytest.approx(step_w * (b["last"] - b["first"] + 1), abs=0.02)
        assert h == pytest.approx(max(viz.PLOT_H * b["size"] / ymax, 1.0), abs=0.02)  # tiny ones stay visible
        top = viz.M_TOP + viz.PLOT_H * (1 - (b["offset"] + b["size"]) / ymax)
        assert y == pytest.approx(top, abs=0.02)
        title = r.find(SVG + "title").text
        assert b["values"][0] in title and f"steps {b['first']} .. {b['last']}" in title
    lb = by_class(root, "line", "lower-bound")[0]
    assert float(lb.get("y1")) == pytest.approx(viz.M_TOP + viz.PLOT_H * (1 - mem["lower_bound_bytes"] / ymax), abs=0.1)


def test_live_bytes_peak_is_lower_bound(g1b, tiny_fused):
    for g in (g1b, tiny_fused):
        assert max(viz.live_bytes(buffers(g), len(g.nodes))) == g.meta["memory"]["lower_bound_bytes"]


# ---------------------------------------------------------------------------------------------
# graph
# ---------------------------------------------------------------------------------------------

def _op_boxes(root):
    return [g for g in root.iter(SVG + "g") if g.get("class") == "node op"]


def _expected_drawn(g, layer):
    return [i for i, n in enumerate(g.nodes) if not re.match(r"l\d+\.", n.name) or n.name.startswith(f"l{layer}.")]


@pytest.mark.parametrize("which,layer,folded", [("g1b", 0, 1), ("g1b", 7, 2), ("tiny_fused", 2, 1),
                                                ("tiny_unfused", 1, 2)])
def test_graph_one_box_per_drawn_op(which, layer, folded, request):
    g = request.getfixturevalue(which)
    root = parse(viz.graph_html(g, layer=layer))
    boxes = _op_boxes(root)
    drawn = sorted(int(b.get("data-node")) for b in boxes)
    assert drawn == _expected_drawn(g, layer) == viz.drawn_nodes(g, layer)
    in_layer = [i for i in drawn if g.nodes[i].name.startswith(f"l{layer}.")]
    assert len(in_layer) == sum(n.name.startswith(f"l{layer}.") for n in g.nodes) > 0
    for b in boxes:
        i = int(b.get("data-node"))
        assert b.get("data-op") == g.nodes[i].op
        texts = [t.text for t in b.iter(SVG + "text")]
        assert texts[0] == g.nodes[i].op
        assert b.find(SVG + "rect").get("fill") == viz.op_color(g.nodes[i].op)
    assert len([e for e in root.iter(SVG + "g") if e.get("class") == "node folded"]) == folded


def test_graph_boxes_do_not_overlap(g1b, tiny_unfused):
    for g, layer in ((g1b, 0), (tiny_unfused, 1)):
        root = parse(viz.graph_html(g, layer=layer))
        rects = []
        for b in root.iter(SVG + "g"):
            if b.get("class", "").startswith("node"):
                r = b.find(SVG + "rect")
                rects.append(tuple(float(r.get(k)) for k in ("x", "y", "width", "height")))
        for i, (x, y, w, h) in enumerate(rects):
            for (x2, y2, w2, h2) in rects[i + 1:]:
                assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y


def test_graph_edges_labelled_with_shapes(tiny_fused):
    g = tiny_fused
    root = parse(viz.graph_html(g, layer=1))
    edges = [e for e in root.iter(SVG + "g") if e.get("class") == "edge"]
    assert edges
    keys = {b.get("data-node") for b in _op_boxes(root)}
    type_re = re.compile(r"\b(f32|f16|bf16|i32)\[[^\]]+\]")
    for e in edges:
        for end in (e.get("data-src"), e.get("data-dst")):
            assert end[0] in "nh"  # an op box or a folded box
            if end[0] == "n":
                assert end[1:] in keys
        assert type_re.search(e.find(SVG + "title").text)
        assert e.find(SVG + "path").get("marker-end") == "url(#arrow)"
    labels = " ".join("".join(t.itertext()) for e in edges for t in e.iter(SVG + "text"))
    assert "qkv_b f32[T,128]" in labels  # (H + 2 KV) * head_dim = (4 + 2*2) * 16, bias fused in
    assert "x_mid f32[T,64]" in labels


def test_graph_html_rejects_missing_layer(tiny_fused):
    with pytest.raises(ValueError, match="layer 9"):
        viz.graph_html(tiny_fused, layer=9)


def test_graph_single_layer_has_no_fold():
    g = compile_graph(load_config(dict(TINY_BIAS, num_hidden_layers=1)), dtype="float32")
    root = parse(viz.graph_html(g))
    assert len(_op_boxes(root)) == len(g.nodes)
    assert not [e for e in root.iter(SVG + "g") if e.get("class") == "node folded"]


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------

def _pictures_digest(g) -> str:
    return hashlib.sha256((viz.graph_html(g) + viz.memory_plan_html(g)).encode()).hexdigest()


def test_pictures_deterministic(g1b):
    again = compiled("llama-3.2-1b.json", max_seq=512)
    assert viz.graph_html(g1b) == viz.graph_html(again)
    assert viz.memory_plan_html(g1b) == viz.memory_plan_html(again)


def test_pictures_deterministic_across_hash_seeds(g1b):
    """No hash() or set order leaks into the pictures: other processes, other hash seeds, same bytes."""
    code = (
        "import hashlib, os\n"
        "from llamagraph import viz\n"
        "from llamagraph.ir import load_config\n"
        "from llamagraph.compiler import compile_graph\n"
        f"g = compile_graph(load_config({os.path.join(ROOT, 'examples', 'llama-3.2-1b.json')!r}), max_seq=512)\n"
        "print(hashlib.sha256((viz.graph_html(g) + viz.memory_plan_html(g)).encode()).hexdigest())\n"
    )
    want = _pictures_digest(g1b)
    for seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == want


def test_cli_writes_the_same_pictures(tmp_path, g1b):
    from llamagraph.cli import main

    assert main(["compile", os.path.join(ROOT, "examples", "llama-3.2-1b.json"), "-o", str(tmp_path), "--max-seq", "512"]) == 0
    page = (tmp_path / "graph.html").read_text()
    assert viz.graph_html(g1b, title="llama-3.2-1b.json: fused graph") == page
    plan = json.loads((tmp_path / "memory_plan.json").read_text())
    rects = by_class(parse((tmp_path / "memory_plan.html").read_text()), "rect", "buf")
    assert len(rects) == len(plan["buffers"])
