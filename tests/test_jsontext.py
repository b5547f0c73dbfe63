"""dumps_lines: the same document as json.dumps, its outer levels one item a line."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from llamagraph.ir.jsontext import dumps_lines

ATOMS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6)
DOCS = st.recursive(ATOMS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
                    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(DOCS, st.integers(0, 4))
def test_any_document_reads_back_the_same(doc, levels):
    assert json.loads(dumps_lines(doc, levels)) == json.loads(json.dumps(doc))


def test_outer_levels_break_and_inner_items_stay_on_their_line():
    doc = {"phases": {"decode": [{"fn": "a", "args": [1, 2]}, {"fn": "b", "args": []}]}, "n": 3, 1: True}
    text = dumps_lines(doc, levels=3)
    assert text.splitlines() == [
        "{",
        ' "phases": {',
        '  "decode": [',
        '   {"fn": "a", "args": [1, 2]},',
        '   {"fn": "b", "args": []}',
        "  ]",
        " },",
        ' "n": 3,',
        ' "1": true',
        "}",
    ]
    assert dumps_lines(doc, levels=0) == json.dumps(doc)
    assert dumps_lines({"empty": [], "e": {}}, levels=3) == '{\n "empty": [],\n "e": {}\n}'
