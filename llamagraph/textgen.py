"""Text in, text out: tokenizers found next to a checkpoint, and streamed generation."""

from __future__ import annotations

import os
import sys

from llamagraph.ir import ConfigError


class Tokenizer:
    """sentencepiece ``tokenizer.model`` or HF ``tokenizer.json`` (needs the tokenizers package).

    Models often pad their vocabulary past the tokenizer's; ids the tokenizer does not know
    decode to nothing.
    """

    def __init__(self, encode, decode, size: int, path: str):
        self.encode, self._decode, self.size, self.path = encode, decode, size, path

    def decode(self, ids: list[int]) -> str:
        return self._decode([i for i in ids if 0 <= i < self.size])


def find_tokenizer(model_dir: str) -> Tokenizer:
    spm = os.path.join(model_dir, "tokenizer.model")
    hf = os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(spm):
        import sentencepiece

        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=spm)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"{spm}: not a sentencepiece model ({str(e).splitlines()[0]})") from None
        return Tokenizer(lambda text: sp.encode(text), lambda ids: sp.decode(ids), sp.get_piece_size(), spm)
    if os.path.isfile(hf):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise ConfigError(f"{hf} needs the 'tokenizers' package (pip install tokenizers)") from None
        tok = HFTokenizer.from_file(hf)
        return Tokenizer(lambda text: tok.encode(text, add_special_tokens=False).ids, lambda ids: tok.decode(ids),
                         tok.get_vocab_size(), hf)
    raise ConfigError(f"{model_dir}: no tokenizer.model or tokenizer.json; pass --random-weights to run on token ids")


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
