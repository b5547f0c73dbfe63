"""The ``torch.compile (gpt-fast style)`` peer of ``llamagraph bench`` is a real Llama: loaded with
the weights of random HF checkpoints, its prefill logits and greedy decode steps match HF
transformers' (fp32, on the CPU, uncompiled: the compiled step runs the same module code)."""

import pytest
import torch
from models import hf_greedy, hf_reference_logits, hf_state_dict, load_hf_model

from llamagraph.gptfast import CACHE_ALIGN, GPTFastPeer, Rope, Transformer
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
