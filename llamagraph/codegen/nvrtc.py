"""Compile generated CUDA source to a cubin on a machine without a GPU, and read its resource use.

Used by CI and by developers to check that every generated kernel compiles, and how many
registers / spill bytes / shared memory it needs. Prefers NVRTC (the ``nvidia-cuda-nvrtc``
wheel, loaded with ctypes: no CUDA headers, exactly how cupy compiles at run time), else
``nvcc -cubin``. Neither needs a GPU or a driver.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

from llamagraph.ir.errors import BackendError

COMPILERS = ("nvrtc", "nvcc")


class CompilerUnavailable(BackendError):
    """No CUDA compiler (NVRTC library or nvcc) can be found on this machine."""


class CompileError(BackendError):
    """The CUDA compiler rejected generated source (a codegen bug); the message holds its log."""


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reports for one kernel (``-Xptxas -v``)."""

    registers: int = 0
    spill_stores: int = 0  # bytes
    spill_loads: int = 0  # bytes
    shared_bytes: int = 0  # static shared memory
    stack_bytes: int = 0


@dataclass(frozen=True)
class CompileResult:
    cubin: bytes
    log: str  # the compiler's log, including the ptxas -v lines
    compiler: str  # e.g. "nvrtc 13.5" or "nvcc"
    kernels: dict[str, KernelResources] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# finding a compiler
# ---------------------------------------------------------------------------------------------

def _nvrtc_paths() -> list[str]:
    """Candidate libnvrtc shared objects: pip wheels first, then a CUDA toolkit install."""
    found: list[str] = []
    try:
        import nvidia  # namespace package of the nvidia-* wheels

        roots = list(nvidia.__path__)
    except ImportError:
        roots = []
    for root in roots:
        for pattern in ("cu*/lib/libnvrtc.so*", "cuda_nvrtc/lib/libnvrtc.so*"):
            found += sorted(p for p in glob.glob(os.path.join(root, pattern)) if "builtins" not in p)
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in filter(None, homes):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
            found += sorted(p for p in glob.glob(os.path.join(home, sub, "libnvrtc.so*")) if "builtins" not in p)
    system = ctypes.util.find_library("nvrtc")
    if system:
        found.append(system)
    return list(dict.fromkeys(found))


@functools.lru_cache(maxsize=None)
def _load_nvrtc() -> tuple[ctypes.CDLL, str] | None:
    for path in _nvrtc_paths():
        try:
            # NVRTC dlopens its builtins library by soname at compile time; some wheels do not
            # put their own directory on its search path, so load the builtins beside it first
            for builtins in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*"))):
                if ".alt." not in builtins:
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            lib = ctypes.CDLL(path)
            lib.nvrtcCompileProgram  # noqa: B018 - raises AttributeError if this is not NVRTC
        except (OSError, AttributeError):
            continue
        major, minor = ctypes.c_int(), ctypes.c_int()
        lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        return lib, f"nvrtc {major.value}.{minor.value}"
    return None


def available(compiler: str | None = None) -> str | None:
    """Which compiler ``compile_source`` will use ("nvrtc 13.5", "nvcc"), or None if none exists.

    ``compiler`` restricts the choice to "nvrtc" or "nvcc".
    """
    if compiler not in (None, *COMPILERS):
        raise ValueError(f"compiler must be one of {COMPILERS} or None, got {compiler!r}")
    if compiler in (None, "nvrtc"):
        loaded = _load_nvrtc()
        if loaded:
            return loaded[1]
    if compiler in (None, "nvcc") and shutil.which("nvcc"):
        return "nvcc"
    return None


# ---------------------------------------------------------------------------------------------
# compiling
# ---------------------------------------------------------------------------------------------

def compile_source(source: str, arch: str = "sm_90", compiler: str | None = None, options: tuple[str, ...] = ()) -> CompileResult:
    """Compile one CUDA translation unit to a cubin for ``arch`` with ptxas verbose output.

    Raises CompilerUnavailable when no compiler exists, CompileError when compilation fails.
    """
    which = available(compiler)
    if which is None:
        wanted = compiler or "NVRTC or nvcc"
        raise CompilerUnavailable(
            f"no CUDA compiler found ({wanted}): pip install nvidia-cuda-nvrtc, or put nvcc on PATH"
        )
    if which.startswith("nvrtc"):
        cubin, log = _compile_nvrtc(source, arch, options)
    else:
        cubin, log = _compile_nvcc(source, arch, options)
    return CompileResult(cubin=cubin, log=log, compiler=which, kernels=parse_ptxas_log(log))


def _compile_nvrtc(source: str, arch: str, options: tuple[str, ...]) -> tuple[bytes, str]:
    lib, _ = _load_nvrtc()

    def check(status: int, what: str) -> None:
        if status != 0:
            raise CompileError(f"NVRTC {what} failed: {lib.nvrtcGetErrorString(status).decode()}")

    prog = ctypes.c_void_p()
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"llamagraph.cu", 0, None, None), "create")
    try:
        # -default-device: unannotated functions (e.g. generic lambdas inside kernels) are device
        # code, as under nvcc; NVRTC 13.0 otherwise rejects them as host functions.
        opts = [f"--gpu-architecture={arch}", "--ptxas-options=-v", "-default-device", *options]
        argv = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
        status = lib.nvrtcCompileProgram(prog, len(opts), argv)
        size = ctypes.c_size_t()
        check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "log size")
        buf = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetProgramLog(prog, buf), "log")
        log = buf.value.decode(errors="replace")
        if status != 0:
            raise CompileError(f"NVRTC could not compile the generated source for {arch}:\n{log}")
        check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(prog, cubin), "cubin")
        return cubin.raw, log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _compile_nvcc(source: str, arch: str, options: tuple[str, ...]) -> tuple[bytes, str]:
    with tempfile.TemporaryDirectory(prefix="llamagraph-nvcc-") as tmp:
        src, out = os.path.join(tmp, "llamagraph.cu"), os.path.join(tmp, "llamagraph.cubin")
        with open(src, "w", encoding="utf-8") as f:
            f.write(source)
        cmd = ["nvcc", f"-arch={arch}", "-cubin", "-Xptxas", "-v", *options, "-o", out, src]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise CompileError(f"nvcc could not compile the generated source for {arch}:\n{log}")
        with open(out, "rb") as f:
            return f.read(), log


# ---------------------------------------------------------------------------------------------
# reading ptxas -v
# ---------------------------------------------------------------------------------------------

_FUNC = re.compile(r"(?:Compiling entry function|Function properties for) '?([A-Za-z_][A-Za-z0-9_]*)'?")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, KernelResources]:
    """Per-function resources from ptxas -v lines (the format of CUDA 11-13's ptxas)."""
    found: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in log.splitlines():
        if m := _FUNC.search(line):
            current = found.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        if m := _STACK.search(line):
            current.update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        if m := _REGS.search(line):
            current["registers"] = int(m.group(1))
            if s := _SMEM.search(line):
                current["shared_bytes"] = int(s.group(1))
    return {name: KernelResources(**vals) for name, vals in found.items()}
