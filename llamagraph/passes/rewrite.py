"""Pattern -> replacement rewriting, the machinery under every local fusion pass.

A pattern is a tree of ``Pat`` rooted at the node it replaces::

    # rmsnorm(residual(y, r), w)
    Pat("rmsnorm", (Pat("residual", ("y", "r"), name="res", exclusive=False), "w"), name="norm")

Each argument is a capture name (binds the input value; a name used twice must bind the same
value), ``None`` (any value), or a nested ``Pat`` (the input is written by a node matching it;
``out`` says which of that node's outputs). A nested pattern's node name works like a capture
too: the same name twice must match the same node. ``exclusive`` (the default) asks that every
reader of the value a nested node feeds its parent is inside the match and that it is no
graph output, so the rewrite may drop it.

A ``Rule`` pairs a pattern with a function from the ``Match`` to the replacement: a dict from
node capture names to the node that takes that node's place in the schedule (None deletes
it); matched nodes it leaves out stay. ``rewrite`` scans the schedule once, trying the rules
in order at every node; a node rewritten once is not matched again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from llamagraph.ir import ACTIVATION, Graph, Node


@dataclass(frozen=True)
class Pat:
    op: str | tuple[str, ...]
    args: tuple = ()  # one per input, exactly: capture name | None | Pat
    name: str = ""  # capture name of the matched node
    out: int = 0  # nested: which output of the matched node feeds the parent
    exclusive: bool = True  # nested: the value it feeds has no reader outside the match


@dataclass
class Match:
    graph: Graph  # the graph being matched (read it; add values to ``Rewriter.out``)
    values: dict[str, str] = field(default_factory=dict)  # capture -> value name
    nodes: dict[str, int] = field(default_factory=dict)  # node capture -> node index
    feeds: list[tuple[str, bool]] = field(default_factory=list)  # (value, exclusive) between matched nodes

    def __getitem__(self, capture: str) -> str:
        return self.values[capture]

    def __contains__(self, capture: str) -> bool:
        return capture in self.values

    def node(self, capture: str) -> Node:
        return self.graph.nodes[self.nodes[capture]]


@dataclass(frozen=True)
class Rule:
    pattern: Pat
    # (match, the output graph to add new values to) -> {node capture: replacement or None}
    replace: Callable[[Match, Graph], dict[str, Node | None]]


def match(graph: Graph, pat: Pat, index: int, producers: dict[str, int] | None = None,
          users: dict[str, list[int]] | None = None) -> Match | None:
    """The match of ``pat`` rooted at node ``index``, or None. ``producers`` / ``users``: the
    graph's, when the caller has them (each is a pass over the whole graph)."""
    m = Match(graph)
    producers = graph.producers() if producers is None else producers
    if not _match(graph, producers, pat, index, m):
        return None
    users = graph.users() if users is None else users
    inside = set(m.nodes.values())
    outputs = set(graph.outputs)
    for value, exclusive in m.feeds:
        if exclusive and (value in outputs or not set(users.get(value, [])) <= inside):
            return None
    return m


def _match(graph: Graph, producers: dict[str, int], pat: Pat, index: int, m: Match) -> bool:
    node = graph.nodes[index]
    ops = (pat.op,) if isinstance(pat.op, str) else pat.op
    if node.op not in ops or len(node.inputs) != len(pat.args):
        return False
    if pat.name:
        if m.nodes.get(pat.name, index) != index:
            return False
        m.nodes[pat.name] = index
    for arg, value in zip(pat.args, node.inputs):
        if arg is None:
            continue
        if isinstance(arg, str):
            if m.values.setdefault(arg, value) != value:
                return False
            continue
        j = producers.get(value)
        if j is None or graph.nodes[j].outputs.index(value) != arg.out:
            return False
        if not _match(graph, producers, arg, j, m):
            return False
        m.feeds.append((value, arg.exclusive))
    return True


def rewrite(graph: Graph, rules: list[Rule]) -> Graph:
    """Apply ``rules`` everywhere they match, scanning the schedule once (see the module doc)."""
    out = graph.copy()
    replaced: dict[int, Node | None] = {}
    consumed: set[int] = set()
    producers, users = graph.producers(), graph.users()  # the scan reads ``graph`` and never changes it
    for i in range(len(graph.nodes)):
        if i in consumed:
            continue
        for rule in rules:
            m = match(graph, rule.pattern, i, producers, users)
            if m is None or consumed & set(m.nodes.values()):
                continue
            for capture, node in rule.replace(m, out).items():
                replaced[m.nodes[capture]] = node
            consumed |= set(m.nodes.values())
            break
    return _replace_nodes(out, replaced)


def _replace_nodes(out: Graph, replaced: dict[int, Node | None]) -> Graph:
    """``out`` (the rewrite's own copy, changed in place) with node i replaced by ``replaced[i]``
    (None deletes it).

    Activations no node touches any more (the intermediates a fusion removed) are dropped;
    weights left unread are dead-code elimination's job.
    """
    out.nodes = [n for n in (replaced.get(i, n) for i, n in enumerate(out.nodes)) if n is not None]
    touched = set(out.outputs).union(*(set(n.inputs) | set(n.outputs) for n in out.nodes))
    out.values = {k: v for k, v in out.values.items() if v.kind != ACTIVATION or k in touched}
    return out
