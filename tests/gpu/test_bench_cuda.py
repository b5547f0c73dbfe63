"""``llamagraph bench`` on the GPU, end to end for a tiny model: llamagraph and all three peers at
batch 1 and 2, every figure in the JSON; and the compiled gpt-fast peer generates HF's greedy
tokens (the compiled, CUDA-graph-replayed step computes what the eager module does)."""

import json

import pytest
import torch
from models import TINY, hf_greedy, hf_state_dict

from llamagraph.bench import ENGINES
from llamagraph.cli import main
from llamagraph.gptfast import GPTFastPeer, Transformer
from llamagraph.ir import load_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="torch has no CUDA device")]

FIGURES = ("decode_tok_s", "pct_floor", "ms_per_step", "prefill_tok_s", "ttft_ms", "vs_gptfast", "vs_hf_eager")
PROMPT = [1, 5, 9, 12, 40, 33, 7, 60, 3, 88, 17, 23]
N_NEW = 8


def test_bench_tiny_model_with_every_peer_at_two_batch_sizes(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**TINY, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    js = tmp_path / "bench.json"
    rc = main(["bench", str(cfg), "--random-weights", "--batch", "1,2", "--prompt-len", "16", "--gen-len", "8",
               "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0
    assert ": batch 1, prompt 16, 8 new tokens, float16" in out and ": batch 2, prompt 16" in out
    data = json.loads(js.read_text())
    assert data["copy_gb_s"] > 100 and data["device"] and data["versions"]["torch"]
    assert [b["batch"] for b in data["batches"]] == [1, 2]
    for b in data["batches"]:
        assert b["step_bytes"] > 0 and b["floor_tok_s"] > 0
        assert set(b["engines"]) == set(ENGINES)
        for key, e in b["engines"].items():
            assert e["note"] == "", (b["batch"], key, e["note"])
            for f in FIGURES:
                assert e[f] > 0, (b["batch"], key, f)
            assert 0 < e["pct_floor"] < 100
        eng = b["engines"]
        # compile seconds: llamagraph.compile, and the torch.compile warm-ups; HF eager only warms up
        assert eng["llamagraph"]["compile_s"] > 0 and eng["gptfast"]["compile_s"] > 0 and eng["compile"]["compile_s"] > 0
        assert eng["hf"]["compile_s"] is None and eng["hf"]["warmup_s"] > 0
        assert eng["gptfast"]["vs_gptfast"] == 1.0 and eng["hf"]["vs_hf_eager"] == 1.0


@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_gpt_fast_peer_generates_hf_greedy_tokens(batch, hf_model):
    hf_dir = hf_model("gqa")
    prompts = [PROMPT, PROMPT[::-1]][:batch]
    expected = [hf_greedy(hf_dir, p, N_NEW) for p in prompts]  # HF on the CPU in fp32: the oracle
    model = Transformer(load_config(hf_dir), dtype=torch.float32, device="cuda")
    peer = GPTFastPeer(model.load_hf_state_dict(hf_state_dict(hf_dir)), compile=True)
    peer.setup(batch, len(PROMPT) + N_NEW)
    ids = torch.tensor(prompts, device="cuda")
    for _ in range(2):  # the first run compiles and records, the second replays the CUDA graph
        assert peer.generate(ids, N_NEW).tolist() == expected
    torch._dynamo.reset()
