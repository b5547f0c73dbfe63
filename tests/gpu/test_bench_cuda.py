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
        assert set(b["engines"]) == set(ENGINES) - {"llamagraph_unquantized"}  # only beside a quantized plan
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


# ---- quantized (issue #8) ------------------------------------------------------------------------

@pytest.mark.parametrize("argv, scheme", [(["--quantize", "int8"], "int8"),
                                          (["--quantize", "int4", "--group-size", "32"], "int4")])
def test_bench_quantized_tiny_model_has_the_quantized_and_unquantized_rows(tmp_path, capsys, argv, scheme):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**TINY, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    js = tmp_path / "bench.json"
    rc = main(["bench", str(cfg), "--random-weights", "--batch", "1,2", "--prompt-len", "16", "--gen-len", "8",
               "--peers", "gptfast,hf", "--json", str(js), *argv])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"llamagraph {scheme} vs llamagraph float16: decode " in out
    data = json.loads(js.read_text())
    assert data["quantize"] == scheme
    for b in data["batches"]:
        eng = b["engines"]
        assert set(eng) == {"llamagraph", "llamagraph_unquantized", "gptfast", "hf"}
        assert 0 < b["step_bytes"] < b["base_step_bytes"]
        for key in ("llamagraph", "llamagraph_unquantized", "hf"):
            assert eng[key]["note"] == "" and eng[key]["decode_tok_s"] > 0 and 0 < eng[key]["pct_floor"] < 100, key
        assert eng["llamagraph"]["scheme"] == scheme and eng["llamagraph_unquantized"]["scheme"] is None
        assert eng["llamagraph"]["vs_unquantized"] > 0 and eng["llamagraph_unquantized"]["vs_unquantized"] == 1.0
        peer = eng["gptfast"]
        assert peer["scheme"] == scheme and peer["name"] == f"torch.compile (gpt-fast {scheme})"
        if scheme == "int8":
            assert peer["note"] == "" and peer["decode_tok_s"] > 0
        else:  # torch's int4 kernel runs (tinygemm: in bfloat16, said in the note) or the row says why not
            assert (peer["decode_tok_s"] or 0) > 0 or peer["note"].startswith("not supported: "), peer["note"]
            print(f"int4 peer at batch {b['batch']}: {peer['decode_tok_s']} tok/s, note: {peer['note']!r}")


def test_cuda_int4_kernel_reads_our_codes_scales_and_zeros():
    """The CUDA layout (uint8 pairs, column 2j in the high nibble) and the zero (8 - z) * s, checked
    against x @ w'^T on the device: the probe refuses any other result. tinygemm takes bfloat16."""
    from llamagraph.gptfast import check_int4

    if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        pytest.skip(f"torch {torch.__version__} has no _weight_int4pack_mm")
    check_int4("cuda", torch.bfloat16, [64, 192, 4096, 11008, 14336], 64)
    check_int4("cuda", torch.bfloat16, [4096, 11008, 14336], 128)  # the 7B / 8B widths at the default G


def test_compiled_quantized_peers_compute_hf_with_dequantized_weights(hf_model, tmp_path):
    """int8 (fp32, compiled, CUDA graphs) generates the greedy tokens of HF run with the dequantized
    weights; int4 (bfloat16: tinygemm) gives its logits within bfloat16 rounding."""
    import quant_oracle
    from models import hf_reference_logits

    from llamagraph.gptfast import quantize_model

    hf_dir = hf_model("gqa")
    int8_dir = quant_oracle.write_dequantized(hf_dir, str(tmp_path / "int8"), "int8")
    expected = hf_greedy(int8_dir, PROMPT, N_NEW)
    model = Transformer(load_config(hf_dir), dtype=torch.float32, device="cuda")
    peer = GPTFastPeer(quantize_model(model.load_hf_state_dict(hf_state_dict(hf_dir)), "int8"), compile=True)
    peer.setup(1, len(PROMPT) + N_NEW)
    ids = torch.tensor([PROMPT], device="cuda")
    for _ in range(2):
        assert peer.generate(ids, N_NEW).tolist() == [expected]
    torch._dynamo.reset()

    if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        pytest.skip(f"torch {torch.__version__} has no _weight_int4pack_mm")
    # the oracle holds the weights the int4 peer computes with: it quantizes its bfloat16 weights
    # (codes of the fp32 weights differ: 11% of max |logit| on this model), scales rounded to
    # bfloat16 before the codes are made, tinygemm's zero (8 - z) * s held in bfloat16
    int4_dir = quant_oracle.write_linear_weights(hf_dir, str(tmp_path / "int4"), lambda w: tinygemm_weights(w, 32))
    (ref,) = hf_reference_logits(int4_dir, [PROMPT], [[]])  # [1, V]: the prompt's last token
    model = Transformer(load_config(hf_dir), dtype=torch.bfloat16, device="cuda")
    quantize_model(model.load_hf_state_dict(hf_state_dict(hf_dir)), "int4", 32)
    model.setup_caches(1, len(PROMPT) + N_NEW)
    with torch.no_grad():
        got = model(ids, torch.arange(len(PROMPT), device="cuda"), prefill=True, last_only=True)[0, -1].float().cpu()
    want = torch.from_numpy(ref[0])
    assert float((got - want).abs().max()) < 0.03 * float(want.abs().max())  # 1.3% on the CPU kernel
    peer = GPTFastPeer(model, compile=True)
    runs = [peer.generate(ids, N_NEW).tolist() for _ in range(2)]  # compile + record, then replay
    assert runs[0] == runs[1]
    torch._dynamo.reset()


def tinygemm_weights(w: torch.Tensor, group: int) -> torch.Tensor:
    """The weights torch's int4 kernel computes with for the gpt-fast peer's int4 ``w`` [N, K]:
    the peer quantizes its bfloat16 weights; (q - 8) * scale + zero per group, scale and zero as
    the bfloat16 values it is given."""
    from llamagraph.gptfast import int4_scales_and_zeros, quantize_int4

    N, K = w.shape
    q, s, z = quantize_int4(w.to(torch.bfloat16), group, torch.bfloat16)  # the peer's weights are bfloat16
    sz = int4_scales_and_zeros(s, z, torch.bfloat16).float().transpose(0, 1)  # [N, K/G, 2]
    g = (q.float().reshape(N, K // group, group) - 8) * sz[:, :, :1] + sz[:, :, 1:]
    return g.reshape(N, K)
