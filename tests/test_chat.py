"""Chat: templates rendered as HF renders them, the Llama-2 / Llama-3 fallbacks, turns that feed only
their new tokens, a full context, and `llamagraph chat` on piped stdin (reference backend, CPU)."""

import io
import json
import os
import shutil
import subprocess
import sys

import pytest

import llamagraph
from llamagraph.chat import ContextFullError, load_chat_format
from llamagraph.cli import main
from llamagraph.textgen import find_tokenizer

# A word-level tokenizer with exactly the tiny model's 96 ids: decoding a reply and encoding it
# again gives back the same ids, as a chat needs for its earlier turns to stay in the KV cache.
LLAMA2_SPECIALS = ["<unk>", "<s>", "</s>"]
LLAMA3_SPECIALS = LLAMA2_SPECIALS + ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
WORDS = ["hi", "hello", "how", "are", "you", "?", "be", "brief", "system", "user", "assistant", "tell", "me", "more",
         "[", "]", "[/", "INST", "<<", "<</", "SYS", ">>", ":", "{", "}", '"', ",", "é"]

SYSTEM = "be brief"
DIALOG = [  # two turns with a system prompt; the assistant's first reply is given
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "hi how are you?"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "tell me more"},
]

# Templates in the styles checkpoints ship, each using a different part of what HF's renderer offers.
TEMPLATES = {
    "headers": (  # Llama-3 style: bos_token, trim, add_generation_prompt, a default system prompt
        "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|start_header_id|>system<|end_header_id|>\n\n"
        "you help<|eot_id|>{% endif %}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
        "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "inst_blocks": (  # Llama-2 style, written over several lines: trim_blocks / lstrip_blocks shape it
        "{% if messages[0]['role'] == 'system' %}\n"
        "    {% set loop_messages = messages[1:] %}\n"
        "    {% set system_message = messages[0]['content'] %}\n"
        "{% else %}\n"
        "    {% set loop_messages = messages %}\n"
        "    {% set system_message = false %}\n"
        "{% endif %}\n"
        "{% for message in loop_messages %}\n"
        "    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
        "        {{ raise_exception('roles must alternate user/assistant') }}\n"
        "    {% endif %}\n"
        "    {% if loop.index0 == 0 and system_message %}\n"
        "        {% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}\n"
        "    {% else %}\n"
        "        {% set content = message['content'] %}\n"
        "    {% endif %}\n"
        "    {% if message['role'] == 'user' %}\n"
        "        {{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}\n"
        "    {% else %}\n"
        "        {{ ' ' + content.strip() + ' ' + eos_token }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
    ),
    "json_and_loops": (  # tojson (plain JSON, not HTML-escaped), namespace, break, the generation block
        "{% set ns = namespace(turns=0) %}{% for m in messages %}{% if m['role'] == 'stop' %}{% break %}{% endif %}"
        "{% set ns.turns = ns.turns + 1 %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}{% endgeneration %}{% else %}{{ m | tojson }}{% endif %}</s>\n{% endfor %}"
        "{{ ns.turns }}{% if add_generation_prompt %}assistant:{% endif %}"
    ),
}


def write_tokenizer(d, specials, template=None, *, template_file=False, bos="<s>", eos="</s>"):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = WORDS + [f"w{i}" for i in range(96 - len(specials) - len(WORDS))]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.save(os.path.join(d, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "unk_token": "<unk>"}
    if template is not None and template_file:
        with open(os.path.join(d, "chat_template.jinja"), "w") as f:
            f.write(template)
    elif template is not None:
        config["chat_template"] = template
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(d)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, hf_model):
    """checkpoint(specials, template=None, **kw) -> the tiny gqa model with that tokenizer (cached)."""
    built = {}

    def get(specials=tuple(LLAMA3_SPECIALS), template=None, **kw):
        key = (tuple(specials), template, tuple(sorted(kw.items())))
        if key not in built:
            d = tmp_path_factory.mktemp("chat")
            src = hf_model("gqa")
            for f in os.listdir(src):
                shutil.copy(os.path.join(src, f), d / f)
            built[key] = write_tokenizer(d, list(specials), template, **kw)
        return built[key]

    return get


def chat_format(model_dir):
    return load_chat_format(find_tokenizer(model_dir), model_dir, bos_token_id=1, eos_token_ids=[2])


# ---- templates --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, template_file", [("headers", False), ("inst_blocks", False),
                                                 ("json_and_loops", False), ("headers", True)])
def test_checkpoint_template_renders_as_hf_does(checkpoint, name, template_file):
    from transformers import AutoTokenizer

    d = checkpoint(LLAMA3_SPECIALS, TEMPLATES[name], template_file=template_file)
    hf = AutoTokenizer.from_pretrained(d)
    ours = chat_format(d)
    tok = find_tokenizer(d)
    for messages in (DIALOG, DIALOG[1:], DIALOG[:2], [{"role": "user", "content": "é {\"x\": <1>}"}]):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.render(messages) == expected
        assert tok.encode_with_specials(ours.render(messages)) == hf(expected, add_special_tokens=False).input_ids
    assert ours.origin.endswith("chat_template.jinja" if template_file else "tokenizer_config.json")


def test_template_raise_exception_is_one_line_input_error(checkpoint):
    from transformers import AutoTokenizer

    d = checkpoint(LLAMA3_SPECIALS, TEMPLATES["inst_blocks"])
    bad = [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi"}]
    with pytest.raises(Exception, match="roles must alternate"):
        AutoTokenizer.from_pretrained(d).apply_chat_template(bad, tokenize=False)
    with pytest.raises(llamagraph.InputError, match="roles must alternate") as e:
        chat_format(d).render(bad)
    assert "\n" not in str(e.value) and "tokenizer_config.json" in str(e.value)


def test_template_that_does_not_parse_names_its_file(checkpoint):
    d = checkpoint(LLAMA3_SPECIALS, "{% for m in messages %}{{ m['content'] }}")  # no endfor
    with pytest.raises(llamagraph.ConfigError, match=r"tokenizer_config.json: chat template does not parse"):
        chat_format(d)


def test_stop_tokens_are_the_eos_ids_and_the_templates_end_of_turn(checkpoint):
    headers = chat_format(checkpoint(LLAMA3_SPECIALS, TEMPLATES["headers"]))
    assert sorted(headers.stop_tokens) == [LLAMA3_SPECIALS.index("</s>"), LLAMA3_SPECIALS.index("<|eot_id|>")]
    inst = chat_format(checkpoint(LLAMA3_SPECIALS, TEMPLATES["inst_blocks"]))
    assert inst.stop_tokens == [LLAMA3_SPECIALS.index("</s>")]


# ---- fallbacks: the published formats, written out by hand -----------------------------------

LLAMA2_EXPECTED = ("<s>[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhi how are you? [/INST] hello </s>"
                   "<s>[INST] tell me more [/INST]")
LLAMA3_EXPECTED = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nhi how are you?<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\ntell me more<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_fallback_llama2_format(checkpoint):
    fmt = chat_format(checkpoint(LLAMA2_SPECIALS))
    assert fmt.origin == "llama-2 format"
    assert fmt.render(DIALOG) == LLAMA2_EXPECTED
    assert fmt.render(DIALOG[1:2]) == "<s>[INST] hi how are you? [/INST]"
    assert fmt.stop_tokens == [2]
    with pytest.raises(llamagraph.InputError, match="alternating"):
        fmt.render([{"role": "assistant", "content": "hello"}])


def test_fallback_llama3_format(checkpoint):
    fmt = chat_format(checkpoint(LLAMA3_SPECIALS, bos="<|begin_of_text|>"))
    assert fmt.origin == "llama-3 format"
    assert fmt.render(DIALOG) == LLAMA3_EXPECTED
    assert sorted(fmt.stop_tokens) == [2, LLAMA3_SPECIALS.index("<|eot_id|>")]


def test_fallback_llama2_with_sentencepiece_tokenizes_as_metas_chat_completion(tmp_path):
    """Meta encodes each exchange "[INST] user [/INST] reply " with bos and eos ids around it."""
    import sentencepiece as spm

    corpus = "hi how are you? be brief. tell me more. hello there. [INST] [/INST] <<SYS>> <</SYS>>\n" * 50
    (tmp_path / "corpus.txt").write_text(corpus)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=60, model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tok = find_tokenizer(str(tmp_path))
    fmt = load_chat_format(tok, str(tmp_path), bos_token_id=1, eos_token_ids=[2])
    first = "<<SYS>>\nbe brief\n<</SYS>>\n\nhi how are you?"
    meta = ([1] + sp.encode(f"[INST] {first} [/INST] hello ") + [2]
            + [1] + sp.encode("[INST] tell me more [/INST]"))
    assert tok.encode_with_specials(fmt.render(DIALOG)) == meta


# ---- turns: only new tokens are fed -----------------------------------------------------------

@pytest.fixture
def spy(monkeypatch):
    """Records (prompt, append) of every Plan.generate call."""
    calls = []
    real = llamagraph.Plan.generate

    def generate(self, prompts, *args, **kw):
        calls.append((list(prompts[0]), kw.get("append", False)))
        return real(self, prompts, *args, **kw)

    monkeypatch.setattr(llamagraph.Plan, "generate", generate)
    return calls


def test_second_turn_feeds_only_its_new_tokens_and_replies_as_a_fresh_plan(checkpoint, spy):
    import models

    d = checkpoint(LLAMA3_SPECIALS, TEMPLATES["headers"])
    plan = llamagraph.compile(d, dtype="float32")
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi how are you?"}]
    first = plan.chat(messages, max_new_tokens=5)
    held = plan.lengths[0]
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "tell me more"}]
    second = plan.chat(messages, max_new_tokens=5)

    fmt, tok = chat_format(d), find_tokenizer(d)
    ids1, ids2 = (tok.encode_with_specials(fmt.render(m)) for m in (messages[:2], messages))
    reply1 = tok.encode(first)
    assert spy[0] == (ids1, False)
    # the cache holds the prompt and the reply (its last token too, unless the reply ran out of tokens:
    # a token is fed only when another is to follow), and those ids begin the second turn's prompt
    assert len(reply1) > 0 and held == len(ids1) + len(reply1) - (len(reply1) == 5)
    assert ids2[: len(ids1) + len(reply1)] == ids1 + reply1
    assert spy[1] == (ids2[held:], True)  # only the rest was fed
    assert len(spy[1][0]) < len(ids2) // 2

    fresh = llamagraph.compile(d, dtype="float32")
    assert fresh.chat(messages, max_new_tokens=5) == second
    assert spy[2] == (ids2, False)
    # HF (the oracle) on the whole conversation: the same greedy tokens, up to the first stop token
    hf = models.hf_greedy(d, ids2, 5)
    cut = next((k for k, t in enumerate(hf) if t in fmt.stop_tokens), len(hf))
    assert tok.encode(second) == hf[:cut]


def test_edited_history_prefills_the_conversation_again(checkpoint, spy):
    d = checkpoint(LLAMA3_SPECIALS, TEMPLATES["headers"])
    plan = llamagraph.compile(d, dtype="float32")
    plan.chat([{"role": "user", "content": "hi how are you?"}], max_new_tokens=3)
    edited = [{"role": "user", "content": "tell me more"}]
    reply = plan.chat(edited, max_new_tokens=3)
    ids = find_tokenizer(d).encode_with_specials(chat_format(d).render(edited))
    assert spy[-1] == (ids, False)  # the whole conversation, prefilled again
    assert reply == llamagraph.compile(d, dtype="float32").chat(edited, max_new_tokens=3)


def test_a_run_between_turns_starts_the_chat_over(checkpoint, spy):
    d = checkpoint(LLAMA3_SPECIALS, TEMPLATES["headers"])
    plan = llamagraph.compile(d, dtype="float32")
    messages = [{"role": "user", "content": "hi how are you?"}]
    first = plan.chat(messages, max_new_tokens=3)
    plan.generate([[1, 5, 9]], 2)  # the cache now holds something else
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "tell me more"}]
    second = plan.chat(messages, max_new_tokens=3)
    assert spy[-1][1] is False  # prefilled from the start, not appended to the generate's tokens
    assert second == llamagraph.compile(d, dtype="float32").chat(messages, max_new_tokens=3)


def test_other_tokens_of_the_same_length_between_turns_start_the_chat_over(checkpoint, spy):
    """A generate that leaves slot 0 at exactly the chat's length: the cache is not the chat's."""
    d = checkpoint(LLAMA3_SPECIALS, TEMPLATES["headers"])
    plan = llamagraph.compile(d, dtype="float32")
    messages = [{"role": "user", "content": "hi how are you?"}]
    first = plan.chat(messages, max_new_tokens=3)
    held = plan.lengths[0]
    plan.reset()
    plan.run([[7] * held])  # same length, other tokens
    assert plan.lengths == [held]
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "tell me more"}]
    second = plan.chat(messages, max_new_tokens=3)
    assert spy[-1][1] is False
    assert second == llamagraph.compile(d, dtype="float32").chat(messages, max_new_tokens=3)


def test_full_context_is_one_line(checkpoint):
    d = checkpoint(LLAMA3_SPECIALS, TEMPLATES["headers"])
    plan = llamagraph.compile(d, dtype="float32", max_seq=24)
    long = [{"role": "user", "content": " ".join(["hi"] * 30)}]
    with pytest.raises(ContextFullError) as e:
        plan.chat(long)
    msg = str(e.value)
    assert isinstance(e.value, llamagraph.InputError) and "\n" not in msg
    assert msg.startswith("context full:") and "24" in msg
    # a reply is cut where the cache ends, not failed: the conversation then holds max_seq tokens
    plan.chat([{"role": "user", "content": "hi"}], max_new_tokens=100)
    assert plan.lengths == [24]


# ---- the command line -------------------------------------------------------------------------

def chat_argv(d, *extra):
    return ["chat", d, "--backend", "reference", "--dtype", "float32", "--max-new-tokens", "4", *extra]


def expected_replies(d, turns, system=None, max_new_tokens=4):
    plan = llamagraph.compile(d, dtype="float32")
    messages = [{"role": "system", "content": system}] if system else []
    replies = []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        replies.append(plan.chat(messages, max_new_tokens=max_new_tokens))
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies


def test_cli_chat_reads_turns_from_stdin_and_prints_replies(checkpoint, monkeypatch, capsys):
    d = checkpoint(LLAMA3_SPECIALS, TEMPLATES["headers"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi how are you?\ntell me more\n\nnot read\n"))
    assert main(chat_argv(d, "--system", SYSTEM)) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == expected_replies(d, ["hi how are you?", "tell me more"], SYSTEM)


def test_cli_chat_through_a_real_pipe(checkpoint):
    d = checkpoint(LLAMA2_SPECIALS)
    res = subprocess.run([sys.executable, "-m", "llamagraph", *chat_argv(d)], input="hi how are you?\ntell me more\n",
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == expected_replies(d, ["hi how are you?", "tell me more"])


def test_cli_chat_says_when_the_context_is_full(checkpoint, monkeypatch, capsys):
    d = checkpoint(LLAMA3_SPECIALS, TEMPLATES["headers"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi how are you?\n" * 10))
    assert main(chat_argv(d, "--max-seq", "40")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llamagraph: error: context full:") and "40" in err[0]


def test_cli_chat_on_a_compiled_plan_directory(checkpoint, tmp_path, monkeypatch, capsys):
    d = checkpoint(LLAMA3_SPECIALS, TEMPLATES["headers"])
    plan_dir = str(tmp_path / "plan")
    assert main(["compile", d, "-o", plan_dir, "--dtype", "float32"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi how are you?\n"))
    assert main(["chat", plan_dir, "--backend", "reference", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.splitlines() == expected_replies(d, ["hi how are you?"])


def _no_gpu() -> str | None:
    try:
        import cupy

        return None if cupy.cuda.runtime.getDeviceCount() else "no CUDA device"
    except Exception as e:  # no cupy, or no driver
        return f"no GPU ({e.__class__.__name__})"


@pytest.mark.gpu
def test_chat_on_the_cuda_backend_matches_the_reference(checkpoint, spy):
    reason = _no_gpu()
    if reason:
        pytest.skip(reason)
    d = checkpoint(LLAMA3_SPECIALS, TEMPLATES["headers"])
    turns = ["hi how are you?", "tell me more", "how are you?"]
    plan = llamagraph.compile(d, dtype="float32", backend="cuda")
    messages = [{"role": "system", "content": SYSTEM}]
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        messages.append({"role": "assistant", "content": plan.chat(messages, max_new_tokens=5)})
    assert [append for _, append in spy] == [False, True, True]  # later turns continue the GPU's KV cache
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert replies == expected_replies(d, turns, SYSTEM, max_new_tokens=5)
