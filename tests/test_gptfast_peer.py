"""The ``torch.compile (gpt-fast style)`` peer of ``llamagraph bench`` is a real Llama: loaded with
the weights of random HF checkpoints, its prefill logits and greedy decode steps match HF
transformers' (fp32, on the CPU, uncompiled: the compiled step runs the same module code); its
int8 and int4 weight-only versions match HF run with the dequantized weights."""

import numpy as np
import pytest
import quant_oracle
import torch
from models import TINY, hf_greedy, hf_reference_logits, hf_state_dict, load_hf_model

from llamagraph.gptfast import (CACHE_ALIGN, GPTFastPeer, Int4Linear, Int4Unsupported, Int8Linear, Rope, Transformer,
                                check_int4, int4_scales_and_zeros, linear_layers, quantize_int4, quantize_int8,
                                quantize_model)
from llamagraph.ir import load_config
from llamagraph.ir.ops import rope_inv_freq

# every variant that changes the math: MHA / GQA / MQA, biases, tied embeddings, head_dim != hidden/heads,
# and each rope type (rope_dynamic's 16 positions are passed by the 20-token prompt, so it rescales)
NAMES = ["gqa", "mha", "mqa", "bias", "tied", "head_dim", "rope_linear", "rope_dynamic", "rope_llama3"]
PROMPT = [1, 5, 9, 12, 40, 33, 7, 60, 3, 88, 17, 23, 51, 70, 4, 66, 29, 91, 45, 11]
N_NEW = 6
ATOL = RTOL = 1e-4


def _peer(hf_dir: str, batch: int, max_seq: int) -> GPTFastPeer:
    model = Transformer(load_config(hf_dir), dtype=torch.float32, device="cpu")
    peer = GPTFastPeer(model.load_hf_state_dict(hf_state_dict(hf_dir)), compile=False)
    peer.setup(batch, max_seq)
    return peer


@pytest.mark.parametrize("name", NAMES)
def test_prefill_and_greedy_decode_match_hf(name, hf_model):
    hf_dir = hf_model(name)
    greedy = hf_greedy(hf_dir, PROMPT, N_NEW)
    # HF's logits of the last token after the prefill and after each greedy token fed back
    (ref,) = hf_reference_logits(hf_dir, [PROMPT], [greedy[:-1]])
    peer = _peer(hf_dir, 1, len(PROMPT) + N_NEW)
    P = len(PROMPT)
    with torch.no_grad():
        rows = [peer.model(torch.tensor([PROMPT]), torch.arange(P), prefill=True, last_only=True)[0, -1]]
        for i, tok in enumerate(greedy[:-1]):
            rows.append(peer.model(torch.tensor([[tok]]), torch.tensor([P + i]))[0, -1])
    torch.testing.assert_close(torch.stack(rows), torch.from_numpy(ref), atol=ATOL, rtol=RTOL)

    peer.setup(1, P + N_NEW)  # fresh caches: generate is prefill + the decode loop
    assert peer.generate(torch.tensor([PROMPT]), N_NEW)[0].tolist() == greedy


def test_a_batch_decodes_each_sequence_as_hf_does_alone(hf_model):
    hf_dir = hf_model("gqa")
    prompts = [PROMPT, PROMPT[::-1]]
    greedy = [hf_greedy(hf_dir, p, N_NEW) for p in prompts]
    peer = _peer(hf_dir, 2, len(PROMPT) + N_NEW)
    assert peer.generate(torch.tensor(prompts), N_NEW).tolist() == greedy


@pytest.mark.parametrize("name", ["gqa", "mqa", "rope_dynamic"])
def test_a_later_chunk_of_several_tokens_attends_through_the_cache_mask(name, hf_model):
    """The masked path with T > 1 (GQA heads folded into G*T query rows, each row masked at its
    own position) against HF fed the same two chunks, at every position of the second one."""
    hf_dir = hf_model(name)
    split = 9
    hf = load_hf_model(hf_dir)
    peer = _peer(hf_dir, 1, len(PROMPT))
    with torch.no_grad():
        first = hf(input_ids=torch.tensor([PROMPT[:split]]), use_cache=True)
        ref = hf(input_ids=torch.tensor([PROMPT[split:]]), past_key_values=first.past_key_values,
                 use_cache=True).logits[0]  # [P - split, V]
        peer.model(torch.tensor([PROMPT[:split]]), torch.arange(split), prefill=True)
        got = peer.model(torch.tensor([PROMPT[split:]]), torch.arange(split, len(PROMPT)))[0]
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("length", [4, 16, 17, 40])
def test_dynamic_rope_on_the_device_is_rope_inv_freq_at_the_step_length(length):
    cfg = load_config({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                       "num_hidden_layers": 1, "vocab_size": 32, "max_position_embeddings": 16,
                       "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}})
    cos, sin = Rope(cfg, "cpu")(torch.tensor([0, length - 1]), torch.float32)
    inv = torch.from_numpy(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, length))
    ang = (length - 1) * inv
    torch.testing.assert_close(cos[1], torch.cat([ang, ang]).cos(), atol=1e-5, rtol=0)
    torch.testing.assert_close(sin[1], torch.cat([ang, ang]).sin(), atol=1e-5, rtol=0)


def test_fused_weights_and_static_cache_shapes(hf_model):
    hf_dir = hf_model("gqa")
    cfg = load_config(hf_dir)
    peer = _peer(hf_dir, 3, 21)
    layer = peer.model.layers[0]
    H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    assert tuple(layer.attention.wqkv.weight.shape) == ((H + 2 * KV) * D, cfg.hidden_size)
    assert tuple(layer.feed_forward.w13.weight.shape) == (2 * cfg.intermediate_size, cfg.hidden_size)
    S = -(-21 // CACHE_ALIGN) * CACHE_ALIGN
    assert tuple(layer.attention.kv_cache.k.shape) == (3, KV, S, D)
    # a decode step writes its token's row of every sequence and nothing else
    with torch.no_grad():
        peer.model(torch.tensor([[1], [2], [3]]), torch.tensor([5]))
    written = layer.attention.kv_cache.k.abs().sum(dim=(1, 3)) > 0  # [B, S]
    assert written[:, 5].all() and written.sum() == 3


def test_the_decode_step_compiles_once_per_batch_size_and_never_mid_run(hf_model):
    """A recompile inside a timed run would be timed: every decode call must present the same
    input layout. Traced with aot_eager (Dynamo without Inductor) to count the graphs on the CPU."""
    from torch._dynamo.utils import counters

    hf_dir = hf_model("gqa")
    torch._dynamo.reset()
    counters.clear()
    model = Transformer(load_config(hf_dir), dtype=torch.float32, device="cpu")
    peer = GPTFastPeer(model.load_hf_state_dict(hf_state_dict(hf_dir)), compile=True, backend="aot_eager")
    for batch in (1, 2, 1):
        prompts = [PROMPT, PROMPT[::-1]][:batch]
        peer.setup(batch, len(PROMPT) + N_NEW)
        for _ in range(2):
            assert peer.generate(torch.tensor(prompts), N_NEW).tolist() == [hf_greedy(hf_dir, p, N_NEW) for p in prompts]
    # one graph for batch 1 (reused with its fresh caches the second time) and one for batch 2
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


# ---- the quantized peers ---------------------------------------------------------------------------
# HF transformers run with the weights dequantized by tests/quant_oracle.py (the schemes written out
# again from their statement) is the oracle: the int8 peer (int8 codes, a scale per row, the
# int8 -> float GEMM as gpt-fast writes it) and the int4 peer (torch's int4 kernels, with the scale
# and zero converted to torch's convention) must compute the same model.

# the CPU's int4 kernels (torch >= 2.6); the tests skip only where they are missing, never on a
# probe's verdict, so a wrong conversion fails here instead of turning into a skip
CPU_INT4 = all(hasattr(torch.ops.aten, n) for n in ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"))
needs_cpu_int4 = pytest.mark.skipif(not CPU_INT4, reason=f"torch {torch.__version__} has no CPU int4 kernel")


@pytest.mark.parametrize("name", ["gqa", "bias", "tied"])
@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32), ("int4", 64)])
def test_quantized_peer_matches_hf_with_dequantized_weights(name, scheme, group, hf_model, tmp_path):
    if scheme == "int4" and not CPU_INT4:
        pytest.skip(f"torch {torch.__version__} has no CPU int4 kernel")
    hf_dir = hf_model(name)
    oracle = quant_oracle.write_dequantized(hf_dir, str(tmp_path / "dequantized"), scheme, group or 128)
    greedy = hf_greedy(oracle, PROMPT, N_NEW)
    (ref,) = hf_reference_logits(oracle, [PROMPT], [greedy[:-1]])
    peer = _peer(hf_dir, 1, len(PROMPT) + N_NEW)
    quantize_model(peer.model, scheme, group)
    kind = Int8Linear if scheme == "int8" else Int4Linear
    swapped = [getattr(p, a) for p, a in linear_layers(peer.model)]
    assert swapped and all(isinstance(m, kind) for m in swapped)
    assert isinstance(peer.model.output, kind) != (name == "tied")  # a tied LM head is the embedding: float
    P = len(PROMPT)
    with torch.no_grad():
        rows = [peer.model(torch.tensor([PROMPT]), torch.arange(P), prefill=True, last_only=True)[0, -1]]
        for i, tok in enumerate(greedy[:-1]):
            rows.append(peer.model(torch.tensor([[tok]]), torch.tensor([P + i]))[0, -1])
    got = torch.stack(rows)
    torch.testing.assert_close(got, torch.from_numpy(ref), atol=ATOL, rtol=RTOL)
    # the comparison means something: the float model's logits are further away than the tolerance
    (float_ref,) = hf_reference_logits(hf_dir, [PROMPT], [greedy[:-1]])
    assert (got - torch.from_numpy(float_ref)).abs().max() > 100 * ATOL
    peer.setup(1, P + N_NEW)
    assert peer.generate(torch.tensor([PROMPT]), N_NEW)[0].tolist() == greedy


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_peer_quantizers_are_llamagraphs_schemes(dtype):
    """Codes and scales (rounded to the activation dtype before the codes are made) equal
    llamagraph.ir.quant's, so the peer reads what a quantized plan reads."""
    from llamagraph.ir import quant

    torch.manual_seed(0)
    w = torch.randn(48, 256) * 0.05
    w[3] = 0.0  # a zero row: scale 1
    w[5, :64] = 0.25  # a constant group (int4): zero range
    tdtype = getattr(torch, dtype)
    w = w.to(tdtype)  # the peer's weights are stored in its dtype; ir.quant reads the same numbers
    q, s = quantize_int8(w, tdtype)
    q_ref, s_ref = quant.quantize_int8(w.float().numpy(), dtype)
    assert q.dtype == torch.int8 and np.array_equal(q.numpy(), q_ref) and np.array_equal(s.numpy(), s_ref)
    for group in (32, 64, 256):
        q, s, z = quantize_int4(w, group, tdtype)
        q_ref, s_ref, z_ref = quant.quantize_int4(w.float().numpy(), group, dtype)
        assert np.array_equal(q.numpy(), q_ref) and np.array_equal(s.numpy(), s_ref)
        assert np.array_equal(z.numpy(), z_ref)


def test_int4_scales_and_zeros_give_our_dequantized_weights_through_torchs_formula():
    """torch dequantizes (q - 8) * scale + zero from qScaleAndZeros [K/G, N, 2]; with our s and z
    that must be (q - z) * s (quant_oracle's w') for every weight, in fp32."""
    torch.manual_seed(1)
    N, K, G = 24, 128, 32
    w = torch.randn(N, K)
    q, s, z = quantize_int4(w, G, torch.float32)
    sz = int4_scales_and_zeros(s, z, torch.float32)
    assert sz.shape == (K // G, N, 2)
    scale = sz[:, :, 0].t().repeat_interleave(G, dim=1)  # [N, K]
    zero = sz[:, :, 1].t().repeat_interleave(G, dim=1)
    torch_w = (q.float() - 8) * scale + zero
    torch.testing.assert_close(torch_w, quant_oracle.dequantized_int4(w, G), atol=1e-6, rtol=0)


@needs_cpu_int4
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int4_probe_passes_where_the_cpu_kernel_runs(dtype):
    check_int4("cpu", dtype, [TINY["hidden_size"], TINY["intermediate_size"]], 32)  # raises if not


@needs_cpu_int4
def test_int4_probe_says_why_a_group_size_does_not_run():
    """The reason is one line naming the case (the benchmark's 'not supported: ...' row)."""
    # one group per row: G = K = 192 for the down projection, which torch's int4 kernels do not take
    with pytest.raises(Int4Unsupported, match=r"K=192, G=192"):
        check_int4("cpu", torch.float32, [64, 192], -1)
    with pytest.raises(Int4Unsupported, match=r"group size 128 does not divide K=64"):
        check_int4("cpu", torch.float32, [64, 192], 128)


@needs_cpu_int4
def test_int4_probe_catches_a_wrong_packing(monkeypatch):
    """The probe checks results, not only that the kernel runs: codes packed in another order
    (here the columns of each pair swapped) are refused."""
    import llamagraph.gptfast as gf

    real = gf.pack_int4_for_torch
    monkeypatch.setattr(gf, "pack_int4_for_torch", lambda q: real(q.reshape(q.shape[0], -1, 2).flip(-1).reshape(q.shape)))
    with pytest.raises(Int4Unsupported, match="differs from the dequantized weights"):
        check_int4("cpu", torch.float32, [64], 32)


def test_a_torch_check_message_becomes_one_line_without_its_boilerplate():
    from llamagraph.gptfast import _first_line

    e = RuntimeError("Expected A.dtype() == at::kBFloat16 to be true, but got false.  (Could this error message be "
                     "improved?  If so, please report an enhancement request to PyTorch.)\nmore")
    assert _first_line(e) == "Expected A.dtype() == at::kBFloat16 to be true, but got false."
    assert _first_line(RuntimeError("")) == "RuntimeError"
