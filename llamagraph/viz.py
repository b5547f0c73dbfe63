"""Offline pictures of a compiled graph: the fused graph and the memory plan, as HTML + SVG.

Both pages are self-contained (inline SVG and CSS, no JavaScript, nothing fetched), viewable
offline in a browser, well-formed XML, and deterministic: the same graph gives the same bytes
(no ``hash()``, no set iteration), so pictures diff cleanly between compiles.

- ``graph_html``: one decoder layer expanded plus the prologue and epilogue; the other layers
  fold into one box per contiguous run. Nodes are coloured by op, edges labelled with the
  values they carry and their types. Layout is a small layered (Sugiyama-style) drawing:
  longest-path ranks, dummy points on long edges, barycenter ordering, relaxed x positions.
- ``memory_plan_html``: each arena buffer as a rectangle, x = schedule steps first..last,
  y = byte offset, height = size; a line at the lower bound and the live-bytes curve.
"""

from __future__ import annotations

import html
import re
import zlib
from dataclasses import dataclass, field

import networkx as nx

from llamagraph.ir import ACTIVATION, INPUT, KV_CACHE, WEIGHT, Graph

# ---------------------------------------------------------------------------------------------
# colours: one per op, grouped by family so a glance tells GEMMs from norms from attention
# ---------------------------------------------------------------------------------------------

OP_COLORS = {
    # GEMMs / GEMVs: blues
    "qkv_gemm": "#9cc3f5",
    "o_proj": "#7fb0ee",
    "gate_proj": "#b5d3f7",
    "up_proj": "#b5d3f7",
    "gate_up_silu": "#5f9ae6",
    "down_proj": "#a9c8f0",
    "lm_head": "#4a86d8",
    # norms: greens
    "rmsnorm": "#a8dca0",
    "add_rmsnorm": "#74c476",
    # attention: oranges / reds
    "rope": "#fdc086",
    "kv_append": "#fdd0a2",
    "rope_kv_append": "#fd9f5b",
    "sdpa": "#f4796b",
    # elementwise: yellows
    "bias_add": "#fff2a8",
    "residual": "#ffe680",
    "silu": "#fde58c",
    "mul": "#fbd96b",
    "silu_mul": "#f6c945",
    # in / out: purples and greys
    "embedding": "#cdb8e6",
    "gather_last": "#d9d9d9",
    "topk_sample": "#bfa3dc",
}
HIDDEN_COLOR = "#eeeeee"


def op_color(op: str) -> str:
    """A fixed colour per known op; other ops get a stable pastel from a CRC of the name."""
    if op in OP_COLORS:
        return OP_COLORS[op]
    hue = zlib.crc32(op.encode()) % 360
    return f"hsl({hue},60%,80%)"


def _esc(s) -> str:
    return html.escape(str(s), quote=True)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


_LAYER = re.compile(r"^l(\d+)\.")


def layer_of(name: str) -> int | None:
    """The decoder layer a node or value belongs to, from its ``lN.`` name prefix."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def drawn_nodes(graph: Graph, layer: int = 0) -> list[int]:
    """Indices of the nodes ``graph_html`` draws as ops: one layer plus everything outside layers."""
    return [i for i, n in enumerate(graph.nodes) if layer_of(n.name) in (None, layer)]


# ---------------------------------------------------------------------------------------------
# page frame
# ---------------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 16px 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px 0; }
p.sub { margin: 0 0 10px 0; color: #555; font-size: 13px; }
div.legend { font-size: 12px; margin: 6px 0 10px 0; }
span.key { display: inline-block; margin: 2px 12px 2px 0; }
span.sw { display: inline-block; width: 12px; height: 12px; border: 1px solid #666; vertical-align: -2px; margin-right: 4px; }
svg text { font-family: 'DejaVu Sans Mono', Menlo, Consolas, monospace; }
svg g.node:hover rect, svg rect.buf:hover { stroke: #000; stroke-width: 2; }
"""


def _page(title: str, subtitle: list[str], legend: list[tuple[str, str]], svg: str) -> str:
    keys = "".join(
        f'<span class="key"><span class="sw" style="background:{_esc(c)}"></span>{_esc(k)}</span>' for k, c in legend
    )
    subs = "".join(f'<p class="sub">{_esc(s)}</p>' for s in subtitle)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8"/>\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_esc(title)}</h1>\n{subs}\n"
        f'<div class="legend">{keys}</div>\n{svg}\n</body>\n</html>\n'
    )


def _model_line(graph: Graph) -> str:
    m = graph.meta
    cfg = m.get("config", {})
    parts = [f"{m.get('dtype', '?')}", f"max_batch {m.get('max_batch', '?')}", f"max_seq {m.get('max_seq', '?')}",
             f"max_tokens {m.get('max_tokens', '?')}"]
    if cfg:
        parts.insert(0, f"{cfg.get('num_layers')} layers, hidden {cfg.get('hidden_size')}")
    return ", ".join(str(p) for p in parts)


# ---------------------------------------------------------------------------------------------
# the graph picture
# ---------------------------------------------------------------------------------------------

FONT = 12  # px, monospace
CHAR_W = 7.3  # px per character at FONT (DejaVu Sans Mono is 0.6 em)
LINE_H = 15
PAD_X, PAD_Y = 10, 6
ROW_GAP = 56  # vertical room between ranks for edge labels
COL_GAP = 36
LABEL_FONT = 10
LABEL_CHAR_W = 6.1


@dataclass
class _Box:
    key: str
    order: int  # schedule index, for deterministic initial ordering
    lines: list[str]
    color: str
    title: str
    op: str = ""
    node_index: int = -1  # -1 for folded layer boxes and dummies
    dummy: bool = False
    width: float = 0.0
    height: float = 0.0
    rank: int = 0
    x: float = 0.0  # centre
    y: float = 0.0  # top


@dataclass
class _Edge:
    src: str
    dst: str
    labels: list[str]  # every value the edge carries (hover title)
    shown: list[str] = field(default_factory=list)  # the labels drawn
    points: list[str] = field(default_factory=list)  # box keys from src through dummies to dst


def _short(name: str) -> str:
    m = _LAYER.match(name)
    return name[m.end():] if m else name


def _op_box(graph: Graph, i: int) -> _Box:
    n = graph.nodes[i]
    lines = [n.op, ", ".join(_short(o) for o in n.outputs if graph.values[o].kind == ACTIVATION) or _short(n.name)]
    weights = [graph.values[v] for v in n.inputs if graph.values[v].kind == WEIGHT]
    lines += [f"{'b' if 'bias' in w.name else 'W'} {w.type_str()}" for w in weights]
    inputs = [v for v in n.inputs if graph.values[v].kind == INPUT]
    caches = [v for v in n.inputs if graph.values[v].kind == KV_CACHE and "alias" not in graph.values[v].attrs]
    if inputs:
        lines.append("in " + ",".join(inputs))
    if caches:
        lines.append("kv " + ",".join(caches) + " (writes)")
    outs = ", ".join(f"%{o}: {graph.values[o].type_str()}" for o in n.outputs)
    ins = ", ".join(("@" if graph.values[v].kind == WEIGHT else "%") + v for v in n.inputs)
    attrs = " ".join(f"{k}={v}" for k, v in sorted(n.attrs.items()))
    title = f"[{i}] {outs} = {n.op}({ins})" + (f" {{{attrs}}}" if attrs else "")
    return _Box(f"n{i}", i, lines, op_color(n.op), title, op=n.op, node_index=i)


def _folded_box(graph: Graph, run: list[int], k: int) -> _Box:
    layers = sorted({layer_of(graph.nodes[i].name) for i in run} - {None})
    span = f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
    counts: dict[str, int] = {}
    for i in run:
        counts[graph.nodes[i].op] = counts.get(graph.nodes[i].op, 0) + 1
    lines = [span, f"{len(run)} nodes, same as the layer drawn"]
    title = f"{span} folded: nodes [{run[0]}..{run[-1]}]\n" + "\n".join(f"{op} x{c}" for op, c in sorted(counts.items()))
    return _Box(f"h{k}", run[0], lines, HIDDEN_COLOR, title, op="(folded)")


def _measure(b: _Box) -> None:
    if b.dummy:
        return
    b.width = max(len(s) for s in b.lines) * CHAR_W + 2 * PAD_X
    b.height = len(b.lines) * LINE_H + 2 * PAD_Y


def _display_graph(graph: Graph, layer: int) -> tuple[list[_Box], list[_Edge]]:
    """Boxes for drawn ops and folded runs of other layers; edges merged per box pair."""
    keep = set(drawn_nodes(graph, layer))
    boxes: list[_Box] = []
    box_of: dict[int, str] = {}
    run: list[int] = []

    def flush() -> None:
        if run:
            b = _folded_box(graph, list(run), len(boxes))
            boxes.append(b)
            for j in run:
                box_of[j] = b.key
            run.clear()

    for i in range(len(graph.nodes)):
        if i in keep:
            flush()
            b = _op_box(graph, i)
            boxes.append(b)
            box_of[i] = b.key
        else:
            run.append(i)
    flush()

    prod = graph.producers()
    edges: dict[tuple[str, str], _Edge] = {}
    for i, n in enumerate(graph.nodes):
        dst = box_of[i]
        for v in n.inputs:
            if v not in prod:
                continue
            src = box_of[prod[v]]
            if src == dst:
                continue
            e = edges.setdefault((src, dst), _Edge(src, dst, []))
            # inside the drawn layer short names read best; across a fold, the full name says which layer
            name = v if src.startswith("h") or dst.startswith("h") else _short(v)
            label = f"{name} {graph.values[v].type_str()}"
            if label not in e.labels:
                e.labels.append(label)
    for e in edges.values():
        e.shown = e.labels if len(e.labels) <= 3 else e.labels[:2] + [f"+{len(e.labels) - 2} more values"]
    return boxes, list(edges.values())


def _rank(boxes: list[_Box], edges: list[_Edge]) -> None:
    g = nx.DiGraph()
    g.add_nodes_from(b.key for b in boxes)
    g.add_edges_from((e.src, e.dst) for e in edges)
    by_key = {b.key: b for b in boxes}
    order = {b.key: b.order for b in boxes}
    for k in nx.lexicographical_topological_sort(g, key=lambda k: order[k]):
        preds = list(g.predecessors(k))
        by_key[k].rank = max((by_key[p].rank + 1 for p in preds), default=0)


def _add_dummies(boxes: list[_Box], edges: list[_Edge]) -> list[_Box]:
    """Split edges that span several ranks with dummy points, so they route between boxes.
    A long edge's label rides on its first dummy, which is as wide as the label."""
    by_key = {b.key: b for b in boxes}
    # one value fanning out to several boxes of the next rank: label it on the first edge only,
    # so sibling labels in the same gap don't overprint each other
    seen: set[tuple[str, str]] = set()
    for e in edges:
        if by_key[e.dst].rank == by_key[e.src].rank + 1:
            e.shown = [s for s in e.shown if (e.src, s) not in seen]
            seen.update((e.src, s) for s in e.shown)
    out = list(boxes)
    for k, e in enumerate(edges):
        a, b = by_key[e.src], by_key[e.dst]
        e.points = [e.src]
        for r in range(a.rank + 1, b.rank):
            d = _Box(f"d{k}_{r}", a.order, [], "", "", dummy=True, rank=r)
            d.width = 12.0
            if r == a.rank + 1:  # the label sits right of the line: reserve its width on both sides
                d.width = 2 * (max(len(s) for s in e.shown) * LABEL_CHAR_W + 8)
            out.append(d)
            e.points.append(d.key)
        e.points.append(e.dst)
    return out


def _order_rows(boxes: list[_Box], edges: list[_Edge]) -> tuple[list[list[_Box]], dict, dict]:
    """Barycenter ordering: a few down and up sweeps over the ranks. Returns the rows and each
    box's neighbours one rank up and one rank down (dummies included)."""
    n_ranks = max(b.rank for b in boxes) + 1
    rows: list[list[_Box]] = [[] for _ in range(n_ranks)]
    for b in sorted(boxes, key=lambda b: (b.order, b.dummy, b.key)):
        rows[b.rank].append(b)
    up: dict[str, list[str]] = {b.key: [] for b in boxes}
    down: dict[str, list[str]] = {b.key: [] for b in boxes}
    for e in edges:
        for p, q in zip(e.points, e.points[1:]):
            down[p].append(q)
            up[q].append(p)

    def sweep(rng, nbrs):
        for r in rng:
            pos = {b.key: i for i, b in enumerate(rows[r - 1 if nbrs is up else r + 1])}
            def bary(ib):
                i, b = ib
                ps = [pos[k] for k in nbrs[b.key] if k in pos]
                return (sum(ps) / len(ps) if ps else float(i), i)
            rows[r] = [b for _, b in sorted(enumerate(rows[r]), key=bary)]

    for _ in range(4):
        sweep(range(1, n_ranks), up)
        sweep(range(n_ranks - 2, -1, -1), down)
    sweep(range(1, n_ranks), up)
    return rows, up, down


def _place(rows: list[list[_Box]], up: dict, down: dict) -> tuple[float, float]:
    """x: relax each box toward its neighbours' centres, keeping order and spacing; y: by rank."""
    by_key = {b.key: b for row in rows for b in row}
    for row in rows:
        x = 0.0
        for b in row:
            b.x = x + b.width / 2
            x += b.width + COL_GAP

    def settle(row: list[_Box], want: list[float]) -> None:
        for b, w in zip(row, want):
            b.x = w
        for a, b in zip(row, row[1:]):
            b.x = max(b.x, a.x + (a.width + b.width) / 2 + COL_GAP)
        for a, b in reversed(list(zip(row, row[1:]))):
            a.x = min(a.x, b.x - (a.width + b.width) / 2 - COL_GAP)
        shift = sum(w - b.x for b, w in zip(row, want)) / len(row)
        for b in row:
            b.x += shift

    for it in range(24):
        order = list(range(len(rows))) if it % 2 == 0 else list(range(len(rows) - 1, -1, -1))
        nbrs = up if it % 2 == 0 else down
        for r in order:
            want = []
            for b in rows[r]:
                xs = [by_key[k].x for k in nbrs[b.key]] or [by_key[k].x for k in (up[b.key] + down[b.key])] or [b.x]
                want.append(sum(xs) / len(xs))
            settle(rows[r], want)

    left = min(b.x - b.width / 2 for row in rows for b in row)
    right = max(b.x + b.width / 2 for row in rows for b in row)
    y = 0.0
    for row in rows:
        h = max((b.height for b in row if not b.dummy), default=LINE_H)
        for b in row:
            b.x -= left
            if b.dummy:  # a long edge runs straight through the whole row height
                b.y, b.height = y, h
            else:
                b.y = y + (h - b.height) / 2
        y += h + ROW_GAP
    return right - left, y - ROW_GAP


def _ports(edges: list[_Edge], by_key: dict[str, _Box]) -> dict[tuple[int, str], float]:
    """Spread the edges leaving (entering) a box across its bottom (top), ordered by where they go."""
    port: dict[tuple[int, str], float] = {}
    outs: dict[str, list[tuple[float, int]]] = {}
    ins: dict[str, list[tuple[float, int]]] = {}
    for k, e in enumerate(edges):
        outs.setdefault(e.points[0], []).append((by_key[e.points[1]].x, k))
        ins.setdefault(e.points[-1], []).append((by_key[e.points[-2]].x, k))
    for side, groups in (("out", outs), ("in", ins)):
        for key, lst in groups.items():
            b = by_key[key]
            lst.sort()
            span = min(b.width - 2 * PAD_X, 28.0 * (len(lst) - 1))
            for j, (_, k) in enumerate(lst):
                off = 0.0 if len(lst) == 1 else -span / 2 + span * j / (len(lst) - 1)
                port[(k, side)] = b.x + off
    return port


def _edge_svg(k: int, e: _Edge, by_key: dict[str, _Box], port: dict, ox: float, oy: float) -> str:
    src, dst = by_key[e.points[0]], by_key[e.points[-1]]
    pts = [(port[(k, "out")], src.y + src.height)]
    for key in e.points[1:-1]:
        d = by_key[key]
        pts += [(d.x, d.y), (d.x, d.y + d.height)]
    pts.append((port[(k, "in")], dst.y - 2))
    path = f"M{pts[0][0] + ox:.1f},{pts[0][1] + oy:.1f}"
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 == x1:
            path += f" L{x1 + ox:.1f},{y1 + oy:.1f}"
        else:
            my = (y0 + y1) / 2
            path += f" C{x0 + ox:.1f},{my + oy:.1f} {x1 + ox:.1f},{my + oy:.1f} {x1 + ox:.1f},{y1 + oy:.1f}"
    # label: beside the first dummy of a long edge, else in the gap below the source
    if len(e.points) > 2:
        d = by_key[e.points[1]]
        lx, ly = d.x + 5, d.y + d.height / 2 - (len(e.shown) - 1) * 6
    else:
        lx, ly = (pts[0][0] + pts[-1][0]) / 2 + 5, (pts[0][1] + pts[-1][1]) / 2 - (len(e.shown) - 1) * 6 + 3
    text = "".join(
        f'<tspan x="{lx + ox:.1f}" dy="{0 if j == 0 else 12}">{_esc(s)}</tspan>' for j, s in enumerate(e.shown)
    )
    label = (
        f'<text x="{lx + ox:.1f}" y="{ly + oy:.1f}" font-size="{LABEL_FONT}" fill="#444" '
        f'stroke="#fff" stroke-width="3" paint-order="stroke">{text}</text>'
        if e.shown else ""
    )
    return (
        f'<g class="edge" data-src="{_esc(e.src)}" data-dst="{_esc(e.dst)}">'
        f'<title>{_esc(e.src + " -> " + e.dst + ": " + "; ".join(e.labels))}</title>'
        f'<path d="{path}" fill="none" stroke="#777" stroke-width="1.2" marker-end="url(#arrow)"/>{label}</g>'
    )


def _box_svg(b: _Box, ox: float, oy: float) -> str:
    x, y = b.x - b.width / 2 + ox, b.y + oy
    cls = "node op" if b.node_index >= 0 else "node folded"
    data = f' data-node="{b.node_index}" data-op="{_esc(b.op)}"' if b.node_index >= 0 else ""
    dash = "" if b.node_index >= 0 else ' stroke-dasharray="5,3"'
    parts = [
        f'<g class="{cls}"{data}><title>{_esc(b.title)}</title>',
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{b.width:.1f}" height="{b.height:.1f}" rx="5" '
        f'fill="{_esc(b.color)}" stroke="#555"{dash}/>',
    ]
    for j, s in enumerate(b.lines):
        weight = ' font-weight="bold"' if j == 0 else ""
        size = FONT if j == 0 else FONT - 1
        parts.append(
            f'<text x="{x + PAD_X:.1f}" y="{y + PAD_Y + LINE_H * j + 11:.1f}" font-size="{size}"{weight}>{_esc(s)}</text>'
        )
    parts.append("</g>")
    return "".join(parts)


def graph_svg(graph: Graph, layer: int = 0) -> str:
    """An SVG drawing of ``graph`` with decoder ``layer`` expanded and other layers folded."""
    boxes, edges = _display_graph(graph, layer)
    for b in boxes:
        _measure(b)
    _rank(boxes, edges)
    boxes = _add_dummies(boxes, edges)
    rows, up, down = _order_rows(boxes, edges)
    width, height = _place(rows, up, down)
    by_key = {b.key: b for b in boxes}
    port = _ports(edges, by_key)
    m = 20.0
    W, H = width + 2 * m + 200, height + 2 * m
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W:.0f}" height="{H:.0f}" viewBox="0 0 {W:.0f} {H:.0f}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#777"/></marker></defs>',
        f'<rect class="bg" x="0" y="0" width="{W:.0f}" height="{H:.0f}" fill="#fff"/>',
    ]
    out += [_edge_svg(k, e, by_key, port, m, m) for k, e in enumerate(edges)]
    out += [_box_svg(b, m, m) for b in boxes if not b.dummy]
    out.append("</svg>")
    return "\n".join(out)


def graph_html(graph: Graph, layer: int = 0, title: str = "graph") -> str:
    """A self-contained HTML page with ``graph_svg`` and an op colour legend."""
    layers = sorted({layer_of(n.name) for n in graph.nodes} - {None})
    if layers and layer not in layers:
        raise ValueError(f"layer {layer} is not in the graph (layers {layers[0]}..{layers[-1]})")
    ops = []
    for i in drawn_nodes(graph, layer):
        if graph.nodes[i].op not in ops:
            ops.append(graph.nodes[i].op)
    legend = [(op, op_color(op)) for op in ops]
    if len(layers) > 1:
        legend.append(("other layers (folded)", HIDDEN_COLOR))
    sub = [
        _model_line(graph),
        f"{len(graph.nodes)} nodes in all; layer {layer} expanded"
        + (f", layers other than {layer} folded" if len(layers) > 1 else "")
        + ". Edges carry activation values (name, dtype[shape]; T = tokens in the step, B = sequences). "
        "W = weight read, in = step inputs, kv = KV cache written. Hover a node for its full IR line.",
    ]
    return _page(title, sub, legend, graph_svg(graph, layer))


# ---------------------------------------------------------------------------------------------
# the memory plan picture
# ---------------------------------------------------------------------------------------------

PLOT_W, PLOT_H = 1180.0, 620.0
M_LEFT, M_RIGHT, M_TOP, M_BOTTOM = 90.0, 30.0, 40.0, 60.0


def _nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    mag = 10 ** len(str(int(raw))) / 10 if raw >= 1 else 1
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def live_bytes(memory: dict, n_steps: int) -> list[int]:
    """Bytes of arena buffers live at each schedule step 0..n_steps."""
    live = [0] * (n_steps + 1)
    for b in memory["buffers"]:
        for s in range(b["first"], min(b["last"], n_steps) + 1):
            live[s] += b["size"]
    return live


def memory_plan_svg(graph: Graph) -> str:
    """Buffers as rectangles: x = steps first..last (inclusive), y = offset, height = size."""
    mem = graph.meta["memory"]
    n_steps = len(graph.nodes)  # graph outputs stay live to step len(nodes)
    arena, lb = mem["arena_bytes"], mem["lower_bound_bytes"]
    ymax = max(arena, lb, 1) * 1.08
    W, H = M_LEFT + PLOT_W + M_RIGHT, M_TOP + PLOT_H + M_BOTTOM

    def sx(step: float) -> float:
        return M_LEFT + PLOT_W * step / (n_steps + 1)

    def sy(byte: float) -> float:
        return M_TOP + PLOT_H * (1 - byte / ymax)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W:.0f}" height="{H:.0f}" viewBox="0 0 {W:.0f} {H:.0f}">',
        f'<rect class="bg" x="0" y="0" width="{W:.0f}" height="{H:.0f}" fill="#fff"/>',
        f'<rect class="plot" x="{M_LEFT}" y="{M_TOP}" width="{PLOT_W}" height="{PLOT_H}" fill="#fafafa" stroke="#999"/>',
    ]
    # layer boundaries: faint vertical lines where each layer's first node sits
    starts: list[tuple[int, int]] = []
    for i, n in enumerate(graph.nodes):
        lay = layer_of(n.name)
        if lay is not None and (not starts or starts[-1][1] != lay) and lay not in [s[1] for s in starts]:
            starts.append((i, lay))
    every = max(1, -(-len(starts) // 16))
    for j, (i, lay) in enumerate(starts):
        out.append(f'<line class="layer" x1="{sx(i):.1f}" y1="{M_TOP}" x2="{sx(i):.1f}" y2="{M_TOP + PLOT_H}" '
                   'stroke="#ddd" stroke-width="1"/>')
        if j % every == 0:
            out.append(f'<text x="{sx(i) + 2:.1f}" y="{M_TOP - 6}" font-size="10" fill="#888">l{lay}</text>')
    # buffers
    prod_op = [n.op for n in graph.nodes]
    for b in sorted(mem["buffers"], key=lambda b: b["id"]):
        x0, x1 = sx(b["first"]), sx(b["last"] + 1)
        y0, y1 = sy(b["offset"] + b["size"]), sy(b["offset"])
        op = prod_op[b["first"]] if b["first"] < len(prod_op) else "?"
        names = b["values"]
        shown = "\n".join(names[:24]) + (f"\n... +{len(names) - 24} more" if len(names) > 24 else "")
        title = (f"buffer {b['id']} ({op}): {len(names)} value(s)\n"
                 f"offset {b['offset']:,} .. {b['offset'] + b['size']:,}  ({b['size']:,} bytes, {_mib(b['size'])})\n"
                 f"steps {b['first']} .. {b['last']}\n{shown}")
        out.append(
            f'<rect class="buf" data-buffer="{b["id"]}" x="{x0:.2f}" y="{y0:.2f}" width="{max(x1 - x0, 1):.2f}" '
            f'height="{max(y1 - y0, 1):.2f}" fill="{_esc(op_color(op))}" stroke="#fff" stroke-width="0.6">'
            f"<title>{_esc(title)}</title></rect>"
        )
        label = _short(names[0]) + (f" +{len(names) - 1}" if len(names) > 1 else "")
        if x1 - x0 > len(label) * 5.6 + 6 and y1 - y0 > 13:
            out.append(f'<text x="{x0 + 3:.1f}" y="{y1 - 4:.1f}" font-size="9" fill="#333" '
                       f'pointer-events="none">{_esc(label)}</text>')
    # live bytes at each step: the lower bound is its maximum
    live = live_bytes(mem, n_steps)
    pts = []
    for s, v in enumerate(live):
        pts += [f"{sx(s):.1f},{sy(v):.1f}", f"{sx(s + 1):.1f},{sy(v):.1f}"]
    out.append(f'<polyline class="live" points="{" ".join(pts)}" fill="none" stroke="#222" stroke-width="0.8" '
               'stroke-opacity="0.55"><title>bytes live at each step</title></polyline>')
    # arena size and lower bound
    out.append(f'<line class="arena" x1="{M_LEFT}" y1="{sy(arena):.1f}" x2="{M_LEFT + PLOT_W}" y2="{sy(arena):.1f}" '
               'stroke="#444" stroke-width="1.5"/>')
    out.append(f'<text x="{M_LEFT + 4}" y="{sy(arena) - 5:.1f}" font-size="11" fill="#444">'
               f"arena {_esc(_mib(arena))}</text>")
    out.append(f'<line class="lower-bound" x1="{M_LEFT}" y1="{sy(lb):.1f}" x2="{M_LEFT + PLOT_W}" y2="{sy(lb):.1f}" '
               'stroke="#d62728" stroke-width="1.5" stroke-dasharray="6,4"/>')
    out.append(f'<text x="{M_LEFT + PLOT_W - 4}" y="{sy(lb) - 5:.1f}" font-size="11" fill="#d62728" '
               f'text-anchor="end">lower bound {_esc(_mib(lb))}</text>')
    # axes
    ystep = _nice_step(ymax / 2**20, 8) * 2**20
    v = 0.0
    while v <= ymax:
        out.append(f'<line x1="{M_LEFT - 5}" y1="{sy(v):.1f}" x2="{M_LEFT}" y2="{sy(v):.1f}" stroke="#666"/>')
        out.append(f'<text x="{M_LEFT - 8}" y="{sy(v) + 4:.1f}" font-size="11" text-anchor="end">'
                   f"{v / 2**20:g}</text>")
        v += ystep
    xstep = max(1, int(_nice_step(n_steps + 1, 14)))
    for s in range(0, n_steps + 1, xstep):
        out.append(f'<line x1="{sx(s):.1f}" y1="{M_TOP + PLOT_H}" x2="{sx(s):.1f}" y2="{M_TOP + PLOT_H + 5}" stroke="#666"/>')
        out.append(f'<text x="{sx(s):.1f}" y="{M_TOP + PLOT_H + 18}" font-size="11" text-anchor="middle">{s}</text>')
    out.append(f'<text x="{M_LEFT + PLOT_W / 2}" y="{H - 14}" font-size="12" text-anchor="middle">'
               "schedule step (node index in graph.txt order; a buffer spans its first..last step)</text>")
    out.append(f'<text transform="translate(22,{M_TOP + PLOT_H / 2}) rotate(-90)" font-size="12" '
               'text-anchor="middle">arena offset (MiB)</text>')
    out.append("</svg>")
    return "\n".join(out)


def memory_plan_html(graph: Graph, title: str = "memory plan") -> str:
    """A self-contained HTML page with ``memory_plan_svg`` and a legend of producing ops."""
    mem = graph.meta["memory"]
    arena, lb = mem["arena_bytes"], mem["lower_bound_bytes"]
    ops = []
    for b in sorted(mem["buffers"], key=lambda b: b["first"]):
        op = graph.nodes[b["first"]].op
        if op not in ops:
            ops.append(op)
    sub = [
        _model_line(graph),
        f"arena {arena:,} bytes ({_mib(arena)}), lower bound {lb:,} bytes ({_mib(lb)}), "
        f"ratio {arena / lb if lb else 1.0:.3f}; {len(mem['buffers'])} buffers. "
        f"Outside the arena: weights {_mib(mem['weight_bytes'])}, KV cache {_mib(mem['kv_cache_bytes'])}, "
        f"step inputs {mem['input_bytes']:,} bytes.",
        "Each rectangle is one buffer, coloured by the op that first writes it; a buffer holding several values "
        "is reused in place. The black staircase is bytes live per step; hover a buffer for its values.",
    ]
    legend = [(f"written by {op}", op_color(op)) for op in ops]
    return _page(title, sub, legend, memory_plan_svg(graph))
