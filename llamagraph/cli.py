"""The ``llamagraph`` command line: a thin face over the Python API. Nothing imports it.

    llamagraph compile CONFIG [-o OUTDIR] [--dtype D] [--max-batch N] [--max-seq N]
                              [--max-tokens N] [--dump-dir DIR] [--arch sm_90]
    llamagraph dump CONFIG [--after PASS] [--dtype D] [--max-batch N] [--max-seq N] [--json]

Each subcommand is one ``add_<name>(subparsers)`` function that builds its parser and sets
``func``; ``COMMANDS`` lists them in help order, so adding ``run`` or ``bench`` is one function
plus one entry.

Errors a user can cause (``LlamagraphError``, an ``OSError`` writing outputs, a bad argument)
print one line ``llamagraph: error: <message>`` to stderr and exit 2, with no traceback;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable

from llamagraph.ir.config import DTYPES
from llamagraph.ir.errors import LlamagraphError

PROG = "llamagraph"
EXIT_USAGE = 2


class UsageError(Exception):
    """A bad command line: reported as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    # argparse would print the usage block and exit; we want one line and a return code.
    def error(self, message: str):
        raise UsageError(message)


# ---------------------------------------------------------------------------------------------
# argument types and shared options
# ---------------------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
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


def model_kwargs(args: argparse.Namespace) -> dict:
    return {"dtype": args.dtype, "max_batch": args.max_batch, "max_seq": args.max_seq,
            "max_tokens": getattr(args, "max_tokens", None)}


# ---------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------

def add_compile(sub) -> None:
    p = sub.add_parser("compile", help="compile a model config; write the fused graph, memory plan and pictures",
                       description="Compile a Llama config into a fused, memory-planned graph and write it, "
                                   "with pictures and a report, into OUTDIR.")
    add_model_options(p)
    p.add_argument("-o", "--outdir", metavar="OUTDIR", help="output directory (default: ./<config stem>.llamagraph/)")
    p.add_argument("--dump-dir", metavar="DIR", help="also write the IR after every pass into DIR")
    p.add_argument("--arch", type=cuda_arch, default="sm_90", help="CUDA arch for generated code (default: sm_90)")
    p.set_defaults(func=cmd_compile)


def cmd_compile(args: argparse.Namespace) -> int:
    from llamagraph import report

    c = report.compile_model(args.config, dump_dir=args.dump_dir, **model_kwargs(args))
    outdir = args.outdir or report.default_outdir(args.config)
    sections = report.write_artifacts(c, outdir, arch=args.arch)
    if args.dump_dir:
        n = len([f for f in os.listdir(args.dump_dir) if f.endswith(".txt")])
        sections.append(report.Section("pass dumps", [f"{n} files in {args.dump_dir} (IR after each pass, with a change note)"]))
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
    from llamagraph import report

    names = report.stage_names()
    if args.after is not None and args.after not in names:
        raise UsageError(f"argument --after: unknown pass {args.after!r}; valid names: {', '.join(names)}")
    graph = report.graph_after(args.config, args.after, **model_kwargs(args))
    sys.stdout.write(graph.to_json() + "\n" if args.json else str(graph))
    return 0


# ---------------------------------------------------------------------------------------------
# the command table and main
# ---------------------------------------------------------------------------------------------

# name -> function adding the subparser (it sets ``func``). run and bench register here too.
COMMANDS: dict[str, Callable] = {
    "compile": add_compile,
    "dump": add_dump,
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


if __name__ == "__main__":
    sys.exit(main())
