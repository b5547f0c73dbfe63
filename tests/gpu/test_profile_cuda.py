"""``llamagraph profile`` on the GPU: one row per decode launch with its time and bytes, the
totals line, the JSON figures and the picture, for a tiny model."""

import json
import re

import pytest
from models import TINY

import llamagraph
from llamagraph.cli import main

pytestmark = pytest.mark.gpu

BATCH, CONTEXT = 2, 16


def test_profile_tiny_decode_step(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**TINY, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    html, js = tmp_path / "p.html", tmp_path / "p.json"
    rc = main(["profile", str(cfg), "--random-weights", "--batch", str(BATCH), "--context", str(CONTEXT),
               "-o", str(html), "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"^total: \d+ kernels, [\d.]+ us summed alone; graph replay [\d.]+ us", out, re.M), out

    # the same plan compiled on the CPU says which launches a decode step of BATCH sequences runs
    plan = llamagraph.compile(str(cfg), "random", max_batch=BATCH, max_seq=CONTEXT)
    step = {"T": BATCH, "B": BATCH}
    launches = [x for x in plan.compiled.phases["decode"] if not x.on_demand and x.runs(step)]

    data = json.loads(js.read_text())
    rows = data["rows"]
    assert [r["kernel"] for r in rows] == [x.fn for x in launches]
    assert all(r["us"] > 0 and r["bytes"] > 0 and r["gb_s"] > 0 for r in rows)
    assert data["totals"]["replay_us"] > 0 and data["copy_gb_s"] > 100
    assert data["totals"]["kernels"] == len(rows)
    assert 0 < data["totals"]["pct_floor"] < 100

    # the LM head GEMV: its [vocab, hidden] fp16 matrix, the [B, hidden] fp16 input, [B, vocab] fp32 logits
    (head,) = [r for r in rows if r["op"] == "lm_head"]
    assert head["bytes"] == 96 * 64 * 2 + BATCH * 64 * 2 + BATCH * 96 * 4
    assert head["group"] == "head" and rows[0]["group"] == "embedding"
    assert {r["group"] for r in rows} >= {"layer 0", "layer 1"}

    page = html.read_text()
    assert page.count('class="bar"') == len(rows)
    assert page.count('class="group"') == 4  # embedding, layer 0, layer 1, head
