"""Denormals flushed to zero while the fused engine computes, as TensorFlow computes.

**Why.** TensorFlow sets the CPU's flush-to-zero and denormals-are-zero modes on the threads that
run its kernels (tsl's ``ScopedFlushDenormal``): in the Keras engine, 5e-39 * 1 is 0. The fused
engine ran without them, so it differed from Keras wherever a value fell below float32's
smallest normal (1.2e-38), and it paid for it: an x86 core takes a microcode assist of ~100
cycles for each subnormal operand or result. Trained models make them, in the softmax's
vanishing probabilities and the momenta of units whose gradient stopped, and at batch size 1
the numba kernel's cost per model-update grew from 0.23 µs in the first epoch to 0.65 µs by the
last of 200 (grids/full.yaml's bs 1 group: 2.8 s of training, 1.4 s with the modes set).

**How.** The modes are two bits of the per-thread MXCSR register (FTZ, bit 15; DAZ, bit 6), which
NumPy, OpenBLAS and numba's code all obey. Nothing we depend on exposes it (the one package for
it is an unmaintained C extension), so two three-instruction functions, placed as machine code
in an executable page and called through ctypes, read and write it: that takes microseconds,
where importing numba to do the same would cost a NumPy-path group 0.25 s. x86-64 with the
System V calling convention (Linux, macOS) only; elsewhere, or where the system refuses an
executable page, ``flushed()`` changes nothing and says so (``fused`` records it in
``engine_version``).
"""
from __future__ import annotations

import ctypes
import mmap
import platform
import sys
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable, Iterator

FTZ, DAZ = 1 << 15, 1 << 6
# x86-64, System V: the argument in edi, the result in eax, [rsp-4] in the red zone.
_GET = bytes.fromhex("0fae5c24fc" "8b4424fc" "c3")  # stmxcsr [rsp-4]; mov eax, [rsp-4]; ret
_SET = bytes.fromhex("897c24fc" "0fae5424fc" "c3")  # mov [rsp-4], edi; ldmxcsr [rsp-4]; ret


@lru_cache(maxsize=1)
def _register() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """(read MXCSR, write MXCSR) for this process, or None where they can't be made."""
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform == "win32":
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, AttributeError):  # a hardened kernel refuses writable executable pages
        return None
    page.write(_GET + _SET)
    base = ctypes.addressof(ctypes.c_char.from_buffer(page))
    read = ctypes.CFUNCTYPE(ctypes.c_uint32)(base)
    write = ctypes.CFUNCTYPE(None, ctypes.c_uint32)(base + len(_GET))
    read.page = write.page = page  # the functions live in it: it must stay mapped as long as they do
    return read, write


def supported() -> bool:
    """Whether ``flushed()`` can set the modes here."""
    return _register() is not None


def flushing() -> bool:
    """Whether this thread flushes denormals now (both modes set)."""
    register = _register()
    return register is not None and register[0]() & (FTZ | DAZ) == FTZ | DAZ


@contextmanager
def flushed() -> Iterator[bool]:
    """Within the block this thread computes with denormals flushed to zero, as TensorFlow's
    threads do; the register is restored on the way out. Yields whether the modes are set."""
    register = _register()
    if register is None:
        yield False
        return
    read, write = register
    before = read()
    write(before | FTZ | DAZ)
    try:
        yield True
    finally:
        write(before)
