"""The public API: ``compile()``, ``load()`` and ``Plan``, shared by both executors.

``compile`` runs the compiler (config -> graph -> passes -> lowerings) into a ``CompiledPlan``
and binds it to weights and an executor; ``load`` does the same for a plan saved by
``llamagraph compile -o DIR``, without running a pass or a lowering. A ``Plan`` owns the
compiled plan, the config and the executor. Sequences live in KV-cache slots
0..batch-1. ``run`` packs every sequence's new tokens into steps of at most ``max_tokens``
tokens (no padding); ``generate`` prefills and then decodes one token per sequence per step,
sampling on the device; on the CUDA backend its decode steps are pipelined (the device feeds each
sampled token back itself, so the host queues steps ahead of the tokens it reads).
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass

import numpy as np

from llamagraph.codegen.compiled import CompiledPlan
from llamagraph.codegen.launch import ADVANCE
from llamagraph.compiler import compile_plan
from llamagraph.ir import ConfigError, Graph, InputError, ModelConfig, WeightError

BACKENDS = ("reference", "cuda")


@dataclass
class Segment:
    """A run of consecutive tokens of one sequence inside one step."""

    slot: int
    tokens: list[int]
    start: int  # position of the first token


def compile(
    model: str | os.PathLike | dict | ModelConfig,
    weights: str | os.PathLike | dict | None = None,
    *,
    dtype: str = "float16",
    max_batch: int = 1,
    max_seq: int | None = None,
    max_tokens: int | None = None,
    backend: str = "reference",
    passes: list[str] | None = None,
    dump_dir: str | None = None,
    seed: int = 0,
    progress: bool = False,
    keep_values: bool = False,
    quantize: str | None = None,
    group_size: int | None = None,
    tp: int = 1,
) -> "Plan":
    """Compile a model into an executable plan.

    model: a config.json / params.json path, a checkpoint directory, or a config dict.
    weights: a checkpoint path, a dict of arrays keyed by graph weight name (see
      ``llamagraph.random_weights``), "random" for random weights drawn with ``seed`` (on the
      GPU for the CUDA backend, so the numbers differ between backends), or None to load
      from the ``model`` directory.
    max_seq: KV-cache length per sequence (default: the model's max positions, at most 4096).
    max_tokens: most tokens in one step (default: max_batch * max_seq, at most 4096); longer
      prompts are prefilled in chunks.
    passes: pass names to run (default: the whole pipeline); DCE and the memory planner always run.
    keep_values: every activation gets its own buffer (no reuse), so ``plan.executor.step(...,
      fetch=[name, ...])`` can read any intermediate after a step (more memory; for debugging,
      as ``llamagraph.bisect`` does).
    quantize: "int8" or "int4" to quantize every linear weight (weight-only; see
      ``llamagraph.ir.quant`` for the exact schemes); group_size: int4 columns per scale and zero
      (default 128; -1 for one group per row). A GPTQ / AWQ checkpoint is int4 on its own.
    tp: tensor-parallel ranks. The graph each rank runs holds 1/tp of every projection (heads,
      FFN columns, vocabulary) with all-reduces after O and down; the CUDA backend runs rank r on
      GPU r (all-reduces over peer memory, or NCCL), the reference backend simulates the ranks in
      one process. ``run`` and
      ``generate`` are unchanged.
    """
    _check_binding(weights, backend, seed)
    compiled = compile_plan(model, dtype=dtype, max_batch=max_batch, max_seq=max_seq, max_tokens=max_tokens,
                            passes=passes, dump_dir=dump_dir, keep_values=keep_values, quantize=quantize,
                            group_size=group_size, tp=tp)
    return bind(compiled, weights, backend=backend, seed=seed, progress=progress)


def load(plan_dir: str | os.PathLike, weights: str | os.PathLike | dict | None = None, *, backend: str = "reference",
         seed: int = 0, progress: bool = False) -> "Plan":
    """A plan saved by ``llamagraph compile MODEL -o DIR``, bound to weights, ready to run.

    Nothing is recompiled: the graph, kernels and launch lists come from ``DIR/plan.json`` and
    ``DIR/kernels.cu``. ``weights`` is as for ``compile``; None loads the checkpoint the plan
    was compiled from (its directory must still hold the weights).
    """
    _check_binding(weights, backend, seed)
    compiled = CompiledPlan.load(os.fspath(plan_dir))
    return bind(compiled, weights, backend=backend, seed=seed, progress=progress)


def _check_backend(backend: str) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {BACKENDS}")


def _check_binding(weights, backend: str, seed) -> None:
    """The arguments a plan is bound with, checked before anything is compiled or read."""
    _check_backend(backend)
    check_seed(seed, ConfigError)
    if weights is not None and not isinstance(weights, (str, os.PathLike, dict)):
        raise WeightError(f"weights must be a checkpoint path, a dict of arrays, 'random' or None, got {weights!r}")


def bind(compiled: CompiledPlan, weights, *, backend: str = "reference", seed: int = 0,
         progress: bool = False) -> "Plan":
    """A ``Plan`` running ``compiled`` on ``backend`` with ``weights`` (see ``compile``)."""
    _check_binding(weights, backend, seed)
    cfg = ModelConfig(**compiled.graph.meta["config"])  # the config the plan was compiled from
    tp = int(compiled.graph.meta.get("tp", 1))
    if tp > 1:
        return Plan(compiled, cfg, _bind_ranks(compiled, cfg, weights, backend, seed, tp, progress))
    if backend == "cuda":
        from llamagraph.runtime.cuda import CudaExecutor  # cupy is imported only when asked for

        CudaExecutor.check_available()
        arrays = resolve_weights(compiled.graph, cfg, compiled.model, weights, seed, backend)
        executor = CudaExecutor(compiled, arrays, progress=progress)
    else:
        from llamagraph.runtime.reference import ReferenceExecutor

        executor = ReferenceExecutor(compiled, resolve_weights(compiled.graph, cfg, compiled.model, weights, seed))
    return Plan(compiled, cfg, executor)


def _bind_ranks(compiled: CompiledPlan, cfg: ModelConfig, weights, backend: str, seed: int, tp: int, progress: bool):
    """The executor of a tensor-parallel plan: every rank bound to its shard of the weights."""
    if isinstance(weights, dict):
        raise WeightError(f"a tensor-parallel plan (tp {tp}) takes a checkpoint path or 'random' for its weights, "
                          "not a dict: each rank cuts its shard from the checkpoint's tensors")
    if backend == "cuda":
        from llamagraph.runtime.cuda import CudaExecutor

        CudaExecutor.check_available()
    per_rank = [resolve_weights(compiled.graph, cfg, compiled.model, weights, seed, backend, rank) for rank in range(tp)]
    if backend == "cuda":
        from llamagraph.runtime.tensor_parallel import CudaTensorParallel

        return CudaTensorParallel(compiled, per_rank, progress=progress)
    from llamagraph.runtime.reference import TensorParallelReference

    return TensorParallelReference(compiled, per_rank)


def resolve_weights(graph: Graph, cfg: ModelConfig, model, weights, seed: int, backend: str = "reference",
                    rank: int = 0):
    """The weights in the form the executor takes (for rank ``rank`` of a tensor-parallel plan)."""
    from llamagraph.runtime.weights import (
        check_reference_memory, check_weights_dict, iter_weights, load_weights, random_weights,
    )

    if backend == "reference":  # before the weights, its first large allocation (CUDA checks its own)
        check_reference_memory(graph, weights_in_hand=isinstance(weights, dict))
    if isinstance(weights, dict):
        return check_weights_dict(graph, weights)
    if isinstance(weights, str) and weights == "random":
        if backend == "cuda":  # drawn on the GPU: a 7B model's worth of normals in seconds
            from llamagraph.runtime.cuda import RandomOnDevice

            return RandomOnDevice(seed, rank=rank)
        return random_weights(graph, seed=seed, rank=rank)
    if weights is None:
        if model is None or isinstance(model, (dict, ModelConfig)):
            raise WeightError("no weights given: pass weights=PATH to a checkpoint, or weights='random'")
        path = os.fspath(model)
        weights = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if backend == "cuda":  # streamed: one weight value in host memory at a time, uploaded as read
        # (checked for NaN / inf on the device after upload, where it is cheap)
        return iter_weights(graph, os.fspath(weights), source=cfg.source, check_finite=False, rank=rank)
    return load_weights(graph, os.fspath(weights), source=cfg.source, rank=rank)


def logits_error(plan: "Plan", reference: "Plan", tokens: list[list[int]]) -> dict:
    """How far ``plan``'s logits are from ``reference``'s on the same prompts (each plan is reset
    first and after): the largest absolute difference, that over the reference's largest |logit|
    ("rel"), and the share of sequences whose top-1 token agrees. Made for a quantized plan
    against the unquantized plan of the same weights."""
    out = []
    for p in (plan, reference):
        p.reset()
        out.append(p.run(tokens))
        p.reset()
    got, want = out
    diff = float(np.abs(got - want).max())
    return {"max_abs": diff, "rel": diff / max(float(np.abs(want).max()), 1e-30),
            "top1_agree": float(np.mean(got.argmax(-1) == want.argmax(-1)))}


class Plan:
    """An executable plan: ``run`` / ``generate`` / ``reset`` over a compiled plan."""

    def __init__(self, compiled: CompiledPlan, config: ModelConfig, executor):
        self.compiled = compiled
        self.graph = graph = compiled.graph
        self.config = config
        self.executor = executor
        self.max_batch = graph.meta["max_batch"]
        self.max_seq = graph.meta["max_seq"]
        self.max_tokens = graph.meta["max_tokens"]
        self.vocab_size = config.vocab_size
        self.logits_name = graph.with_role("logits")
        self.next_token_name = graph.with_role("next_token")
        self.next_logprob_name = graph.with_role("next_logprob")
        # a tensor-parallel plan has none (its LM head is split over the ranks): echo logprobs are refused
        has_echo = any(v.role == "token_logprobs" for v in graph.values.values())
        self.token_logprobs_name = graph.with_role("token_logprobs") if has_echo else None
        self.lengths: list[int] = []  # tokens held in each slot's KV cache
        self.state = 0  # bumped whenever what the KV cache holds changes (a chat checks it is still its own)

    @property
    def backend(self) -> str:
        return self.executor.name

    def reset(self) -> None:
        """Forget every sequence; the next ``run`` prefills a new batch."""
        self.lengths = []
        self.state += 1

    # ---- public API ---------------------------------------------------------------------------
    def run(self, tokens: list[list[int]]) -> np.ndarray:
        """Feed new tokens to each sequence; return float32 logits [batch, vocab] of each
        sequence's last token. The first call (or the first after ``reset``) prefills."""
        batch = self._check_tokens(tokens)
        held = self.lengths or [0] * batch  # a new batch is held only once this call completes
        return self._forward(tokens, greedy_sampling(batch), lengths=held).logits

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop_tokens: list[int] | None = None,
                 on_token=None, *, logprobs: bool = False, echo: bool = False, append: bool = False):
        """Generate up to ``max_new_tokens`` tokens per prompt (sampling on the device).

        temperature 0 is greedy. A sequence stops after emitting any of ``stop_tokens``; the
        stop token is not included in its output (nor fed back into the KV cache).
        ``on_token(sequence, token)`` is called as each token is produced (for streaming).
        Returns the new tokens of each prompt; with ``echo=True`` the prompt followed by them.

        ``logprobs=True`` returns ``(tokens, logprobs)``, where ``logprobs`` mirrors ``tokens``:
        each token's log-softmax under the model's distribution before temperature (as Meta's
        generate computes it), computed on the device. With ``echo`` the prompt's tokens get
        theirs too, each given the tokens before it, and the first prompt token's is 0.0.

        ``append=True`` feeds each prompt after what its sequence already holds (a multi-turn
        chat continues its KV cache) instead of starting a new batch.
        Every argument is checked before any state changes.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        check_sampling(temperature, top_k, top_p, seed, stop_tokens, self.vocab_size)
        for flag, v in (("logprobs", logprobs), ("echo", echo), ("append", append)):
            if not isinstance(v, bool):
                raise InputError(f"{flag} must be True or False, got {v!r}")
        if echo and append:
            raise InputError("echo=True scores whole prompts; it cannot continue held sequences (append=True)")
        if echo and logprobs and self.token_logprobs_name is None:
            raise InputError(f"echo=True with logprobs=True: prompt logprobs are not available in a tensor-parallel "
                             f"plan (tp {self.graph.meta.get('tp')}); its LM head is split over the ranks")
        held = self.lengths if append else []
        batch = self._check_tokens(prompts, extra=max(max_new_tokens - 1, 0), lengths=held)
        if max_new_tokens == 0 and not (echo and logprobs):
            out = [list(p) if echo else [] for p in prompts]
            return (out, [[] for _ in out]) if logprobs else out
        if not append:  # a new batch: held only once its prefill completes (lengths=[0] * batch below)
            self.reset()
        stops = set(stop_tokens or [])
        params = Sampling(temperature, top_k, top_p, seed)
        out: list[list[int]] = [list(p) if echo else [] for p in prompts]
        lps: list[list[float]] = [[] for _ in range(batch)]
        new = [0] * batch  # tokens generated per sequence
        step_of = [0] * batch
        fed = self._forward(prompts, params.per_row(list(range(batch)), step_of), want_logits=False,
                            lengths=None if append else [0] * batch, logprobs=logprobs, echo=echo and logprobs)
        if echo and logprobs:  # token j's logprob is row j-1's logprob of its successor
            lps = [[0.0] + fed.prompt_logprobs[b][:-1].tolist() for b in range(batch)]

        def take(slot: int, tok: int, logprob: float) -> bool:
            """Record ``slot``'s new token; whether the sequence goes on."""
            if tok in stops:
                return False
            out[slot].append(tok)
            lps[slot].append(logprob)
            new[slot] += 1
            step_of[slot] += 1
            if on_token is not None:
                on_token(slot, tok)
            return new[slot] < max_new_tokens

        active = list(range(batch)) if max_new_tokens else []
        while active:
            active = [slot for k, slot in enumerate(active)
                      if take(slot, int(fed.next_token[k]), float(fed.next_logprob[k]))]
            if active and self._can_run_ahead():
                self._decode_ahead(active, params.per_row(active, step_of), max_new_tokens - new[active[0]],
                                   logprobs, take, [out[slot][-1] for slot in active])
                break
            if active:
                feed = {slot: [out[slot][-1]] for slot in active}
                fed = self._forward_slots(feed, params.per_row(active, step_of), want_logits=False, logprobs=logprobs)
        return (out, lps) if logprobs else out

    def _can_run_ahead(self) -> bool:
        """Whether decode steps can be pipelined: an executor that replays decode + advance (the
        reference executors run its meaning step by step) and a plan that captures both phases
        (plans saved before the advance phase have none).
        ``LLAMAGRAPH_AHEAD=0`` turns it off (for A/B runs)."""
        return hasattr(self.executor, "decode_ahead") and {"decode", ADVANCE} <= set(self.compiled.captured) \
            and os.environ.get("LLAMAGRAPH_AHEAD", "1") != "0"

    def _decode_ahead(self, rows: list[int], sampling: "RowParams", steps: int, logprobs: bool, take,
                      last: list[int]) -> None:
        """Decode ``steps`` more tokens for the sequences in ``rows`` (slots, each fed its ``last``
        token first), pipelined: the device feeds each sampled token back itself (the plan's advance
        phase), so the host queues the next steps while it reads this one's tokens. ``take(slot,
        token, logprob)`` records each token and says whether its sequence goes on.

        A sequence that stops keeps its row until the batch ends (the steps already queued hold
        it; a batch of the rest would be another graph): its later tokens are dropped, and the KV
        rows they write lie past its held length, which never reads them. So every kept token is
        the one the step-by-step loop gives. When every sequence has stopped, the queued steps are
        waited for and dropped. At most ``steps`` steps run, so no row passes the positions
        ``generate`` checked against max_seq."""
        lengths = list(self.lengths)
        step = [Segment(slot, [tok], lengths[slot]) for slot, tok in zip(rows, last)]
        inputs = self.step_inputs(step, sampling, lengths, None, logprobs)
        fetch = [self.next_token_name] + ([self.next_logprob_name] if logprobs else [])
        alive = set(rows)
        greedy = not logprobs and bool((sampling.temperature <= 0).all())
        ahead = self.executor.decode_ahead(inputs, len(rows), fetch, steps, greedy=greedy)
        try:
            for got in ahead:
                for k, slot in enumerate(rows):
                    if slot in alive:
                        lengths[slot] += 1  # its token of this step went into its cache
                        lp = float(got[self.next_logprob_name][k]) if logprobs else 0.0
                        if not take(slot, int(got[self.next_token_name][k]), lp):
                            alive.discard(slot)
                if not alive:
                    break
        finally:
            ahead.close()  # waits for the steps still queued
            self.lengths = lengths  # what each sequence's cache holds (the steps run so far)
            self.state += 1

    def chat(self, messages: list[dict], max_new_tokens: int = 256, *, on_text=None, model_dir: str | None = None,
             **sampling) -> str:
        """The assistant's reply to ``messages`` ([{"role": "system" | "user" | "assistant",
        "content": str}, ...], the whole conversation so far, ending with a user turn).

        The prompt is the checkpoint's chat template (``tokenizer_config.json`` /
        ``chat_template.jinja``), or the Llama-2 / Llama-3 chat format where it has none. A call
        that continues the previous call's conversation feeds only the new tokens: earlier turns
        stay in the KV cache (slot 0). ``on_text(piece)`` streams the reply; ``sampling`` is as
        for ``generate``. The tokenizer and template come from ``model_dir`` (default: the
        checkpoint the plan was compiled from). A conversation that no longer fits in
        ``max_seq`` raises ``llamagraph.chat.ContextFullError``.
        """
        from llamagraph.chat import open_session  # the logic lives in chat.py

        opened = getattr(self, "_chat_session", None)  # (model_dir, ChatSession) of the last call
        if opened is None or opened[0] != model_dir:
            opened = self._chat_session = (model_dir, open_session(self, *([model_dir] if model_dir else [])))
        return opened[1].reply(messages, max_new_tokens, on_text=on_text, **sampling)

    # ---- internals ----------------------------------------------------------------------------
    def _check_tokens(self, tokens, extra: int = 0, lengths: list[int] | None = None) -> int:
        """The batch size of ``tokens``, checked against the sequences held in ``lengths``
        (default: this plan's)."""
        lengths = self.lengths if lengths is None else lengths
        if not isinstance(tokens, (list, tuple)) or not tokens or not all(isinstance(t, (list, tuple)) for t in tokens):
            raise InputError("tokens must be a non-empty list with one list of token ids per sequence")
        batch = len(tokens)
        if batch > self.max_batch:
            raise InputError(f"batch of {batch} sequences exceeds max_batch {self.max_batch}; compile with a larger max_batch")
        if lengths and batch != len(lengths):
            raise InputError(f"this plan holds {len(lengths)} sequences; got {batch} (call reset() to start a new batch)")
        for b, seq in enumerate(tokens):
            if not seq:
                raise InputError(f"sequence {b} has no tokens")
            for j, t in enumerate(seq):
                if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.vocab_size:
                    raise InputError(f"token id {t!r} at sequence {b} index {j} is outside the vocabulary [0, {self.vocab_size})")
            have = lengths[b] if lengths else 0
            if have + len(seq) + extra > self.max_seq:
                raise InputError(
                    f"sequence {b} would hold {have + len(seq) + extra} tokens, more than max_seq {self.max_seq}; "
                    "compile with a larger max_seq"
                )
        return batch

    def _forward(self, tokens: list[list[int]], sampling: "RowParams", want_logits: bool = True,
                 lengths: list[int] | None = None, **want) -> "Fed":
        return self._forward_slots({b: list(t) for b, t in enumerate(tokens)}, sampling, want_logits, lengths, **want)

    def _forward_slots(self, feed: dict[int, list[int]], sampling: "RowParams", want_logits: bool = True,
                       lengths: list[int] | None = None, logprobs: bool = False, echo: bool = False) -> "Fed":
        """Run every step needed to consume ``feed`` (slot -> new tokens), starting from the
        sequence ``lengths`` (default: this plan's); return the logits, sampled token and (with
        ``logprobs``) its logprob of each fed slot's last token, in ``feed`` order, and (with
        ``echo``) each fed token's logprob of the token after it, per slot.

        All or nothing: the new lengths become the plan's only when every step has run. A call
        cut short (an error, or Ctrl-C while a long prompt is prefilled in chunks) leaves the
        plan's lengths as they were. The KV rows its steps wrote all lie past those lengths, so
        nothing held is lost; and they are never read stale: a token at position p attends to
        rows 0..p only, and the next call feeds positions from the held length on, rewriting
        each such row in the step that first reads it.
        """
        lengths = list(self.lengths if lengths is None else lengths)
        start = list(lengths)
        order = list(feed)
        target = {slot: lengths[slot] + len(toks) for slot, toks in feed.items()}
        # a decode step allocates only what it returns (no [n, vocab] logits unless asked)
        fed = Fed(np.zeros((len(order), self.vocab_size if want_logits else 0), np.float32),
                  np.zeros(len(order), np.int32), np.zeros(len(order), np.float32),
                  {slot: np.zeros(len(t), np.float32) for slot, t in feed.items()} if echo else {})
        # echo: each fed token's successor; the last one's is not known yet
        successors = {slot: np.asarray(list(toks[1:]) + [-1], np.int32) for slot, toks in feed.items()} if echo else {}
        for step in self._pack(feed, lengths):
            row_of = [order.index(seg.slot) for seg in step]
            targets = None
            if echo:
                targets = np.concatenate([successors[s.slot][s.start - start[s.slot]:][:len(s.tokens)] for s in step])
            out = self._run_step(step, sampling.take(row_of), want_logits, lengths, targets, logprobs)
            at = 0
            for k, (seg, row) in enumerate(zip(step, row_of)):
                lengths[seg.slot] = seg.start + len(seg.tokens)
                if echo:
                    first = seg.start - start[seg.slot]
                    fed.prompt_logprobs[seg.slot][first:first + len(seg.tokens)] = \
                        out[self.token_logprobs_name][at:at + len(seg.tokens)]
                at += len(seg.tokens)
                if lengths[seg.slot] == target[seg.slot]:
                    fed.next_token[row] = out[self.next_token_name][k]
                    if logprobs:
                        fed.next_logprob[row] = out[self.next_logprob_name][k]
                    if want_logits:
                        fed.logits[row] = out[self.logits_name][k]
        self.lengths = lengths
        self.state += 1
        return fed

    def _pack(self, feed: dict[int, list[int]], lengths: list[int]) -> list[list[Segment]]:
        """Split the new tokens into steps of at most max_tokens tokens, in slot order."""
        steps: list[list[Segment]] = [[]]
        room = self.max_tokens
        for slot, toks in feed.items():
            pos = lengths[slot]
            while toks:
                if room == 0:
                    steps.append([])
                    room = self.max_tokens
                take = toks[:room]
                steps[-1].append(Segment(slot, take, pos))
                toks, pos, room = toks[len(take):], pos + len(take), room - len(take)
        return steps

    def _run_step(self, step: list[Segment], sampling: "RowParams", want_logits: bool, lengths: list[int],
                  targets: np.ndarray | None = None, logprobs: bool = False) -> dict[str, np.ndarray]:
        """One executor step over ``step``'s segments; returns the fetched outputs by value name.
        ``targets`` (each token's successor, -1 where unknown) asks for the prompt logprobs."""
        inputs = self.step_inputs(step, sampling, lengths, targets, logprobs)
        fetch = [self.next_token_name] + ([self.logits_name] if want_logits else []) + \
            ([self.next_logprob_name] if logprobs else []) + ([self.token_logprobs_name] if targets is not None else [])
        # a step that needs only greedy tokens (no logits, no logprobs) may skip gathering a
        # vocabulary split over tensor-parallel ranks (the plan's decode_greedy phase)
        greedy = not want_logits and not logprobs and targets is None and bool((sampling.temperature <= 0).all())
        return self.executor.step(inputs, len(inputs["tokens"]), len(step), fetch, greedy=greedy)

    def step_inputs(self, step: list[Segment], sampling: "RowParams", lengths: list[int],
                    targets: np.ndarray | None = None, logprobs: bool = False) -> dict[str, np.ndarray]:
        """The graph's step inputs for one step over ``step``'s segments (every sequence's cache
        holding ``lengths`` tokens before it): what ``executor.step`` takes. Tools that fetch
        other values than ``run``/``generate`` do (``llamagraph.bisect``) build steps with it."""
        tokens = np.concatenate([np.asarray(s.tokens, np.int32) for s in step])
        positions = np.concatenate([np.arange(s.start, s.start + len(s.tokens), dtype=np.int32) for s in step])
        seq_ids = np.concatenate([np.full(len(s.tokens), s.slot, np.int32) for s in step])
        seq_lens = np.zeros(self.max_batch, np.int32)
        seq_lens[: len(lengths)] = lengths
        for s in step:
            seq_lens[s.slot] = s.start + len(s.tokens)
        last_index = np.cumsum([len(s.tokens) for s in step]).astype(np.int32) - 1
        inputs = {
            "tokens": tokens,
            "positions": positions,
            "seq_ids": seq_ids,
            "seq_lens": seq_lens,
            "last_index": last_index,
            "targets": targets if targets is not None else np.full(len(tokens), -1, np.int32),
            "sample.logprobs": np.full(len(step), int(logprobs), np.int32),
            **sampling.arrays(),
        }
        return inputs


@dataclass
class Fed:
    """What ``_forward_slots`` returns, per fed slot in feed order (``prompt_logprobs`` by slot)."""

    logits: np.ndarray  # [n, vocab] fp32 of each slot's last token (with want_logits)
    next_token: np.ndarray  # [n] sampled after each slot's last token
    next_logprob: np.ndarray  # [n] its logprob (with logprobs)
    prompt_logprobs: dict[int, np.ndarray]  # slot -> [fed tokens] logprob of each one's successor (with echo)


@dataclass
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def per_row(self, slots: list[int], step_of: list[int]) -> "RowParams":
        n = len(slots)
        # Each sequence gets its own stream: the seed mixed with its slot; the step is the offset.
        seed = int(self.seed)  # a numpy integer would overflow in the shift
        seeds = np.array([((seed & 0xFFFFFFFF) << 20 | s) & 0x7FFFFFFFFFFFFFFF for s in slots], np.int64)
        return RowParams(
            np.full(n, self.temperature, np.float32),
            np.full(n, self.top_k, np.int32),
            np.full(n, self.top_p, np.float32),
            seeds,
            np.array([step_of[s] for s in slots], np.int32),
        )


@dataclass
class RowParams:
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    seed: np.ndarray
    step: np.ndarray

    def take(self, rows: list[int]) -> "RowParams":
        return RowParams(*(a[rows] for a in (self.temperature, self.top_k, self.top_p, self.seed, self.step)))

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "sample.temperature": self.temperature,
            "sample.top_k": self.top_k,
            "sample.top_p": self.top_p,
            "sample.seed": self.seed,
            "sample.step": self.step,
        }


def greedy_sampling(batch: int) -> RowParams:
    return Sampling().per_row(list(range(batch)), [0] * batch)


SEED_LIMIT = 2**32  # random weights and the sampler use a seed mod 2**32: larger seeds would alias smaller ones
FLOAT32_MAX = float(np.finfo(np.float32).max)  # sampling parameters reach the device as float32
INT32_LIMIT = 2**31


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)  # numpy integers too


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)  # numpy floats too


def check_seed(seed, error: type = InputError) -> None:
    if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise error(f"seed must be an integer in [0, 2**32), got {seed!r}")


def check_sampling(temperature, top_k, top_p, seed=0, stop_tokens=None, vocab_size: int | None = None) -> None:
    """Check generate's sampling and stopping arguments: NaN, inf, or values that do not fit
    the float32 / int32 the device reads would otherwise give junk tokens."""
    if not _is_real(temperature) or not 0 <= temperature <= FLOAT32_MAX:  # NaN fails every comparison
        raise InputError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not _is_int(top_k) or not 0 <= top_k < INT32_LIMIT:
        raise InputError(f"top_k must be an integer in [0, 2**31) (0: no limit), got {top_k!r}")
    if not _is_real(top_p) or not 0 < top_p <= 1 or np.float32(top_p) == 0:
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
    check_seed(seed)
    if stop_tokens is None:
        return
    if not isinstance(stop_tokens, (list, tuple, set, frozenset)):
        raise InputError(f"stop_tokens must be a list of token ids, got {stop_tokens!r}")
    for t in stop_tokens:
        if not _is_int(t) or t < 0 or (vocab_size is not None and t >= vocab_size):
            bound = "" if vocab_size is None else f" in [0, {vocab_size})"
            raise InputError(f"stop token {t!r} is not a token id{bound}")
