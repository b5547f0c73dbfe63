"""``--dump-dir`` pass diffs: beside each stage's IR (``NN_<pass>.txt``), a unified diff from the
previous stage (``NN_<pass>.diff``) that turns the previous dump into this one.

The diffs are checked by applying them with a small strict applier written here (every context
and removed line must match the previous dump), by the system ``patch`` when it is installed,
and against the op counts of the graphs the dumps parse back into.
"""

import collections
import os
import re
import shutil
import subprocess

import pytest

from llamagraph.cli import main
from llamagraph.ir import Graph, build_graph, load_config
from llamagraph.passes import PASS_NAMES
from llamagraph.passes.pipeline import run_pipeline

HUNK = re.compile(r"@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
NODE_OP = re.compile(r"^  \S.* = ([a-z_0-9]+)\(")  # a node line: `  %out: ... = op(args)`
STAGES = ["build", *PASS_NAMES]


def apply_unified_diff(source: str, diff: str) -> str:
    """Apply a unified diff to ``source``; fail when a context or removed line does not match."""
    src = source.splitlines(keepends=True)
    lines = diff.splitlines(keepends=True)
    assert lines[0].startswith("--- ") and lines[1].startswith("+++ "), lines[:2]
    out: list[str] = []
    pos, i = 0, 2
    while i < len(lines):
        m = HUNK.match(lines[i])
        assert m, f"not a hunk header: {lines[i]!r}"
        old_len = 1 if m[2] is None else int(m[2])
        new_len = 1 if m[4] is None else int(m[4])
        start = int(m[1]) if old_len == 0 else int(m[1]) - 1  # 0-based first line of the hunk
        assert start >= pos, "hunks out of order"
        out += src[pos:start]
        pos = start
        old_seen = new_seen = 0
        i += 1
        while i < len(lines) and not lines[i].startswith("@@"):
            tag, body = lines[i][0], lines[i][1:]
            assert tag in " -+", f"bad diff line {lines[i]!r}"
            if tag in " -":
                assert src[pos] == body, f"line {pos + 1}: diff expects {body!r}, source has {src[pos]!r}"
                pos += 1
                old_seen += 1
            if tag in " +":
                out.append(body)
                new_seen += 1
            i += 1
        assert (old_seen, new_seen) == (old_len, new_len), f"hunk {m[0]} has {old_seen}/{new_seen} lines"
    return "".join(out + src[pos:])


def _model(**over):
    # biases so that every fusion in the pipeline changes the graph
    cfg = load_config({"hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 2, "num_hidden_layers": 2,
                       "vocab_size": 32, "attention_bias": True, "mlp_bias": True, **over})
    return build_graph(cfg, dtype="float32", max_batch=1, max_seq=8, max_tokens=8)


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    d = tmp_path_factory.mktemp("dumps")
    run_pipeline(_model(), dump_dir=str(d))
    return d


def _stage(dumps, k: int, ext: str):
    return dumps / f"{k:02d}_{STAGES[k]}.{ext}"


def test_every_stage_but_the_build_has_a_diff(dumps):
    expected = {f"{k:02d}_{name}.txt" for k, name in enumerate(STAGES)}
    expected |= {f"{k:02d}_{name}.diff" for k, name in enumerate(STAGES) if k > 0}
    assert set(os.listdir(dumps)) == expected


def test_each_diff_turns_the_previous_dump_into_this_one(dumps):
    for k in range(1, len(STAGES)):
        before, after = _stage(dumps, k - 1, "txt").read_text(), _stage(dumps, k, "txt").read_text()
        diff = _stage(dumps, k, "diff").read_text()
        head = diff.splitlines()[:2]
        assert head == [f"--- {k - 1:02d}_{STAGES[k - 1]}.txt", f"+++ {k:02d}_{STAGES[k]}.txt"]
        assert apply_unified_diff(before, diff) == after, STAGES[k]


@pytest.mark.skipif(shutil.which("patch") is None, reason="no patch(1) on this machine")
def test_diffs_apply_with_patch(dumps, tmp_path):
    for k in range(1, len(STAGES)):
        out = tmp_path / f"{k:02d}.out"
        subprocess.run(["patch", "-s", "-o", str(out), str(_stage(dumps, k - 1, "txt")), str(_stage(dumps, k, "diff"))],
                       check=True, cwd=dumps)
        assert out.read_text() == _stage(dumps, k, "txt").read_text(), STAGES[k]


def _changed_ops(diff: str, sign: str) -> collections.Counter:
    return collections.Counter(m[1] for line in diff.splitlines()
                               if line.startswith(sign) and not line.startswith(sign * 3)
                               and (m := NODE_OP.match(line[1:])))


def test_fusion_diff_removes_the_matched_ops_and_adds_the_fused_one(dumps):
    k = STAGES.index("fuse_silu_mul")
    diff = _stage(dumps, k, "diff").read_text()
    removed, added = _changed_ops(diff, "-"), _changed_ops(diff, "+")
    assert removed["silu"] == 2 and removed["mul"] == 2  # one of each per layer
    assert added["silu_mul"] == 2
    before = _stage(dumps, k - 1, "txt").read_text().splitlines()
    after = _stage(dumps, k, "txt").read_text().splitlines()
    for line in diff.splitlines()[2:]:
        if line.startswith("-  %"):  # a removed node line: in the previous dump only
            assert line[1:] in before and line[1:] not in after
        elif line.startswith("+  %"):
            assert line[1:] in after and line[1:] not in before


def test_diff_op_lines_account_for_every_op_count_change(dumps):
    """Per pass: node lines added minus node lines removed, per op, equals the change in op
    counts between the two dumped graphs (parsed back from the .txt files)."""
    for k in range(1, len(STAGES)):
        before = Graph.from_text(_stage(dumps, k - 1, "txt").read_text()).op_counts()
        after = Graph.from_text(_stage(dumps, k, "txt").read_text()).op_counts()
        diff = _stage(dumps, k, "diff").read_text()
        net = _changed_ops(diff, "+")
        net.subtract(_changed_ops(diff, "-"))
        expected = {op: after.get(op, 0) - before.get(op, 0) for op in set(before) | set(after)}
        assert {op: n for op, n in net.items() if n} == {op: n for op, n in expected.items() if n}, STAGES[k]


def test_selected_passes_diff_against_the_last_stage_dumped(tmp_path):
    run_pipeline(_model(), passes=["fuse_silu_mul", "dce"], dump_dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["00_build.txt", "01_fuse_silu_mul.diff", "01_fuse_silu_mul.txt",
                                            "02_dce.diff", "02_dce.txt"]
    for prev, cur in (("00_build", "01_fuse_silu_mul"), ("01_fuse_silu_mul", "02_dce")):
        diff = (tmp_path / f"{cur}.diff").read_text()
        assert diff.startswith(f"--- {prev}.txt\n+++ {cur}.txt\n")
        assert apply_unified_diff((tmp_path / f"{prev}.txt").read_text(), diff) == (tmp_path / f"{cur}.txt").read_text()


def test_compile_report_mentions_the_diffs(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, '
                   '"num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 100}')
    dump = tmp_path / "dumps"
    assert main(["compile", str(cfg), "-o", str(tmp_path / "out"), "--dump-dir", str(dump)]) == 0
    report = capsys.readouterr().out
    n = len(STAGES)
    assert f"{n} files in {dump}" in report
    assert f"{n - 1} diffs against the stage before" in report
    assert len([f for f in os.listdir(dump) if f.endswith(".diff")]) == n - 1
