"""Text in, text out: tokenizers found next to a checkpoint, and streamed generation."""

from __future__ import annotations

import os
import sys

from llamagraph.ir import ConfigError


class Tokenizer:
    """sentencepiece ``tokenizer.model`` or HF ``tokenizer.json`` (read by HF's tokenizers).

    Models often pad their vocabulary past the tokenizer's; ids the tokenizer does not know
    decode to nothing.
    """

    def __init__(self, encode, decode, size: int, path: str):
        self.encode, self._decode, self.size, self.path = encode, decode, size, path

    def decode(self, ids: list[int]) -> str:
        return self._decode([i for i in ids if 0 <= i < self.size])


def find_tokenizer(*dirs: str) -> Tokenizer:
    """The tokenizer of the first directory in ``dirs`` that has one. Within a directory a
    sentencepiece ``tokenizer.model`` comes before an HF ``tokenizer.json``. An unreadable file
    is a ConfigError naming it (one line), not a traceback from the tokenizer library."""
    for d in dict.fromkeys(dirs):  # each directory once, in the order given
        spm, hf = os.path.join(d, "tokenizer.model"), os.path.join(d, "tokenizer.json")
        if os.path.isfile(spm):
            return _sentencepiece_tokenizer(spm)
        if os.path.isfile(hf):
            return _hf_tokenizer(hf)
    where = " or ".join(dict.fromkeys(dirs))
    raise ConfigError(f"{where}: no tokenizer.model or tokenizer.json; pass --random-weights to run on token ids")


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def _sentencepiece_tokenizer(path: str) -> Tokenizer:
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"{path}: not a sentencepiece model ({_first_line(e)})") from None
    return Tokenizer(lambda text: sp.encode(text), lambda ids: sp.decode(ids), sp.get_piece_size(), path)


def _hf_tokenizer(path: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a bare Exception for bad JSON or a missing model
        raise ConfigError(f"{path}: not a valid tokenizer.json ({_first_line(e)})") from None
    return Tokenizer(lambda text: tok.encode(text, add_special_tokens=False).ids, lambda ids: tok.decode(ids),
                     tok.get_vocab_size(), path)


def stream_text(plan, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, *, bos: int | None,
                stop_tokens: list[int], out=None, **sampling) -> list[int]:
    """Generate from ``prompt`` and write the text to ``out`` as tokens arrive."""
    out = out or sys.stdout  # looked up per call: stdout may have been replaced since import
    ids = ([bos] if bos is not None else []) + list(tokenizer.encode(prompt))
    generated: list[int] = []
    shown = ""

    def on_token(_seq: int, tok: int) -> None:
        nonlocal shown
        generated.append(tok)
        text = tokenizer.decode(generated)  # decode the whole tail: pieces can merge
        out.write(text[len(shown):])
        out.flush()
        shown = text

    plan.generate([ids], max_new_tokens, stop_tokens=stop_tokens, on_token=on_token, **sampling)
    out.write("\n")
    return generated
