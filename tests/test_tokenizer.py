"""Tokenizers found next to a checkpoint (llamagraph.textgen.find_tokenizer): sentencepiece
``tokenizer.model`` and HF ``tokenizer.json`` (the tokenizers package, a core dependency), the
directory search order, and one-line errors for corrupt files."""

import importlib.metadata
import re

import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from llamagraph.ir import ConfigError
from llamagraph.textgen import find_tokenizer

CORPUS = "the quick brown fox jumps over the lazy dog. a llama graph compiles kernels fast.\n" * 40
TEXT = "the lazy fox compiles"


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text(CORPUS)
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=60,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    return (d / "tokenizer.model").read_bytes()


@pytest.fixture(scope="module")
def hf_json():
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=50, special_tokens=["<unk>", "<s>", "</s>"]))
    return tok.to_str()


def _dir(tmp_path, name, *, model: bytes | None = None, json_text: str | None = None):
    d = tmp_path / name
    d.mkdir()
    if model is not None:
        (d / "tokenizer.model").write_bytes(model)
    if json_text is not None:
        (d / "tokenizer.json").write_text(json_text)
    return str(d)


def test_tokenizers_is_a_core_dependency():
    requires = importlib.metadata.requires("llamagraph") or []
    core = [r for r in requires if "extra ==" not in r]
    assert any(re.match(r"tokenizers\b", r) for r in core), core
    assert any(re.match(r"sentencepiece\b", r) for r in core), core


def test_hf_tokenizer_json_encodes_and_decodes_as_the_tokenizers_library(tmp_path, hf_json):
    tok = find_tokenizer(_dir(tmp_path, "m", json_text=hf_json))
    ref = tokenizers.Tokenizer.from_str(hf_json)
    assert tok.path.endswith("tokenizer.json") and tok.size == ref.get_vocab_size() == 50
    ids = tok.encode(TEXT)
    assert ids == ref.encode(TEXT, add_special_tokens=False).ids and len(ids) > 1
    assert tok.decode(ids) == ref.decode(ids)
    assert tok.decode(ids + [tok.size, tok.size + 7]) == ref.decode(ids)  # ids past the vocabulary decode to nothing


def test_sentencepiece_model_encodes_and_decodes_as_sentencepiece(tmp_path, spm_file):
    d = _dir(tmp_path, "m", model=spm_file)
    tok = find_tokenizer(d)
    ref = spm.SentencePieceProcessor(model_file=d + "/tokenizer.model")
    assert tok.encode(TEXT) == ref.encode(TEXT)
    assert tok.decode(ref.encode(TEXT)) == TEXT
    assert tok.size == ref.get_piece_size() == 60


def test_sentencepiece_comes_before_tokenizer_json_in_one_directory(tmp_path, spm_file, hf_json):
    tok = find_tokenizer(_dir(tmp_path, "m", model=spm_file, json_text=hf_json))
    assert tok.path.endswith("tokenizer.model")


def test_the_first_directory_with_a_tokenizer_wins(tmp_path, spm_file, hf_json):
    model_dir = _dir(tmp_path, "model", json_text=hf_json)
    weights_dir = _dir(tmp_path, "weights", model=spm_file)
    empty = _dir(tmp_path, "empty")
    assert find_tokenizer(model_dir, weights_dir).path == model_dir + "/tokenizer.json"
    assert find_tokenizer(weights_dir, model_dir).path == weights_dir + "/tokenizer.model"
    assert find_tokenizer(empty, weights_dir).path == weights_dir + "/tokenizer.model"


def test_no_tokenizer_names_every_directory_searched(tmp_path):
    a, b = _dir(tmp_path, "a"), _dir(tmp_path, "b")
    with pytest.raises(ConfigError) as e:
        find_tokenizer(a, b, a)
    assert str(e.value) == (f"{a} or {b}: no tokenizer.model or tokenizer.json; "
                            "pass --random-weights to run on token ids")


@pytest.mark.parametrize("content", ["{not json", "{}", "", '{"model": {"type": "BPE", "vocab": 3}}', "\x00\x01\x02",
                                     "[1, 2, 3]"])
def test_corrupt_tokenizer_json_is_one_line_naming_the_file(tmp_path, content):
    d = _dir(tmp_path, "m", json_text=content)
    with pytest.raises(ConfigError) as e:
        find_tokenizer(d)
    msg = str(e.value)
    assert msg.startswith(f"{d}/tokenizer.json: not a valid tokenizer.json (") and "\n" not in msg


@pytest.mark.parametrize("content", [b"", b"not a model", b"\x0a\x05hello\xff\xff"])
def test_corrupt_tokenizer_model_is_one_line_naming_the_file(tmp_path, content):
    d = _dir(tmp_path, "m", model=content)
    with pytest.raises(ConfigError) as e:
        find_tokenizer(d)
    msg = str(e.value)
    assert msg.startswith(f"{d}/tokenizer.model: not a sentencepiece model (") and "\n" not in msg
