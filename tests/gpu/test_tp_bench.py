"""``llamagraph bench --tp 2`` on two GPUs: the tensor-parallel row beside the tp1 row of the same
model in one run, the per-GPU floor, ``vs tp1``. (Speed itself is shown by running the bench,
never asserted in a test.) Skipped with fewer than two GPUs."""

import json
import os

import pytest

from models import TINY

from llamagraph.bench import decode_step_bytes
from llamagraph.cli import main
from llamagraph.compiler import compile_graph
from llamagraph.ir import load_config

pytestmark = pytest.mark.gpu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _gpus() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no cupy or no driver: the gpu marker skips these anyway
        return 0


two_gpus = pytest.mark.skipif("_gpus() < 2", reason="needs two GPUs")


@two_gpus
def test_bench_tp2_tiny_model_has_the_tp_and_tp1_rows(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**TINY, "vocab_size": 97, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    js = tmp_path / "bench.json"
    rc = main(["bench", str(cfg), "--random-weights", "--tp", "2", "--batch", "1,2", "--prompt-len", "16",
               "--gen-len", "8", "--json", str(js)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "tensor parallel over 2 GPUs, floor per GPU" in out and "llamagraph tp2 vs llamagraph tp1: decode" in out
    assert "the PyTorch peers run on one GPU" in err
    data = json.loads(js.read_text())
    assert data["tp"] == 2 and data["floor"] == "per GPU" and data["peers"] == []
    config = load_config(str(cfg))
    for b in data["batches"]:
        eng = b["engines"]
        assert set(eng) == {"llamagraph", "llamagraph_tp1"}
        for key, e in eng.items():
            assert e["note"] == "" and e["decode_tok_s"] > 0 and 0 < e["pct_floor"] < 100, (key, e)
        assert eng["llamagraph"]["vs_tp1"] > 0 and eng["llamagraph_tp1"]["vs_tp1"] == 1.0
        rank = compile_graph(config, dtype="float16", max_batch=b["batch"], max_seq=24, tp=2)
        assert b["step_bytes"] == decode_step_bytes(rank, config, b["batch"], 16 + 8 / 2) < b["base_step_bytes"]
