"""Token logprobs and echo, against HF transformers' own log-softmax (as Meta's generate
computes them: the log-softmax of the raw logits, before temperature)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import llamagraph
from llamagraph.ir import InputError

PROMPTS = [[1, 17, 33, 5, 60, 2, 9, 41, 77, 12], [1, 88, 3, 50]]


@torch.no_grad()
def hf_logprobs(model_dir: str, seq: list[int]) -> np.ndarray:
    """[len(seq)] logprob of each token given the ones before it (0 for the first), from HF."""
    import models

    model = models.load_hf_model(model_dir)
    logits = model(input_ids=torch.tensor([seq])).logits[0].float()  # [S, V]
    lp = torch.log_softmax(logits, dim=-1)[:-1].gather(1, torch.tensor(seq[1:])[:, None])[:, 0]
    return np.concatenate([[0.0], lp.numpy()])


@pytest.fixture(scope="module")
def model_dir(hf_model):
    return hf_model("gqa")


def test_generated_logprobs_match_hf_greedy(model_dir):
    plan = llamagraph.compile(model_dir, dtype="float32", max_batch=2, max_seq=40)
    tokens, logprobs = plan.generate(PROMPTS, 6, logprobs=True)
    plain = plan.generate(PROMPTS, 6)
    assert tokens == plain  # asking for logprobs changes no token
    for prompt, toks, lps in zip(PROMPTS, tokens, logprobs):
        assert len(lps) == len(toks) == 6
        want = hf_logprobs(model_dir, prompt + toks)[len(prompt):]
        np.testing.assert_allclose(lps, want, rtol=1e-4, atol=1e-4)
        assert all(lp <= 0 for lp in lps)


def test_logprobs_are_before_temperature(model_dir):
    """Sampled at temperature 1.7 with top-k: the logprob is still the model's own log-softmax."""
    plan = llamagraph.compile(model_dir, dtype="float32", max_batch=1, max_seq=40)
    tokens, logprobs = plan.generate(PROMPTS[:1], 8, temperature=1.7, top_k=20, seed=3, logprobs=True)
    want = hf_logprobs(model_dir, PROMPTS[0] + tokens[0])[len(PROMPTS[0]):]
    np.testing.assert_allclose(logprobs[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("max_tokens", [None, 4])  # 4: the prompts are prefilled over several steps
def test_echo_returns_the_prompt_and_its_logprobs(model_dir, max_tokens):
    plan = llamagraph.compile(model_dir, dtype="float32", max_batch=2, max_seq=40, max_tokens=max_tokens)
    tokens, logprobs = plan.generate(PROMPTS, 5, logprobs=True, echo=True)
    for prompt, toks, lps in zip(PROMPTS, tokens, logprobs):
        assert toks[: len(prompt)] == prompt and len(toks) == len(prompt) + 5 == len(lps)
        assert lps[0] == 0.0  # as in Meta's generate: the first prompt token has no context
        np.testing.assert_allclose(lps, hf_logprobs(model_dir, toks), rtol=1e-4, atol=1e-4)


def test_echo_without_logprobs_returns_the_prompt_and_tokens(model_dir):
    plan = llamagraph.compile(model_dir, dtype="float32", max_batch=1, max_seq=40)
    new = plan.generate(PROMPTS[:1], 4)
    assert plan.generate(PROMPTS[:1], 4, echo=True) == [PROMPTS[0] + new[0]]


def test_echo_with_no_new_tokens_scores_the_prompt(model_dir):
    plan = llamagraph.compile(model_dir, dtype="float32", max_batch=1, max_seq=40)
    tokens, logprobs = plan.generate(PROMPTS[:1], 0, logprobs=True, echo=True)
    assert tokens == PROMPTS[:1]
    np.testing.assert_allclose(logprobs[0], hf_logprobs(model_dir, PROMPTS[0]), rtol=1e-4, atol=1e-4)


def test_prompt_logprobs_are_computed_only_on_demand(model_dir, monkeypatch):
    """A plain generate never runs the prompt-logprob op (it would cost a full LM head over the prompt)."""
    import dataclasses

    from llamagraph.ir import OPS

    plan = llamagraph.compile(model_dir, dtype="float32", max_batch=1, max_seq=40)
    calls = []
    op = OPS["token_logprobs"]
    spy = dataclasses.replace(op, reference=lambda ins, a: calls.append(1) or op.reference(ins, a))
    monkeypatch.setitem(OPS, "token_logprobs", spy)
    plan.generate(PROMPTS[:1], 3, logprobs=True)
    assert calls == []
    plan.generate(PROMPTS[:1], 3, logprobs=True, echo=True)
    assert calls


def test_bad_logprob_flags_are_one_line_errors(model_dir):
    plan = llamagraph.compile(model_dir, dtype="float32", max_batch=1, max_seq=40)
    with pytest.raises(InputError, match="logprobs"):
        plan.generate(PROMPTS[:1], 2, logprobs="yes")
    with pytest.raises(InputError, match="echo"):
        plan.generate(PROMPTS[:1], 2, echo=1)


def test_cli_run_prints_logprobs(model_dir, capsys):
    from llamagraph.cli import main

    assert main(["run", model_dir, "--random-weights", "--backend", "reference", "--dtype", "float32",
                 "--max-new-tokens", "3", "--prompt-len", "5", "--logprobs"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("logprobs:")]
    assert len(lines) == 1 and len(lines[0].split()[1:]) == 3
    assert all(float(x) <= 0 for x in lines[0].split()[1:])
