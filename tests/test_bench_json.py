"""``llamagraph bench``'s tables and JSON, from a made-up report (no GPU), and its command line:
batch lists, peers, bad arguments as one line and exit 2, and what reaches ``bench()``."""

import json
import math
import subprocess
import sys

import pytest

import llamagraph.bench as bench_mod
from llamagraph.bench import ENGINES, BatchReport, BenchReport, Result
from llamagraph.cli import build_parser, main

TINYLLAMA = "examples/tinyllama-1.1b.json"
FIELDS = {"name", "decode_tok_s", "pct_floor", "ms_per_step", "prefill_tok_s", "ttft_ms", "compile_s", "warmup_s",
          "vs_gptfast", "vs_hf_eager", "prefill_vs_gptfast", "prefill_vs_hf_eager", "vs_unquantized", "scheme",
          "note"}

# (engine, decode tok/s, prefill tok/s, TTFT ms, compile s, warm-up s) per batch; floor 200 and 1600 tok/s
FIGURES = {
    1: [("llamagraph", 150.0, 9000.0, 12.0, 3.5, 0.8), ("gptfast", 120.0, 7500.0, 15.0, 41.0, None),
        ("hf", 30.0, 6000.0, 20.0, None, 2.0), ("compile", 60.0, 5000.0, 25.0, 70.0, None)],
    8: [("llamagraph", 1300.0, 20000.0, 40.0, 3.6, 0.9), ("gptfast", 1000.0, 16000.0, 45.0, 38.0, None),
        ("hf", 240.0, 12500.0, 60.0, None, 2.5)],
}
FLOOR = {1: 200.0, 8: 1600.0}


def fake_report(failed_compile_at_8: bool = True) -> BenchReport:
    rep = BenchReport("examples/llama-3-8b.json", 128, 128, "float16", "NVIDIA H100 80GB HBM3", 3000.0,
                      {"layers": 32}, ["gptfast", "hf", "compile"], {"torch": "2.11"})
    for batch, rows in FIGURES.items():
        b = BatchReport(batch, 16_000_000_000, FLOOR[batch])
        for eng, dec, pre, ttft, comp, warm in rows:
            b.results.append(Result(eng, dec, 1e3 * batch / dec, pre, ttft, comp, warm))
        rep.batches.append(b)
    if failed_compile_at_8:
        rep.batches[1].results.append(Result("compile", note="failed: OutOfMemoryError: CUDA out of memory"))
    return rep


def _rows(table: str, batch: int) -> dict[str, list[str]]:
    """engine name -> the fields after it, in the table of ``batch``."""
    block = next(b for b in table.split("\n\n") if f": batch {batch}," in b.splitlines()[0])
    out = {}
    for line in block.splitlines()[3:]:
        for name in ENGINES.values():
            if line.startswith(name + " "):
                out[name] = line[len(name):].split("  (")[0].split()
    return out


def test_one_table_per_batch_with_every_figure_and_both_ratios():
    table = fake_report().table()
    assert [ln for ln in table.splitlines() if ": batch " in ln] == [
        "examples/llama-3-8b.json: batch 1, prompt 128, 128 new tokens, float16, NVIDIA H100 80GB HBM3",
        "examples/llama-3-8b.json: batch 8, prompt 128, 128 new tokens, float16, NVIDIA H100 80GB HBM3"]
    for batch, rows in FIGURES.items():
        got = _rows(table, batch)
        dec = {eng: d for eng, d, *_ in rows}
        for eng, d, pre, ttft, comp, warm in rows:
            prefill, decode, ms, pct, ttft_s, comp_s, warm_s, vs_gf, vs_hf = got[ENGINES[eng]]
            assert float(decode) == pytest.approx(d, abs=0.05)
            assert float(prefill) == pytest.approx(pre, abs=0.5)
            assert float(ms) == pytest.approx(1e3 * batch / d, abs=5e-4)
            assert pct == f"{100 * d / FLOOR[batch]:.1f}%"
            assert float(ttft_s) == pytest.approx(ttft, abs=0.05)
            assert comp_s == ("-" if comp is None else f"{comp:.1f}")
            assert warm_s == ("-" if warm is None else f"{warm:.1f}")
            assert vs_gf == f"{d / dec['gptfast']:.2f}x" and vs_hf == f"{d / dec['hf']:.2f}x"


def test_a_failed_peer_row_has_no_figures_and_says_why():
    table = fake_report().table()
    row = _rows(table, 8)["HF static cache + torch.compile"]
    assert row == ["-"] * 9
    (line,) = [ln for ln in table.splitlines() if ln.startswith("HF static cache") and "batch" not in ln
               and "failed" in ln]
    assert line.endswith("(failed: OutOfMemoryError: CUDA out of memory)")


def test_summary_lines_compare_llamagraph_with_gpt_fast_and_hf_eager():
    table = fake_report().table()
    # batch 1: decode 150 / 120 and 150 / 30; prefill 9000 / 7500 and 9000 / 6000
    assert "llamagraph vs gpt-fast: decode 1.25x, prefill 1.20x, TTFT 12.0 ms vs 15.0 ms" in table
    assert "llamagraph vs HF eager: decode 5.00x, prefill 1.50x, TTFT 12.0 ms vs 20.0 ms" in table


def test_ab_bench_still_reads_decode_and_pct_floor_of_the_llamagraph_row():
    # tools/ab_bench.sh takes fields 4 and 6 of the line starting "llamagraph (CUDA graphs)"
    line = next(ln for ln in fake_report().table().splitlines() if ln.startswith("llamagraph (CUDA graphs)"))
    assert float(line.split()[4]) == 150.0 and line.split()[6] == "75.0%"


def test_without_peers_the_ratio_columns_are_empty():
    rep = fake_report()
    for b in rep.batches:
        b.results = [r for r in b.results if r.engine == "llamagraph"]
    for batch in FIGURES:
        assert _rows(rep.table(), batch)["llamagraph (CUDA graphs)"][-2:] == ["-", "-"]
    assert "llamagraph vs" not in rep.table()


def test_json_has_every_figure_per_batch_and_engine(tmp_path):
    rep = fake_report()
    path = tmp_path / "bench.json"
    rep.write_json(str(path))
    data = json.loads(path.read_text())
    assert {k: data[k] for k in ("config", "dtype", "device", "prompt_len", "gen_len", "copy_gb_s", "peers")} == {
        "config": "examples/llama-3-8b.json", "dtype": "float16", "device": "NVIDIA H100 80GB HBM3",
        "prompt_len": 128, "gen_len": 128, "copy_gb_s": 3000.0, "peers": ["gptfast", "hf", "compile"]}
    assert data["model"] == {"layers": 32} and data["versions"] == {"torch": "2.11"}
    assert data["quantize"] is None and data["group_size"] is None
    assert [b["batch"] for b in data["batches"]] == [1, 8]
    for b in data["batches"]:
        rows = FIGURES[b["batch"]]
        dec = {eng: d for eng, d, *_ in rows}
        pre = {eng: p for eng, _, p, *_ in rows}
        assert b["step_bytes"] == 16_000_000_000 and b["floor_tok_s"] == FLOOR[b["batch"]]
        assert b["base_step_bytes"] is None and b["base_floor_tok_s"] is None
        for eng, d, p, ttft, comp, warm in rows:
            e = b["engines"][eng]
            assert set(e) == FIELDS and e["name"] == ENGINES[eng]
            assert e["decode_tok_s"] == d and e["prefill_tok_s"] == p and e["ttft_ms"] == ttft
            assert e["compile_s"] == comp and e["warmup_s"] == warm
            assert e["ms_per_step"] == pytest.approx(1e3 * b["batch"] / d)
            assert e["pct_floor"] == pytest.approx(100 * d / FLOOR[b["batch"]])
            assert e["vs_gptfast"] == pytest.approx(d / dec["gptfast"])
            assert e["vs_hf_eager"] == pytest.approx(d / dec["hf"])
            assert e["prefill_vs_hf_eager"] == pytest.approx(p / pre["hf"])
            assert e["vs_unquantized"] is None and e["scheme"] is None  # nothing is quantized
    failed = data["batches"][1]["engines"]["compile"]
    assert all(failed[k] is None for k in FIELDS - {"name", "note"}) and failed["note"].startswith("failed:")


def test_json_is_strict_where_a_figure_is_not_finite():
    rep = fake_report()
    rep.batches[0].results[0].ttft_ms = math.nan
    rep.batches[0].results[1].decode_tok_s = math.inf
    data = json.loads(rep.to_json())  # to_json refuses NaN / inf (allow_nan=False): they become null
    assert data["batches"][0]["engines"]["llamagraph"]["ttft_ms"] is None
    assert data["batches"][0]["engines"]["gptfast"]["decode_tok_s"] is None
    assert data["batches"][0]["engines"]["llamagraph"]["vs_gptfast"] is None


# ---- the command line ----------------------------------------------------------------------------

def test_batch_list_and_peers_parse():
    args = build_parser().parse_args(["bench", TINYLLAMA, "--random-weights", "--batch", "1,8,16"])
    assert args.batch == [1, 8, 16] and args.peers == "gptfast,hf,compile" and args.json is None
    assert build_parser().parse_args(["bench", TINYLLAMA, "--random-weights"]).batch == [1]
    assert build_parser().parse_args(["bench", TINYLLAMA, "--random-weights", "--batch", "4"]).batch == [4]


@pytest.mark.parametrize("argv, words", [
    (["--batch", "1,,8"], "--batch: must be a positive integer, got ''"),
    (["--batch", "1,x"], "--batch: must be a positive integer, got 'x'"),
    (["--batch", "0,8"], "--batch: must be a positive integer, got '0'"),
    (["--batch", "8,-1"], "--batch: must be a positive integer, got '-1'"),
    (["--batch", "1,8,1"], "--batch: a batch size repeats in '1,8,1'"),
    (["--batch", f"1,{10**9}"], "--batch: must be at most"),
    (["--peers", "gptfast,vllm"], "unknown peer 'vllm'; choose from gptfast, hf, compile, none"),
    (["--gen-len", "1"], "--gen-len: must be at least 2"),
    (["--json", "/nonexistent-dir/bench.json"], "--json: /nonexistent-dir is not a directory"),
])
def test_bad_bench_arguments_are_one_line_and_exit_2(argv, words, capsys):
    rc = main(["bench", TINYLLAMA, "--random-weights", *argv])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and words in err, err


def test_cmd_bench_passes_the_arguments_and_prints_and_writes_the_report(monkeypatch, tmp_path, capsys):
    from llamagraph.runtime.cuda import CudaExecutor

    seen = {}

    def fake_bench(config, **kw):
        seen.update(kw, config=config)
        return fake_report()

    monkeypatch.setattr(CudaExecutor, "check_available", staticmethod(lambda: None))
    monkeypatch.setattr(bench_mod, "bench", fake_bench)
    path = tmp_path / "out.json"
    rc = main(["bench", TINYLLAMA, "--random-weights", "--batch", "1,8", "--peers", "hf,gptfast,hf",
               "--prompt-len", "2048", "--gen-len", "8", "--dtype", "bfloat16", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert seen["config"] == TINYLLAMA and seen["batch"] == [1, 8] and seen["peers"] == ("hf", "gptfast")
    assert (seen["prompt_len"], seen["gen_len"], seen["dtype"]) == (2048, 8, "bfloat16")
    assert out == fake_report().table() + "\n" + f"wrote {path}\n"
    assert json.loads(path.read_text()) == fake_report().to_dict()


def test_peers_none_runs_llamagraph_alone(monkeypatch, capsys):
    from llamagraph.runtime.cuda import CudaExecutor

    seen = {}
    monkeypatch.setattr(CudaExecutor, "check_available", staticmethod(lambda: None))
    monkeypatch.setattr(bench_mod, "bench", lambda config, **kw: seen.update(kw) or fake_report())
    assert main(["bench", TINYLLAMA, "--random-weights", "--peers", "none"]) == 0
    assert seen["peers"] == () and seen["batch"] == [1]


def test_importing_the_cli_and_bench_does_not_import_torch():
    code = ("import sys, llamagraph, llamagraph.bench, llamagraph.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'cupy') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
