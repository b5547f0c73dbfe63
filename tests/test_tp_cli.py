"""`--tp N` on the command line (compile, dump, run, chat, bench), the compile report's tensor
parallel section, and ``llamagraph bench``'s tensor-parallel rows (per-GPU floor, the tp1 plan
beside it, ``vs tp1``), all on the CPU. Expected figures come from the config and from plans
compiled at tp 1, not from the report code."""

import json
import math
import os

import pytest

import llamagraph.bench as bench_mod
from llamagraph.bench import BatchReport, BenchReport, Result, bench, decode_step_bytes, engine_label
from llamagraph.cli import build_parser, main
from llamagraph.compiler import compile_graph, compile_plan
from llamagraph.ir import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
            vocab_size=96, max_position_embeddings=64, rms_norm_eps=1e-5)


def write_config(tmp_path, name="config.json", **over) -> str:
    path = tmp_path / name
    path.write_text(json.dumps({**TINY, **over}))
    return str(path)


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(rc, err, *words) -> str:
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("llamagraph: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def section(report: str, title: str) -> list[str]:
    """The lines of one titled section of the compile report."""
    lines = report.splitlines()
    start = lines.index(f"{title}:") + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("  ")), len(lines))
    return [x.strip() for x in lines[start:end]]


# ---------------------------------------------------------------------------------------------
# compile and dump
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv, vocab, tp", [(2, 96, 2), (1, 97, 2), (2, 97, 4)],
                         ids=["gqa-tp2", "mqa-odd-vocab-tp2", "gqa-odd-vocab-tp4"])
def test_compile_report_has_the_tensor_parallel_section(tmp_path, capsys, kv, vocab, tp):
    cfg = write_config(tmp_path, num_key_value_heads=kv, vocab_size=vocab)
    out = tmp_path / "plan"
    rc, report, err = cli(capsys, "compile", cfg, "--tp", tp, "-o", out, "--max-seq", 32)
    assert rc == 0, err
    lines = section(report, "tensor parallel")
    text = "\n".join(lines)
    kvl = kv // tp if kv >= tp else 1
    assert lines[0].startswith(f"{tp} ranks")
    assert f"attention: {4 // tp} of 4 q heads and {kvl} " in text
    assert ("KV heads replicated" in text) == (kv < tp)
    assert f"ffn: {192 // tp} of 192 intermediate columns per rank" in text
    chunk = math.ceil(vocab / tp)
    pad = chunk * tp - vocab
    assert f"lm head: {chunk} of {vocab} vocabulary rows per rank" in text
    assert (f"last rank: {pad} zero padding row" in text) == (pad > 0)
    assert "collectives per step: 4 all_reduce" in text and "1 all_gather_vocab" in text  # 2 layers x (O, down)
    # bytes against the plan compiled at tp 1 (its memory planner's totals)
    rank = compile_plan(cfg, tp=tp, max_seq=32).graph.meta["memory"]
    whole = compile_plan(cfg, max_seq=32).graph.meta["memory"]
    assert f"weights per rank: {rank['weight_bytes']} bytes" in text
    assert f"vs {whole['weight_bytes']} bytes" in text and rank["weight_bytes"] < whole["weight_bytes"]
    assert rank["kv_cache_bytes"] * kv == whole["kv_cache_bytes"] * kvl
    assert f"kv cache per rank: {rank['kv_cache_bytes']} bytes" in text and f"vs {whole['kv_cache_bytes']} bytes" in text
    assert "memory (per rank):" in report
    saved = json.loads((out / "plan.json").read_text())["graph"]["meta"]
    assert saved["tp"] == tp and saved["tp_heads"] == [4 // tp, kvl]
    for name in ("graph.txt", "graph.html"):  # the pictures draw the collectives
        assert "all_reduce" in (out / name).read_text() and "all_gather_vocab" in (out / name).read_text(), name
    assert (out / "memory_plan.html").read_text().startswith("<!DOCTYPE html>")


def test_compile_report_without_tp_has_no_tensor_parallel_section(tmp_path, capsys):
    rc, report, err = cli(capsys, "compile", write_config(tmp_path), "-o", tmp_path / "plan", "--max-seq", 32)
    assert rc == 0, err
    assert "tensor parallel:" not in report and "memory:" in report


def test_tied_embeddings_weights_per_rank_hold_the_whole_table(tmp_path, capsys):
    """A tied LM head gets its own sharded copy of the table: per rank, the whole table (for the
    embedding gather) plus 1/tp of it; unsharded, the table once."""
    cfg = write_config(tmp_path, tie_word_embeddings=True)
    rc, report, err = cli(capsys, "compile", cfg, "--tp", 2, "-o", tmp_path / "plan", "--dtype", "float32")
    assert rc == 0, err
    text = "\n".join(section(report, "tensor parallel"))
    whole = compile_plan(cfg, dtype="float32").graph.meta["memory"]["weight_bytes"]
    rank = compile_plan(cfg, dtype="float32", tp=2).graph.meta["memory"]["weight_bytes"]
    table, norms = 96 * 64 * 4, (2 * 2 + 1) * 64 * 4  # fp32; two norms per layer and the final one
    split = whole - table - norms  # the projections, halved per rank; norms and the table stay whole
    assert rank == split // 2 + norms + table + table // 2
    assert f"weights per rank: {rank} bytes" in text and f"vs {whole} bytes" in text


def test_dump_after_the_shard_pass(tmp_path, capsys):
    rc, out, err = cli(capsys, "dump", write_config(tmp_path), "--tp", 2, "--after", "shard_tensor_parallel")
    assert rc == 0, err
    assert out.count("= all_reduce(") == 4 and out.count("= all_gather_vocab(") == 1
    assert "token_logprobs" not in out and '"tp":2' in out


# ---------------------------------------------------------------------------------------------
# run (reference backend)
# ---------------------------------------------------------------------------------------------

def generated(out: str) -> list[int]:
    return [int(t) for t in out.split("generated ids:")[1].split()]


RUN = ["--random-weights", "--backend", "reference", "--dtype", "float32", "--max-seq", 32, "--prompt-len", 6,
       "--max-new-tokens", 8]


@pytest.mark.parametrize("tp", [2, 4])
def test_run_tp_gives_the_tokens_of_tp1(tmp_path, capsys, tp):
    cfg = write_config(tmp_path, vocab_size=97)
    rc, one, err = cli(capsys, "run", cfg, *RUN, "--tp", 1)
    assert rc == 0, err
    rc, many, err = cli(capsys, "run", cfg, *RUN, "--tp", tp)
    assert rc == 0, err
    assert generated(many) == generated(one) and len(generated(one)) == 8
    assert many.splitlines()[0] == one.splitlines()[0]  # the same prompt


def test_run_a_tp_plan_directory(tmp_path, capsys):
    cfg = write_config(tmp_path)
    plan = tmp_path / "plan"
    assert cli(capsys, "compile", cfg, "--tp", 2, "-o", plan, "--dtype", "float32", "--max-seq", 32)[0] == 0
    rc, direct, err = cli(capsys, "run", cfg, *RUN, "--tp", 2)
    assert rc == 0, err
    run_args = [a for a in RUN if a not in ("--dtype", "float32", "--max-seq", 32)]
    for extra in ([], ["--tp", 2]):  # its own rank count, said or not
        rc, out, err = cli(capsys, "run", plan, *run_args, *extra)
        assert rc == 0, err
        assert generated(out) == generated(direct)
    for other in (1, 4):
        rc, out, err = cli(capsys, "run", plan, *run_args, "--tp", other)
        one_error_line(rc, err, "argument --tp", "compiled plan", "(tp 2)", f"--tp {other}")


def test_run_a_tp1_plan_directory_with_tp2_is_refused(tmp_path, capsys):
    plan = tmp_path / "plan"
    assert cli(capsys, "compile", write_config(tmp_path), "-o", plan, "--dtype", "float32", "--max-seq", 32)[0] == 0
    rc, out, err = cli(capsys, "run", plan, "--random-weights", "--backend", "reference", "--tp", 2)
    one_error_line(rc, err, "argument --tp", "(tp 1)")


# ---------------------------------------------------------------------------------------------
# bad values: one line, exit 2
# ---------------------------------------------------------------------------------------------

COMMANDS = {
    "compile": lambda cfg, out: ["compile", cfg, "-o", out],
    "dump": lambda cfg, out: ["dump", cfg],
    "run": lambda cfg, out: ["run", cfg, *RUN],
    "bench": lambda cfg, out: ["bench", cfg, "--random-weights"],
    "chat": lambda cfg, out: ["chat", cfg],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5", ""])
def test_bad_tp_values_are_usage_errors(tmp_path, capsys, command, value):
    rc, out, err = cli(capsys, *COMMANDS[command](write_config(tmp_path), tmp_path / "out"), f"--tp={value}")
    one_error_line(rc, err, "argument --tp: must be a positive integer", repr(value))
    assert out == "" and not (tmp_path / "out").exists()


GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "format": "gptq"}


@pytest.mark.parametrize("command", ["compile", "dump", "run", "bench"])
def test_tp_with_a_gptq_checkpoint_is_the_compilers_one_line_error(tmp_path, capsys, command):
    """bench included: refused before any GPU work (no GPU is patched in here)."""
    cfg = write_config(tmp_path, quantization_config=GPTQ)
    rc, out, err = cli(capsys, *COMMANDS[command](cfg, tmp_path / "out"), "--tp", 2)
    one_error_line(rc, err, "tp 2: this checkpoint is gptq int4", "not sharded yet")
    assert not (tmp_path / "out").exists()


def test_tp_with_compile_time_quantization_compiles_and_reports_both(tmp_path, capsys):
    rc, report, err = cli(capsys, "compile", write_config(tmp_path), "-o", tmp_path / "out", "--max-seq", 32,
                          "--tp", 2, "--quantize", "int4", "--group-size", 32)
    assert rc == 0, err
    assert "tensor parallel:" in report and "int4" in report


@pytest.mark.parametrize("command", ["compile", "dump", "run", "bench"])
def test_tp_the_heads_do_not_split_by_names_the_dimension(tmp_path, capsys, command):
    rc, out, err = cli(capsys, *COMMANDS[command](write_config(tmp_path), tmp_path / "out"), "--tp", 3)
    one_error_line(rc, err, "tp 3", "num_attention_heads 4 is not divisible by 3")


def test_tp_parses_on_every_command_that_compiles(tmp_path):
    cfg = write_config(tmp_path)
    p = build_parser()
    for command in COMMANDS:
        argv = [str(a) for a in COMMANDS[command](cfg, tmp_path / "out")]
        default = p.parse_args(argv).tp
        assert default == (None if command in ("run", "chat") else 1)  # run / chat: a plan dir keeps its own
        assert p.parse_args(argv + ["--tp", "8"]).tp == 8


# ---------------------------------------------------------------------------------------------
# bench: what reaches bench(), the table and JSON of a tensor-parallel report, bench() on the CPU
# ---------------------------------------------------------------------------------------------

TINYLLAMA = os.path.join(ROOT, "examples", "tinyllama-1.1b.json")


@pytest.fixture
def fake_bench(monkeypatch):
    from llamagraph.runtime.cuda import CudaExecutor

    seen = {}
    monkeypatch.setattr(CudaExecutor, "check_available", staticmethod(lambda: None))
    monkeypatch.setattr(bench_mod, "bench", lambda config, **kw: seen.update(kw) or tp_report())
    return seen


@pytest.mark.parametrize("argv, tp, tp1, peers, note", [
    ([], 1, True, ("gptfast", "hf", "compile"), False),
    (["--tp", "2"], 2, True, (), True),  # the peers are single-GPU: not run unless asked
    (["--tp", "2", "--no-tp1"], 2, False, (), True),
    (["--tp", "2", "--peers", "gptfast"], 2, True, ("gptfast",), False),
    (["--tp", "2", "--peers", "gptfast,hf,compile"], 2, True, ("gptfast", "hf", "compile"), False),
    (["--tp", "4", "--peers", "none"], 4, True, (), False),
])
def test_cli_passes_tp_and_picks_the_peers(fake_bench, capsys, argv, tp, tp1, peers, note):
    assert main(["bench", TINYLLAMA, "--random-weights", *argv]) == 0
    out, err = capsys.readouterr()
    assert (fake_bench["tp"], fake_bench["tp1"], fake_bench["peers"]) == (tp, tp1, peers)
    assert ("the PyTorch peers run on one GPU" in err) == note
    assert out == tp_report().table() + "\n"


def test_no_tp1_without_tp_is_a_usage_error(fake_bench, capsys):
    rc = main(["bench", TINYLLAMA, "--random-weights", "--no-tp1"])
    one_error_line(rc, capsys.readouterr().err, "argument --no-tp1: only with --tp N > 1")
    assert fake_bench == {}


# a made-up tp 2 report: per-GPU floor 400 tok/s (step bytes 10 GB), one-GPU floor 200 tok/s (20 GB)
def tp_report(tp1: bool = True) -> BenchReport:
    rep = BenchReport("examples/llama-3-8b.json", 128, 128, "float16", "2 x NVIDIA H200", 4000.0, {"layers": 32},
                      [], {}, tp=2)
    b = BatchReport(1, 10_000_000_000, 400.0, base_step_bytes=20_000_000_000, base_floor_tok_s=200.0)
    b.results.append(Result("llamagraph", 320.0, 1e3 / 320.0, 9000.0, 9.0, 5.0, 1.0,
                            label=engine_label("llamagraph", None, "float16", 2), tp=2))
    if tp1:
        b.results.append(Result("llamagraph_tp1", 180.0, 1e3 / 180.0, 6000.0, 12.0, 4.0, 1.0))
    rep.batches.append(b)
    return rep


def test_tp_table_has_the_per_gpu_floor_and_vs_tp1():
    table = tp_report().table()
    lines = table.splitlines()
    assert "tensor parallel over 2 GPUs, floor per GPU, 2 x NVIDIA H200" in lines[0]
    assert "10.000 GB per GPU (tp2) -> floor 400.0 tok/s" in lines[1] and "tp1: 20.000 GB on one GPU" in lines[1]
    assert lines[2].rstrip().endswith("vs tp1")
    rows = {line[:33].strip(): line[33:].split() for line in lines[3:5]}
    tp2, tp1 = rows["llamagraph tp2 (CUDA graphs)"], rows["llamagraph tp1 (CUDA graphs)"]
    assert tp2[3] == f"{100 * 320 / 400:.1f}%" and tp1[3] == f"{100 * 180 / 200:.1f}%"  # each against its own floor
    assert tp2[-1] == f"{320 / 180:.2f}x" and tp1[-1] == "1.00x"
    assert f"llamagraph tp2 vs llamagraph tp1: decode {320 / 180:.2f}x (floor 2.00x" in table
    assert "Tensor parallel: the floor of the tp2 row is per GPU" in table


def test_tp_json_says_per_gpu_and_has_vs_tp1():
    data = json.loads(tp_report().to_json())
    assert data["tp"] == 2 and data["floor"] == "per GPU"
    b = data["batches"][0]
    assert b["step_bytes"] == 10_000_000_000 and b["base_step_bytes"] == 20_000_000_000
    eng = b["engines"]
    assert eng["llamagraph"]["vs_tp1"] == pytest.approx(320 / 180) and eng["llamagraph"]["tp"] == 2
    assert eng["llamagraph"]["pct_floor"] == pytest.approx(80.0) and eng["llamagraph_tp1"]["pct_floor"] == pytest.approx(90.0)
    assert eng["llamagraph_tp1"]["tp"] == 1 and eng["llamagraph_tp1"]["name"] == "llamagraph tp1 (CUDA graphs)"


def test_tp_table_without_the_tp1_row_keeps_its_floor():
    table = tp_report(tp1=False).table()
    assert "tp1: 20.000 GB on one GPU -> floor 200.0 tok/s" in table
    assert "vs llamagraph tp1" not in table


@pytest.mark.parametrize("tp1", [True, False])
def test_bench_on_the_cpu_runs_the_tp_plan_and_the_tp1_plan(tmp_path, tp1):
    cfg_path = write_config(tmp_path, vocab_size=97)
    rep = bench(cfg_path, batch=[1, 2], prompt_len=4, gen_len=3, dtype="float32", peers=(), device="cpu",
                log=lambda m: None, tp=2, tp1=tp1)
    cfg = load_config(cfg_path)
    assert rep.tp == 2 and rep.device == "2 x cpu"
    for b in rep.batches:
        assert [r.engine for r in b.results] == ["llamagraph"] + (["llamagraph_tp1"] if tp1 else [])
        ours = b.result("llamagraph")
        assert ours.tp == 2 and ours.name == "llamagraph tp2 (CUDA graphs)" and ours.decode_tok_s > 0
        rank = compile_graph(cfg, dtype="float32", max_batch=b.batch, max_seq=7, tp=2)
        whole = compile_graph(cfg, dtype="float32", max_batch=b.batch, max_seq=7)
        assert b.step_bytes == decode_step_bytes(rank, cfg, b.batch, 4 + 3 / 2)
        assert b.base_step_bytes == decode_step_bytes(whole, cfg, b.batch, 4 + 3 / 2) > b.step_bytes
        if tp1:
            assert b.ratio(ours, "llamagraph_tp1") == pytest.approx(ours.decode_tok_s / b.result("llamagraph_tp1").decode_tok_s)


@pytest.mark.parametrize("example, dtype, tied", [("llama-3-8b.json", "bfloat16", False),
                                                  ("llama-3.2-1b.json", "float16", True)])
def test_decode_step_bytes_of_a_rank_graph_are_one_ranks_shard(example, dtype, tied):
    cfg = load_config(os.path.join(ROOT, "examples", example))
    assert cfg.tie_word_embeddings == tied
    g = compile_graph(cfg, dtype=dtype, max_batch=4, max_seq=256, tp=2)
    D, V, L, H, KV, HD, I = (cfg.hidden_size, cfg.vocab_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
                             cfg.head_dim, cfg.intermediate_size)
    per_layer = D * (H // 2 + 2 * KV // 2) * HD + H // 2 * HD * D + 3 * D * I // 2 + 2 * D
    head = math.ceil(V / 2) * D  # this rank's vocabulary chunk (its own value even when tied)
    weights = 2 * (L * per_layer + D + head)
    embed_rows = 4 * 2 * D  # the embedding table is only gathered: one row per sequence
    kv = 4 * 100 * 2 * L * (KV // 2) * HD * 2
    assert decode_step_bytes(g, cfg, 4, 100) == weights + embed_rows + kv


def test_bench_closes_each_tensor_parallel_runner_before_the_next_plan(tmp_path, monkeypatch):
    """The NCCL clique of a TP runner is released (close) before the next plan is compiled."""
    import llamagraph

    events, real = [], llamagraph.compile

    def compile_and_watch(*a, **kw):
        events.append(f"compile tp{kw.get('tp', 1)}")
        plan = real(*a, **kw)
        if kw.get("tp", 1) > 1:
            plan.executor.close = lambda: events.append("close")
        return plan

    monkeypatch.setattr(llamagraph, "compile", compile_and_watch)
    bench(write_config(tmp_path), batch=[1, 2], prompt_len=4, gen_len=3, dtype="float32", peers=(), device="cpu",
          log=lambda m: None, tp=2)
    assert events == ["compile tp2", "close", "compile tp1"] * 2
