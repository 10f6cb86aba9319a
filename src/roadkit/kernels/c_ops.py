"""The C slot backend (`kernels.SlotBackend`): one pass that rotates each row of x by its own row of a
coefficient table, on CPU.

This is the serving op of vLLM on CPU (see `integrations/vllm/slots.py`): a batch of tokens for many
adapters is rotated by one call that reads each token's coefficient row from the table in place, in the
activation's dtype (bfloat16, float16 or float32), with float32 math and one rounding. The tables hold
k = c - 1 and the signed sines w, in bfloat16 for 16-bit activations (`table_dtype`). The torch
formulation needs a gathered coefficient tensor three times the size of the output and four or more
passes over it.

The source, `c_ops.c`, is compiled on first use with the machine's C compiler (`$CC`, else `cc`, `gcc`
or `clang`) for the machine itself (`-O3 -march=native`, and `-fopenmp` where the compiler has it: a
call's rows are then split over the threads of torch's own OpenMP runtime), in about a second, and kept in roadkit's
cache folder (`$ROADKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/roadkit`, else `~/.cache/roadkit`) under a
name that hashes the source, the compiler, its flags and the CPU. Without a compiler `library()` raises
`CKernelUnavailable` with the reason, and callers fall back to the torch path. `ROADKIT_C_KERNELS=0`
turns the backend off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from . import SlotTables

SOURCE = Path(__file__).with_name("c_ops.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11")
DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}  # activations
TABLE_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}  # coefficient tables


class CKernelUnavailable(RuntimeError):
    """The C backend cannot run here (no compiler, a failed build, or turned off); the message says why."""


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise CKernelUnavailable("no C compiler found (set $CC, or install gcc or clang)")


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    if os.environ.get("ROADKIT_CACHE_DIR"):
        return Path(os.environ["ROADKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "roadkit"


def _cpu_signature() -> str:
    """What `-march=native` depends on: the CPU's model and flags (Linux), else the platform's name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))


def _build(compiler: str) -> Path:
    """Compile `c_ops.c` into the cache: with OpenMP when the compiler has it (the rows of a call are then
    split over the threads of the OpenMP runtime torch has loaded), else without."""
    try:
        return _compile(compiler, (*FLAGS, "-fopenmp"))
    except CKernelUnavailable:
        return _compile(compiler, FLAGS)


def _compile(compiler: str, flags: tuple[str, ...]) -> Path:
    """Compile `c_ops.c` with `flags` into the cache, atomically (concurrent processes may build it at once)."""
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    parts = (source, version.encode(), " ".join(flags).encode(), _cpu_signature().encode())
    key = hashlib.sha256(b"\0".join(parts))
    target = cache_dir() / "kernels" / f"c_ops-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *flags, "-o", scratch, str(SOURCE)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise CKernelUnavailable(f"{compiler} failed to compile {SOURCE.name}: {done.stderr.strip()[-500:]}")
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return target


@functools.cache
def _load() -> ctypes.CDLL | CKernelUnavailable:
    if os.environ.get("ROADKIT_C_KERNELS", "1") == "0":
        return CKernelUnavailable("turned off by ROADKIT_C_KERNELS=0")
    try:
        lib = ctypes.CDLL(str(_build(_compiler())))
    except (OSError, CKernelUnavailable) as error:
        return error if isinstance(error, CKernelUnavailable) else CKernelUnavailable(str(error))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for suffix in (f"{x}_{t}" for x in DTYPES.values() for t in TABLE_DTYPES.values()):
        fn = getattr(lib, f"rotate_{suffix}", None)  # f16 needs a compiler with _Float16
        if fn is not None:
            fn.argtypes = [pointer, size, pointer, size, pointer, pointer, size, pointer, pointer, size, size, size]
            fn.restype = size
    return lib


def library() -> ctypes.CDLL:
    """The compiled kernels, built on the first call of the process; raises `CKernelUnavailable`."""
    lib = _load()
    if isinstance(lib, CKernelUnavailable):
        raise lib
    return lib


def handles_slots(x: torch.Tensor) -> bool:
    """Whether `rotate_rows` (and `forward_slots`) can rotate x: a CPU tensor of a dtype the compiled library
    has, rows contiguous."""
    lib = _load()
    suffix = DTYPES.get(x.dtype)
    return (
        not isinstance(lib, CKernelUnavailable)
        and suffix is not None
        and hasattr(lib, f"rotate_{suffix}_f32")
        and x.device.type == "cpu"
        and x.dim() == 2
        and x.stride(-1) == 1
    )


def table_dtype(dtype: torch.dtype) -> torch.dtype:
    """The coefficient tables' dtype for activations of `dtype`: bfloat16 for 16-bit ones (half the bytes a
    token reads, and `k = c - 1` keeps the adapter's deviations to bfloat16's relative precision, finer than
    the output's own rounding), float32 for float32."""
    return torch.float32 if dtype == torch.float32 else torch.bfloat16


def rotate_rows(
    x: torch.Tensor, k: torch.Tensor, w: torch.Tensor, half: torch.Tensor, index: torch.Tensor, identity: int
) -> torch.Tensor:
    """Row t of x (n, d) rotated by table row index[t] of k = c - 1 and w (the signed sines; (rows, d),
    contiguous, float32 or bfloat16) with half-group size half[index[t]] (int32); rows with index
    `identity` are copied. A new tensor of x's dtype.

    x must be one `handles_slots` accepts. An index outside the table, or a half that does not split d into
    whole groups, raises ValueError (the kernel checks every row before it writes any).
    """
    if k.dtype != w.dtype or k.dtype not in TABLE_DTYPES or not (k.is_contiguous() and w.is_contiguous()):
        raise ValueError("rotate_rows needs contiguous float32 or bfloat16 coefficient tables of one dtype")
    if half.dtype != torch.int32 or index.dtype != torch.int64 or not index.is_contiguous():
        raise ValueError("rotate_rows needs an int32 half table and a contiguous int64 index")
    n, d = x.shape
    if index.shape != (n,) or k.shape != w.shape or k.shape[1] != d or half.shape != (k.shape[0],):
        raise ValueError(
            f"rotate_rows: x {tuple(x.shape)}, index {tuple(index.shape)}, k {tuple(k.shape)}, "
            f"w {tuple(w.shape)} and half {tuple(half.shape)} do not fit together"
        )
    out = torch.empty((n, d), dtype=x.dtype)
    fn = getattr(library(), f"rotate_{DTYPES[x.dtype]}_{TABLE_DTYPES[k.dtype]}")
    bad = fn(
        x.data_ptr(), x.stride(0), out.data_ptr(), d, k.data_ptr(), w.data_ptr(), k.shape[0],
        half.data_ptr(), index.data_ptr(), identity, n, d,
    )  # fmt: skip
    if bad >= 0:
        row = int(index[bad])
        raise ValueError(
            f"rotate_rows: row {bad} of x asks for table row {row}, which is outside the table's {k.shape[0]} "
            f"rows or whose half-group size does not split {d} features into whole groups"
        )
    return out


def forward_slots(
    x: torch.Tensor, tables: SlotTables, index: torch.Tensor, runs: Optional[list[tuple[int, int, int]]] = None
) -> torch.Tensor:
    """Row t of x rotated by row index[t] of the slot tables (`rotate_rows` on their `k`, `w` and `half`);
    one pass needs no `runs`."""
    return rotate_rows(x, tables.k, tables.w, tables.half, index, identity=tables.n_slots)
