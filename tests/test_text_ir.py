"""The text IR parses back, and per-value layouts (dtype, quantization, shard, cache layout) are
represented, printed, round-tripped and verified."""

import glob
import os
import textwrap

import pytest

from llamagraph.compiler import BUILD, build_unfused, stage_names
from llamagraph.ir import CacheLayout, Graph, GraphError, Quant, Shard, load_config, verify
from llamagraph.ir.dtypes import nbytes
from llamagraph.passes import PIPELINE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.json")))


def _stages(example: str):
    g = build_unfused(load_config(example), dtype="bfloat16", max_batch=2, max_seq=256)
    yield BUILD, g
    for p in PIPELINE:
        g = p(g)
        yield p.__name__, g


@pytest.mark.parametrize("example", EXAMPLES, ids=os.path.basename)
def test_every_stage_of_every_example_parses_back(example):
    seen = []
    for stage, g in _stages(example):
        text = str(g)
        back = Graph.from_text(text)
        assert str(back) == text, stage
        assert back == Graph.from_json(g.to_json()) == g, stage
        verify(back, stage)
        seen.append(stage)
    assert seen == stage_names()


def test_text_names_the_line_of_a_mistake():
    good = """
    graph (T=4, B=1)
      input %x: f32[T,8]
      %y: f32[T,8] = silu(%x)
      return %y
    """
    assert Graph.from_text(textwrap.dedent(good)).nodes[0].op == "silu"
    for bad, message in [
        (good.replace("f32[T,8] = silu", "f99[T,8] = silu"), "line 4, column .*unknown dtype 'f99'"),
        (good.replace("silu(%x)", "silu(%x"), "line 4.*expected ','"),
        (good.replace("input %x", "input @x"), "line 3.*non-weights are written with %"),
        (good.replace("%y: f32[T,8] = silu(%x)", "%y: f32[T,8] = silu(%x) {eps=1e-5,}"), "line 4.*expected a name"),
        (good.replace("%y: f32[T,8] = silu(%x)", "%x: f32[T,8] = silu(%x)"), "line 4.*declared twice"),
        (good.replace("return %y", "return %y junk"), "line 5.*expected ','"),
    ]:
        with pytest.raises(GraphError, match=message):
            Graph.from_text(textwrap.dedent(bad))


# ---------------------------------------------------------------------------------------------
# per-value layouts
# ---------------------------------------------------------------------------------------------

QUANTIZED = """
graph (T=4, B=1)
  input %x: f16[T,256]
  weight @w: i4[64,256] {layer=0, role="matrix", quant={"group_size":128,"scales":"w.scales","scheme":"int4","zeros":"w.zeros"}}
  weight @w.scales: f16[64,2] {layer=0, role="scales"}
  weight @w.zeros: f16[64,2] {layer=0, role="zeros"}
  weight @v: i8[64,256] {quant={"scales":"v.scales","scheme":"int8"}, shard={"axis":0,"blocks":[128],"ranks":2}, parts=[["v.weight",[128,256]]]}
  weight @v.scales: f16[64] {role="scales"}
  cache %kv: f16[1,16,2,32] {layout={"kind":"dense"}}
  %y: f16[T,64] = o_proj(%x, @w) loc(layer=0)
  return %y
"""


def test_layouts_print_parse_and_round_trip():
    g = Graph.from_text(textwrap.dedent(QUANTIZED))
    verify(g)
    w, v = g.values["w"], g.values["v"]
    assert w.quant == Quant("int4", "w.scales", 128, "w.zeros") and w.layer == 0
    assert v.quant == Quant("int8", "v.scales") and v.shard == Shard(0, 2, blocks=(128,))
    assert g.values["kv"].layout == CacheLayout("dense")
    assert Graph.from_text(str(g)) == g == Graph.from_json(g.to_json())
    # sizes come from the layout: packed int4 is half a byte a weight, int8 one
    assert w.nbytes(g.dims) == 64 * 256 // 2 and v.nbytes(g.dims) == 64 * 256
    assert nbytes("int4", (3, 5)) == 3 * 3  # each row padded to a whole byte
    assert g.values["w.scales"].nbytes(g.dims) == 64 * 2 * 2


@pytest.mark.parametrize("edit, message", [
    (('"group_size":128', '"group_size":100'), "group_size 100 must be a positive divisor of K=256"),
    (('"scales":"w.scales","scheme":"int4"', '"scales":"nope","scheme":"int4"'), "scales %nope is not a weight"),
    (("weight @w.zeros: f16[64,2]", "weight @w.zeros: f16[64,4]"), r"zeros %w.zeros must be a float \[64, 2\]"),
    (('"scheme":"int4","zeros":"w.zeros"', '"scheme":"int8","zeros":"w.zeros"'), "stores int8 codes, value is int4"),
    (('"scheme":"int4"', '"scheme":"nf4"'), "unknown quantization scheme 'nf4'"),
    (("weight @v: i8[64,256] {", "weight @v: i8[64,256] {role=\"matrix\", "), None),
    (('quant={"scales":"v.scales","scheme":"int8"}, ', ""), "int8 weight has no quantization description"),
    (('"axis":0,"blocks":[128],"ranks":2', '"axis":2,"blocks":[128],"ranks":2'), "shard axis 2 is not an axis of i8"),
    (('"blocks":[128],', '"blocks":[128],"chunk":32,'), "either blocks .one per part. or a chunk"),
    (('"blocks":[128]', '"blocks":[64,64]'), r"shard blocks \[64, 64\] do not match its 1 parts"),
    (('cache %kv: f16[1,16,2,32] {layout={"kind":"dense"}}', "cache %kv: f16[1,16,2,32]"), "cache layout"),
    (('{layout={"kind":"dense"}}', '{layout={"kind":"paged"}}'), "unknown cache layout 'paged'"),
    (("input %x: f16[T,256]", 'input %x: f16[T,256] {layout={"kind":"dense"}}'), "cache layout"),
    (("input %x: f16[T,256]", "input %x: i8[T,256]"), "only weights may be int8"),
    (("weight @w: i4[64,256]", "weight @w: i4[64,255]"), "packed int4 needs an even last dim"),
    (('role="scales"}\n  weight @w.zeros', 'role="bogus"}\n  weight @w.zeros'), "unknown role 'bogus'"),
])
def test_the_verifier_checks_layouts(edit, message):
    text = textwrap.dedent(QUANTIZED).replace(*edit)
    assert text != textwrap.dedent(QUANTIZED)
    g = Graph.from_text(text)
    if message is None:
        verify(g)
        return
    with pytest.raises(GraphError, match=message):
        verify(g)


PAIRED = """
graph (T=4, B=1)
  input %x: f16[T,32]
  weight @w: f16[64,32] {parts=[["q",[64,32]]], row_order=["rope_pairs",4,16,"rotate_half"]}
  %y: f16[T,64] = qkv_gemm(%x, @w)
  return %y
"""


@pytest.mark.parametrize("edit, message", [
    (("", ""), None),
    (('["rope_pairs",4,16,"rotate_half"]', '["rope_pairs",2,16,"rotate_half"]'), r"permutes 32 rows, value has f16\[64,32\]"),
    (('["rope_pairs",4,16,"rotate_half"]', '["shuffle",4,16]'), "unknown row_order"),
    (('"rotate_half"]', '"diagonal"]'), "bad row_order .* unknown rope layout 'diagonal'"),
    (('["rope_pairs",4,16,"rotate_half"]', '["rope_pairs",2,32,"rotate_half",7]'), "bad row_order"),
    (('["rope_pairs",4,16,"rotate_half"]', '["rope_pairs",8,8,"rotate_half"]'), "multiple of 16"),
])
def test_the_verifier_checks_row_orders(edit, message):
    g = Graph.from_text(textwrap.dedent(PAIRED).replace(*edit))
    if message is None:
        verify(g)
        return
    with pytest.raises(GraphError, match=message):
        verify(g)


def test_values_carry_their_own_dtypes():
    g = build_unfused(load_config(EXAMPLES[0]), dtype="bfloat16", max_batch=1, max_seq=64)
    dtypes = {v.name: v.dtype for v in g.values.values()}
    assert dtypes["logits"] == "float32" and dtypes["next_token"] == "int32" and dtypes["sample.seed"] == "int64"
    assert dtypes["embed.w"] == dtypes["kv.l0.k"] == dtypes["x0"] == "bfloat16"
    assert g.values["kv.l0.k"].layout == CacheLayout("dense") and g.values["l3.o.w"].layer == 3
