"""The peers of ``llamagraph bench`` run on the model's shape, from a config.json or a Meta
params.json: the config the HF peers are built from is checked against the LlamaConfig
transformers reads from the HF config.json of the same model. The benchmark itself runs on a GPU;
here it runs end to end on the CPU (llamagraph's reference backend, the peers uncompiled) to check
that every engine gives every figure at every batch size."""

import json
import os
import shutil

import pytest
import torch
from models import CONFIG_MATRIX, META_COMPATIBLE, TINY, hf_config
from transformers import LlamaConfig, LlamaForCausalLM

from llamagraph.bench import ENGINES, PEERS, bench, hf_peer_config, llama_config
from llamagraph.ir import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the fields that fix the peers' shapes and math
FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "head_dim", "vocab_size", "rms_norm_eps", "rope_parameters", "max_position_embeddings",
          "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act")


def _fields(c: LlamaConfig, skip=()) -> dict:
    return {f: getattr(c, f) for f in FIELDS if f not in skip}


def _shapes_and_rope(c: LlamaConfig) -> tuple[dict, torch.Tensor]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(c)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}, model.model.rotary_emb.inv_freq


@pytest.mark.parametrize("name", META_COMPATIBLE)
def test_peer_config_from_params_json_matches_the_hf_config_json(name, meta_model):
    meta_dir, hf_dir = meta_model(name)
    expected = LlamaConfig.from_pretrained(hf_dir)  # transformers reading the HF checkpoint of the same model
    for where in (meta_dir, os.path.join(meta_dir, "params.json")):
        peer = hf_peer_config(where)
        assert _fields(peer) == _fields(expected)
    # the models built from them have the same parameters and the same rotary frequencies
    peer_shapes, peer_freq = _shapes_and_rope(hf_peer_config(meta_dir))
    shapes, freq = _shapes_and_rope(expected)
    assert peer_shapes == shapes
    torch.testing.assert_close(peer_freq, freq, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(CONFIG_MATRIX))
def test_llama_config_of_a_parsed_config_is_the_config_it_came_from(name):
    """Every variant the tests build (biases, tied, head_dim, each rope type): HF config -> llamagraph's
    ModelConfig -> LlamaConfig gives back the same fields."""
    expected = hf_config(name)
    back = llama_config(load_config(expected.to_dict()))
    assert _fields(back) == _fields(expected)


def test_llama_3_8b_params_json_gives_the_shape_of_its_hf_config():
    # Meta's params.json for Llama 3 8B: the FFN width comes from multiple_of and ffn_dim_multiplier
    params = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
              "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0}
    peer = llama_config(load_config(params))
    expected = LlamaConfig.from_json_file(os.path.join(ROOT, "examples", "llama-3-8b.json"))
    # params.json has no max_seq_len here, so the context length is llamagraph's default, not HF's 8192
    assert _fields(peer, skip=("max_position_embeddings",)) == _fields(expected, skip=("max_position_embeddings",))
    assert peer.intermediate_size == 14336


def test_hf_peer_config_of_an_hf_checkpoint_is_read_by_transformers(hf_model, tmp_path):
    hf_dir = hf_model("bias")
    expected = LlamaConfig.from_pretrained(hf_dir)
    assert _fields(hf_peer_config(hf_dir)) == _fields(expected)
    assert _fields(hf_peer_config(os.path.join(hf_dir, "config.json"))) == _fields(expected)
    # with both files, the peers follow the one llamagraph compiles: config.json
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(os.path.join(hf_dir, "config.json"), both)
    (both / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 10}))
    assert load_config(str(both)).source == "hf"
    assert _fields(hf_peer_config(str(both))) == _fields(expected)


def test_bench_gives_every_figure_of_every_engine_at_every_batch_on_the_cpu(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**TINY, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: thread hand-offs would dominate
    try:
        rep = bench(str(cfg), batch=[1, 2], prompt_len=6, gen_len=3, dtype="float32", peers=PEERS, device="cpu",
                    log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    data = json.loads(rep.to_json())
    assert (data["prompt_len"], data["gen_len"], data["dtype"], data["peers"]) == (6, 3, "float32", list(PEERS))
    assert [b["batch"] for b in data["batches"]] == [1, 2]
    for b in data["batches"]:
        assert b["step_bytes"] > 0 and b["floor_tok_s"] > 0
        assert set(b["engines"]) == set(ENGINES) - {"llamagraph_unquantized"}  # only beside a quantized plan
        for key, e in b["engines"].items():
            assert e["note"] == "", (key, e["note"])
            for f in ("decode_tok_s", "pct_floor", "ms_per_step", "prefill_tok_s", "ttft_ms", "vs_gptfast", "vs_hf_eager"):
                assert e[f] > 0, (key, f)
            assert (e["compile_s"] or 0) + (e["warmup_s"] or 0) > 0, key
    assert data["batches"][0]["engines"]["llamagraph"]["compile_s"] > 0  # llamagraph.compile's wall time
    assert rep.table().count("torch.compile (gpt-fast style)") == 2
