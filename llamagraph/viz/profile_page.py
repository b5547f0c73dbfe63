"""The picture of a decode-step profile: one horizontal bar per kernel, grouped by layer.

Rows are plain dicts (as ``llamagraph profile --json`` writes them): ``index``, ``group``
("embedding", "layer <i>", "head"), ``op``, ``node``, ``kernel``, ``us``, ``bytes``, ``gb_s``,
``pct_copy``. Bars run in launch order; a bar's length is its time, its colour its op, and
its tooltip names the kernel with its time, bytes and bandwidth. Consecutive rows of one
group share a band labelled with the group's kernel count and summed time.
"""

from __future__ import annotations

from .page import esc, op_color, page

ROW_H = 16  # one kernel
HEAD_H = 20  # a group's label row
LABEL_W = 260  # op / node names left of the bars
PLOT_W = 640  # the longest bar
VALUE_W = 150  # the us / GB/s text right of the bars
TOP = 28  # the scale


def _groups(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """Consecutive rows of the same group (a layer's kernels run together in a decode step)."""
    out: list[tuple[str, list[dict]]] = []
    for r in rows:
        if out and out[-1][0] == r["group"]:
            out[-1][1].append(r)
        else:
            out.append((r["group"], [r]))
    return out


def _tick(most: float) -> float:
    """A round scale step giving about 5 ticks up to ``most``."""
    step = 10 ** max(-2, len(str(int(most / 5))) - 1) if most >= 5 else 1.0
    while most / step > 8:
        step *= 2
    return step


def profile_svg(rows: list[dict]) -> str:
    groups = _groups(rows)
    most = max((r["us"] for r in rows), default=1.0) or 1.0
    scale = PLOT_W / most
    height = TOP + sum(HEAD_H + ROW_H * len(g) for _, g in groups) + 8
    width = LABEL_W + PLOT_W + VALUE_W
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-size="11">']
    step = _tick(most)
    t = 0.0
    while t <= most + 1e-9:  # the scale: a tick and a light rule every ``step`` us
        x = LABEL_W + t * scale
        parts.append(f'<line x1="{x:.1f}" y1="{TOP - 6}" x2="{x:.1f}" y2="{height - 4}" stroke="#e4e4e4"/>')
        parts.append(f'<text x="{x:.1f}" y="{TOP - 10}" text-anchor="middle" fill="#666">{t:g}</text>')
        t += step
    parts.append(f'<text x="{LABEL_W + PLOT_W + 8}" y="{TOP - 10}" fill="#666">us</text>')
    y = TOP
    for k, (name, members) in enumerate(groups):
        h = HEAD_H + ROW_H * len(members)
        total = sum(r["us"] for r in members)
        parts.append(f'<g class="group" data-group="{esc(name)}">')
        parts.append(f'<rect class="band" x="0" y="{y}" width="{width}" height="{h}" '
                     f'fill="{"#f7f7f7" if k % 2 == 0 else "#ffffff"}"/>')
        parts.append(f'<text x="4" y="{y + 14}" font-weight="bold">{esc(name)}: {len(members)} kernels, '
                     f'{total:.1f} us</text>')
        y += HEAD_H
        for r in members:
            w = max(r["us"] * scale, 1.0)
            tip = (f'#{r["index"]} {r["kernel"]} ({r["op"]}, {r["node"]}): {r["us"]:.2f} us, {r["bytes"]:,} bytes, '
                   f'{r["gb_s"]:.0f} GB/s, {r["pct_copy"]:.1f}% of copy bandwidth')
            parts.append(f'<g class="kernel"><title>{esc(tip)}</title>')
            parts.append(f'<text x="12" y="{y + 12}">{esc(r["op"])} <tspan fill="#777">{esc(r["node"])}</tspan></text>')
            parts.append(f'<rect class="bar" x="{LABEL_W}" y="{y + 2}" width="{w:.1f}" height="{ROW_H - 4}" '
                         f'fill="{esc(op_color(r["op"]))}" stroke="#666" stroke-width="0.5"/>')
            parts.append(f'<text x="{LABEL_W + w + 4:.1f}" y="{y + 12}" fill="#333">{r["us"]:.2f} us, '
                         f'{r["gb_s"]:.0f} GB/s</text></g>')
            y += ROW_H
        parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts)


def profile_html(rows: list[dict], title: str = "decode step profile", subtitle: list[str] | None = None) -> str:
    """A self-contained page (inline SVG and CSS, nothing fetched) of ``profile_svg(rows)``."""
    ops = list(dict.fromkeys(r["op"] for r in rows))
    return page(title, list(subtitle or []), [(op, op_color(op)) for op in ops], profile_svg(rows))
