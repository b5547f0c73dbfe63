"""Rendering kernel templates.

Templates live in ``templates/`` (installed as the package data ``llamagraph.templates``)
and hold CUDA text only; Python decides every specialisation constant. Rendering is
deterministic, so the same plan always produces the same bytes and modules cache by hash.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import jinja2

from llamagraph.ir.dtypes import DTYPES


@dataclass(frozen=True)
class Kernel:
    """One generated ``extern "C" __global__`` function and the source that defines it."""

    name: str  # the function name; encodes every specialisation constant, so equal names mean equal code
    source: str  # the rendered template, without the prelude


def number_tag(x: float | int) -> str:
    """A number as a kernel-name fragment: 10000.0 -> '10000', 2.5 -> '2p5', 1e-05 -> '1em05'."""
    s = repr(float(x))
    if s.endswith(".0"):
        s = s[:-2]
    return s.replace(".", "p").replace("-", "m").replace("+", "")


def _load(dtype: str) -> str:
    """The prelude function converting one stored element to float ("" for float32)."""
    return "" if dtype == "float32" else f"lg_{DTYPES[dtype].short}_to_f32"


def _store(dtype: str) -> str:
    """The prelude function converting a float to one stored element ("" for float32)."""
    return "" if dtype == "float32" else f"lg_f32_to_{DTYPES[dtype].short}"


@functools.lru_cache(maxsize=None)
def environment() -> jinja2.Environment:
    root = resources.files("llamagraph.templates")
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: (root / name).read_text(encoding="utf-8")),
        undefined=jinja2.StrictUndefined,  # a missing constant is an error, never an empty string
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["ctype"] = lambda dtype: DTYPES[dtype].ctype
    env.globals["load"] = _load
    env.globals["store"] = _store
    env.globals["tag"] = lambda dtype: f"lg_{DTYPES[dtype].short}"  # the prelude's dtype tag struct
    return env


def render(template: str, **params) -> str:
    """Render ``templates/<template>.cu.j2`` with the given specialisation constants."""
    return environment().get_template(f"{template}.cu.j2").render(**params)


def prelude() -> str:
    return environment().get_template("_prelude.cuh.j2").render()


def module_source(kernels: list[Kernel]) -> str:
    """One translation unit: the prelude, then each distinct kernel once, in first-use order."""
    seen: dict[str, Kernel] = {}
    for k in kernels:
        if k.name in seen and seen[k.name].source != k.source:
            raise AssertionError(f"two different kernels are both named {k.name}")
        seen.setdefault(k.name, k)
    return prelude() + "".join("\n" + k.source for k in seen.values())
