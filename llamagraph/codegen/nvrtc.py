"""Compile generated CUDA source to a cubin on a machine without a GPU, and read its resource use.

Used by CI and by developers to check that every generated kernel compiles, and how many
registers / spill bytes / shared memory it needs. Prefers NVRTC (the ``nvidia-cuda-nvrtc``
wheel, loaded with ctypes: no CUDA headers, exactly how cupy compiles at run time), else
``nvcc -cubin``. Neither needs a GPU or a driver.

NVRTC compiles one program on one core, and optimizing (NVVM) plus register allocation
(ptxas) take nearly all of its time, kernel by kernel. So a source made the way
``render.module_source`` makes it (the prelude, then self-contained kernels) is compiled as
several programs at once, one per group of kernels, on threads (ctypes lets go of the GIL
while NVRTC runs). Each group's program is the whole source with the other groups' kernels
blanked out line for line, so the log's line numbers are those of ``kernels.cu``. The module
image holding every kernel (``CompileResult.cubin``) is still one program of the whole source,
compiled when first asked for. Every NVRTC program's output is kept on disk, keyed by its
text, arch, options and the NVRTC library (``cache_dir()``), so compiling the same kernels
again reads files instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

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
    log: str  # the compiler's log, including the ptxas -v lines (one block per program)
    compiler: str  # e.g. "nvrtc 13.5" or "nvcc"
    kernels: dict[str, KernelResources] = field(default_factory=dict)  # as in the one module of the source
    programs: int = 1  # how many programs the kernels were compiled as
    image: Callable[[], bytes] | None = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def cubin(self) -> bytes:
        """The module image holding every kernel of the source: the one program of the whole
        source (compiled on first use when the kernels were compiled in groups; cached)."""
        return self.image()


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
def _load_nvrtc() -> tuple[ctypes.CDLL, str, str] | None:
    """(the library, its version as "nvrtc 13.0", its path), or None."""
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
        return lib, f"nvrtc {major.value}.{minor.value}", path
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

# Programs per thread. Text length says little about how long a kernel takes to compile (the
# sampler and decode attention take 3x a GEMV of the same length), so the kernels are cut into
# more programs than threads, the longest first, and each thread takes the next one when done:
# an unlucky long program then waits on no other. Each program costs NVRTC ~40 ms to set up.
PROGRAMS_PER_JOB = 3


def default_jobs() -> int:
    """How many programs to compile at once: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def compile_source(source: str, arch: str = "sm_90", compiler: str | None = None, options: tuple[str, ...] = (),
                   *, jobs: int | None = None, cache: bool = True) -> CompileResult:
    """Compile one CUDA translation unit for ``arch`` with ptxas verbose output: the log, and
    each kernel's registers, spills and shared memory as in the module of the whole source.

    jobs: how many NVRTC programs to compile at once (default: ``default_jobs()``); a source of
      the prelude and its kernels (``render.module_source``) is split into up to
      ``PROGRAMS_PER_JOB * jobs`` groups of kernels. 1 compiles it as one program, as nvcc
      always does: the way for a caller that wants only ``cubin``.
    cache: read and keep NVRTC's output in ``cache_dir()``.
    ``result.cubin`` is the module image of the whole source, compiled on first use when the
    kernels were compiled in groups. Raises CompilerUnavailable when no compiler exists,
    CompileError when compilation fails.
    """
    which = available(compiler)
    if which is None:
        wanted = compiler or "NVRTC or nvcc"
        raise CompilerUnavailable(
            f"no CUDA compiler found ({wanted}): pip install nvidia-cuda-nvrtc, or put nvcc on PATH"
        )
    options = tuple(options)
    if not which.startswith("nvrtc"):
        cubin, log = _compile_nvcc(source, arch, options)
        return CompileResult(log=log, compiler=which, kernels=parse_ptxas_log(log), image=lambda: cubin)

    def whole() -> Program:
        return _program(source, arch, options, cache)

    jobs = default_jobs() if jobs is None else max(1, int(jobs))
    texts = group_sources(source, jobs * PROGRAMS_PER_JOB) if jobs > 1 else [source]
    if len(texts) > 1:
        try:
            with ThreadPoolExecutor(min(jobs, len(texts)), thread_name_prefix="nvrtc") as pool:
                parts = list(pool.map(lambda text: _program(text, arch, options, cache), texts))
        except CompileError:
            parts = None  # compile the whole source: its error is the one to report, its line numbers true
        if parts is not None:
            log = "".join(p.log if p.log.endswith("\n") or not p.log else p.log + "\n" for p in parts)
            return CompileResult(log=log, compiler=which, kernels=merge_resources(parts), programs=len(parts),
                                 image=lambda: whole().cubin)
    one = whole()
    return CompileResult(log=one.log, compiler=which, kernels=parse_ptxas_log(one.log), image=lambda: one.cubin)


@dataclass(frozen=True)
class Program:
    """What NVRTC made of one program."""

    cubin: bytes
    log: str
    shared_align: int = 0  # the largest alignment of an extern __shared__ array in its PTX (0: none)


def merge_resources(parts: list[Program]) -> dict[str, KernelResources]:
    """Each kernel's resources as ptxas reports them for one module holding every part's kernels.

    The one difference a module makes: where any kernel declares an extern (dynamic)
    ``__shared__`` array, ptxas pads every kernel's static shared memory up to that array's
    alignment, so the dynamic part that follows it starts aligned."""
    align = max((p.shared_align for p in parts), default=0)
    merged: dict[str, KernelResources] = {}
    for p in parts:
        for name, r in parse_ptxas_log(p.log).items():
            if align > p.shared_align and r.shared_bytes % align:
                r = dataclasses.replace(r, shared_bytes=r.shared_bytes + align - r.shared_bytes % align)
            merged[name] = r
    return merged


_EXTERN_SHARED = re.compile(r"^\s*\.extern \.shared \.align (\d+)", re.M)


def _program(source: str, arch: str, options: tuple[str, ...], cache: bool) -> Program:
    """One NVRTC program, from the cache when it holds it."""
    key = _cache_key(source, arch, options) if cache else None
    if key and (hit := _cache_read(key)):
        return hit
    cubin, log, ptx = _compile_nvrtc(source, arch, options)
    aligns = [int(a) for a in _EXTERN_SHARED.findall(ptx)]
    program = Program(cubin=cubin, log=log, shared_align=max(aligns, default=0))
    if key:
        _cache_write(key, program)
    return program


def _compile_nvrtc(source: str, arch: str, options: tuple[str, ...]) -> tuple[bytes, str, str]:
    """(cubin, log, ptx) of one program. Called from several threads at once: NVRTC may compile
    different programs concurrently, and ctypes releases the GIL for each call."""
    lib, _, _ = _load_nvrtc()

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
        check(lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "ptx size")
        ptx = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetPTX(prog, ptx), "ptx")
        return cubin.raw, log, ptx.value.decode(errors="replace")
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
# splitting a module's source into groups of kernels
# ---------------------------------------------------------------------------------------------

# the start of a kernel definition; the kernel is the function body that follows
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\b')
# what is not code: comments, string and character literals
_NOT_CODE = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S)
_BRACE = re.compile(r"[{}]")


def kernel_spans(source: str) -> list[tuple[int, int]] | None:
    """[start, end) of each kernel of a ``render.module_source`` text: from the end of the
    kernel before it (or of the prelude) to the closing brace of its body, so with the helpers
    it defines first; the text after the last kernel goes with it. None when the source is not
    the prelude followed by kernels."""
    from llamagraph.codegen.render import prelude

    head = prelude()
    if not source.startswith(head):
        return None
    # code: the source with comments and literals blanked (same length), so braces count true
    code = _NOT_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), source)
    spans: list[tuple[int, int]] = []
    start = len(head)
    for m in _KERNEL.finditer(source, start):
        if m.start() < start or code[m.start()] == " ":
            continue  # inside the kernel before it, or in a comment
        depth = 0
        for b in _BRACE.finditer(code, start, m.start()):
            depth += 1 if b.group() == "{" else -1
        if depth != 0:
            return None  # a kernel inside a namespace or block: not the shape module_source makes
        end = None
        for b in _BRACE.finditer(code, m.end()):
            depth += 1 if b.group() == "{" else -1
            if depth == 0:
                end = b.end()
                break
        if end is None:
            return None
        spans.append((start, end))
        start = end
    if not spans:
        return None
    spans[-1] = (spans[-1][0], len(source))
    return spans


def group_sources(source: str, groups: int) -> list[str]:
    """The source as up to ``groups`` programs, each the whole text with the kernels of the
    other groups blanked out line for line (so every line keeps its number), or ``[source]``.

    Kernels go to groups longest first, each to the group with the least text so far (text
    length stands in for compile time); the groups come longest first."""
    spans = kernel_spans(source) if groups > 1 else None
    if not spans or len(spans) < 2:
        return [source]
    groups = min(groups, len(spans))
    members: list[list[int]] = [[] for _ in range(groups)]
    load = [0] * groups
    for k in sorted(range(len(spans)), key=lambda k: spans[k][0] - spans[k][1]):
        g = load.index(min(load))
        members[g].append(k)
        load[g] += spans[k][1] - spans[k][0]
    texts = []
    for g in sorted(range(groups), key=lambda g: -load[g]):  # the longest first
        keep = set(members[g])
        pieces, at = [], 0
        for k, (a, b) in enumerate(spans):
            pieces.append(source[at:a])
            pieces.append(source[a:b] if k in keep else "\n" * source.count("\n", a, b))
            at = b
        pieces.append(source[at:])
        texts.append("".join(pieces))
    return texts


# ---------------------------------------------------------------------------------------------
# the cache of NVRTC's output
# ---------------------------------------------------------------------------------------------

def cache_dir() -> str:
    """Where NVRTC's output is kept: ``$LLAMAGRAPH_CACHE/nvrtc`` (default ``~/.cache/llamagraph``,
    the root the CUDA executor keeps its modules under)."""
    root = os.environ.get("LLAMAGRAPH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llamagraph")
    return os.path.join(root, "nvrtc")


@functools.lru_cache(maxsize=None)
def _nvrtc_identity() -> str:
    """The NVRTC library as a cache key: version, file, size and time (an update invalidates)."""
    _, label, path = _load_nvrtc()
    try:
        st = os.stat(os.path.realpath(path))
        return f"{label} {os.path.realpath(path)} {st.st_size} {st.st_mtime_ns}"
    except OSError:
        return f"{label} {path}"


def _cache_key(source: str, arch: str, options: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for part in ("llamagraph-nvrtc/1", _nvrtc_identity(), arch, *options, "", source):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _cache_read(key: str) -> Program | None:
    base = os.path.join(cache_dir(), key)
    try:
        with open(base + ".json", encoding="utf-8") as f:
            meta = json.load(f)
        with open(base + ".cubin", "rb") as f:
            cubin = f.read()
        if len(cubin) != meta["cubin_bytes"]:
            return None
        return Program(cubin=cubin, log=meta["log"], shared_align=int(meta["shared_align"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, or half-written by a process that died: compile again


def _cache_write(key: str, program: Program) -> None:
    """Keep ``program`` (best effort: a read-only or full disk only loses the cache). The .json,
    written last, marks the entry whole; each file appears by rename, never half-written."""
    folder = cache_dir()
    base = os.path.join(folder, key)
    meta = {"log": program.log, "shared_align": program.shared_align, "cubin_bytes": len(program.cubin)}
    try:
        os.makedirs(folder, exist_ok=True)
        for ext, data in ((".cubin", program.cubin), (".json", json.dumps(meta).encode())):
            tmp = f"{base}{ext}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, base + ext)
    except OSError:
        pass


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
