"""What makes `llamagraph compile` fast, tested without timing anything.

- the CLI imports no heavy package (torch, transformers, cupy) to compile;
- NVRTC compiles the kernels as several programs at once, one per group of kernels, and what
  it reports (each kernel's registers, spills, shared memory; the module image) is what one
  program of the whole source gives;
- NVRTC's output is kept on disk, so the same kernels are compiled once.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import threading

import pytest

from llamagraph.codegen import dense, nvrtc
from llamagraph.codegen.compiled import defined_kernels
from llamagraph.codegen.render import Kernel, module_source, prelude
from llamagraph.compiler import compile_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINYLLAMA = os.path.join(ROOT, "examples", "tinyllama-1.1b.json")
HEAVY = ("torch", "transformers", "cupy", "safetensors", "sentencepiece")

needs_nvrtc = pytest.mark.skipif(nvrtc.available("nvrtc") is None, reason="no NVRTC library on this machine")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Every test starts from an empty kernel cache of its own."""
    monkeypatch.setenv("LLAMAGRAPH_CACHE", str(tmp_path / "cache"))


def _small_source(dtype: str = "float16") -> str:
    """A few quick kernels, as module_source writes them."""
    return module_source([dense.gather_rows(dtype, 256), dense.add_rmsnorm(dtype, 256, 1e-5),
                          dense.elementwise("res", "a + b", "full", dtype, 256), dense.gemv(dtype, 256, 256, 1)])


def _count_compiles(monkeypatch) -> list[str]:
    """Record the text of every program NVRTC compiles (from any thread)."""
    seen: list[str] = []
    lock = threading.Lock()
    real = nvrtc._compile_nvrtc

    def counting(source, arch, options):
        with lock:
            seen.append(source)
        return real(source, arch, options)

    monkeypatch.setattr(nvrtc, "_compile_nvrtc", counting)
    return seen


# ---------------------------------------------------------------------------------------------
# imports
# ---------------------------------------------------------------------------------------------

def _modules_after(code: str, env: dict | None = None) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, cwd=ROOT, env=env, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_cli_imports_no_heavy_package():
    loaded = _modules_after("import llamagraph.cli")
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}


def test_compile_command_imports_no_heavy_package(tmp_path):
    # the whole command in one process, NVRTC included where it exists
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 192, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 96,
                               "max_position_embeddings": 64, "rms_norm_eps": 1e-5}))
    env = dict(os.environ, LLAMAGRAPH_CACHE=str(tmp_path / "cache"))
    loaded = _modules_after(f"from llamagraph.cli import main\nimport contextlib, io\n"
                            f"with contextlib.redirect_stdout(io.StringIO()):\n"
                            f"    assert main(['compile', {str(cfg)!r}, '-o', {str(tmp_path / 'out')!r}]) == 0", env)
    assert "llamagraph.report" in loaded  # it did compile
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}


def test_loading_a_plan_imports_no_networkx(tmp_path):
    """networkx only names a cycle when a schedule is out of order (verify) and lays out pictures:
    reading a compiled plan (verified on load) never imports it."""
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 192, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 96}))
    from llamagraph.compiler import compile_plan

    compile_plan(str(cfg), dtype="float16", max_seq=64).save(str(tmp_path / "plan"))
    loaded = _modules_after(f"from llamagraph.codegen.compiled import CompiledPlan\n"
                            f"from llamagraph.ir import verify\n"
                            f"verify(CompiledPlan.load({str(tmp_path / 'plan')!r}).graph)")
    assert "llamagraph.codegen.compiled" in loaded and "networkx" not in loaded


# ---------------------------------------------------------------------------------------------
# splitting a module into groups of kernels
# ---------------------------------------------------------------------------------------------

def test_kernel_spans_cut_after_each_kernel():
    plan = compile_plan(TINYLLAMA, max_seq=256)
    src = plan.source
    spans = nvrtc.kernel_spans(src)
    assert spans is not None and len(spans) == len(plan.kernels)
    assert spans[0][0] == len(prelude()) and spans[-1][1] == len(src)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # they tile the text after the prelude
    for (a, b), name in zip(spans, plan.kernels):
        assert defined_kernels(src[a:b]) == [name]
        assert src[a:b].rstrip().endswith("}")


def test_sources_not_made_by_module_source_stay_whole():
    one = 'extern "C" __global__ void k() {}\nextern "C" __global__ void j() {}\n'
    assert nvrtc.kernel_spans(one) is None and nvrtc.group_sources(one, 4) == [one]
    # braces inside comments and strings do not count
    tricky = prelude() + '// }\nextern "C" __global__ void a() { /* } */ }\nextern "C" __global__ void b() { char c = \'}\'; }\n'
    spans = nvrtc.kernel_spans(tricky)
    assert [defined_kernels(tricky[a:b]) for a, b in spans] == [["a"], ["b"]]


@pytest.mark.parametrize("groups", [1, 2, 3, 50])
def test_groups_hold_each_kernel_once_on_its_own_lines(groups):
    src = compile_plan(TINYLLAMA, max_seq=256).source
    texts = nvrtc.group_sources(src, groups)
    names = defined_kernels(src)
    assert len(texts) == min(groups, len(names))
    found = [k for t in texts for k in defined_kernels(t)]
    assert sorted(found) == sorted(names)
    lines = src.split("\n")
    for t in texts:
        assert t.startswith(prelude())
        mine = t.split("\n")
        assert len(mine) == len(lines)  # blanked line for line: the log's line numbers are kernels.cu's
        assert all(a == b or a == "" for a, b in zip(mine, lines))


# ---------------------------------------------------------------------------------------------
# compiling in groups
# ---------------------------------------------------------------------------------------------

@needs_nvrtc
def test_groups_report_what_the_whole_module_has():
    # TinyLlama fp16 holds the case that needs care: the prefill attention's extern __shared__
    # array pads other kernels' static shared memory in the one module, not in their own groups
    src = compile_plan(TINYLLAMA).source
    whole = nvrtc.compile_source(src, jobs=1)
    grouped = nvrtc.compile_source(src, jobs=3)
    assert whole.programs == 1 and grouped.programs == min(3 * nvrtc.PROGRAMS_PER_JOB, len(defined_kernels(src)))
    assert grouped.kernels == whole.kernels and set(whole.kernels) == set(defined_kernels(src))
    own = {}
    for text in nvrtc.group_sources(src, 3):
        own.update(nvrtc.parse_ptxas_log(nvrtc._program(text, "sm_90", (), True).log))
    assert own != whole.kernels  # (so this test does test the padding)
    assert grouped.cubin == whole.cubin  # the module image is the whole program's (here from the cache)


@needs_nvrtc
def test_parallel_programs_are_byte_identical_to_serial(monkeypatch):
    src = _small_source()
    real = nvrtc._compile_nvrtc
    in_threads: dict[str, tuple] = {}
    threads: set[int] = set()
    lock = threading.Lock()

    def recording(source, arch, options):
        out = real(source, arch, options)
        with lock:
            in_threads[source] = out
            threads.add(threading.get_ident())
        return out

    monkeypatch.setattr(nvrtc, "_compile_nvrtc", recording)
    nvrtc.compile_source(src, jobs=4, cache=False)
    assert len(in_threads) == 4 and threading.get_ident() not in threads
    untimed = re.compile(r"Compile time = [0-9.]+ ms")  # the one line of a log that may differ
    for text, (cubin, log, ptx) in in_threads.items():
        cubin_1, log_1, ptx_1 = real(text, "sm_90", ())  # one at a time
        assert cubin_1 == cubin and ptx_1 == ptx
        assert untimed.sub("", log_1) == untimed.sub("", log)


@needs_nvrtc
def test_group_error_names_the_line_of_the_whole_source():
    good = dense.add_rmsnorm("float16", 256, 1e-5)
    bad = Kernel("k_bad", 'extern "C" __global__ void k_bad(float* x) {\n    x[0] = not_declared;\n}\n')
    src = module_source([good, bad, dense.gather_rows("float16", 256)])
    line = src.split("\n").index("    x[0] = not_declared;") + 1
    with pytest.raises(nvrtc.CompileError, match=rf"llamagraph\.cu\({line}\).*not_declared"):
        nvrtc.compile_source(src, jobs=3)


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------

@needs_nvrtc
def test_second_compile_reads_the_cache(monkeypatch, tmp_path):
    src = _small_source()
    n = len(nvrtc.group_sources(src, 2 * nvrtc.PROGRAMS_PER_JOB))
    assert n > 1
    seen = _count_compiles(monkeypatch)
    first = nvrtc.compile_source(src, jobs=2)
    assert len(seen) == n and first.programs == n
    assert len(os.listdir(tmp_path / "cache" / "nvrtc")) == 2 * n  # .cubin and .json per program

    again = nvrtc.compile_source(src, jobs=2)
    assert len(seen) == n  # nothing compiled
    assert again.kernels == first.kernels and again.log == first.log

    nvrtc.compile_source(src, jobs=2, options=("-lineinfo",))  # other options: other programs
    nvrtc.compile_source(src, "sm_80", jobs=2)  # another arch too
    assert len(seen) == 3 * n
    nvrtc.compile_source(src, jobs=2, cache=False)
    assert len(seen) == 4 * n


@needs_nvrtc
def test_a_broken_cache_entry_is_compiled_again(monkeypatch, tmp_path):
    src = _small_source("bfloat16")
    first = nvrtc.compile_source(src, jobs=1)
    folder = tmp_path / "cache" / "nvrtc"
    (cubin,) = glob.glob(str(folder / "*.cubin"))
    with open(cubin, "r+b") as f:
        f.truncate(100)  # a process died writing it (renames make this unlikely, not impossible)
    seen = _count_compiles(monkeypatch)
    again = nvrtc.compile_source(src, jobs=1)
    assert len(seen) == 1 and again.cubin == first.cubin
    assert os.path.getsize(cubin) == len(first.cubin)  # and kept whole this time


@needs_nvrtc
def test_compile_command_writes_the_same_report_in_groups_and_whole(tmp_path, monkeypatch, capsys):
    from llamagraph.cli import main

    outs = {}
    for jobs in (1, 2):
        monkeypatch.setattr(nvrtc, "default_jobs", lambda jobs=jobs: jobs)
        assert main(["compile", TINYLLAMA, "--max-seq", "512", "-o", str(tmp_path / f"j{jobs}")]) == 0
        report = re.sub(r" in [0-9.]+ s", "", capsys.readouterr().out.replace(str(tmp_path / f"j{jobs}"), "OUT"))
        outs[jobs] = (report, (tmp_path / f"j{jobs}" / "kernels.txt").read_text(),
                      (tmp_path / f"j{jobs}" / "plan.json").read_text())
    assert outs[1] == outs[2]
