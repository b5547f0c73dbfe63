"""Offline pictures of a compiled graph: the fused graph and the memory plan, as HTML + SVG.

Both pages are self-contained (inline SVG and CSS, no JavaScript, nothing fetched), viewable
offline in a browser, well-formed XML, and deterministic: the same graph gives the same bytes
(no ``hash()``, no set iteration), so pictures diff cleanly between compiles.

- ``graph_html`` (``graph_page``): one decoder layer expanded plus the prologue and epilogue;
  the other layers fold into one box per contiguous run, laid out by ``layout`` (a small
  layered drawing).
- ``memory_plan_html`` (``memory_page``): each arena buffer as a rectangle, x = schedule steps
  first..last, y = byte offset, height = size; a line at the lower bound and the live-bytes curve.
- ``profile_html`` (``profile_page``): a decode-step profile (``llamagraph profile``), one bar
  per kernel (length = microseconds), grouped by layer; drawn from plain rows, not the graph.

Pictures read only the graph (layers, roles and the memory plan are on its values and nodes).
"""

from .graph_page import drawn_nodes, graph_html, graph_svg, layer_of
from .memory_page import M_BOTTOM, M_LEFT, M_RIGHT, M_TOP, PLOT_H, PLOT_W, live_bytes, memory_plan_html, memory_plan_svg
from .page import HIDDEN_COLOR, OP_COLORS, op_color
from .profile_page import profile_html, profile_svg

__all__ = [
    "HIDDEN_COLOR", "M_BOTTOM", "M_LEFT", "M_RIGHT", "M_TOP", "OP_COLORS", "PLOT_H", "PLOT_W", "drawn_nodes",
    "graph_html", "graph_svg", "layer_of", "live_bytes", "memory_plan_html", "memory_plan_svg", "op_color",
    "profile_html", "profile_svg",
]
