"""A small layered (Sugiyama-style) drawing of a DAG of boxes: longest-path ranks, dummy points on
long edges, barycenter ordering, relaxed x positions, and edge ports spread along box sides."""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

FONT = 12  # px, monospace
CHAR_W = 7.3  # px per character at FONT (DejaVu Sans Mono is 0.6 em)
LINE_H = 15
PAD_X, PAD_Y = 10, 6
ROW_GAP = 56  # vertical room between ranks for edge labels
COL_GAP = 36
LABEL_FONT = 10
LABEL_CHAR_W = 6.1


@dataclass
class Box:
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
class Edge:
    src: str
    dst: str
    labels: list[str]  # every value the edge carries (hover title)
    shown: list[str] = field(default_factory=list)  # the labels drawn
    points: list[str] = field(default_factory=list)  # box keys from src through dummies to dst


def measure(b: Box) -> None:
    if b.dummy:
        return
    b.width = max(len(s) for s in b.lines) * CHAR_W + 2 * PAD_X
    b.height = len(b.lines) * LINE_H + 2 * PAD_Y


def rank(boxes: list[Box], edges: list[Edge]) -> None:
    g = nx.DiGraph()
    g.add_nodes_from(b.key for b in boxes)
    g.add_edges_from((e.src, e.dst) for e in edges)
    by_key = {b.key: b for b in boxes}
    order = {b.key: b.order for b in boxes}
    for k in nx.lexicographical_topological_sort(g, key=lambda k: order[k]):
        preds = list(g.predecessors(k))
        by_key[k].rank = max((by_key[p].rank + 1 for p in preds), default=0)


def add_dummies(boxes: list[Box], edges: list[Edge]) -> list[Box]:
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
            d = Box(f"d{k}_{r}", a.order, [], "", "", dummy=True, rank=r)
            d.width = 12.0
            if r == a.rank + 1:  # the label sits right of the line: reserve its width on both sides
                d.width = 2 * (max(len(s) for s in e.shown) * LABEL_CHAR_W + 8)
            out.append(d)
            e.points.append(d.key)
        e.points.append(e.dst)
    return out


def order_rows(boxes: list[Box], edges: list[Edge]) -> tuple[list[list[Box]], dict, dict]:
    """Barycenter ordering: a few down and up sweeps over the ranks. Returns the rows and each
    box's neighbours one rank up and one rank down (dummies included)."""
    n_ranks = max(b.rank for b in boxes) + 1
    rows: list[list[Box]] = [[] for _ in range(n_ranks)]
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


def place(rows: list[list[Box]], up: dict, down: dict) -> tuple[float, float]:
    """x: relax each box toward its neighbours' centres, keeping order and spacing; y: by rank."""
    by_key = {b.key: b for row in rows for b in row}
    for row in rows:
        x = 0.0
        for b in row:
            b.x = x + b.width / 2
            x += b.width + COL_GAP

    def settle(row: list[Box], want: list[float]) -> None:
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


def ports(edges: list[Edge], by_key: dict[str, Box]) -> dict[tuple[int, str], float]:
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
