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

    # the LM head GEMV (the final norm in its prologue): its [vocab, hidden] fp16 matrix, the [hidden]
    # norm weight, the [B, hidden] fp16 input, [B, vocab] fp32 logits
    (head,) = [r for r in rows if r["op"] == "rms_lm_head"]
    assert head["bytes"] == 96 * 64 * 2 + 64 * 2 + BATCH * 64 * 2 + BATCH * 96 * 4
    assert head["group"] == "head" and rows[0]["group"] == "embedding"
    assert {r["group"] for r in rows} >= {"layer 0", "layer 1"}

    page = html.read_text()
    assert page.count('class="bar"') == len(rows)
    assert page.count('class="group"') == 4  # embedding, layer 0, layer 1, head

    # each op's marginal cost: the step replayed without its launches is faster, and the table says so
    marginal = {m["op"]: m for m in data["marginal"]}
    assert set(marginal) == {r["op"] for r in rows}
    assert data["launches_replay_us"] > 0
    assert all(m["without_us"] > 0 for m in marginal.values()), marginal
    heaviest = max(marginal.values(), key=lambda m: m["alone_us"])  # (an op of a microsecond is within the noise)
    assert heaviest["without_us"] < data["launches_replay_us"], marginal
    assert marginal["rms_lm_head"]["launches"] == 1
    assert "without each op's launches" in out and re.search(r"^rms_lm_head\s+1\s", out, re.M), out


def _gpus() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


@pytest.mark.skipif("_gpus() < 2", reason="needs two GPUs")
def test_profile_tp2_times_every_rank_launch_and_the_all_reduces(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**TINY, "num_attention_heads": 4, "num_key_value_heads": 2, "model_type": "llama",
                               "architectures": ["LlamaForCausalLM"]}))
    js = tmp_path / "p.json"
    rc = main(["profile", str(cfg), "--random-weights", "--batch", str(BATCH), "--context", str(CONTEXT),
               "--tp", "2", "-o", str(tmp_path / "p.html"), "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0 and "tensor parallel over 2 GPUs" in out
    assert re.search(r"^all-reduce and gather: \d+ launches of collective ops, [\d.]+ us per step", out, re.M), out
    data = json.loads(js.read_text())
    rows = data["rows"]
    plan = llamagraph.compile(str(cfg), "random", max_batch=BATCH, max_seq=CONTEXT, tp=2)
    launches = [x for x in plan.compiled.phases["decode"] if not x.on_demand and x.runs({"T": BATCH, "B": BATCH})]
    assert [r["kernel"] for r in rows] == [x.fn for x in launches]
    reduces = [r for r in rows if r["op"] == "all_reduce_residual"]
    assert len(reduces) == 2 * TINY["num_hidden_layers"] and all(r["us"] > 0 for r in reduces)
    # and the all_gather_vocab's two launches (NCCL's gather, then the kernel putting the chunks in order)
    assert data["tp"] == 2 and data["totals"]["collectives"] == len(reduces) + 2
    assert 0 < data["totals"]["collectives_us"] < data["totals"]["kernels_us"]
    assert all(r["us"] > 0 for r in rows) and data["totals"]["replay_us"] > 0
