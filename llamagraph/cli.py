"""The ``llamagraph`` command line: a thin face over the Python API. Nothing imports it.

    llamagraph compile CONFIG [-o OUTDIR] [--dtype D] [--max-batch N] [--max-seq N]
                              [--max-tokens N] [--tp N] [--dump-dir DIR] [--arch sm_90]
    llamagraph dump CONFIG [--after PASS] [--dtype D] [--max-batch N] [--max-seq N] [--tp N] [--json]
    llamagraph run MODEL|PLAN_DIR [--weights PATH | --random-weights] --prompt TEXT [--max-new-tokens N]
                         [--temperature T] [--top-k K] [--top-p P] [--seed S] [--backend cuda] [--tp N]
    llamagraph bench CONFIG --random-weights [--batch B[,B...]] [--prompt-len P] [--gen-len G]
                     [--tp N [--no-tp1]] [--peers gptfast,hf,compile] [--json PATH]
    llamagraph profile CONFIG --random-weights [--batch B] [--context N] [--dtype D] [--tp N] [-o OUT.html]
                       [--json OUT.json]
    llamagraph chat MODEL|PLAN_DIR [--weights PATH] [--system TEXT] [--max-new-tokens N]
                          [--temperature T] [--top-k K] [--top-p P] [--seed S] [--backend cuda] [--tp N]
                          (turns on stdin)

Each subcommand is one ``add_<name>(subparsers)`` function that builds its parser and sets
``func``; ``COMMANDS`` lists them in help order, so adding ``run`` or ``bench`` is one function
plus one entry.

Errors a user can cause (``LlamagraphError``, an ``OSError`` writing outputs, a bad argument)
print one line ``llamagraph: error: <message>`` to stderr and exit 2, with no traceback
(running out of memory too, though sizes are checked against free memory first); Ctrl-C
prints ``llamagraph: interrupted`` and exits 130. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Callable

from llamagraph.ir.config import DTYPES
from llamagraph.ir.errors import LlamagraphError

PROG = "llamagraph"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT


class UsageError(Exception):
    """A bad command line: reported as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    # argparse would print the usage block and exit; we want one line and a return code.
    def error(self, message: str):
        raise UsageError(message)


# ---------------------------------------------------------------------------------------------
# argument types and shared options
# ---------------------------------------------------------------------------------------------

# The most any count argument may be (sequences, tokens, lengths): 2**24 tokens is beyond every
# Llama's context, and a larger count only fails later, deep inside, allocating.
MAX_COUNT = 2**24


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    if v > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_COUNT} (2**24), got {text!r}")
    return v


def cuda_arch(text: str) -> str:
    if not re.fullmatch(r"sm_\d{2,3}[af]?", text):
        raise argparse.ArgumentTypeError(f"expected a CUDA arch like sm_90, got {text!r}")
    return text


def add_model_options(p: argparse.ArgumentParser, *, max_tokens: bool = True) -> None:
    """CONFIG and the sizes every command that compiles a graph takes."""
    p.add_argument("config", metavar="CONFIG", help="config.json / params.json, or a checkpoint directory")
    p.add_argument("--dtype", choices=DTYPES, default="float16", help="storage dtype (default: float16)")
    p.add_argument("--max-batch", type=positive_int, default=1, metavar="N", help="sequences per step (default: 1)")
    p.add_argument("--max-seq", type=positive_int, metavar="N",
                   help="KV-cache length per sequence (default: the model's max positions, at most 4096)")
    if max_tokens:
        p.add_argument("--max-tokens", type=positive_int, metavar="N",
                       help="most tokens in one step (default: max_batch * max_seq, at most 4096)")
    add_quant_options(p)
    add_tp_option(p)


def add_tp_option(p: argparse.ArgumentParser, default: int | None = 1, extra: str = "") -> None:
    p.add_argument("--tp", type=positive_int, default=default, metavar="N",
                   help="tensor-parallel ranks: each of N GPUs holds 1/N of every projection (heads, FFN "
                        f"columns, vocabulary), all-reduced after O and down (default: 1){extra}")


def group_size_arg(text: str) -> int:
    if text.strip() == "-1":
        return -1
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a positive integer (or -1: one group per row), got {text!r}") from None


def add_quant_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=("int8", "int4"),
                   help="weight-only quantization of every linear weight (int8: one scale per row; int4: "
                        "a scale and zero per group of --group-size columns); a GPTQ/AWQ checkpoint is int4 already")
    p.add_argument("--group-size", type=group_size_arg, metavar="G",
                   help="int4 columns per scale and zero (default: 128; -1: one group per row)")


def quant_kwargs(args: argparse.Namespace) -> dict:
    if args.group_size is not None and args.quantize != "int4":
        raise UsageError("argument --group-size: only with --quantize int4")
    return {"quantize": args.quantize, "group_size": args.group_size}


def model_kwargs(args: argparse.Namespace) -> dict:
    return {"dtype": args.dtype, "max_batch": args.max_batch, "max_seq": args.max_seq,
            "max_tokens": getattr(args, "max_tokens", None), **quant_kwargs(args), "tp": args.tp}


# ---------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------

def add_compile(sub) -> None:
    p = sub.add_parser("compile", help="compile a model config; write the plan, fused graph, memory plan and pictures",
                       description="Compile a Llama config into a plan (plan.json + kernels.cu, which "
                                   "`llamagraph run OUTDIR` and llamagraph.load run) and write it, with the fused "
                                   "graph, memory plan, pictures and a report, into OUTDIR.")
    add_model_options(p)
    p.add_argument("-o", "--outdir", metavar="OUTDIR", help="output directory (default: ./<config stem>.llamagraph/)")
    p.add_argument("--dump-dir", metavar="DIR", help="also write the IR after every pass into DIR")
    p.add_argument("--arch", type=cuda_arch, default="sm_90", help="CUDA arch for generated code (default: sm_90)")
    p.set_defaults(func=cmd_compile)


def cmd_compile(args: argparse.Namespace) -> int:
    from llamagraph import report

    outdir = args.outdir or report.default_outdir(args.config)
    if args.dump_dir and os.path.commonpath([os.path.realpath(outdir), os.path.realpath(args.dump_dir)]) \
            == os.path.realpath(outdir):  # the plan directory is written elsewhere, then renamed into place
        raise UsageError(f"--dump-dir {args.dump_dir} is inside the output directory {outdir}, which is written "
                         "whole; choose a dump directory outside it")
    c = report.compile_model(args.config, dump_dir=args.dump_dir, **model_kwargs(args))
    sections = report.write_artifacts(c, outdir, arch=args.arch)
    if args.dump_dir:
        files = os.listdir(args.dump_dir)
        n, n_diff = sum(f.endswith(".txt") for f in files), sum(f.endswith(".diff") for f in files)
        sections.append(report.Section("pass dumps", [
            f"{n} files in {args.dump_dir} (IR after each pass, with a change note)",
            f"{n_diff} diffs against the stage before (NN_<pass>.diff, unified; patch applies them)"]))
    sys.stdout.write(report.format_report(f"{PROG} compile {args.config}", sections))
    return 0


# ---------------------------------------------------------------------------------------------
# dump
# ---------------------------------------------------------------------------------------------

def add_dump(sub) -> None:
    p = sub.add_parser("dump", help="print the IR after a pass",
                       description="Print the IR after the named pass ('build' is the unfused graph; "
                                   "default: the last pass), as text or JSON.")
    add_model_options(p, max_tokens=False)
    p.add_argument("--after", metavar="PASS", help="build, or a pass name (default: the last pass)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_dump)


def cmd_dump(args: argparse.Namespace) -> int:
    from llamagraph.compiler import graph_after, stage_names

    names = stage_names()
    if args.after is not None and args.after not in names:
        raise UsageError(f"argument --after: unknown pass {args.after!r}; valid names: {', '.join(names)}")
    kwargs = model_kwargs(args)
    kwargs.pop("max_tokens")
    graph = graph_after(args.config, args.after, **kwargs)
    sys.stdout.write(graph.to_json() + "\n" if args.json else str(graph))
    return 0


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------

def probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return v


def non_negative(kind, most=None):
    """An argument type: a finite ``kind`` (int or float) >= 0, and <= ``most`` when given."""
    what = ("finite non-negative number" if kind is float else "non-negative integer") + \
        (f" up to {most}" if most is not None else "")

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a {what}, got {text!r}") from None
        if not math.isfinite(v) or v < 0 or (most is not None and v > most):  # nan fails every comparison
            raise argparse.ArgumentTypeError(f"must be a {what}, got {text!r}")
        return v
    return parse


top_k_count = non_negative(int, most=2**31 - 1)  # an int32 on the device
seed_int = non_negative(int, most=2**32 - 1)  # as the API takes them: one 32-bit word per stream


def add_run(sub) -> None:
    p = sub.add_parser("run", help="generate text from a prompt, streaming it",
                       description="Generate from a checkpoint (its tokenizer.model / tokenizer.json encodes the "
                                   "prompt), streaming the text. The tokenizer is looked up in MODEL's directory (for "
                                   "a plan directory: the checkpoint it was compiled from), then in the --weights "
                                   "directory. --random-weights runs a config's shape on random weights with token "
                                   "ids in place of text.")
    p.add_argument("model", metavar="MODEL",
                   help="checkpoint directory, a config.json / params.json, or a plan directory from `llamagraph compile -o`")
    p.add_argument("--weights", metavar="PATH",
                   help="checkpoint to load (default: the MODEL directory, or the checkpoint a plan was compiled "
                        "from); its directory is searched for a tokenizer after MODEL's")
    p.add_argument("--random-weights", action="store_true", help="random weights; the prompt is random token ids")
    p.add_argument("--prompt", default="", help="prompt text (ignored with --random-weights)")
    p.add_argument("--prompt-len", type=positive_int, default=16, help="random prompt length (--random-weights)")
    add_generation_options(p, max_new_tokens=64, max_seq_help="KV-cache length per sequence")
    p.add_argument("--logprobs", action="store_true",
                   help="after the output, print each generated token's logprob (log-softmax before temperature)")
    p.add_argument("--quant-error", action="store_true",
                   help="with --quantize: also run the unquantized plan on the prompt and print the logits error")
    p.set_defaults(func=cmd_run)


def add_generation_options(p: argparse.ArgumentParser, *, max_new_tokens: int, max_seq_help: str) -> None:
    """What `run` and `chat` share: sampling, and the sizes of a plan compiled on the spot."""
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens, metavar="N",
                   help=f"most new tokens (default: {max_new_tokens})")
    p.add_argument("--temperature", type=non_negative(float), default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=top_k_count, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus mass to keep (default: 1.0)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--dtype", choices=DTYPES, default="float16", help="(not for a plan directory: it has its own)")
    p.add_argument("--max-seq", type=positive_int, metavar="N",
                   help=f"{max_seq_help} (not for a plan directory: it has its own)")
    p.add_argument("--backend", choices=("cuda", "reference"), default="cuda")
    add_quant_options(p)
    # default None: a plan directory keeps the rank count it was compiled with unless told otherwise
    add_tp_option(p, default=None, extra="; the reference backend simulates the ranks in one process")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


class PlanSource:
    """MODEL as `run` and `chat` take it: a plan directory (loaded as it is) or a checkpoint /
    config (compiled on the spot); ``model`` is where its tokenizer is looked for first."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.compiled, self.model = args, None, args.model
        if _is_plan_dir(args.model):
            from llamagraph.codegen.compiled import CompiledPlan

            self.compiled = CompiledPlan.load(args.model)
            self.model = self.compiled.model

    def tokenizer_dirs(self) -> list[str]:
        if self.model is None and not self.args.weights:
            raise UsageError(f"{self.args.model}: the plan records no model directory to find a tokenizer in; "
                             "pass --weights DIR")
        return _tokenizer_dirs(self.model, self.args.weights)

    def plan(self, weights, progress: bool = False, unquantized: bool = False):
        import llamagraph

        a = self.args
        tp = 1 if a.tp is None else a.tp
        if unquantized:  # the same model and weights without quantization (for --quant-error)
            return llamagraph.compile(a.model, weights, dtype=a.dtype, max_seq=a.max_seq, backend=a.backend,
                                      seed=a.seed, progress=progress, tp=tp)
        if self.compiled is not None:
            if a.quantize or a.group_size is not None:
                raise UsageError(f"argument --quantize: {a.model} is a compiled plan with its own weight layout; "
                                 "compile it with --quantize instead")
            own = int(self.compiled.graph.meta.get("tp", 1))
            if a.tp is not None and a.tp != own:  # its graph is one rank's, cut for its own rank count
                raise UsageError(f"argument --tp: {a.model} is a compiled plan with its own weight layout (tp {own}); "
                                 f"compile it with --tp {a.tp} instead")
            return llamagraph.bind(self.compiled, weights, backend=a.backend, seed=a.seed, progress=progress)
        return llamagraph.compile(a.model, weights, dtype=a.dtype, max_seq=a.max_seq, backend=a.backend, seed=a.seed,
                                  progress=progress, tp=tp, **quant_kwargs(a))


def _is_plan_dir(path: str) -> bool:
    from llamagraph.codegen.compiled import PLAN_FILE

    return os.path.isdir(path) and os.path.isfile(os.path.join(path, PLAN_FILE))


def _tokenizer_dirs(model: str | None, weights: str | None) -> list[str]:
    """Where ``run`` looks for a tokenizer, in order: MODEL's directory (for a plan, the checkpoint
    it was compiled from), then the --weights directory (a weights file's directory)."""
    return [os.path.normpath(p) if os.path.isdir(p) else os.path.dirname(os.path.abspath(p)) for p in (model, weights) if p]


def cmd_run(args: argparse.Namespace) -> int:
    from llamagraph.textgen import find_tokenizer, format_logprobs, stream_text

    if args.random_weights and args.weights:
        raise UsageError("--weights and --random-weights exclude each other")
    if args.quant_error and not args.quantize:
        raise UsageError("--quant-error needs --quantize (it compares the quantized plan with the unquantized one)")
    sampling = sampling_kwargs(args)
    source = PlanSource(args)
    if args.random_weights:
        plan = source.plan("random")
        import numpy as np

        prompt = np.random.default_rng(args.seed).integers(0, plan.vocab_size, args.prompt_len).tolist()
        if args.quant_error:
            _print_quant_error(plan, source.plan("random", unquantized=True), prompt, args.quantize)
        print(f"prompt ids: {prompt}")
        sys.stdout.write("generated ids:")
        result = plan.generate([prompt], args.max_new_tokens, logprobs=args.logprobs,
                               on_token=lambda _s, t: (sys.stdout.write(f" {t}"), sys.stdout.flush()), **sampling)
        sys.stdout.write("\n")
        if args.logprobs:
            print(format_logprobs(result[1][0]))
        return 0
    if not args.prompt:
        raise UsageError("--prompt is required (or pass --random-weights)")
    tokenizer = find_tokenizer(*source.tokenizer_dirs())
    plan = source.plan(args.weights, progress=sys.stderr.isatty())
    cfg = plan.config
    if args.quant_error:
        ids = ([cfg.bos_token_id] if cfg.bos_token_id is not None else []) + tokenizer.encode(args.prompt)
        _print_quant_error(plan, source.plan(args.weights, unquantized=True), ids, args.quantize)
    stream_text(plan, tokenizer, args.prompt, args.max_new_tokens, bos=cfg.bos_token_id,
                stop_tokens=cfg.eos_token_ids, logprobs=args.logprobs, **sampling)
    return 0


def _print_quant_error(plan, unquantized, prompt: list[int], scheme: str) -> None:
    import llamagraph

    e = llamagraph.logits_error(plan, unquantized, [prompt])
    print(f"info: {scheme} logits against the unquantized plan, last prompt token: max |diff| {e['max_abs']:.4g}, "
          f"relative to max |logit| {e['rel']:.3%}, top-1 {'agrees' if e['top1_agree'] == 1 else 'differs'}",
          file=sys.stderr)
    del unquantized


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------

class _Default(str):
    """A default argparse hands back as it is (the same object), so a command can tell it from the
    same text typed on the command line."""


DEFAULT_PEERS = _Default("gptfast,hf,compile")


def add_bench(sub) -> None:
    def batch_list(text: str) -> list[int]:
        sizes = [positive_int(x.strip()) for x in text.split(",")]
        if len(set(sizes)) != len(sizes):
            raise argparse.ArgumentTypeError(f"a batch size repeats in {text!r}")
        return sizes

    p = sub.add_parser("bench", help="decode and prefill speed vs the bandwidth floor and PyTorch peers (GPU)",
                       description="Time prefill, time to first token and decode on random weights at each batch "
                                   "size and print tok/s, ms/step, the bandwidth floor and the % of it reached, "
                                   "beside a gpt-fast-style torch.compile model, HF transformers eager and HF's "
                                   "static cache + torch.compile path, all measured in the same run.")
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("--random-weights", action="store_true", required=True,
                   help="required: the benchmark runs on random weights")
    p.add_argument("--batch", type=batch_list, default=[1], metavar="B[,B...]",
                   help="batch sizes, e.g. 1,8,16: one table each (default 1)")
    p.add_argument("--prompt-len", type=positive_int, default=128)
    p.add_argument("--gen-len", type=positive_int, default=128, help="new tokens per sequence, at least 2")
    p.add_argument("--dtype", choices=DTYPES, default="float16")
    add_quant_options(p)
    add_tp_option(p, extra="; the floor is per GPU, and the same model at tp 1 is measured beside it "
                           "(a 'vs tp1' column)")
    p.add_argument("--no-tp1", action="store_true",
                   help="with --tp N > 1: do not also measure the model at tp 1")
    p.add_argument("--peers", default=DEFAULT_PEERS,
                   help="comma list of gptfast, hf, compile (default: all three; none with --tp N > 1, as the "
                        "peers run on one GPU); 'none' for no peers")
    p.add_argument("--json", metavar="PATH", help="also write every figure as one JSON document")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from llamagraph.bench import PEERS, bench, check_request
    from llamagraph.runtime.cuda import CudaExecutor

    if args.no_tp1 and args.tp == 1:
        raise UsageError("argument --no-tp1: only with --tp N > 1")
    # the peers run on one GPU: beside a tensor-parallel plan only when asked for
    given = "none" if args.tp > 1 and isinstance(args.peers, _Default) else args.peers
    peers = tuple(dict.fromkeys(x.strip() for x in given.split(",") if x.strip() and x.strip() != "none"))
    bad = [x for x in peers if x not in PEERS]
    if bad:
        raise UsageError(f"argument --peers: unknown peer {bad[0]!r}; choose from {', '.join(PEERS)}, none")
    if args.gen_len < 2:
        raise UsageError(f"argument --gen-len: must be at least 2 (decode is timed over the steps after the first "
                         f"token), got {args.gen_len}")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise UsageError(f"argument --json: {os.path.dirname(os.path.abspath(args.json))} is not a directory")
    quant = quant_kwargs(args)
    # a bad config, or a plan the compiler refuses (quantize with tp, heads tp does not divide), fails before
    # any GPU work
    check_request(args.config, batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len, dtype=args.dtype,
                  tp=args.tp, **quant)
    CudaExecutor.check_available()
    if given is not args.peers:
        print(f"note: --tp {args.tp}: the PyTorch peers run on one GPU; none run unless --peers names them",
              file=sys.stderr)
    report = bench(args.config, batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len, dtype=args.dtype,
                   peers=peers, progress=sys.stderr.isatty(), log=lambda m: print(m, file=sys.stderr),
                   tp=args.tp, tp1=not args.no_tp1, **({k: v for k, v in quant.items() if v is not None}))
    print(report.table())
    if args.json:
        report.write_json(args.json)
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------

def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="a multi-turn chat: user turns read from stdin, replies streamed",
                       description="Chat with a checkpoint. Each line read from stdin is a user turn (an empty line "
                                   "or end of input ends the chat); the reply streams to stdout. The prompt is the "
                                   "checkpoint's chat template (tokenizer_config.json or chat_template.jinja), else "
                                   "the Llama-3 or Llama-2 chat format, as its tokenizer's special tokens call for. "
                                   "Earlier turns stay in the KV cache: each turn feeds only its new tokens.")
    p.add_argument("model", metavar="MODEL",
                   help="checkpoint directory, or a plan directory from `llamagraph compile -o`")
    p.add_argument("--weights", metavar="PATH",
                   help="checkpoint to load (default: MODEL, or the checkpoint a plan was compiled from); its "
                        "directory is searched for a tokenizer and chat template after MODEL's")
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    add_generation_options(p, max_new_tokens=256, max_seq_help="tokens the whole conversation may hold")
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    from llamagraph.chat import ContextFullError, open_session

    source = PlanSource(args)
    dirs = source.tokenizer_dirs()
    session = open_session(source.plan(args.weights, progress=sys.stderr.isatty()), *dirs)
    sampling = sampling_kwargs(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    while True:
        try:
            turn = input("> ") if interactive else sys.stdin.readline()  # input() gives line editing
        except EOFError:
            break
        if not turn.strip():
            break
        messages.append({"role": "user", "content": turn.rstrip("\n")})
        reply = session.reply(messages, args.max_new_tokens, on_text=show, **sampling)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})
        if session.cut_by_context:  # the reply filled the KV cache: no room for another turn
            raise ContextFullError(session.context_full_message())
    return 0


# ---------------------------------------------------------------------------------------------
# bisect
# ---------------------------------------------------------------------------------------------

EXIT_MISMATCH = 1  # bisect: an intermediate exceeds the tolerance


def token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}") from None


def add_bisect(sub) -> None:
    p = sub.add_parser("bisect", help="find the first op where the plan departs from HF transformers",
                       description="Run HF transformers (float32, the oracle) and the plan on the same checkpoint "
                                   "and prompt; compare every intermediate layer by layer (normed input, q/k/v after "
                                   "RoPE, attention, residual stream, MLP, final norm, logits); print the table and "
                                   "name the first op whose relative error exceeds the dtype's tolerance. Exit 0 "
                                   "when none does, 1 when one does, 2 on bad input.")
    p.add_argument("model", metavar="CKPT", help="HF checkpoint directory (config.json + safetensors)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text, encoded by the checkpoint's tokenizer (BOS first)")
    prompt.add_argument("--prompt-ids", type=token_ids, metavar="IDS", help="token ids, e.g. 1,2,3")
    p.add_argument("--backend", choices=("cuda", "reference"), default="cuda")
    p.add_argument("--dtype", choices=DTYPES, default="float16", help="plan storage dtype (default: float16)")
    p.add_argument("--unfused", action="store_true", help="bisect the unfused graph (every op its own node)")
    p.add_argument("--tolerance", type=float, metavar="X",
                   help="max relative error at layer 0, times sqrt(layer + 1) deeper "
                        "(default: 1e-4 float32, 2e-2 float16, 1e-1 bfloat16)")
    p.set_defaults(func=cmd_bisect)


def cmd_bisect(args: argparse.Namespace) -> int:
    from llamagraph.bisect import bisect, prompt_ids_from_text

    ids = args.prompt_ids if args.prompt is None else prompt_ids_from_text(args.model, args.prompt)
    r = bisect(args.model, ids, backend=args.backend, dtype=args.dtype, passes=[] if args.unfused else None,
               tolerance=args.tolerance)
    plan = "unfused graph" if args.unfused else "fused plan"
    print(f"{PROG} bisect {args.model}: {r.dtype} {plan} on {r.backend} vs HF transformers float32, "
          f"{len(ids)} prompt tokens")
    print(f"prompt ids: {','.join(map(str, ids))}")
    print()
    sys.stdout.write(r.table())
    for line in r.unmapped:
        print(f"not compared: {line}")
    print()
    print(r.verdict())
    return 0 if r.ok else EXIT_MISMATCH


# ---------------------------------------------------------------------------------------------
# profile
# ---------------------------------------------------------------------------------------------

def add_profile(sub) -> None:
    p = sub.add_parser("profile", help="one decode step kernel by kernel: us, bytes, GB/s (GPU)",
                       description="Replay one decode step kernel by kernel on random weights and print each "
                                   "launch's microseconds, the bytes it must move, GB/s and % of the copy "
                                   "bandwidth, then the totals against the captured graph's replay time; "
                                   "draw a bar per kernel, grouped by layer, as offline HTML + SVG.")
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("--random-weights", action="store_true", required=True,
                   help="required: the profile runs on random weights")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--context", type=positive_int, default=128,
                   help="cached tokens per sequence the profiled step attends over (default 128)")
    p.add_argument("--dtype", choices=DTYPES, default="float16")
    add_quant_options(p)
    add_tp_option(p, extra="; each launch is timed with every rank running it (on rank 0's clock), and the "
                           "totals give the all-reduce time per step")
    p.add_argument("-o", "--output", metavar="OUT.html", default="profile.html", help="the picture (default profile.html)")
    p.add_argument("--json", metavar="OUT.json", help="also write every figure as JSON")
    p.set_defaults(func=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    from llamagraph.ir import load_config
    from llamagraph.profile import profile
    from llamagraph.runtime.cuda import CudaExecutor

    if args.context < 2:
        raise UsageError("argument --context: must be at least 2 (a prompt token and the decoded one)")
    load_config(args.config)  # a bad config fails before any GPU work
    CudaExecutor.check_available()
    result = profile(args.config, batch=args.batch, context=args.context, dtype=args.dtype,
                     progress=sys.stderr.isatty(), log=lambda m: print(m, file=sys.stderr), tp=args.tp,
                     **quant_kwargs(args))
    print(result.table())
    if result.without:
        print(result.marginal_table())
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(result.html())
    print(f"wrote {args.output}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(result.to_json())
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------------------------------
# the command table and main
# ---------------------------------------------------------------------------------------------

# name -> function adding the subparser (it sets ``func``). run and bench register here too.
COMMANDS: dict[str, Callable] = {
    "compile": add_compile,
    "dump": add_dump,
    "run": add_run,
    "bench": add_bench,
    "profile": add_profile,
    "chat": add_chat,
    "bisect": add_bisect,
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Lower Llama models to a fused, memory-planned CUDA execution plan.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS.values():
        add(sub)
    return parser


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        msg = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else 0
    except (UsageError, LlamagraphError, OSError) as e:
        if isinstance(e, BrokenPipeError):  # `llamagraph dump ... | head`: not an error
            sys.stdout = open(os.devnull, "w")
            return 0
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError as e:  # sizes are checked against free memory first; this is the backstop
        print(f"{PROG}: error: out of memory ({_one_line(e)})", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's exit status for SIGINT
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
