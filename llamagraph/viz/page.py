"""The frame every picture shares: colours per op, the page around an SVG, small formatting."""

from __future__ import annotations

import html
import zlib

from llamagraph.ir import Graph

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
    # collectives across tensor-parallel ranks: a loud magenta, so the communication stands out
    "all_reduce": "#e7298a",
    "all_gather_vocab": "#e7298a",
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


def esc(s) -> str:
    return html.escape(str(s), quote=True)


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def short_name(graph: Graph, name: str) -> str:
    """A value's name without its layer prefix (``l3.q_rot`` -> ``q_rot``), for labels inside one layer."""
    v = graph.values.get(name)
    layer = v.layer if v is not None else None
    prefix = f"l{layer}." if layer is not None else ""
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


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


def page(title: str, subtitle: list[str], legend: list[tuple[str, str]], svg: str) -> str:
    keys = "".join(
        f'<span class="key"><span class="sw" style="background:{esc(c)}"></span>{esc(k)}</span>' for k, c in legend
    )
    subs = "".join(f'<p class="sub">{esc(s)}</p>' for s in subtitle)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8"/>\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n{subs}\n"
        f'<div class="legend">{keys}</div>\n{svg}\n</body>\n</html>\n'
    )


def model_line(graph: Graph) -> str:
    m = graph.meta
    cfg = m.get("config", {})
    parts = [f"{m.get('dtype', '?')}", f"max_batch {m.get('max_batch', '?')}", f"max_seq {m.get('max_seq', '?')}",
             f"max_tokens {m.get('max_tokens', '?')}"]
    if cfg:
        parts.insert(0, f"{cfg.get('num_layers')} layers, hidden {cfg.get('hidden_size')}")
    return ", ".join(str(p) for p in parts)
