"""The text form of a graph: what ``str(graph)`` prints and ``Graph.from_text`` parses back.

One statement per line; lines starting with ``#`` are comments::

    graph llama (T=4, B=1)                                  name and the max size of each symbolic dim
      meta {"dtype":"float32",...}                          every meta key but the name, as JSON
      input %tokens: i32[T]                                 step inputs
      weight @l0.qkv.w: f32[192,64] {layer=0, role="matrix", parts=[...]}
      cache %kv.l0.k: f32[1,64,2,16] {layer=0, layout={"kind":"dense"}}
      %l0.attn_in: f32[T,64] {layer=0} = rmsnorm(%x0, @l0.attn_norm.w) {eps=1e-05} loc(layer=0)
      return %logits, %next_token

A node line declares its outputs (an output with an ``alias`` field is a KV-cache update, any
other is an activation); an output belongs to its node's layer unless its fields say another. ``{key=value, ...}`` blocks hold JSON values: a value's fields
(``Value.fields``: layer, role, quant, shard, layout, attrs), then a node's op attributes.
``loc(...)`` holds where a node sits: its layer, and its name where that is not its first
output's. ``@`` marks weights, ``%`` every other value.
"""

from __future__ import annotations

import json
import re

from .dtypes import BY_SHORT
from .errors import GraphError
from .graph import ACTIVATION, INPUT, KV_CACHE, WEIGHT, Graph, Node, Value

DECL = {INPUT: "input", WEIGHT: "weight", KV_CACHE: "cache"}
KIND_OF_DECL = {v: k for k, v in DECL.items()}


def _json(v) -> str:
    return json.dumps(v, separators=(",", ":"), sort_keys=True)


def _block(items: dict) -> str:
    return "{" + ", ".join(f"{k}={_json(v)}" for k, v in items.items()) + "}"


def _sigil(v: Value) -> str:
    return "@" if v.kind == WEIGHT else "%"


def _decl(v: Value, layer=...) -> str:
    f = v.fields()
    if layer is not ...:  # a node's outputs belong to its layer unless they say otherwise
        f.pop("layer", None)
        if v.layer != layer:
            f = {"layer": v.layer, **f}
    return f"{_sigil(v)}{v.name}: {v.type_str()}" + (f" {_block(f)}" if f else "")


def print_graph(g: Graph) -> str:
    dims = ", ".join(f"{k}={v}" for k, v in g.dims.items())
    name = g.meta.get("name")
    lines = [f"graph {name} ({dims})" if name else f"graph ({dims})"]
    meta = {k: v for k, v in g.meta.items() if k != "name"}
    if meta:
        lines.append(f"  meta {_json(meta)}")
    for kind in (INPUT, WEIGHT, KV_CACHE):
        lines += [f"  {DECL[kind]} {_decl(v)}" for v in g.values.values() if v.kind == kind and "alias" not in v.attrs]
    for n in g.nodes:
        outs = ", ".join(_decl(g.values[o], n.layer) for o in n.outputs)
        ins = ", ".join(_sigil(g.values[i]) + i for i in n.inputs)
        line = f"  {outs} = {n.op}({ins})"
        if n.attrs:
            line += " " + _block(dict(sorted(n.attrs.items())))
        loc = {}
        if n.layer is not None:
            loc["layer"] = n.layer
        if n.name != (n.outputs[0] if n.outputs else ""):
            loc["name"] = n.name
        if loc:
            line += " loc(" + ", ".join(f"{k}={_json(v)}" for k, v in loc.items()) + ")"
        lines.append(line)
    lines.append("  return " + ", ".join(f"%{o}" for o in g.outputs))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9_.]+")
_SPACE = re.compile(r"[ \t]*")
_DECODER = json.JSONDecoder()


class _Line:
    """A cursor over one line, with errors that name the line and column."""

    def __init__(self, text: str, lineno: int):
        self.s, self.i, self.lineno = text, 0, lineno

    def fail(self, msg: str):
        return GraphError(f"line {self.lineno}, column {self.i + 1}: {msg}: {self.s.strip()!r}")

    def skip(self) -> None:
        self.i = _SPACE.match(self.s, self.i).end()

    def peek(self, tok: str) -> bool:
        self.skip()
        return self.s.startswith(tok, self.i)

    def eat(self, tok: str) -> bool:
        if self.peek(tok):
            self.i += len(tok)
            return True
        return False

    def expect(self, tok: str) -> None:
        if not self.eat(tok):
            raise self.fail(f"expected {tok!r}")

    def name(self) -> str:
        self.skip()
        m = _NAME.match(self.s, self.i)
        if not m:
            raise self.fail("expected a name")
        self.i = m.end()
        return m.group()

    def ref(self) -> tuple[str, str]:
        self.skip()
        sigil = self.s[self.i : self.i + 1]
        if sigil not in ("%", "@"):
            raise self.fail("expected %value or @weight")
        self.i += 1
        return sigil, self.name()

    def json(self):
        self.skip()
        try:
            v, self.i = _DECODER.raw_decode(self.s, self.i)
        except json.JSONDecodeError as e:
            raise self.fail(f"bad JSON value ({e.msg})") from None
        return v

    def type(self) -> tuple[str, tuple]:
        short = self.name()
        if short not in BY_SHORT:
            raise self.fail(f"unknown dtype {short!r}")
        self.expect("[")
        shape: list = []
        while not self.eat("]"):
            if shape:
                self.expect(",")
            d = self.name()
            shape.append(int(d) if d.isdigit() else d)
        return BY_SHORT[short], tuple(shape)

    def items(self, close: str) -> dict:
        """``key=json, ...`` up to ``close`` (the opener is already eaten)."""
        out: dict = {}
        while not self.eat(close):
            if out:
                self.expect(",")
            key = self.name()
            self.expect("=")
            out[key] = self.json()
        return out

    def decl(self) -> tuple[str, str, str, tuple, dict]:
        sigil, name = self.ref()
        self.expect(":")
        dtype, shape = self.type()
        fields = self.items("}") if self.eat("{") else {}
        return sigil, name, dtype, shape, fields

    def end(self) -> None:
        self.skip()
        if self.i != len(self.s):
            raise self.fail("unexpected text")


def parse_graph(text: str) -> Graph:
    g = Graph()
    header = False
    for lineno, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        ln = _Line(raw, lineno)
        if not header:
            ln.expect("graph")
            if not ln.peek("("):
                g.meta["name"] = ln.name()
            ln.expect("(")
            g.dims = ln.items(")")
            ln.end()
            header = True
            continue
        if ln.eat("meta "):
            g.meta.update(ln.json())
        elif ln.eat("return"):
            g.outputs = []
            ln.skip()
            while ln.i < len(ln.s.rstrip()):
                if g.outputs:
                    ln.expect(",")
                g.outputs.append(ln.ref()[1])
                ln.skip()
        elif any(ln.peek(d + " ") for d in KIND_OF_DECL):
            kind = KIND_OF_DECL[ln.name()]
            sigil, name, dtype, shape, fields = ln.decl()
            if (sigil == "@") != (kind == WEIGHT):
                raise ln.fail(f"{'weights' if kind == WEIGHT else 'non-weights'} are written with {'@' if kind == WEIGHT else '%'}")
            _add(g, ln, Value.from_fields(name, shape, dtype, kind, fields))
        else:
            g.nodes.append(_node(g, ln))
        ln.end()
    if not header:
        raise GraphError("line 1: expected 'graph (...)'")
    return g


def _add(g: Graph, ln: _Line, v: Value) -> None:
    if v.name in g.values:
        raise ln.fail(f"value %{v.name} is declared twice")
    g.values[v.name] = v


def _node(g: Graph, ln: _Line) -> Node:
    outputs, inherit = [], []
    while True:
        _, name, dtype, shape, fields = ln.decl()
        kind = KV_CACHE if "alias" in fields else ACTIVATION
        _add(g, ln, Value.from_fields(name, shape, dtype, kind, fields))
        outputs.append(name)
        if "layer" not in fields:
            inherit.append(name)
        if not ln.eat(","):
            break
    ln.expect("=")
    op = ln.name()
    ln.expect("(")
    inputs = []
    while not ln.eat(")"):
        if inputs:
            ln.expect(",")
        inputs.append(ln.ref()[1])
    attrs = ln.items("}") if ln.eat("{") else {}
    loc = ln.items(")") if ln.eat("loc(") else {}
    unknown = set(loc) - {"layer", "name"}
    if unknown:
        raise ln.fail(f"unknown loc field(s) {sorted(unknown)}")
    for name in inherit:
        g.values[name].layer = loc.get("layer")
    return Node(op, inputs, outputs, attrs, loc.get("name", outputs[0]), loc.get("layer"))

