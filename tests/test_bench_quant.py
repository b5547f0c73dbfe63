"""``llamagraph bench --quantize int8|int4``: the quantized floor (the bytes a step actually reads:
codes + scales + zeros), the quantized plan beside the unquantized one of the same shape (the
speedup of issue #8), the quantized gpt-fast-style peer, and the "not supported" row where
torch's int4 kernel does not run. On the CPU: the peers uncompiled, llamagraph's reference backend."""

import json
import os

import pytest
import torch
from models import TINY

import llamagraph.bench as bench_mod
import llamagraph.gptfast as gptfast
from llamagraph.bench import BatchReport, BenchReport, Result, bench, decode_step_bytes, engine_label
from llamagraph.cli import main
from llamagraph.compiler import compile_graph
from llamagraph.ir import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


# ---- the floor ---------------------------------------------------------------------------------

def _matrix_bytes(N: int, K: int, scheme: str | None, group: int | None, act: int) -> int:
    """Bytes of one [N, K] linear weight as stored: float; int8 codes + a scale per row; int4 codes
    two to a byte + a scale and a zero per group of G columns of a row."""
    if scheme is None:
        return N * K * act
    if scheme == "int8":
        return N * K + N * act
    G = K if group == -1 else group
    return N * K // 2 + 2 * N * (K // G) * act


def _expected_step_bytes(cfg, batch: int, context: int, scheme, group, act: int) -> int:
    D, V, L, H, KV, HD, F = (cfg.hidden_size, cfg.vocab_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
                             cfg.head_dim, cfg.intermediate_size)
    layer = sum(_matrix_bytes(N, K, scheme, group, act)
                for N, K in (((H + 2 * KV) * HD, D), (D, H * HD), (2 * F, D), (D, F)))  # QKV, O, gate/up, down
    weights = L * (layer + 2 * D * act) + D * act  # + the two norms per layer and the final norm
    if cfg.tie_word_embeddings:
        weights += V * D * act  # the LM head is the embedding table, read whole, never quantized
    else:
        weights += _matrix_bytes(V, D, scheme, group, act) + batch * D * act  # LM head + the gathered rows
    kv = batch * context * 2 * L * KV * HD * act  # K and V of every layer
    return weights + kv


@pytest.mark.parametrize("example", ["llama-3-8b", "llama-2-7b", "llama-3.2-1b"])
@pytest.mark.parametrize("scheme,group", [(None, None), ("int8", None), ("int4", 128), ("int4", 64), ("int4", -1)])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_decode_step_bytes_of_a_quantized_plan_are_codes_scales_and_zeros(example, scheme, group, dtype):
    cfg = load_config(os.path.join(EXAMPLES, f"{example}.json"))
    g = compile_graph(cfg, dtype=dtype, max_batch=2, max_seq=256, quantize=scheme, group_size=group)
    assert decode_step_bytes(g, cfg, 2, 100) == _expected_step_bytes(cfg, 2, 100, scheme, group, 2)


def test_int4_reads_about_a_quarter_of_the_fp16_weights():
    """The floor the issue's int4 ratio is measured against: Llama-2-7B int4 G128 reads 3.5-4x fewer bytes."""
    cfg = load_config(os.path.join(EXAMPLES, "llama-2-7b.json"))
    fp16 = decode_step_bytes(compile_graph(cfg, max_seq=256), cfg, 1, 192)
    int4 = decode_step_bytes(compile_graph(cfg, max_seq=256, quantize="int4", group_size=128), cfg, 1, 192)
    int8 = decode_step_bytes(compile_graph(cfg, max_seq=256, quantize="int8"), cfg, 1, 192)
    assert 3.5 < fp16 / int4 < 4.0 and 1.9 < fp16 / int8 < 2.0


# ---- tables and JSON of a quantized run (a made-up report) ---------------------------------------

# (engine, scheme, decode tok/s, prefill tok/s, TTFT ms) at batch 1: quantized floor 600, unquantized 200
ROWS = [("llamagraph", "int4", 540.0, 9000.0, 8.0), ("llamagraph_unquantized", None, 170.0, 9500.0, 9.0),
        ("gptfast", "int4", 400.0, 5000.0, 12.0), ("hf", None, 30.0, 4000.0, 20.0)]
QFLOOR, BASE_FLOOR = 600.0, 200.0
NOT_SUPPORTED = "not supported: _weight_int4pack_mm (float16, K=11008, G=-1): expect qGroupSize to be 32, 64, 128 or 256"


def fake_quantized_report() -> BenchReport:
    rep = BenchReport("examples/llama-2-7b.json", 128, 128, "float16", "NVIDIA H100 80GB HBM3", 3000.0,
                      {"layers": 32}, ["gptfast", "hf"], {"torch": "2.11"}, quantize="int4", group_size=128)
    b = BatchReport(1, 3_900_000_000, QFLOOR, base_step_bytes=13_500_000_000, base_floor_tok_s=BASE_FLOOR)
    for eng, scheme, dec, pre, ttft in ROWS:
        b.results.append(Result(eng, dec, 1e3 / dec, pre, ttft, 4.0, 0.5, scheme=scheme,
                                label=engine_label(eng, scheme, "float16")))
    rep.batches.append(b)
    b8 = BatchReport(8, 4_000_000_000, 8 * QFLOOR, base_step_bytes=14_000_000_000, base_floor_tok_s=8 * BASE_FLOOR)
    b8.results = [Result("llamagraph", 4000.0, 2.0, scheme="int4", label=engine_label("llamagraph", "int4", "float16")),
                  Result("gptfast", note=NOT_SUPPORTED, scheme="int4", label=engine_label("gptfast", "int4", "float16"))]
    rep.batches.append(b8)
    return rep


def _row(table: str, batch: int, name: str) -> list[str]:
    block = next(b for b in table.split("\n\n") if f": batch {batch}," in b.splitlines()[0])
    (line,) = [ln for ln in block.splitlines() if ln.startswith(name + " ")]
    return line[len(name):].split("  (")[0].split()


def test_quantized_table_names_the_rows_and_measures_each_against_its_own_floor():
    table = fake_quantized_report().table()
    block = table.split("\n\n")[0].splitlines()
    assert block[0] == ("examples/llama-2-7b.json: batch 1, prompt 128, 128 new tokens, float16, int4 weights, G 128, "
                        "NVIDIA H100 80GB HBM3")
    assert "reads 3.900 GB -> floor 600.0 tok/s (int4: codes + scales + zeros); float16: 13.500 GB -> floor 200.0" \
        in block[1]
    assert block[2].split()[-1] == "float16" and block[2].split()[-2] == "vs"  # the extra column: vs float16
    names = {"llamagraph": "llamagraph int4 (CUDA graphs)", "llamagraph_unquantized": "llamagraph float16 (CUDA graphs)",
             "gptfast": "torch.compile (gpt-fast int4)", "hf": "HF eager"}
    dec = {eng: d for eng, _, d, *_ in ROWS}
    for eng, scheme, d, *_ in ROWS:
        fields = _row(table, 1, names[eng])
        floor = QFLOOR if scheme else BASE_FLOOR  # quantized rows: the bytes of codes + scales + zeros
        assert fields[1] == f"{d:.1f}" and fields[3] == f"{100 * d / floor:.1f}%"
        assert fields[-1] == f"{d / dec['llamagraph_unquantized']:.2f}x"  # vs float16
    # the issue's ratio, and the one the bytes allow
    assert "llamagraph int4 vs llamagraph float16: decode 3.18x (floor 3.46x: bytes read per step)" in table
    assert "llamagraph int4 vs gpt-fast int4: decode 1.35x, prefill 1.80x, TTFT 8.0 ms vs 12.0 ms" in table
    assert "(q - 8) * scale + zero" in table  # the legend says how the int4 peer's zero is made


def test_a_not_supported_peer_row_says_why_in_the_table_and_the_json():
    rep = fake_quantized_report()
    table = rep.table()
    assert _row(table, 8, "torch.compile (gpt-fast int4)") == ["-"] * 10
    (line,) = [ln for ln in table.splitlines() if ln.startswith("torch.compile (gpt-fast int4)") and "not supported" in ln]
    assert line.endswith(f"({NOT_SUPPORTED})")
    e = json.loads(rep.to_json())["batches"][1]["engines"]["gptfast"]
    assert e["note"] == NOT_SUPPORTED and e["decode_tok_s"] is None and e["scheme"] == "int4"


def test_quantized_json_has_both_floors_the_schemes_and_the_speedup():
    data = json.loads(fake_quantized_report().to_json())
    assert data["quantize"] == "int4" and data["group_size"] == 128
    b = data["batches"][0]
    assert (b["step_bytes"], b["floor_tok_s"], b["base_step_bytes"], b["base_floor_tok_s"]) == (
        3_900_000_000, QFLOOR, 13_500_000_000, BASE_FLOOR)
    for eng, scheme, d, *_ in ROWS:
        e = b["engines"][eng]
        assert e["scheme"] == scheme and e["name"] == engine_label(eng, scheme, "float16")
        assert e["pct_floor"] == pytest.approx(100 * d / (QFLOOR if scheme else BASE_FLOOR))
        assert e["vs_unquantized"] == pytest.approx(d / 170.0)


# ---- bench() on the CPU ------------------------------------------------------------------------

@pytest.fixture
def tiny_config(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**TINY, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: thread hand-offs would dominate
    yield str(cfg)
    torch.set_num_threads(threads)


@pytest.fixture
def fake_llamagraph(monkeypatch):
    """llamagraph's own run replaced by its compiled graph and made-up figures (the peers run for
    real): what bench() asks of it is recorded."""
    calls = []

    def fake(cfg, prompts, gen_len, dtype, backend="cuda", progress=False, quantize=None, group_size=None,
             engine="llamagraph"):
        calls.append({"batch": len(prompts), "quantize": quantize, "group_size": group_size, "engine": engine,
                      "backend": backend})
        g = compile_graph(cfg, dtype=dtype, max_batch=len(prompts), max_seq=len(prompts[0]) + gen_len,
                          quantize=quantize, group_size=group_size)
        tok_s = 300.0 if quantize else 100.0
        return Result(engine, tok_s, 1.0, 1000.0, 5.0, 1.0, 0.1, scheme=quantize,
                      label=engine_label(engine, quantize, dtype)), g

    monkeypatch.setattr(bench_mod, "bench_llamagraph", fake)
    return calls


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32)])
def test_bench_runs_the_quantized_and_unquantized_plans_and_the_quantized_peer(tiny_config, fake_llamagraph,
                                                                              scheme, group):
    rep = bench(tiny_config, batch=[1, 2], prompt_len=6, gen_len=3, dtype="float32", peers=("gptfast",),
                device="cpu", log=lambda m: None, quantize=scheme, group_size=group)
    # each batch: the quantized plan, then the unquantized plan of the same shape
    assert fake_llamagraph == [
        {"batch": b, "quantize": q, "group_size": g, "engine": e, "backend": "reference"}
        for b in (1, 2) for q, g, e in ((scheme, group, "llamagraph"), (None, None, "llamagraph_unquantized"))]
    assert rep.quantize == scheme and rep.group_size == group
    cfg = load_config(tiny_config)
    for b in rep.batches:
        quantized = compile_graph(cfg, dtype="float32", max_batch=b.batch, max_seq=9, quantize=scheme,
                                  group_size=group)
        base = compile_graph(cfg, dtype="float32", max_batch=b.batch, max_seq=9)
        assert b.step_bytes == decode_step_bytes(quantized, cfg, b.batch, 6 + 3 / 2)
        assert b.base_step_bytes == decode_step_bytes(base, cfg, b.batch, 6 + 3 / 2) > b.step_bytes
        assert b.floor_tok_s / b.base_floor_tok_s == pytest.approx(b.base_step_bytes / b.step_bytes)
        assert b.ratio(b.result("llamagraph"), "llamagraph_unquantized") == pytest.approx(3.0)
        peer = b.result("gptfast")
        assert peer.note == "" and peer.scheme == scheme and peer.decode_tok_s > 0 and peer.prefill_tok_s > 0
        assert peer.name == f"torch.compile (gpt-fast {scheme})"
    assert "vs float32" in rep.table() and f"llamagraph {scheme} vs llamagraph float32: decode 3.00x" in rep.table()


def test_the_peer_is_built_quantized(tiny_config, fake_llamagraph, monkeypatch):
    """The peer row is the quantized model's: quantize_model is called on the model it times."""
    seen = []
    real = gptfast.quantize_model
    monkeypatch.setattr(gptfast, "quantize_model",
                        lambda model, scheme, group=None: seen.append((scheme, group)) or real(model, scheme, group))
    bench(tiny_config, batch=1, prompt_len=4, gen_len=2, dtype="float32", peers=("gptfast",), device="cpu",
          log=lambda m: None, quantize="int4", group_size=64)
    assert seen == [("int4", 64)]


def test_int4_peer_not_supported_is_a_row_not_a_failure(tiny_config, fake_llamagraph, monkeypatch):
    def unsupported(device, dtype, ks, group_size, seed=0):
        raise gptfast.Int4Unsupported(f"no int4 kernel for {dtype} here")

    monkeypatch.setattr(gptfast, "check_int4", unsupported)
    rep = bench(tiny_config, batch=[1, 2], prompt_len=6, gen_len=3, dtype="float32", peers=("gptfast", "hf"),
                device="cpu", log=lambda m: None, quantize="int4", group_size=32)
    for b in rep.batches:
        peer = b.result("gptfast")
        assert peer.note == "not supported: no int4 kernel for torch.float32 here" and peer.decode_tok_s is None
        assert b.result("hf").decode_tok_s > 0  # the other rows still stand
    assert "(not supported: no int4 kernel for torch.float32 here)" in rep.table()
    assert json.loads(rep.to_json())["batches"][0]["engines"]["gptfast"]["note"].startswith("not supported: ")


def test_int4_peer_runs_in_bfloat16_where_only_bfloat16_runs(tiny_config, fake_llamagraph, monkeypatch):
    """CUDA's tinygemm takes bfloat16 activations only: a float16 benchmark's int4 peer runs in
    bfloat16 (the same weight bytes) and its row says so. Forced here on the CPU."""
    real_check, dtypes = gptfast.check_int4, []

    def bf16_only(device, dtype, ks, group_size, seed=0):
        if dtype != torch.bfloat16:
            raise gptfast.Int4Unsupported("A must be bfloat16")
        return real_check(device, dtype, ks, group_size, seed)

    real_quantize = gptfast.quantize_model
    monkeypatch.setattr(gptfast, "check_int4", bf16_only)
    monkeypatch.setattr(gptfast, "quantize_model", lambda model, scheme, group=None: dtypes.append(
        model.tok_embeddings.weight.dtype) or real_quantize(model, scheme, group))
    rep = bench(tiny_config, batch=1, prompt_len=4, gen_len=2, dtype="float32", peers=("gptfast",), device="cpu",
                log=lambda m: None, quantize="int4", group_size=32)
    peer = rep.batches[0].result("gptfast")
    assert dtypes == [torch.bfloat16]
    assert peer.decode_tok_s > 0 and peer.note == "runs in bfloat16: at float32, A must be bfloat16"


def test_group_size_one_per_row_is_not_supported_by_torchs_int4_on_the_cpu(tiny_config, fake_llamagraph):
    """The real probe, no patching: G = K = 192 (the down projection) is outside torch's 32..256
    powers of two, so the row says so, naming the case."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip(f"torch {torch.__version__} has no CPU int4 kernel")
    rep = bench(tiny_config, batch=1, prompt_len=4, gen_len=2, dtype="float32", peers=("gptfast",), device="cpu",
                log=lambda m: None, quantize="int4", group_size=-1)
    note = rep.batches[0].result("gptfast").note
    assert note.startswith("not supported: ") and "K=192, G=192" in note, note
    assert "int4 weights, a group per row" in rep.table()


def test_bench_end_to_end_with_llamagraphs_quantized_reference_plan(tiny_config):
    """Nothing patched: llamagraph's quantized and unquantized plans on the reference backend."""
    import llamagraph
    from llamagraph.codegen.lowering import LoweringError

    try:
        llamagraph.compile(tiny_config, "random", dtype="float32", max_batch=1, max_seq=8, backend="reference",
                           quantize="int8")
    except LoweringError as e:
        if "no kernel reads that layout yet" not in str(e):
            raise
        pytest.skip(f"quantized plans do not lower yet: {e}")
    rep = bench(tiny_config, batch=1, prompt_len=4, gen_len=3, dtype="float32", peers=("gptfast",), device="cpu",
                log=lambda m: None, quantize="int4", group_size=32)
    data = json.loads(rep.to_json())
    eng = data["batches"][0]["engines"]
    assert set(eng) == {"llamagraph", "llamagraph_unquantized", "gptfast"}
    for key, e in eng.items():
        assert e["note"] == "" and e["decode_tok_s"] > 0 and e["vs_unquantized"] > 0, (key, e)
    assert eng["llamagraph"]["scheme"] == "int4" and eng["llamagraph_unquantized"]["scheme"] is None
    assert data["batches"][0]["base_step_bytes"] > data["batches"][0]["step_bytes"]


# ---- the command line --------------------------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    ([], {}),
    (["--quantize", "int8"], {"quantize": "int8"}),
    (["--quantize", "int4"], {"quantize": "int4"}),
    (["--quantize", "int4", "--group-size", "64"], {"quantize": "int4", "group_size": 64}),
    (["--quantize", "int4", "--group-size", "-1"], {"quantize": "int4", "group_size": -1}),
])
def test_cli_passes_quantize_and_group_size_to_bench(monkeypatch, capsys, argv, expected):
    from llamagraph.runtime.cuda import CudaExecutor

    seen = {}
    monkeypatch.setattr(CudaExecutor, "check_available", staticmethod(lambda: None))
    monkeypatch.setattr(bench_mod, "bench", lambda config, **kw: seen.update(kw) or fake_quantized_report())
    assert main(["bench", "examples/llama-2-7b.json", "--random-weights", "--peers", "none", *argv]) == 0
    assert {k: seen.get(k) for k in ("quantize", "group_size") if seen.get(k) is not None} == expected
    assert capsys.readouterr().out == fake_quantized_report().table() + "\n"



def test_bench_quantized_tp_compares_with_the_same_quantized_plan_at_tp1(tiny_config, monkeypatch):
    """--quantize with --tp: the tp1 row is the quantized plan on one GPU (not the float plan),
    its floor that plan's bytes, and the table says 'int4 tp2 vs int4 tp1'."""
    calls = []

    def fake(cfg, prompts, gen_len, dtype, backend="cuda", progress=False, quantize=None, group_size=None,
             engine="llamagraph", tp=1):
        calls.append((engine, quantize, group_size, tp))
        g = compile_graph(cfg, dtype=dtype, max_batch=len(prompts), max_seq=len(prompts[0]) + gen_len,
                          quantize=quantize, group_size=group_size, tp=tp)
        return Result(engine, 300.0 if tp > 1 else 200.0, 1.0, 1000.0, 5.0, 1.0, 0.1, scheme=quantize,
                      label=engine_label(engine, quantize, dtype, tp), tp=tp), g

    monkeypatch.setattr(bench_mod, "bench_llamagraph", fake)
    rep = bench(tiny_config, batch=1, prompt_len=6, gen_len=3, dtype="float32", peers=(), device="cpu",
                log=lambda m: None, quantize="int4", group_size=32, tp=2)
    assert calls == [("llamagraph", "int4", 32, 2), ("llamagraph_tp1", "int4", 32, 1)]
    (b,) = rep.batches
    cfg = load_config(tiny_config)
    one = compile_graph(cfg, dtype="float32", max_batch=1, max_seq=9, quantize="int4", group_size=32)
    assert b.base_step_bytes == decode_step_bytes(one, cfg, 1, 6 + 3 / 2)
    table = rep.table()
    assert "llamagraph int4 tp2 (CUDA graphs)" in table and "llamagraph int4 tp1 (CUDA graphs)" in table
    assert "llamagraph int4 tp2 vs llamagraph int4 tp1: decode 1.50x" in table
