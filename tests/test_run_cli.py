"""`llamagraph run` (text in, text out) on the reference backend, and the no-GPU errors."""

import importlib.util
import os
import subprocess
import sys

import pytest

import llamagraph
from llamagraph.cli import main

CORPUS = "the quick brown fox jumps over the lazy dog. a llama graph compiles kernels fast.\n" * 40


@pytest.fixture(scope="module")
def checkpoint_with_tokenizer(tmp_path_factory, hf_model):
    """The tiny gqa checkpoint plus a sentencepiece tokenizer.model trained for its vocabulary."""
    import shutil

    import sentencepiece as spm

    d = tmp_path_factory.mktemp("run")
    src = hf_model("gqa")
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), d / f)
    (d / "corpus.txt").write_text(CORPUS)
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=60,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    return str(d)


def test_run_streams_text_from_a_sentencepiece_checkpoint(checkpoint_with_tokenizer, capsys):
    import sentencepiece as spm

    rc = main(["run", checkpoint_with_tokenizer, "--prompt", "the quick brown", "--max-new-tokens", "6",
               "--backend", "reference", "--dtype", "float32"])
    assert rc == 0
    text = capsys.readouterr().out
    # the streamed text is the decode of the greedy tokens the API generates
    sp = spm.SentencePieceProcessor(model_file=os.path.join(checkpoint_with_tokenizer, "tokenizer.model"))
    plan = llamagraph.compile(checkpoint_with_tokenizer, dtype="float32", max_batch=1)
    ids = [1] + sp.encode("the quick brown")
    new = plan.generate([ids], 6, stop_tokens=[2])[0]
    assert text == sp.decode([t for t in new if t < sp.get_piece_size()]) + "\n"
    assert len(text.strip()) > 0


def test_run_with_random_weights_prints_token_ids(capsys):
    rc = main(["run", "examples/tinyllama-1.1b.json", "--random-weights", "--backend", "reference",
               "--dtype", "float32", "--max-seq", "24", "--prompt-len", "4", "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("prompt ids: [") and len(out.split("generated ids:")[1].split()) == 3


@pytest.mark.parametrize("argv, culprit", [
    (["run", "examples/tinyllama-1.1b.json", "--random-weights", "--top-p", "1.5"], "--top-p"),
    (["run", "examples/tinyllama-1.1b.json", "--random-weights", "--temperature", "-1"], "--temperature"),
    (["run", "examples/tinyllama-1.1b.json", "--prompt", "hi", "--backend", "reference"], "tokenizer"),
    (["bench", "examples/tinyllama-1.1b.json", "--random-weights", "--peers", "vllm"], "vllm"),
])
def test_run_and_bench_bad_input(argv, culprit, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and culprit in err[0]


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="cupy is installed here")
def test_cuda_backend_without_cupy_is_one_clear_error():
    with pytest.raises(llamagraph.BackendError, match="needs cupy"):
        llamagraph.compile({"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                            "num_hidden_layers": 1, "vocab_size": 50}, "random", backend="cuda")
    res = subprocess.run([sys.executable, "-m", "llamagraph", "bench", "examples/tinyllama-1.1b.json",
                          "--random-weights"], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == ["llamagraph: error: backend 'cuda' needs cupy: pip install "
                                               "'llamagraph[cuda]' (cupy-cuda13x)"]


def test_run_with_an_hf_tokenizer_json(tmp_path, hf_model, capsys):
    import shutil

    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    src = hf_model("gqa")
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), tmp_path / f)
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    assert main(["run", str(tmp_path), "--prompt", "the lazy dog", "--max-new-tokens", "5",
                 "--backend", "reference", "--dtype", "float32"]) == 0
    plan = llamagraph.compile(str(tmp_path), dtype="float32")
    new = plan.generate([[1] + tok.encode("the lazy dog").ids], 5, stop_tokens=[2])[0]
    assert capsys.readouterr().out == tok.decode([t for t in new if t < tok.get_vocab_size()]) + "\n"


def test_run_a_compiled_plan_directory_with_weights(checkpoint_with_tokenizer, tmp_path, capsys):
    """`llamagraph compile CKPT -o DIR` then `llamagraph run DIR --weights CKPT`: the tokenizer comes
    from the weights' directory and the text equals running the checkpoint directly."""
    ckpt = checkpoint_with_tokenizer
    args = ["--prompt", "the lazy dog", "--max-new-tokens", "6", "--backend", "reference"]
    assert main(["run", ckpt, "--dtype", "float32", *args]) == 0
    direct = capsys.readouterr().out
    plan_dir = str(tmp_path / "plan")
    assert main(["compile", ckpt, "-o", plan_dir, "--dtype", "float32"]) == 0
    capsys.readouterr()
    assert main(["run", plan_dir, "--weights", ckpt, *args]) == 0
    assert capsys.readouterr().out == direct and direct.strip()
    assert main(["run", plan_dir, *args]) == 0  # weights and tokenizer from the checkpoint it was compiled from
    assert capsys.readouterr().out == direct


# ---- tokenizer lookup: MODEL's directory, then the --weights directory ------------------------

def _split_checkpoint(ckpt: str, root) -> tuple[str, str]:
    """A config-only MODEL directory and a weights-only directory made from one checkpoint."""
    import shutil

    model_dir, weights_dir = root / "model", root / "weights"
    model_dir.mkdir()
    weights_dir.mkdir()
    shutil.copy(os.path.join(ckpt, "config.json"), model_dir)
    shutil.copy(os.path.join(ckpt, "model.safetensors"), weights_dir)
    return str(model_dir), str(weights_dir)


RUN_ARGS = ["--prompt", "the lazy dog", "--max-new-tokens", "6", "--backend", "reference", "--dtype", "float32"]


def test_run_finds_the_tokenizer_in_model_dir_when_weights_point_elsewhere(checkpoint_with_tokenizer, tmp_path, capsys):
    import shutil

    ckpt = checkpoint_with_tokenizer
    assert main(["run", ckpt, *RUN_ARGS]) == 0
    direct = capsys.readouterr().out
    model_dir, weights_dir = _split_checkpoint(ckpt, tmp_path)
    shutil.copy(os.path.join(ckpt, "tokenizer.model"), model_dir)
    # a corrupt tokenizer beside the weights is never read: MODEL's directory comes first
    (tmp_path / "weights" / "tokenizer.json").write_text("{not json")
    for model in (model_dir, os.path.join(model_dir, "config.json")):
        assert main(["run", model, "--weights", weights_dir, *RUN_ARGS]) == 0, capsys.readouterr().err
        assert capsys.readouterr().out == direct and direct.strip()
    # --weights may name the file itself
    assert main(["run", model_dir, "--weights", os.path.join(weights_dir, "model.safetensors"), *RUN_ARGS]) == 0
    assert capsys.readouterr().out == direct


def test_run_falls_back_to_the_weights_dir_for_the_tokenizer(checkpoint_with_tokenizer, tmp_path, capsys):
    ckpt = checkpoint_with_tokenizer
    assert main(["run", ckpt, *RUN_ARGS]) == 0
    direct = capsys.readouterr().out
    model_dir, _ = _split_checkpoint(ckpt, tmp_path)
    assert main(["run", model_dir, "--weights", ckpt, *RUN_ARGS]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out == direct and direct.strip()


def test_run_without_a_tokenizer_names_both_directories(checkpoint_with_tokenizer, tmp_path, capsys):
    model_dir, weights_dir = _split_checkpoint(checkpoint_with_tokenizer, tmp_path)
    assert main(["run", model_dir, "--weights", weights_dir, *RUN_ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"llamagraph: error: {model_dir} or {weights_dir}: no tokenizer.model or tokenizer.json; "
                   "pass --random-weights to run on token ids"]


@pytest.mark.parametrize("name, content, what", [
    ("tokenizer.json", "{not json", "not a valid tokenizer.json"),
    ("tokenizer.model", "not a sentencepiece model", "not a sentencepiece model"),
])
def test_run_with_a_corrupt_tokenizer_exits_2_with_one_line(hf_model, tmp_path, name, content, what):
    import shutil

    src = hf_model("gqa")
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), tmp_path / f)
    (tmp_path / name).write_text(content)
    res = subprocess.run([sys.executable, "-m", "llamagraph", "run", str(tmp_path), "--prompt", "hi",
                          "--backend", "reference"], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"llamagraph: error: {tmp_path / name}: {what} ("), err
