"""Multi-turn chat over a ``Plan``: chat templates, and a session that keeps earlier turns in the KV cache.

The prompt is the checkpoint's own ``chat_template`` (``chat_template.jinja``, or the
``chat_template`` key of ``tokenizer_config.json``) rendered with jinja2 the way HF transformers
renders it: an immutable sandbox with ``trim_blocks`` / ``lstrip_blocks`` and loop controls,
``raise_exception`` / ``strftime_now`` globals, a ``tojson`` that writes plain JSON, the
tokenizer's special tokens (``bos_token``, ``eos_token``, ...) as variables and
``add_generation_prompt``. A checkpoint without one falls back to Meta's Llama-3 header format
when its tokenizer knows ``<|start_header_id|>`` and ``<|eot_id|>``, else to Llama-2's
``[INST]`` / ``<<SYS>>`` format.

Each turn renders the whole conversation and tokenizes it. When the ids the KV cache already
holds are a prefix of the new ids, only the remainder is fed (``generate(append=True)``);
otherwise (an earlier reply re-tokenizes differently, or the history was edited) the
conversation is prefilled again from the start.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llamagraph.ir import ConfigError, InputError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# tokens that end a turn in common chat formats; one the template spells out is a stop token
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "</s>")

# Meta's Llama-2 chat format: the system prompt folds into the first user turn inside <<SYS>>;
# every exchange is "<s>[INST] user [/INST] reply </s>", and the prompt ends after "[/INST]".
LLAMA2_TEMPLATE = (
    "{%- set system = '' -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('the Llama-2 chat format needs an optional system message, then user and assistant "
    "turns alternating from a user turn') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- bos_token + '[INST] ' + ((system if loop.first else '') + message['content']) | trim + ' [/INST]' -}}"
    "{%- else -%}"
    "{{- ' ' + message['content'] | trim + ' ' + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Meta's Llama-3 chat format: a header per message, content trimmed, each turn closed by <|eot_id|>;
# the generation prompt is an open assistant header.
LLAMA3_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)


class ContextFullError(InputError):
    """The conversation no longer fits in the plan's KV cache (max_seq tokens per sequence)."""


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}`` (HF's marker for assistant text): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson escapes HTML characters; chat templates expect plain json.dumps
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@dataclass
class ChatFormat:
    """A chat template ready to render, with the special tokens it sees and the ids that end a reply."""

    source: str  # jinja text
    origin: str  # where it came from: a file path, or "llama-2 format" / "llama-3 format"
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token -> "<s>", ...
    stop_tokens: list[int] = field(default_factory=list)

    def __post_init__(self):
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"{self.origin}: chat template does not parse: {e.message} (line {e.lineno})") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as prompt text, special tokens spelled out."""
        _check_messages(messages)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except (jinja2.TemplateError, TypeError, ValueError, LookupError) as e:  # raise_exception, or a template bug
            raise InputError(f"chat template ({self.origin}): {' '.join(str(e).split()) or type(e).__name__}") from None


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputError(f"message {k} must be a dict with string 'role' and 'content', got {m!r}")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _spelling(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _ids(value) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def load_chat_format(tokenizer, *dirs: str, bos_token_id: int | None = None,
                     eos_token_ids: list[int] | tuple = ()) -> ChatFormat:
    """The chat format of the first of ``dirs`` with a chat template, else the fallback for
    ``tokenizer``. ``bos_token_id`` / ``eos_token_ids`` come from the model config."""
    source = origin = None
    config: dict = {}  # the first tokenizer_config.json found: its special tokens
    stop = list(eos_token_ids)
    for d in dict.fromkeys(dirs):
        config_path, jinja_path = os.path.join(d, "tokenizer_config.json"), os.path.join(d, "chat_template.jinja")
        here = _read_json(config_path) if os.path.isfile(config_path) else {}
        config = config or here
        gen_path = os.path.join(d, "generation_config.json")
        if os.path.isfile(gen_path):  # instruct checkpoints list their end-of-turn ids here
            stop += _ids(_read_json(gen_path).get("eos_token_id"))
        if source is not None:
            continue
        if os.path.isfile(jinja_path):  # HF's newer layout; it takes priority over the config's key
            with open(jinja_path, encoding="utf-8") as f:
                source, origin = f.read(), jinja_path
        elif here.get("chat_template"):
            source, origin = _template_from_config(here["chat_template"], config_path), config_path
    by_id = {i: s for s, i in tokenizer.specials.items()}
    special = {k: _spelling(config.get(k)) for k in SPECIAL_TOKEN_KEYS}
    if special["bos_token"] is None and bos_token_id in by_id:
        special["bos_token"] = by_id[bos_token_id]
    if special["eos_token"] is None and eos_token_ids and eos_token_ids[0] in by_id:
        special["eos_token"] = by_id[eos_token_ids[0]]
    special = {k: v for k, v in special.items() if v is not None}
    if source is None:
        llama3 = "<|start_header_id|>" in tokenizer.specials and "<|eot_id|>" in tokenizer.specials
        source, origin = (LLAMA3_TEMPLATE, "llama-3 format") if llama3 else (LLAMA2_TEMPLATE, "llama-2 format")
        special.setdefault("bos_token", "")
        special.setdefault("eos_token", "")
    spelled = [special.get("eos_token")] + [t for t in END_OF_TURN if t in source]
    stop += [tokenizer.specials[t] for t in spelled if t in tokenizer.specials]
    return ChatFormat(source, origin, special, list(dict.fromkeys(stop)))


def _template_from_config(value, path: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ConfigError(f"{path}: key 'chat_template' is neither a template string nor a list with a 'default' template")


class ChatSession:
    """One conversation on slot 0 of a plan; ``reply`` feeds only what the KV cache lacks."""

    def __init__(self, plan, tokenizer, chat_format: ChatFormat):
        self.plan, self.tokenizer, self.format = plan, tokenizer, chat_format
        self.held: list[int] = []  # the token ids the plan's KV cache holds for this conversation
        self.plan_state = -1  # the plan's state counter right after our last turn
        self.fed: list[int] = []  # what the last turn fed (its new tokens)
        self.cut_by_context = False  # the last reply stopped because the KV cache was full

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode_with_specials(self.format.render(messages))

    def reply(self, messages: list[dict], max_new_tokens: int = 256, *, on_text=None, **sampling) -> str:
        """The assistant's reply to ``messages`` (the whole conversation so far, ending with a
        user turn); ``on_text(piece)`` gets the text as it is generated."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        ids = self.prompt_ids(messages)
        max_seq = self.plan.max_seq
        if len(ids) >= max_seq:
            raise ContextFullError(f"context full: the conversation is {len(ids)} tokens and the plan holds at most "
                                   f"{max_seq} per sequence (max_seq); start a new chat or compile with a larger max_seq")
        # The cache still holds this conversation when nothing else ran on the plan since our last
        # turn (its state counter is unchanged) and slot 0 is all there is.
        ours = self.plan.state == self.plan_state and self.plan.lengths == [len(self.held)]
        held = self.held if ours else []
        keep = held if held and len(ids) > len(held) and ids[: len(held)] == held else []
        # the last reply token is sampled, not fed: a reply may reach one past the cache
        budget = min(max_new_tokens, max_seq - len(ids) + 1)
        generated: list[int] = []
        shown = ""

        def on_token(_slot: int, tok: int) -> None:
            nonlocal shown
            generated.append(tok)
            text = self.tokenizer.decode(generated)  # the whole reply: pieces can merge
            # hold back a partial UTF-8 character until its last byte arrives
            if on_text is not None and text.startswith(shown) and not text.endswith("\ufffd"):
                on_text(text[len(shown):])
                shown = text

        new = ids[len(keep):]
        out = self.plan.generate([new], budget, stop_tokens=self.format.stop_tokens, on_token=on_token,
                                 append=bool(keep), **sampling)[0]
        self.fed = new
        self.held = (ids + out)[: self.plan.lengths[0]]
        self.plan_state = self.plan.state
        self.cut_by_context = len(out) == budget < max_new_tokens
        text = self.tokenizer.decode(out)
        if on_text is not None and text.startswith(shown) and len(text) > len(shown):
            on_text(text[len(shown):])
        return text

    def context_full_message(self) -> str:
        return (f"context full: the conversation fills the plan's {self.plan.max_seq} tokens per sequence (max_seq); "
                "start a new chat or compile with a larger max_seq")


def open_session(plan, *dirs: str) -> ChatSession:
    """A chat session on ``plan`` with the tokenizer and chat template found in ``dirs``
    (default: the checkpoint the plan was compiled from)."""
    from llamagraph.textgen import find_tokenizer

    if not dirs:
        model = plan.compiled.model
        if model is None:
            raise ConfigError("this plan records no checkpoint directory to read a tokenizer and chat template from; "
                              "pass model_dir=")
        model = os.fspath(model)
        dirs = (model if os.path.isdir(model) else os.path.dirname(os.path.abspath(model)),)
    tokenizer = find_tokenizer(*dirs)
    cfg = plan.config
    fmt = load_chat_format(tokenizer, *dirs, bos_token_id=cfg.bos_token_id, eos_token_ids=cfg.eos_token_ids)
    return ChatSession(plan, tokenizer, fmt)
