"""Text in, text out: tokenizers found next to a checkpoint, and streamed generation."""

from __future__ import annotations

import os
import re
import sys

from llamagraph.ir import ConfigError


class Tokenizer:
    """sentencepiece ``tokenizer.model`` or HF ``tokenizer.json`` (read by HF's tokenizers).

    Models often pad their vocabulary past the tokenizer's; ids the tokenizer does not know
    decode to nothing.
    """

    def __init__(self, encode, decode, size: int, path: str, specials: dict[str, int] | None = None,
                 encode_with_specials=None):
        self.encode, self._decode, self.size, self.path = encode, decode, size, path
        # special tokens by spelling ("<s>", "<|eot_id|>"): chat templates spell them out in text
        self.specials = specials or {}
        self._encode_with_specials = encode_with_specials

    def encode_with_specials(self, text: str) -> list[int]:
        """Encode text in which special tokens are spelled out (a rendered chat template): each
        spelling becomes its token, the text between is encoded as ``encode`` does."""
        if self._encode_with_specials is not None:
            return self._encode_with_specials(text)
        if not self.specials:
            return list(self.encode(text))
        ids: list[int] = []
        pattern = "(" + "|".join(re.escape(s) for s in sorted(self.specials, key=len, reverse=True)) + ")"
        for k, part in enumerate(re.split(pattern, text)):  # odd parts are the special spellings
            if k % 2:
                ids.append(self.specials[part])
            elif part:
                ids.extend(self.encode(part))
        return ids

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
    specials = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)}
    return Tokenizer(lambda text: sp.encode(text), lambda ids: sp.decode(ids), sp.get_piece_size(), path, specials)


def _hf_tokenizer(path: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a bare Exception for bad JSON or a missing model
        raise ConfigError(f"{path}: not a valid tokenizer.json ({_first_line(e)})") from None
    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
    # the tokenizers library already finds added tokens spelled out in text, as HF's chat templates expect
    return Tokenizer(encode, lambda ids: tok.decode(ids), tok.get_vocab_size(), path, specials, encode)


def format_logprobs(logprobs: list[float]) -> str:
    """The ``logprobs:`` line ``llamagraph run --logprobs`` prints: one value per generated token."""
    return "logprobs: " + " ".join(f"{x:.4f}" for x in logprobs)


def stream_text(plan, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, *, bos: int | None,
                stop_tokens: list[int], out=None, logprobs: bool = False, **sampling) -> list[int]:
    """Generate from ``prompt`` and write the text to ``out`` as tokens arrive; with
    ``logprobs``, then a line of each generated token's logprob."""
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

    result = plan.generate([ids], max_new_tokens, stop_tokens=stop_tokens, on_token=on_token, logprobs=logprobs,
                           **sampling)
    out.write("\n")
    if logprobs:
        out.write(format_logprobs(result[1][0]) + "\n")
    return generated
