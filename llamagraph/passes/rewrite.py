"""Small helpers shared by the pattern-rewrite passes."""

from __future__ import annotations

from llamagraph.ir import ACTIVATION, Graph, Node


class Matcher:
    """Producer/user lookups over one schedule, for writing local pattern rewrites."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.prod = graph.producers()
        self.users = graph.users()
        self.outputs = set(graph.outputs)

    def producer(self, value: str, op: str | tuple[str, ...]) -> int | None:
        """Index of the node writing ``value`` if its op is ``op``, else None."""
        i = self.prod.get(value)
        ops = (op,) if isinstance(op, str) else op
        return i if i is not None and self.graph.nodes[i].op in ops else None

    def only_user(self, value: str, node_index: int) -> bool:
        """True when ``node_index`` is the one reader of ``value`` and it is no graph output."""
        return self.users.get(value) == [node_index] and value not in self.outputs


def apply(graph: Graph, replaced: dict[int, Node | None]) -> Graph:
    """A copy of ``graph`` with node i replaced by ``replaced[i]`` (None deletes it).

    Activations no node touches any more (the intermediates a fusion removed) are dropped;
    weights left unread are dead-code elimination's job.
    """
    out = graph.copy()
    out.nodes = [replaced.get(i, n) for i, n in enumerate(graph.nodes)]
    out.nodes = [n for n in out.nodes if n is not None]
    touched = set(out.outputs).union(*(set(n.inputs) | set(n.outputs) for n in out.nodes))
    out.values = {k: v for k, v in out.values.items() if v.kind != ACTIVATION or k in touched}
    return out
