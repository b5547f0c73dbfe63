"""Bad input to the Python API is a one-line ``LlamagraphError``, and a failed call loses nothing.

``BAD_COMPILE``, ``BAD_GENERATE`` and ``BAD_TOKENS`` are the full list of bad inputs tried
against ``compile`` / ``bind``, ``Plan.generate`` and ``Plan.run`` (issue #10, item 6): each row
is (argument, bad value, the error class, a word the one-line message must contain). The
session tests check, against HF transformers as the oracle, that a refused ``generate`` and an
interrupted multi-step ``run`` leave an ongoing session exactly as it was.
"""

import numpy as np
import pytest

import llamagraph
import models
from llamagraph.ir import ConfigError, InputError, WeightError
from numerics import rel_err

CFG = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
       "num_hidden_layers": 1, "vocab_size": 50, "max_position_embeddings": 64}
GOOD_COMPILE = dict(dtype="float32", max_batch=2, max_seq=16, max_tokens=None, passes=None, seed=0,
                    backend="reference")

# (keyword, bad value, error class, a word the message must contain)
BAD_COMPILE = [
    ("model", None, ConfigError, "model"),
    ("model", 5, ConfigError, "model"),
    ("model", ["config.json"], ConfigError, "model"),
    ("weights", 5, WeightError, "weights"),
    ("weights", ["random"], WeightError, "weights"),
    ("max_batch", None, ConfigError, "max_batch"),
    ("max_batch", 0, ConfigError, "max_batch"),
    ("max_batch", -1, ConfigError, "max_batch"),
    ("max_batch", 1.5, ConfigError, "max_batch"),
    ("max_batch", 2.0, ConfigError, "max_batch"),
    ("max_batch", True, ConfigError, "max_batch"),
    ("max_batch", "2", ConfigError, "max_batch"),
    ("max_seq", 0, ConfigError, "max_seq"),
    ("max_seq", -16, ConfigError, "max_seq"),
    ("max_seq", 16.5, ConfigError, "max_seq"),
    ("max_seq", True, ConfigError, "max_seq"),
    ("max_seq", "16", ConfigError, "max_seq"),
    ("max_tokens", 0, ConfigError, "max_tokens"),
    ("max_tokens", -4, ConfigError, "max_tokens"),
    ("max_tokens", 8.0, ConfigError, "max_tokens"),
    ("max_tokens", False, ConfigError, "max_tokens"),
    ("max_tokens", 2 * 16 + 1, ConfigError, "max_batch * max_seq"),  # more than the KV caches hold
    ("max_tokens", 10**6, ConfigError, "max_batch * max_seq"),
    ("passes", "dce", ConfigError, "list of pass names"),  # not read letter by letter
    ("passes", 5, ConfigError, "passes"),
    ("passes", {"dce"}, ConfigError, "passes"),
    ("passes", ["nope"], ConfigError, "nope"),
    ("passes", ["fuse_silu_mul", "fuse_everything"], ConfigError, "fuse_everything"),
    ("passes", [None], ConfigError, "unknown pass"),
    ("dtype", "float8", ConfigError, "dtype"),
    ("dtype", "fp16", ConfigError, "dtype"),
    ("dtype", "int8", ConfigError, "dtype"),  # a storage dtype, not a plan dtype
    ("dtype", None, ConfigError, "dtype"),
    ("dtype", 16, ConfigError, "dtype"),
    ("seed", 1.5, ConfigError, "seed"),
    ("seed", -1, ConfigError, "seed"),
    ("seed", 2**32, ConfigError, "seed"),  # would alias seed 0
    ("seed", None, ConfigError, "seed"),
    ("seed", "0", ConfigError, "seed"),
    ("seed", True, ConfigError, "seed"),
    ("backend", "gpu", ConfigError, "backend"),
    ("backend", None, ConfigError, "backend"),
    ("backend", ["cuda"], ConfigError, "backend"),
]

# generate(prompts, max_new_tokens=3, <keyword>=<bad value>)
BAD_GENERATE = [
    ("temperature", float("nan"), InputError, "temperature"),
    ("temperature", float("inf"), InputError, "temperature"),
    ("temperature", -float("inf"), InputError, "temperature"),
    ("temperature", np.float32("nan"), InputError, "temperature"),
    ("temperature", np.float64("inf"), InputError, "temperature"),
    ("temperature", 1e39, InputError, "temperature"),  # inf once the device reads it as float32
    ("temperature", -0.5, InputError, "temperature"),
    ("temperature", True, InputError, "temperature"),
    ("temperature", "0.7", InputError, "temperature"),
    ("temperature", None, InputError, "temperature"),
    ("top_p", float("nan"), InputError, "top_p"),
    ("top_p", float("inf"), InputError, "top_p"),
    ("top_p", np.float32("nan"), InputError, "top_p"),
    ("top_p", 0.0, InputError, "top_p"),
    ("top_p", 1e-50, InputError, "top_p"),  # 0 once the device reads it as float32
    ("top_p", 1.5, InputError, "top_p"),
    ("top_p", -0.1, InputError, "top_p"),
    ("top_p", "0.9", InputError, "top_p"),
    ("top_p", None, InputError, "top_p"),
    ("top_k", -1, InputError, "top_k"),
    ("top_k", 2**31, InputError, "top_k"),  # beyond int32
    ("top_k", 10**12, InputError, "top_k"),
    ("top_k", np.int64(2**40), InputError, "top_k"),
    ("top_k", 2.5, InputError, "top_k"),
    ("top_k", True, InputError, "top_k"),
    ("top_k", None, InputError, "top_k"),
    ("seed", 1.5, InputError, "seed"),
    ("seed", -5, InputError, "seed"),
    ("seed", 2**32, InputError, "seed"),
    ("seed", np.float64(3.0), InputError, "seed"),
    ("seed", None, InputError, "seed"),
    ("seed", "7", InputError, "seed"),
    ("stop_tokens", 2, InputError, "stop_tokens"),
    ("stop_tokens", "2", InputError, "stop_tokens"),
    ("stop_tokens", b"\x02", InputError, "stop_tokens"),
    ("stop_tokens", {2: "eos"}, InputError, "stop_tokens"),
    ("stop_tokens", [[2]], InputError, "stop token"),
    ("stop_tokens", [2, [3]], InputError, "stop token"),
    ("stop_tokens", [2.0], InputError, "stop token"),
    ("stop_tokens", [True], InputError, "stop token"),
    ("stop_tokens", [-1], InputError, "stop token"),
    ("stop_tokens", [96], InputError, "stop token"),  # the tiny vocabulary is [0, 96)
    ("max_new_tokens", 2.0, InputError, "max_new_tokens"),
    ("max_new_tokens", -1, InputError, "max_new_tokens"),
    ("max_new_tokens", True, InputError, "max_new_tokens"),
    ("max_new_tokens", None, InputError, "max_new_tokens"),
    ("max_new_tokens", "3", InputError, "max_new_tokens"),
    ("max_new_tokens", 40, InputError, "max_seq"),  # prompt + new tokens exceed max_seq 32
]

# run(tokens) / generate(tokens, 3) with a bad token batch (the plan: max_batch 2, max_seq 32, vocab 96)
BAD_TOKENS = [
    ([], "tokens"),
    ([1, 2, 3], "tokens"),  # not one list per sequence
    ("hello", "tokens"),
    (None, "tokens"),
    ([[1, 2], 3], "tokens"),
    ([[]], "no tokens"),
    ([[1, 96]], "vocabulary"),
    ([[1, -1]], "vocabulary"),
    ([[1, 2.0]], "vocabulary"),
    ([[1, True]], "vocabulary"),
    ([[1, "a"]], "vocabulary"),
    ([[1], [2], [3]], "max_batch"),
    ([list(range(1, 34))], "max_seq"),
]


def _id(x) -> str:
    return x.__name__ if isinstance(x, type) else repr(x)[:40]


def _one_line(err: BaseException) -> str:
    msg = str(err)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    return msg


@pytest.mark.parametrize("key,value,error,word", BAD_COMPILE, ids=_id)
def test_bad_compile_argument_is_a_one_line_error(key, value, error, word):
    args = dict(GOOD_COMPILE, model=CFG, weights="random")
    args[key] = value
    model, weights = args.pop("model"), args.pop("weights")
    with pytest.raises(error) as e:
        llamagraph.compile(model, weights, **args)
    assert word in _one_line(e.value)


@pytest.mark.parametrize("key,value,error,word",
                         [row for row in BAD_COMPILE if row[0] in ("weights", "seed", "backend")],
                         ids=_id)
def test_bad_bind_argument_is_a_one_line_error(compiled_tiny, key, value, error, word):
    # bind() is also load()'s last step; a saved plan is bound with the same checks
    args = dict(weights="random", backend="reference", seed=0)
    args[key] = value
    with pytest.raises(error) as e:
        llamagraph.bind(compiled_tiny, args.pop("weights"), **args)
    assert word in _one_line(e.value)


@pytest.fixture(scope="module")
def compiled_tiny():
    return llamagraph.compile_plan(CFG, dtype="float32", max_batch=2, max_seq=16)


def test_good_sizes_still_compile_numpy_integers_included():
    plan = llamagraph.compile(CFG, "random", dtype="float32", max_batch=np.int64(2), max_seq=np.int32(16),
                              max_tokens=np.int64(32), seed=np.uint32(3), passes=("fuse_silu_mul",))
    assert (plan.max_batch, plan.max_seq, plan.max_tokens) == (2, 16, 32)
    assert all(type(v) is int for v in (plan.max_batch, plan.max_seq, plan.max_tokens))  # plan.json stays plain
    assert plan.graph.meta["passes"] == ["shard_tensor_parallel", "fuse_silu_mul", "dce", "quantize_weights", "plan_memory"]
    same = llamagraph.compile(CFG, "random", dtype="float32", max_batch=2, max_seq=16, seed=3)
    np.testing.assert_array_equal(plan.run([[1, 2, 3]]), same.run([[1, 2, 3]]))


def test_compile_plan_shares_the_checks_with_the_cli():
    # `llamagraph compile` calls compile_plan: the size and pass checks live there, not in api.compile
    with pytest.raises(ConfigError, match="max_batch \\* max_seq"):
        llamagraph.compile_plan(CFG, max_batch=1, max_seq=8, max_tokens=9)
    with pytest.raises(ConfigError, match="list of pass names"):
        llamagraph.compile_plan(CFG, passes="dce")


# ---- a plan on a real (tiny, random) HF checkpoint, with a session in progress ---------------------

PREFIX = [[3, 17, 29, 41, 5], [7, 11, 2]]
NEXT = [[23, 31, 8], [13, 44]]


@pytest.fixture(scope="module")
def ckpt(hf_model):
    return hf_model("gqa")


@pytest.fixture(scope="module")
def hf_after(ckpt):
    """HF's last-token logits for PREFIX + NEXT (each sequence whole, no cache): the oracle for
    a session that ran PREFIX and then NEXT, however the plan split the work."""
    whole = [p + n for p, n in zip(PREFIX, NEXT)]
    return [ref[0] for ref in models.hf_reference_logits(ckpt, whole, [[], []])]


def _plan(ckpt, max_tokens=None):
    return llamagraph.compile(ckpt, dtype="float32", max_batch=2, max_seq=32, max_tokens=max_tokens)


@pytest.fixture(scope="module")
def session_plan(ckpt):
    return _plan(ckpt)


def _assert_continues_like_hf(plan, hf_after):
    got = plan.run(NEXT)
    for b in range(2):
        assert rel_err(got[b], hf_after[b]) < 1e-4, f"sequence {b} lost its session"


@pytest.mark.parametrize("key,value,error,word", BAD_GENERATE, ids=_id)
def test_bad_generate_argument_is_refused_and_keeps_the_session(session_plan, key, value, error, word):
    plan = session_plan
    plan.reset()
    plan.run(PREFIX)
    held = list(plan.lengths)
    args = {"max_new_tokens": 3, key: value}
    with pytest.raises(error) as e:
        plan.generate([[1, 4, 9]] * 2, **args)
    assert word in _one_line(e.value)
    assert plan.lengths == held


@pytest.mark.parametrize("tokens,word", BAD_TOKENS, ids=_id)
def test_bad_tokens_are_refused_by_run_and_generate(session_plan, tokens, word):
    plan = session_plan
    plan.reset()
    for call in (plan.run, lambda t: plan.generate(t, 3)):
        with pytest.raises(InputError) as e:
            call(tokens)
        assert word in _one_line(e.value)
        assert plan.lengths == []


def test_refused_generate_leaves_the_run_session_usable(session_plan, hf_after):
    plan = session_plan
    plan.reset()
    plan.run(PREFIX)
    for key, value in [("temperature", float("nan")), ("stop_tokens", 2), ("top_k", 2**40), ("seed", 1.5)]:
        with pytest.raises(InputError):
            plan.generate([[1, 4, 9]] * 2, 3, **{key: value})
    with pytest.raises(InputError):
        plan.generate([[1, 4, 9]], 3, append=True)  # one prompt to continue two sequences
    _assert_continues_like_hf(plan, hf_after)


def test_numpy_sampling_scalars_sample_like_python_ones(session_plan):
    plan = session_plan
    prompts = [[1, 4, 9], [2, 8]]
    want = plan.generate(prompts, 6, temperature=0.9, top_k=20, top_p=0.8, seed=5, stop_tokens=[0])
    got = plan.generate(prompts, np.int64(6), temperature=np.float32(0.9), top_k=np.int32(20), top_p=np.float64(0.8),
                        seed=np.uint32(5), stop_tokens=(np.int64(0),))
    assert got == want


class _FailOnStep:
    """Wraps an executor's ``step``: the ``n``-th call raises ``exc`` (before running)."""

    def __init__(self, executor, n: int, exc: BaseException):
        self.step, self.n, self.exc, self.calls = executor.step, n, exc, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise self.exc
        return self.step(*args, **kwargs)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("device lost")], ids=["ctrl-c", "error"])
@pytest.mark.parametrize("cut_at", [2, 3])
def test_interrupted_chunked_run_leaves_the_session_as_it_was(ckpt, hf_after, monkeypatch, exc, cut_at):
    # max_tokens 2: NEXT runs as three steps (slot 0: 2 | slot 0: 1, slot 1: 1 | slot 1: 1);
    # cut in the second or third, earlier steps have advanced one or both sequences.
    plan = _plan(ckpt, max_tokens=2)
    plan.run(PREFIX)
    held = list(plan.lengths)
    monkeypatch.setattr(plan.executor, "step", _FailOnStep(plan.executor, cut_at, exc))
    with pytest.raises(type(exc)):
        plan.run(NEXT)
    assert plan.lengths == held
    monkeypatch.undo()
    _assert_continues_like_hf(plan, hf_after)  # the rows the cut call wrote are rewritten, not read


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("device lost")], ids=["ctrl-c", "error"])
def test_interrupted_first_run_holds_no_batch(ckpt, monkeypatch, exc):
    plan = _plan(ckpt, max_tokens=2)
    monkeypatch.setattr(plan.executor, "step", _FailOnStep(plan.executor, 3, exc))
    with pytest.raises(type(exc)):
        plan.run(PREFIX)  # four steps; cut in the third
    assert plan.lengths == []
    monkeypatch.undo()
    # nothing is held, so a batch of a different size starts cleanly and matches HF
    prompt = PREFIX[0] + NEXT[0]
    got = plan.run([prompt])
    want = models.hf_reference_logits(ckpt, [prompt], [[]])[0][0]
    assert rel_err(got[0], want) < 1e-4



# ---------------------------------------------------------------------------------------------
# tensor parallelism (issue #9): tp, and what a tp plan refuses
# ---------------------------------------------------------------------------------------------

# (keyword, bad value, error class, a word the message must contain); CFG has 4 heads, 2 kv heads, ffn 64
BAD_TP = [
    ("tp", 0, ConfigError, "tp must be a positive integer"),
    ("tp", -2, ConfigError, "tp must be a positive integer"),
    ("tp", 2.0, ConfigError, "tp must be a positive integer"),
    ("tp", "2", ConfigError, "tp must be a positive integer"),
    ("tp", True, ConfigError, "tp must be a positive integer"),
    ("tp", None, ConfigError, "tp must be a positive integer"),
    ("tp", 3, ConfigError, "num_attention_heads 4 is not divisible by 3"),
    ("tp", 128, ConfigError, "num_attention_heads 4 is not divisible by 128"),
]


@pytest.mark.parametrize("key,value,error,word", BAD_TP, ids=_id)
def test_bad_tp_is_a_one_line_error(key, value, error, word):
    with pytest.raises(error) as e:
        llamagraph.compile(CFG, "random", **{**GOOD_COMPILE, key: value})
    assert word in _one_line(e.value)


def test_what_a_tp_plan_refuses_is_one_line():
    gptq = {**CFG, "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32, "format": "gptq"}}
    with pytest.raises(ConfigError) as e:
        llamagraph.compile(gptq, "random", tp=2, **GOOD_COMPILE)
    assert "tp 2: this checkpoint is gptq int4" in _one_line(e.value)
    tp1 = llamagraph.compile(CFG, "random", **GOOD_COMPILE)
    with pytest.raises(WeightError) as e:
        llamagraph.compile(CFG, llamagraph.random_weights(tp1.graph), tp=2, **GOOD_COMPILE)
    assert "tp 2" in _one_line(e.value) and "dict" in _one_line(e.value)
    plan = llamagraph.compile(CFG, "random", tp=2, **GOOD_COMPILE)
    with pytest.raises(InputError) as e:
        plan.generate([[1, 2, 3]], 2, echo=True, logprobs=True)
    assert "tensor-parallel" in _one_line(e.value)
    assert plan.lengths == []  # nothing was started
