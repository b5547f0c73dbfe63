"""The fused-graph picture: one decoder layer expanded plus the prologue and epilogue; the other
layers fold into one box per contiguous run. Nodes are coloured by op, edges labelled with the
values they carry and their types."""

from __future__ import annotations

from llamagraph.ir import ACTIVATION, INPUT, KV_CACHE, WEIGHT, Graph, Node

from .layout import (
    FONT, LABEL_FONT, LINE_H, PAD_X, PAD_Y, Box, Edge, add_dummies, measure, order_rows, place,
    ports, rank,
)
from .page import HIDDEN_COLOR, esc, model_line, op_color, page, short_name


def layer_of(node: Node) -> int | None:
    """The decoder layer a node computes (None: outside the layers)."""
    return node.layer


def drawn_nodes(graph: Graph, layer: int = 0) -> list[int]:
    """Indices of the nodes ``graph_html`` draws as ops: one layer plus everything outside layers."""
    return [i for i, n in enumerate(graph.nodes) if n.layer in (None, layer)]


def _op_box(graph: Graph, i: int) -> Box:
    n = graph.nodes[i]
    lines = [n.op, ", ".join(short_name(graph, o) for o in n.outputs if graph.values[o].kind == ACTIVATION)
             or short_name(graph, n.outputs[0])]
    weights = [graph.values[v] for v in n.inputs if graph.values[v].kind == WEIGHT]
    lines += [f"{'b' if w.role == 'bias' else 'W'} {w.type_str()}" for w in weights]
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
    return Box(f"n{i}", i, lines, op_color(n.op), title, op=n.op, node_index=i)


def _folded_box(graph: Graph, run: list[int], k: int) -> Box:
    layers = sorted({layer_of(graph.nodes[i]) for i in run} - {None})
    span = f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
    counts: dict[str, int] = {}
    for i in run:
        counts[graph.nodes[i].op] = counts.get(graph.nodes[i].op, 0) + 1
    lines = [span, f"{len(run)} nodes, same as the layer drawn"]
    title = f"{span} folded: nodes [{run[0]}..{run[-1]}]\n" + "\n".join(f"{op} x{c}" for op, c in sorted(counts.items()))
    return Box(f"h{k}", run[0], lines, HIDDEN_COLOR, title, op="(folded)")


def _display_graph(graph: Graph, layer: int) -> tuple[list[Box], list[Edge]]:
    """Boxes for drawn ops and folded runs of other layers; edges merged per box pair."""
    keep = set(drawn_nodes(graph, layer))
    boxes: list[Box] = []
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
    edges: dict[tuple[str, str], Edge] = {}
    for i, n in enumerate(graph.nodes):
        dst = box_of[i]
        for v in n.inputs:
            if v not in prod:
                continue
            src = box_of[prod[v]]
            if src == dst:
                continue
            e = edges.setdefault((src, dst), Edge(src, dst, []))
            # inside the drawn layer short names read best; across a fold, the full name says which layer
            name = v if src.startswith("h") or dst.startswith("h") else short_name(graph, v)
            label = f"{name} {graph.values[v].type_str()}"
            if label not in e.labels:
                e.labels.append(label)
    for e in edges.values():
        e.shown = e.labels if len(e.labels) <= 3 else e.labels[:2] + [f"+{len(e.labels) - 2} more values"]
    return boxes, list(edges.values())


def _edge_svg(k: int, e: Edge, by_key: dict[str, Box], port: dict, ox: float, oy: float) -> str:
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
        f'<tspan x="{lx + ox:.1f}" dy="{0 if j == 0 else 12}">{esc(s)}</tspan>' for j, s in enumerate(e.shown)
    )
    label = (
        f'<text x="{lx + ox:.1f}" y="{ly + oy:.1f}" font-size="{LABEL_FONT}" fill="#444" '
        f'stroke="#fff" stroke-width="3" paint-order="stroke">{text}</text>'
        if e.shown else ""
    )
    return (
        f'<g class="edge" data-src="{esc(e.src)}" data-dst="{esc(e.dst)}">'
        f'<title>{esc(e.src + " -> " + e.dst + ": " + "; ".join(e.labels))}</title>'
        f'<path d="{path}" fill="none" stroke="#777" stroke-width="1.2" marker-end="url(#arrow)"/>{label}</g>'
    )


def _box_svg(b: Box, ox: float, oy: float) -> str:
    x, y = b.x - b.width / 2 + ox, b.y + oy
    cls = "node op" if b.node_index >= 0 else "node folded"
    data = f' data-node="{b.node_index}" data-op="{esc(b.op)}"' if b.node_index >= 0 else ""
    dash = "" if b.node_index >= 0 else ' stroke-dasharray="5,3"'
    parts = [
        f'<g class="{cls}"{data}><title>{esc(b.title)}</title>',
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{b.width:.1f}" height="{b.height:.1f}" rx="5" '
        f'fill="{esc(b.color)}" stroke="#555"{dash}/>',
    ]
    for j, s in enumerate(b.lines):
        weight = ' font-weight="bold"' if j == 0 else ""
        size = FONT if j == 0 else FONT - 1
        parts.append(
            f'<text x="{x + PAD_X:.1f}" y="{y + PAD_Y + LINE_H * j + 11:.1f}" font-size="{size}"{weight}>{esc(s)}</text>'
        )
    parts.append("</g>")
    return "".join(parts)


def graph_svg(graph: Graph, layer: int = 0) -> str:
    """An SVG drawing of ``graph`` with decoder ``layer`` expanded and other layers folded."""
    boxes, edges = _display_graph(graph, layer)
    for b in boxes:
        measure(b)
    rank(boxes, edges)
    boxes = add_dummies(boxes, edges)
    rows, up, down = order_rows(boxes, edges)
    width, height = place(rows, up, down)
    by_key = {b.key: b for b in boxes}
    port = ports(edges, by_key)
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
    layers = sorted({layer_of(n) for n in graph.nodes} - {None})
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
        model_line(graph),
        f"{len(graph.nodes)} nodes in all; layer {layer} expanded"
        + (f", layers other than {layer} folded" if len(layers) > 1 else "")
        + ". Edges carry activation values (name, dtype[shape]; T = tokens in the step, B = sequences). "
        "W = weight read, in = step inputs, kv = KV cache written. Hover a node for its full IR line.",
    ]
    return page(title, sub, legend, graph_svg(graph, layer))
