"""The memory-plan picture: each arena buffer as a rectangle, x = schedule steps first..last,
y = byte offset, height = size; a line at the lower bound and the live-bytes curve."""

from __future__ import annotations

from llamagraph.ir import Graph
from llamagraph.ir.memory import Buffer, buffers

from .page import esc, mib, model_line, op_color, page, short_name

PLOT_W, PLOT_H = 1180.0, 620.0
M_LEFT, M_RIGHT, M_TOP, M_BOTTOM = 90.0, 30.0, 40.0, 60.0


def _nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    mag = 10 ** len(str(int(raw))) / 10 if raw >= 1 else 1
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def live_bytes(bufs: list[Buffer], n_steps: int) -> list[int]:
    """Bytes of arena buffers live at each schedule step 0..n_steps."""
    live = [0] * (n_steps + 1)
    for b in bufs:
        for s in range(b.first, min(b.last, n_steps) + 1):
            live[s] += b.size
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
        lay = n.layer
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
    bufs = buffers(graph)
    for b in bufs:
        x0, x1 = sx(b.first), sx(b.last + 1)
        y0, y1 = sy(b.offset + b.size), sy(b.offset)
        op = prod_op[b.first] if b.first < len(prod_op) else "?"
        names = b.values
        shown = "\n".join(names[:24]) + (f"\n... +{len(names) - 24} more" if len(names) > 24 else "")
        title = (f"buffer {b.id} ({op}): {len(names)} value(s)\n"
                 f"offset {b.offset:,} .. {b.offset + b.size:,}  ({b.size:,} bytes, {mib(b.size)})\n"
                 f"steps {b.first} .. {b.last}\n{shown}")
        out.append(
            f'<rect class="buf" data-buffer="{b.id}" x="{x0:.2f}" y="{y0:.2f}" width="{max(x1 - x0, 1):.2f}" '
            f'height="{max(y1 - y0, 1):.2f}" fill="{esc(op_color(op))}" stroke="#fff" stroke-width="0.6">'
            f"<title>{esc(title)}</title></rect>"
        )
        label = short_name(graph, names[0]) + (f" +{len(names) - 1}" if len(names) > 1 else "")
        if x1 - x0 > len(label) * 5.6 + 6 and y1 - y0 > 13:
            out.append(f'<text x="{x0 + 3:.1f}" y="{y1 - 4:.1f}" font-size="9" fill="#333" '
                       f'pointer-events="none">{esc(label)}</text>')
    # live bytes at each step: the lower bound is its maximum
    live = live_bytes(bufs, n_steps)
    pts = []
    for s, v in enumerate(live):
        pts += [f"{sx(s):.1f},{sy(v):.1f}", f"{sx(s + 1):.1f},{sy(v):.1f}"]
    out.append(f'<polyline class="live" points="{" ".join(pts)}" fill="none" stroke="#222" stroke-width="0.8" '
               'stroke-opacity="0.55"><title>bytes live at each step</title></polyline>')
    # arena size and lower bound
    out.append(f'<line class="arena" x1="{M_LEFT}" y1="{sy(arena):.1f}" x2="{M_LEFT + PLOT_W}" y2="{sy(arena):.1f}" '
               'stroke="#444" stroke-width="1.5"/>')
    out.append(f'<text x="{M_LEFT + 4}" y="{sy(arena) - 5:.1f}" font-size="11" fill="#444">'
               f"arena {esc(mib(arena))}</text>")
    out.append(f'<line class="lower-bound" x1="{M_LEFT}" y1="{sy(lb):.1f}" x2="{M_LEFT + PLOT_W}" y2="{sy(lb):.1f}" '
               'stroke="#d62728" stroke-width="1.5" stroke-dasharray="6,4"/>')
    out.append(f'<text x="{M_LEFT + PLOT_W - 4}" y="{sy(lb) - 5:.1f}" font-size="11" fill="#d62728" '
               f'text-anchor="end">lower bound {esc(mib(lb))}</text>')
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
    for b in sorted(buffers(graph), key=lambda b: b.first):
        op = graph.nodes[b.first].op
        if op not in ops:
            ops.append(op)
    sub = [
        model_line(graph),
        f"arena {arena:,} bytes ({mib(arena)}), lower bound {lb:,} bytes ({mib(lb)}), "
        f"ratio {arena / lb if lb else 1.0:.3f}; {mem['buffers']} buffers. "
        f"Outside the arena: weights {mib(mem['weight_bytes'])}, KV cache {mib(mem['kv_cache_bytes'])}, "
        f"step inputs {mem['input_bytes']:,} bytes.",
        "Each rectangle is one buffer, coloured by the op that first writes it; a buffer holding several values "
        "is reused in place. The black staircase is bytes live per step; hover a buffer for its values.",
    ]
    legend = [(f"written by {op}", op_color(op)) for op in ops]
    return page(title, sub, legend, memory_plan_svg(graph))
