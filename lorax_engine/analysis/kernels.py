"""Dense float64 kernels of subspaces.py's CPU bases, on the LAPACK that suits the CPU: torch's or numpy's.

torch's x86 CPU wheels carry MKL; numpy's wheels carry OpenBLAS (Accelerate on macOS, MKL in conda builds). MKL is
tuned for Intel's CPUs and takes slower paths on others: on the project's 2-core AMD EPYC VM, one thread each,
numpy's OpenBLAS took 0.29 s for a float64 1280 x 1280 ``eigh`` (MKL 0.38 s), 0.32 s for the Gram of a
10240 x 1280 weight (its symmetric product; torch's blockwise one 0.44 s) and 0.63 s for ``W V`` (0.71 s). So on
a CPU not made by Intel the kernels below use numpy's OpenBLAS (:func:`prefer_numpy`); the results agree to
float64 rounding, so the cache does not tell them apart.

numpy is used only where threadpoolctl can hold its BLAS to the threads it is given (:func:`blas_threads`):
OpenBLAS's own pool on top of two basis workers ran two eigendecompositions at once 1.6x slower than one after the
other on 2 cores. Without threadpoolctl (a pack installed without its requirements) everything stays on torch.
"""
from __future__ import annotations

import contextlib
import functools
import platform

import numpy as np
import torch

try:
    import threadpoolctl
except ImportError:          # the pack still works, on torch's kernels only
    threadpoolctl = None


def gram_lower(x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """``x^T x`` on and below the diagonal (all that ``eigh`` and ``cholesky`` read; 0 above the diagonal blocks), by
    column blocks: 10 of the 16 block products with 4 blocks. torch has no symmetric product, and a full one does
    twice the work: on one core the float64 Gram of a 10240 x 1280 weight took 0.67 s in full, 0.44 s this way
    (1280 x 1280: 0.083 -> 0.056 s; a sketch's float32 10240 x 416 Ritz Gram 35 -> 26 ms)."""
    n = x.shape[1]
    step = -(-n // blocks)
    gram = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    for i in range(0, n, step):
        gram[i:, i:i + step] = x[:, i:].T @ x[:, i:i + step]
    return gram


@functools.lru_cache(maxsize=1)
def _blas_controller():
    """threadpoolctl's handle on the BLAS libraries loaded (numpy's), or None. Only those: a limit over every
    threadpool would also set OpenMP's, torch's own thread count, back to what it was when the limit began."""
    if threadpoolctl is None:
        return None
    controller = threadpoolctl.ThreadpoolController().select(user_api="blas")
    return controller if controller.lib_controllers else None


def blas_threads(threads: int):
    """A context that holds numpy's BLAS to ``threads`` (and restores it after); nothing without threadpoolctl."""
    controller = _blas_controller()
    return contextlib.nullcontext() if controller is None else controller.limit(limits=max(1, int(threads)))


def cpu_info(field: str) -> str | None:
    """The value of ``field`` (``vendor_id``, ``flags``, ...) in /proc/cpuinfo's first processor; None where there is
    no such file or field."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, ...; whatever the platform says elsewhere)."""
    return cpu_info("vendor_id") or platform.processor()


@functools.lru_cache(maxsize=1)
def prefer_numpy() -> bool:
    """Whether the CPU kernels run on numpy: where its BLAS is OpenBLAS that threadpoolctl controls, torch's is MKL,
    and the CPU is not Intel's (MKL's home ground). A fixed rule rather than a timing, so a process computes the same
    bits every time (a report written in-process and one written by the command line agree exactly)."""
    controller = _blas_controller()
    if controller is None or not any(lib.internal_api == "openblas" for lib in controller.lib_controllers):
        return False
    return torch.backends.mkl.is_available() and "Intel" not in _cpu_vendor()


def _use_numpy(t: torch.Tensor, numpy: bool | None) -> bool:
    if t.device.type != "cpu":
        return False
    return prefer_numpy() if numpy is None else numpy


def gram(x: torch.Tensor, numpy: bool | None = None) -> torch.Tensor:
    """``x^T x`` in ``x``'s dtype, at least on and below the diagonal (all that :func:`eigh` reads): numpy's
    symmetric product, or :func:`gram_lower`. ``numpy``: force a side (tests); None follows :func:`prefer_numpy` on
    the CPU."""
    if _use_numpy(x, numpy):
        a = x.numpy()
        return torch.from_numpy(a.T @ a)        # numpy computes a.T @ a as a symmetric product (syrk)
    return gram_lower(x)


def eigh(symmetric: torch.Tensor, numpy: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a symmetric matrix given on and below its diagonal, on the chosen side."""
    if _use_numpy(symmetric, numpy):
        vals, vecs = np.linalg.eigh(symmetric.numpy(), UPLO="L")
        return torch.from_numpy(vals), torch.from_numpy(vecs)
    return torch.linalg.eigh(symmetric)


def matmul(a: torch.Tensor, b: torch.Tensor, numpy: bool | None = None) -> torch.Tensor:
    """``a @ b`` on the chosen side."""
    if _use_numpy(a, numpy):
        return torch.from_numpy(a.numpy() @ b.numpy())
    return a @ b
