"""The weight-upload progress bar of the CUDA backend (its drawing needs no GPU)."""

from llamagraph.runtime.cuda import _Progress


def test_progress_bar_draws_on_one_line_and_ends_at_100_percent(capsys):
    bar = _Progress(total=4 << 30, enabled=True)
    for name in ("embed.w", "l0.qkv.w", "l0.gate_up.w", "lm_head.w"):
        bar(1 << 30, name)
    err = capsys.readouterr().err
    frames = err.split("\r")[1:]
    assert len(frames) == 4 and err.endswith("\n") and err.count("\n") == 1
    assert "25.0%" in frames[0] and "100.0%" in frames[-1] and "4.00 GiB" in frames[-1] and "lm_head.w" in frames[-1]


def test_progress_bar_silent_when_disabled(capsys):
    bar = _Progress(total=10, enabled=False)
    bar(10, "x")
    assert capsys.readouterr().err == ""
