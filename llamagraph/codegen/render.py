"""Rendering kernel templates.

Templates live in ``templates/`` (installed as the package data ``llamagraph.templates``)
and hold CUDA text only; Python decides every specialisation constant. Rendering is
deterministic, so the same plan always produces the same bytes and modules cache by hash.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources

import jinja2

# Storage dtype -> (C storage type, load-to-float, store-from-float) used by the templates.
CTYPES = {
    "float32": ("float", "", ""),
    "float16": ("unsigned short", "lg_f16_to_f32", "lg_f32_to_f16"),
    "bfloat16": ("unsigned short", "lg_bf16_to_f32", "lg_f32_to_bf16"),
}
DTYPE_TAG = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class Kernel:
    """One generated ``extern "C" __global__`` function and the source that defines it."""

    name: str  # the function name; encodes every specialisation constant, so equal names mean equal code
    source: str  # the rendered template, without the prelude

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Launch:
    """Launch shape of one kernel call, decided in Python from sizes known at launch time."""

    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    smem: int = 0  # dynamic shared memory bytes (over 48 KiB needs the kernel's attribute raised)


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
    env.globals["ctype"] = lambda dtype: CTYPES[dtype][0]
    env.globals["load"] = lambda dtype: CTYPES[dtype][1]
    env.globals["store"] = lambda dtype: CTYPES[dtype][2]
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
