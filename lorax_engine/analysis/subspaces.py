"""Singular subspaces of base weights (METHOD.md, Notation, §2b, §2c): sketches to screen, whole spectra to score
exactly and to project, and their cache.

A weight ``W`` of shape ``[m, n]`` (a conv ``[m, c, kh, kw]`` read as ``[m, c*kh*kw]``) has ``d = min(m, n)``
singular triplets. Two kinds of result, both float32 on the CPU:

* :class:`Spectrum` (methods ``"gram"`` and ``"exact"``): every triplet, ``u [m, d]``, ``v [n, d]``, ``s [d]``
  descending. The smaller Gram matrix (``W^T W`` or ``W W^T``) is formed and eigendecomposed in float64: squaring
  the spectrum is harmless there (it resolves singular values down to ~1e-8 s_1), while a float32 Gram moved the
  top-320 projector of trained-looking weights (slow bulk, s_1 / s_r up to 1e4) by 1e-2 to 0.7 relative. The
  other side is ``W V`` (or ``W^T U``) in float64 with its columns normalised (its smallest columns made
  orthonormal by projection: :func:`_unit_columns`), on the LAPACK that suits the CPU (kernels.py), for both
  methods: the names differ only in what the transfer does with them, and one cache entry serves both. Its top-r
  part (:meth:`Spectrum.top`) is the exact top-r :class:`Basis` that §1's scores and the paper's Eq. 3 use; the
  whole spectrum is what §2c's soft operators need (projection/operators.py).
  It does not depend on r, so one entry serves every rank.
* :class:`Basis` (method ``"randomized"``): a sketch of the top-r subspaces, to screen candidates cheaply: a
  Gaussian sketch of ``l = r + oversample`` columns (seeded from the weight's content: :func:`_content_seed`),
  ``power_iters`` rounds of subspace iteration with Cholesky-QR re-orthonormalisation (products with W in
  ``sketch_dtype``; :func:`fast_sketch_dtype` picks bfloat16 where the hardware multiplies it natively), then
  Rayleigh-Ritz with float32 products and a float64
  eigensolver. Always an estimate: on the slow spectra of trained weights the top-r subspace is not resolved by a
  few power iterations (it mixes the directions around index r), so scores from sketches shrink toward chance
  (similarity.py states the measured envelope every decision made on them allows for). Where a sketch would be
  as large as the weight (``r + oversample >= d``) the spectrum is computed instead.

Cost per weight on one core of the 2-core VMs (AVX512-BF16; bfloat16 sketch, q = 1): sketch 1280 x 1280 ~0.1 s,
10240 x 1280 ~0.4-0.5 s; spectrum 1280 x 1280 ~0.5 s (most of it the float64 eigendecomposition), 10240 x 1280
~1.8 s and 1280 x 5120 ~1.2 s on an AMD EPYC (2026-12-04; 2.6 s and 1.5 s with the QR of W V, 2.0 s and 1.4 s with a
full Gram product).

Why one power iteration and 96 extra columns (measured 2026-12-05 on the same CPU). The figures are the smallest
factor a bfloat16 sketch shrank an exact score by, over every pair kind and spectrum of tests/test_screening.py at
640 and 1280 square, among pairs whose exact score is at most 0.35 / above it: q = 1, p = 96: 0.30 / 0.17. Cheaper
sketches shrink more, and the envelope must then allow more: p = 32 or 64: 0.24 / 0.13 or 0.28 / 0.15; q = 0 with p
= 200: 0.26 / 0.15 for 8% (1280 x 1280) to 24% (10240 x 1280) less time; q = 0 with p = 96: 0.17 / 0.09, and an
unrelated 640-wide pair's bound (0.052) would no longer fail the default threshold; a Rayleigh-Ritz on the power
iteration's own last product (no float32 product): 0.18 / 0.10 on the V side; no power iteration and no Rayleigh-
Ritz product (each side the top-r of one ``A Omega``): 0.10-0.12 / 0.05.

Cache (:class:`SubspaceCache`): an in-memory LRU bounded in bytes plus an optional on-disk cache. The key
is the weight's content fingerprint (xxh3-128 or sha256 of its stored bytes, dtype and shape; see
:mod:`lorax_engine.files.base_weights`), its matrix shape, the effective method with all its parameters, the
output dtype and an algorithm version, so a stale entry cannot be served. A request for a sketch is served by a
spectrum of the same weight when one is at hand (it is exact). Disk entries are safetensors files written
atomically (temporary file + ``os.replace``) and validated on read (key, checksum, shapes, dtype, finite values,
unit columns); a bad entry is deleted and recomputed. No pickle anywhere.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import os
import threading
import time
import zlib
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..errors import LoraFileError, TransferOptionError
from ..tensor_checks import all_finite
from .kernels import blas_threads, cpu_info, eigh, gram, gram_lower, matmul

ALGORITHM_VERSION = 5      # 4: whole spectra for exact scores and projection, plain sketches to screen;
                           # 5: a spectrum's other side in float64 (method "gram" computes what "exact" does)
METHODS = ("exact", "gram", "randomized")
SPECTRUM_METHODS = frozenset({"exact", "gram"})
SKETCH_DTYPES = ("float32", "bfloat16")
DEFAULT_RANK = 320
DEFAULT_MEMORY_BYTES = 1 << 30
CACHE_ENV = "LORAX_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$LORAX_CACHE_DIR`` if set, else ``~/.cache/lorax/subspaces``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorax" / "subspaces"


@dataclass(frozen=True)
class SubspaceSpec:
    """How to compute: rank r and method (with the sketch parameters for "randomized")."""

    rank: int = DEFAULT_RANK
    method: str = "gram"
    oversample: int = 96
    power_iters: int = 1
    seed: int = 0
    sketch_dtype: str = "float32"   # dtype of the sketch products (see fast_sketch_dtype)

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise TransferOptionError(f"rank must be a positive integer, got {self.rank!r}")
        if self.method not in METHODS:
            raise TransferOptionError(f"subspace method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.oversample < 0 or self.power_iters < 0:
            raise TransferOptionError("oversample and power_iters must be >= 0")
        if self.sketch_dtype not in SKETCH_DTYPES:
            raise TransferOptionError(f"sketch dtype must be one of {', '.join(SKETCH_DTYPES)}, "
                                      f"got {self.sketch_dtype!r}")

    def effective(self, m: int, n: int) -> SubspaceSpec:
        """The spec actually used for an ``[m, n]`` weight: a spectrum keeps all ``d = min(m, n)`` directions
        (its rank is d), and a sketch as large as the weight itself is a spectrum ("gram") instead."""
        d = min(m, n)
        if self.method == "randomized" and self.rank + self.oversample < d:
            return SubspaceSpec(self.rank, "randomized", self.oversample, self.power_iters, self.seed,
                                self.sketch_dtype)
        return SubspaceSpec(d, "exact" if self.method == "exact" else "gram")

    def describe(self) -> str:
        if self.method in SPECTRUM_METHODS:
            return f"{self.method}(d={self.rank})"
        return (f"randomized(r={self.rank},p={self.oversample},q={self.power_iters},seed={self.seed},"
                f"{self.sketch_dtype})")


def default_workers(device="cpu") -> int:
    """Bases computed at once by :meth:`SubspaceCache.get_many`: 2 on a CPU with >= 2 torch threads, else 1;
    2 on a GPU, where one thread's reading, checks and cache write overlap the other's GPU work."""
    return 2 if not str(device).startswith("cpu") or torch.get_num_threads() >= 2 else 1


def load_linalg_kernels(device) -> None:
    """One linear-algebra call on ``device`` from this thread, before worker threads compute there: torch loads
    its CUDA linear-algebra kernels on their first use, and first uses from two threads at once fail with
    "lazy wrapper should be called at most once" (pytorch/pytorch#90613; seen on an H200 with torch 2.11)."""
    if torch.device(device).type == "cuda":
        torch.linalg.cholesky_ex(torch.ones(1, 1, dtype=torch.float64, device=device))


@functools.lru_cache(maxsize=4)
def fast_sketch_dtype(device: str = "cpu") -> str:
    """The sketch dtype for fast screening on ``device``: bfloat16 where the hardware multiplies it natively
    (CUDA with bf16 support; CPUs with AVX512-BF16 or AMX, 4x the float32 rate on the 2-core EPYC VM),
    else float32 (emulated bfloat16 products are far slower than float32 ones)."""
    if str(device).startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    flags = set((cpu_info("flags") or "").split())
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & flags else "float32"


def _placed(t: torch.Tensor | None, target) -> torch.Tensor | None:
    return None if t is None else t.to(target)


@dataclass
class Basis:
    """Top-r singular subspaces of one weight matrix ``[m, n]``.

    ``u`` is ``[m, r]`` and ``v`` is ``[n, r]``, float32 with orthonormal columns; ``None`` means the side
    spans its whole space (identity projector). ``s`` holds the top singular values when computed.
    ``estimate`` is True for a randomised sketch (scores from it carry similarity.py's envelope), False for the
    top of a spectrum.
    """

    shape: tuple[int, int]
    u: torch.Tensor | None
    v: torch.Tensor | None
    s: torch.Tensor | None
    method: str
    estimate: bool = False

    @property
    def rank_u(self) -> int:
        return self.shape[0] if self.u is None else int(self.u.shape[1])

    @property
    def rank_v(self) -> int:
        return self.shape[1] if self.v is None else int(self.v.shape[1])

    def top(self, rank: int) -> Basis:
        """Itself: a sketch is computed at the rank asked for (:meth:`Spectrum.top` has the same signature)."""
        return self

    def to(self, target: torch.dtype | torch.device | str) -> Basis:
        """The same subspaces with ``u`` and ``v`` cast to a dtype or placed on a device, as ``Tensor.to`` (no copy
        where nothing changes; ``s`` stays). Placed once, a basis serves many products on the LoRA's or the
        transfer's device. bfloat16 makes the ``r x r`` similarity product 3-4x cheaper on hardware with native
        bfloat16, and on orthonormal bases its rounding moves phi by < 1e-4 (7e-5 measured at 1280 x 320)."""
        return replace(self, u=_placed(self.u, target), v=_placed(self.v, target))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.u, self.v, self.s) if t is not None)


@dataclass
class Spectrum:
    """Every singular triplet of one weight matrix ``[m, n]``: ``u [m, d]``, ``v [n, d]``, ``s [d]`` (descending,
    float32, orthonormal columns; ``d = min(m, n)``; directions of zero singular value included)."""

    shape: tuple[int, int]
    u: torch.Tensor
    v: torch.Tensor
    s: torch.Tensor
    method: str
    estimate: bool = False

    def top(self, rank: int) -> Basis:
        """The exact top-``rank`` subspaces; a side is the identity (None) when ``rank`` covers its whole space,
        and the span of W's rows or columns when ``rank >= d`` on the longer side."""
        m, n = self.shape
        r = min(rank, self.s.shape[0])
        return Basis(self.shape, None if r >= m else self.u[:, :r], None if r >= n else self.v[:, :r], self.s[:r],
                     self.method)

    def to(self, target: torch.dtype | torch.device | str) -> Spectrum:
        return replace(self, u=self.u.to(target), v=self.v.to(target))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.u, self.v, self.s))


# --------------------------------------------------------------------------------------------- computing

def _orth(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column span (Householder QR: orthonormal even for dependent columns)."""
    return torch.linalg.qr(x).Q


def _orth_fast(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of a tall sketch by Cholesky QR (two BLAS-3 products instead of a Householder QR,
    2-3x faster); Householder when the sketch is too close to rank-deficient for a Cholesky factor."""
    gram = gram_lower(x).double()      # cholesky reads the lower triangle only
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return _orth(x)
    return torch.linalg.solve_triangular(chol.to(x.dtype).T, x, upper=True, left=False)   # X L^-T


def _unit_columns(x: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``x``'s columns, orthogonal already (``W V``: the other side of singular vectors, times their values),
    divided by their ``norms``. That orthogonality is only as good as the Gram's eigenvectors: columns ``i, j`` of
    a float64 ``W V`` meet at ~eps64 / (s_i s_j) (with s_1 = 1), 4e-7 at s_i = 1e-5, s_j = 1e-4. So the columns
    of norm at most 1e-4 of the largest are made orthonormal to the others and to each other instead (projected
    off twice, then a QR of just them), and a zero column, a direction of zero singular value that ``W v / s``
    does not determine, starts from a seeded random direction. That costs O(m d k) for k such columns, where a QR
    of the whole side cost O(m d^2): square zoo weights with a few singular values below 1e-6 s_1 spent 83 of the
    660 thread-seconds of the bench's ``stress`` spectra in it. The whole QR stays for what the projection cannot
    settle (columns that lie in the others' span)."""
    if not bool(torch.isfinite(norms).all()):
        return _orth(x)
    weak = norms <= norms.max() * 1e-4
    if not bool(weak.any()):
        return x / norms
    unit = x / torch.where(weak, norms.clamp_min(torch.finfo(x.dtype).tiny), norms)
    kept = unit[:, ~weak]
    fill = unit[:, weak]
    zero = norms[weak] == 0
    if bool(zero.any()):
        seeded = torch.randn(x.shape[0], int(zero.sum()), generator=torch.Generator().manual_seed(0), dtype=x.dtype)
        fill[:, zero] = seeded.to(x.device)
    for _ in range(2):      # twice is enough for working precision (Kahan-Parlett)
        fill = fill - kept @ (kept.T @ fill)
    fill = _orth(fill)
    if float(torch.linalg.vector_norm(kept.T @ fill)) > 1e-9:
        return _orth(x)
    unit[:, weak] = fill
    return unit


def _spectrum(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u, v, s)`` of every triplet of ``w``: the float64 eigendecomposition of the smaller Gram, the other side
    ``W V`` (or ``W^T U``) in float64 with unit columns. Those columns are orthogonal already (``W v_i = s_i u_i``)
    where s_i is not small, so normalising replaces a QR (on one core a 10240 x 1280 weight's float64 QR took 2.8 s,
    the rest of its spectrum 2.6 s); :func:`_unit_columns` completes the small ones. The float64 kernels run on the
    LAPACK that suits the CPU (kernels.py)."""
    m, n = w.shape
    tall = m >= n
    # W or W^T, whichever is tall (its Gram is the smaller one), laid out row by row: a product with a transposed
    # view took 0.98 s instead of 0.70 s (1280 x 10240, float64, one core)
    tall_w = w.double() if tall else w.T.contiguous().double()
    evals, evecs = eigh(gram(tall_w))
    small = evecs.flip(-1)
    s = evals.flip(0).clamp_min(0).sqrt()
    big = matmul(tall_w, small)
    del tall_w
    big = _unit_columns(big, torch.linalg.vector_norm(big, dim=0))
    u, v = (big, small) if tall else (small, big)
    return u.float(), v.float(), s.float()


@functools.lru_cache(maxsize=8)
def _sketch_matrix(n: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(n, cols, generator=torch.Generator().manual_seed(seed))


def _content_seed(w: torch.Tensor, seed: int) -> int:
    """A sketch seed of ``w``'s own: an unconverged sketch leans toward its test matrix, so two weights sketched
    with the same one share that lean, and unrelated weights scored up to 0.15 (640 x 640, i^-0.3 spectra).
    Derived from the row and column sums, it is the same for equal weights and differs for any others."""
    h = hashlib.sha256(f"{seed}|{tuple(w.shape)}|".encode())
    for sums in (w.sum(0), w.sum(1)):
        h.update(sums.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:4], "little")


def _randomized(w: torch.Tensor, spec: SubspaceSpec):
    """Sketched top-r triplets ``(u, v, s)`` (module docstring), the short side sketched: the first and last
    orthonormalisations are on ``[min(m, n), l]``, each power iteration's middle one on ``[max(m, n), l]``."""
    m, n = w.shape
    if m > n:
        v, u, s = _randomized(w.T, spec)
        return u, v, s
    dt = getattr(torch, spec.sketch_dtype)
    a = w.to(dt)
    omega = _sketch_matrix(n, spec.rank + spec.oversample, _content_seed(w, spec.seed)).to(device=w.device, dtype=dt)
    q = _orth_fast((a @ omega).float())
    for _ in range(spec.power_iters):
        q = _orth_fast((a @ _orth_fast((a.T @ q.to(dt)).float()).to(dt)).float())
    # Rayleigh-Ritz with float32 products and a float64 Gram: bfloat16 here would cap the accuracy at bfloat16's
    # rounding of W, and a float32 Gram moved similarities by up to 0.008
    bt = w.T @ q
    evals, evecs = eigh(gram_lower(bt).double())
    ub = evecs[:, -spec.rank:].flip(-1).to(device=w.device, dtype=torch.float32)
    s = evals[-spec.rank:].flip(0).clamp_min(0).sqrt().to(device=w.device, dtype=torch.float32)
    # (Q^T W)^T ub has orthogonal columns of norms s (ub are eigenvectors of its Gram): scaling replaces a QR
    return q @ ub, _unit_columns(bt @ ub, s), s


def compute_basis(w: torch.Tensor, spec: SubspaceSpec, device="cpu") -> Basis | Spectrum:
    """The sketch (a :class:`Basis`) or the spectrum of ``w`` (2-D, or 4-D read as ``[m, c*kh*kw]``) that ``spec``
    asks for, computed on ``device``, returned on the CPU."""
    w = w.reshape(w.shape[0], -1)
    m, n = w.shape
    eff = spec.effective(m, n)
    w = w.to(device=device, dtype=torch.float32)
    cpu = lambda t: t.to("cpu", torch.float32).contiguous()  # noqa: E731
    if eff.method == "randomized":
        u, v, s = _randomized(w, eff)
        return Basis((m, n), cpu(u), cpu(v), cpu(s), eff.describe(), estimate=True)
    u, v, s = _spectrum(w)
    return Spectrum((m, n), cpu(u), cpu(v), cpu(s), eff.describe())


def cache_key(fingerprint: str, shape: tuple[int, int], spec: SubspaceSpec) -> str:
    """Everything a basis depends on, as one string (its sha256 names the disk entry)."""
    eff = spec.effective(*shape)
    # "gram" and "exact" are one computation (_spectrum): one entry serves both
    kind = f"spectrum(d={eff.rank})" if eff.method in SPECTRUM_METHODS else eff.describe()
    return f"lorax-subspace-v{ALGORITHM_VERSION}|{fingerprint}|{shape[0]}x{shape[1]}|{kind}|float32"


def matrix_shape(shape) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape[1:]:
        n *= s
    return shape[0], n


@dataclass
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    computed: int = 0
    discarded: int = 0          # corrupt or mismatching disk entries, deleted and recomputed
    compute_seconds: float = 0.0    # summed over get_many's worker threads: may exceed wall time
    read_seconds: float = 0.0   # reading weights and hashing them

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SubspaceCache:
    """Bases by content: memory LRU (``memory_bytes``) in front of an optional disk directory.

    One cache object can serve many transfers (batch mode, repeated node runs): identical weights in
    different models (SDXL's CLIP-L is SD1.5's) are computed once.
    """

    directory: Path | None = None
    memory_bytes: int = DEFAULT_MEMORY_BYTES
    stats: CacheStats = field(default_factory=CacheStats)
    # layer-pair similarities (similarity.PairStore over the same directory), created on first use by the
    # transfer; kept here so one cache object also reuses pair scores across transfers in memory
    pairs: object = field(default=None, repr=False)

    def __post_init__(self):
        self.directory = Path(self.directory).expanduser() if self.directory is not None else None
        self._lru: OrderedDict[str, Basis] = OrderedDict()
        self._used = 0
        # guards this cache's state and the weight providers read through it (one file handle each), for
        # get_many's threads and any get() made meanwhile
        self._lock = threading.Lock()

    # -- public -----------------------------------------------------------------------------------
    def get(self, weights, key: str, spec: SubspaceSpec, device="cpu") -> Basis:
        """The basis of ``weights``' matrix ``key`` under ``spec``, from memory, disk, or computed now
        (on ``device``; the result is the same up to rounding, so the device is not part of the key)."""
        return self._get(weights, key, spec, device)

    def get_many(self, weights, keys, spec: SubspaceSpec, device="cpu", workers: int | None = None):
        """Yield ``(key, basis)`` for ``keys`` in order, like :meth:`get`, with up to ``workers`` bases read
        and computed ahead in threads (default :func:`default_workers`). Each thread's torch ops then use
        ``threads // workers`` of torch's threads: on 2 CPU cores two single-threaded bases at once beat one
        two-threaded one by 10-20%, as the small QR/eigh steps and the reading and hashing parallelise
        poorly; numpy's BLAS is held to as many (kernels.py). An error surfaces at its key; close the generator
        (``contextlib.closing``) when stopping early: that waits for the running bases and restores the thread
        counts."""
        keys = list(keys)
        workers = default_workers(device) if workers is None else workers
        if workers <= 1 or len(keys) <= 1:
            for key in keys:
                yield key, self.get(weights, key, spec, device)
            return
        load_linalg_kernels(device)
        threads = torch.get_num_threads()
        per_worker = max(1, threads // workers)
        torch.set_num_threads(per_worker)
        pool = ThreadPoolExecutor(workers, thread_name_prefix="lorax-basis")
        pending: deque = deque()
        todo = iter(keys)
        with blas_threads(per_worker):      # numpy's BLAS too, where kernels.py uses it
            try:
                for key in itertools.islice(todo, workers + 1):
                    pending.append((key, pool.submit(self._get, weights, key, spec, device)))
                while pending:
                    key, future = pending.popleft()
                    following = next(todo, None)
                    if following is not None:
                        pending.append((following, pool.submit(self._get, weights, following, spec, device)))
                    yield key, future.result()
            finally:
                for _, future in pending:
                    future.cancel()
                pool.shutdown(wait=True)
                torch.set_num_threads(threads)

    def _get(self, weights, key: str, spec: SubspaceSpec, device) -> Basis | Spectrum:
        with self._lock:
            t0 = time.perf_counter()
            shape = matrix_shape(weights.shape(key))
            fingerprint = weights.fingerprint(key)
            self.stats.read_seconds += time.perf_counter() - t0
            # a spectrum at hand serves a sketch's request: it is exact
            tries = [spec] if spec.effective(*shape).method != "randomized" else [spec, SubspaceSpec(spec.rank)]
            for s in tries:
                found = self._lookup(cache_key(fingerprint, shape, s), shape, s)
                if found is not None:
                    return found
            t0 = time.perf_counter()
            w = weights.matrix(key)
            self.stats.read_seconds += time.perf_counter() - t0
        if not all_finite(w):
            raise LoraFileError(getattr(weights, "name", "model"),
                                f"weight {key} holds NaN or infinite values; the model file is damaged")
        t0 = time.perf_counter()
        basis = compute_basis(w, spec, device)
        del w
        _validate(basis, spec.effective(*shape), content=True)
        seconds = time.perf_counter() - t0
        ckey = cache_key(fingerprint, shape, spec)
        self._write(ckey, basis)
        with self._lock:
            self.stats.compute_seconds += seconds
            self.stats.computed += 1
            self._remember(ckey, basis)
        return basis

    def _lookup(self, ckey: str, shape: tuple[int, int], spec: SubspaceSpec) -> Basis | Spectrum | None:
        """The entry ``ckey`` from memory or disk (counted in the stats), or None. Call with the lock held."""
        basis = self._lru.get(ckey)
        if basis is not None:
            self._lru.move_to_end(ckey)
            self.stats.memory_hits += 1
            return basis
        basis = self._read(ckey, shape, spec)
        if basis is not None:
            self.stats.disk_hits += 1
            self._remember(ckey, basis)
        return basis

    def clear_memory(self):
        self._lru.clear()
        self._used = 0

    @property
    def fingerprint_dir(self) -> Path | None:
        """Where the digests of checkpoint weights and whole files are memoised, next to the bases (None
        without a disk cache)."""
        return self.directory / "fingerprints" if self.directory is not None else None

    def trim_disk(self):
        """Keep the disk cache within ``$LORAX_DISK_CACHE_GB``: least recently used bases go first."""
        from .disk_budget import disk_budget_bytes, evict_to  # local: disk_budget is not needed to compute bases

        evict_to(self.directory, disk_budget_bytes())

    # -- memory -----------------------------------------------------------------------------------
    def _remember(self, ckey: str, basis: Basis | Spectrum):
        if basis.nbytes > self.memory_bytes:
            return
        self._lru[ckey] = basis
        self._used += basis.nbytes
        while self._used > self.memory_bytes:
            _, old = self._lru.popitem(last=False)
            self._used -= old.nbytes

    # -- disk -------------------------------------------------------------------------------------
    def _path(self, ckey: str) -> Path | None:
        if self.directory is None:
            return None
        digest = hashlib.sha256(ckey.encode()).hexdigest()[:40]
        return self.directory / "bases" / digest[:2] / f"{digest}.safetensors"

    def _read(self, ckey: str, shape: tuple[int, int], spec: SubspaceSpec) -> Basis | Spectrum | None:
        path = self._path(ckey)
        if path is None or not path.is_file():
            return None
        # our own files: the Rust reader (memory-mapped, header and size checked) is ~2x faster than a
        # Python read for the ~200 entries of a warm transfer
        from safetensors import SafetensorError, safe_open

        eff = spec.effective(*shape)
        try:
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("lorax.cache_key") != ckey:
                    raise ValueError("entry belongs to another key")
                t = {k: f.get_tensor(k) for k in f.keys()}
            if metadata.get("lorax.crc32") != _checksum(t):
                raise ValueError("content does not match its checksum")
            kind = Spectrum if eff.method in SPECTRUM_METHODS else Basis
            basis = kind(shape, t.get("u"), t.get("v"), t.get("s"), eff.describe(), kind is Basis)
            _validate(basis, eff)      # the checksum vouches for the values, checked when written
        except (SafetensorError, ValueError, RuntimeError, OSError):
            self.stats.discarded += 1
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)                  # mtime = last use, for the disk budget's LRU eviction
        except OSError:
            pass                            # a read-only cache still serves its entries
        return basis

    def _write(self, ckey: str, basis: Basis | Spectrum):
        path = self._path(ckey)
        if path is None:
            return
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        tensors = {k: t for k, t in (("u", basis.u), ("v", basis.v), ("s", basis.s)) if t is not None}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata={"lorax.cache_key": ckey, "lorax.method": basis.method,
                                                       "lorax.crc32": _checksum(tensors)})
        except (OSError, SafetensorError):     # safetensors reports a full disk as SafetensorError
            pass    # a read-only or full cache disk costs speed, never the result


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 of an entry's names, dtypes, shapes and bytes: catches damage that leaves the shapes and unit columns
    intact. The entries are ours, so this guards against corruption, not forgery: CRC-32 runs at ~3.6 GB/s here
    against sha256's ~1.4 (a warm transfer reads ~650 MB of entries)."""
    crc = 0
    for k, t in sorted(tensors.items()):
        t = t.detach().to("cpu").contiguous()
        crc = zlib.crc32(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode(), crc)
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    return f"crc32:{crc:08x}"


def _validate(basis: Basis | Spectrum, spec: SubspaceSpec, content: bool = False):
    """Raise ValueError unless ``basis`` has the kind, shapes and dtype its effective ``spec`` promises (``content``:
    and finite values with unit columns, a full pass over the data)."""
    m, n = basis.shape
    spectrum = spec.method in SPECTRUM_METHODS
    if isinstance(basis, Spectrum) != spectrum:
        raise ValueError("entry is not of the kind its key names")
    rank = spec.rank
    for side, t, dim in (("u", basis.u, m), ("v", basis.v, n)):
        full = not spectrum and rank >= dim
        if full != (t is None):
            raise ValueError(f"side {side}: presence does not match the rank")
        if t is None:
            continue
        if t.dtype != torch.float32 or tuple(t.shape) != (dim, rank):
            raise ValueError(f"side {side}: {t.dtype} {tuple(t.shape)}, expected float32 {(dim, rank)}")
        if not content:
            continue
        norms = torch.linalg.vector_norm(t, dim=0)
        if not float((norms - 1).abs().max()) <= 1e-3:     # NaN or inf in a column fails this too
            raise ValueError(f"side {side}: columns are not unit vectors")
    s = basis.s
    if s is None or s.dtype != torch.float32 or tuple(s.shape) != (rank,) or not bool(torch.isfinite(s).all()):
        raise ValueError("singular values malformed")
