"""Top-r singular subspaces of base weights (METHOD.md, Notation), computed exactly or by sketching, and cached.

A weight ``W`` of shape ``[m, n]`` (a conv ``[m, c, kh, kw]`` read as ``[m, c*kh*kw]``) has at most
``d = min(m, n)`` singular vectors. :func:`compute_basis` returns ``U_r [m, r]`` and ``V_r [n, r]`` with
orthonormal columns, in float32, for ``r = min(rank, d)``. A side whose subspace is all of its space
(``r >= m`` for U, ``r >= n`` for V) is returned as ``None``, meaning the identity: no rounding, and
projections skip it.

Methods (the choice is an option, ``SubspaceSpec.method``):

* ``"exact"``: eigendecomposition of the smaller Gram matrix ``W^T W`` (or ``W W^T``) in float64, then the
  other side by a QR of ``W V`` (or ``W^T U``). Squaring the spectrum is harmless in float64 (it resolves
  singular values down to ~1e-8 s_1), and on 2 CPU cores it is as fast as ``torch.linalg.svd`` for square
  weights and 1.3-2x faster for rectangular ones. It agrees with a float64 SVD to ~3e-7 on the projector.
  When ``r >= d`` no decomposition is needed: the full side is the identity and the other is the span of
  W's rows (or columns), a QR.
* ``"gram"``: the same Gram eigendecomposition in float64, but ``W V`` and its QR in float32: 1.2-1.5x cheaper
  than exact. A float32 Gram (used up to ALGORITHM_VERSION 2) rounds each entry by 1e-3..1e-2 ``eps32 s_1^2``
  in its eigenbasis: on trained-looking weights (lorax_zoo.pairs: slow bulk ``i^-0.2..0.5``, ``s_1/s_d`` up to
  1e4) that moved the top-320 projector by 1e-2 (i^-0.2, cond 1e3) to 0.7 (cond 1e4). The fast transfer
  projects with it. Never an estimate.
* ``"randomized"``: randomised range finder (Halko, Martinsson, Tropp 2011, Alg. 4.4): a seeded Gaussian
  sketch of ``l = r + oversample`` columns, ``power_iters`` rounds of subspace iteration with Cholesky-QR
  re-orthonormalisation (products with W in ``sketch_dtype``; :func:`fast_sketch_dtype` picks bfloat16 where
  the hardware multiplies it natively), then Rayleigh-Ritz with float32 products and a float64 eigensolver.
  It then certifies itself (:func:`_iterations_needed`): from its own Ritz values it predicts the loss
  ``1 - ||U^T U_exact||_F^2 / r`` after q iterations (per-direction convergence ``(s_{l+1}/s_i)^(2q+1)``,
  ``s_{l+1}`` extrapolated from a power-law fit of the Ritz values over ``[r/2, r]``, times a safety factor,
  plus the floor that rounding W to the sketch dtype sets). Within :data:`SKETCH_TOLERANCE` it returns the
  sketch, marked ``estimate``; if a few more iterations (at most :data:`MAX_POWER_ITERS`) would get there it
  runs them and looks again (a look needs the Ritz values only: an eigvalsh; the vectors are computed once, for
  the sketch returned); otherwise it returns the "gram" basis (not an estimate). A similarity of
  two sketched bases is then off by at most about ``2 * SKETCH_TOLERANCE / (1 - r/d)`` (0.008 at d = 640).
  Falls back to exact when ``r + oversample >= d``.

Measured accuracy (r = 320, against float64 SVDs; tests/test_subspaces_trained.py): zoo weights (``s_i ~ 1/i``
with a noise floor) stay sketches: with p = 96 the certificate asks for q = 4-5 and the sketch captures
99.92-99.97% of the exact subspace (q = 1, the old default, captured 96.7-97%: same-subspace pairs with
different spectra scored 0.85-0.89 instead of 1). Trained-looking weights (``i^-0.2``, ``i^-0.35``, ``i^-0.5``
at cond 1e3-1e4, and ``i^-1`` at cond 1e4 with bfloat16 products) are too flat at index r or too
ill-conditioned for bfloat16: the sketch falls back to the Gram basis after one look (true losses of the
rejected sketches were 2e-2 to 0.45). Every certified sketch measured had loss <= 8.5e-4 (tolerance 2e-3).
Scores from screening and gram bases agree with exact ones within 0.01 and projected rank-16 updates within
1e-2 on every pair kind of lorax_zoo.pairs at 640 x 640 (default test run) and, in the slow tests, 1280 x 1280
and 1280 x 5120, 10240 x 1280, 640 x 2048, 1280 x 2048.

Cost per basis (one torch thread, as get_many runs two at once; 2-core VM under load, medians of 3; old = v2):
screening 1280 x 1280: zoo 0.20 -> 0.56 s, trained 0.14 -> 1.35 s (the sketch's look plus the Gram); 640 x
640: zoo 0.15 -> 0.40 s, trained 0.16 -> 0.30 s; 10240 x 1280: zoo 1.46 -> 3.04 s, trained 0.75 -> 3.99 s;
1280 x 5120: zoo 0.35 -> 1.23 s, trained 0.46 -> 1.97 s. Projection ("gram"): 1280 x 1280 1.02 -> 1.23 s,
10240 x 1280 1.93 -> 2.74 s, 1280 x 5120 1.47 -> 1.91 s (float64 Gram product). The old screening numbers
bought 0.85 where 1.0 was right.

Cache (:class:`SubspaceCache`): an in-memory LRU bounded in bytes plus an optional on-disk cache. The key
is the weight's content fingerprint (sha256 of its stored bytes, dtype and shape; see
:mod:`lorax_engine.files.base_weights`), its matrix shape, the effective method with all its parameters, the
output dtype and an algorithm version, so a stale basis cannot be served. Disk entries are safetensors
files written atomically (temporary file + ``os.replace``) and validated on read (key, checksum, shapes, dtype,
finite values, unit columns); a bad entry is deleted and recomputed. No pickle anywhere.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import math
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

ALGORITHM_VERSION = 3      # 3: certified sketches (Gram where they cannot promise), float64 Gram fallback
METHODS = ("exact", "gram", "randomized")
SKETCH_DTYPES = ("float32", "bfloat16")
DEFAULT_RANK = 320
DEFAULT_MEMORY_BYTES = 1 << 30
CACHE_ENV = "LORAX_CACHE_DIR"
# accuracy promise of the sketches (METHOD §2b), see the module docstring
SKETCH_TOLERANCE = 2e-3     # predicted loss 1 - ||U^T U_exact||_F^2 / r a sketch may have
SKETCH_SAFETY = 3.0         # margin on the per-direction convergence model (measured: it is off by up to 2.5x)
MAX_POWER_ITERS = 6         # beyond this a sketch costs as much as the Gram on 2 CPU cores


def default_cache_dir() -> Path:
    """``$LORAX_CACHE_DIR`` if set, else ``~/.cache/lorax/subspaces``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorax" / "subspaces"


@dataclass(frozen=True)
class SubspaceSpec:
    """How to compute a basis: rank r and method (with the sketch parameters for "randomized")."""

    rank: int = DEFAULT_RANK
    method: str = "exact"
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
        """The spec actually used for an ``[m, n]`` weight: the rank clipped to min(m, n), and exact
        wherever a sketch would be as large as the weight itself."""
        d = min(m, n)
        rank = min(self.rank, d)
        if self.method == "exact" or rank >= d or (self.method == "randomized" and rank + self.oversample >= d):
            return SubspaceSpec(rank, "exact")
        if self.method == "gram":
            return SubspaceSpec(rank, "gram")
        return SubspaceSpec(rank, "randomized", self.oversample, self.power_iters, self.seed, self.sketch_dtype)

    def describe(self) -> str:
        if self.method in ("exact", "gram"):
            return f"{self.method}(r={self.rank})"
        return (f"randomized(r={self.rank},p={self.oversample},q={self.power_iters},seed={self.seed},"
                f"{self.sketch_dtype})")


def default_workers(device="cpu") -> int:
    """Bases computed at once by :meth:`SubspaceCache.get_many`: 2 on a CPU with >= 2 torch threads, else 1;
    2 on a GPU, where one thread's reading, checks and cache write overlap the other's GPU work."""
    return 2 if not str(device).startswith("cpu") or torch.get_num_threads() >= 2 else 1


@functools.lru_cache(maxsize=4)
def fast_sketch_dtype(device: str = "cpu") -> str:
    """The sketch dtype for fast screening on ``device``: bfloat16 where the hardware multiplies it natively
    (CUDA with bf16 support; CPUs with AVX512-BF16 or AMX, 4x the float32 rate on the 2-core EPYC VM),
    else float32 (emulated bfloat16 products are far slower than float32 ones)."""
    if str(device).startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags.split()) else "float32"


@dataclass
class Basis:
    """Top-r singular subspaces of one weight matrix ``[m, n]``.

    ``u`` is ``[m, r]`` and ``v`` is ``[n, r]``, float32 with orthonormal columns; ``None`` means the side
    spans its whole space (identity projector). ``s`` holds the top singular values when computed.
    ``estimate`` is True for a randomised sketch (its accuracy is a prediction from its own Ritz values, see
    :data:`SKETCH_TOLERANCE`), False for an exact or Gram basis (the requested method may have fallen back).
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

    def to(self, target: torch.dtype | torch.device | str) -> Basis:
        """The same subspaces with ``u`` and ``v`` cast to a dtype or placed on a device, as ``Tensor.to`` (no copy
        where nothing changes; ``s`` stays). Placed once, a basis serves many products on the LoRA's or the
        transfer's device. bfloat16 makes the ``r x r`` similarity product 3-4x cheaper on hardware with native
        bfloat16, and on orthonormal bases its rounding moves phi by < 1e-4 (7e-5 measured at 1280 x 320)."""
        move = lambda t: None if t is None else t.to(target)  # noqa: E731
        return replace(self, u=move(self.u), v=move(self.v))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.u, self.v, self.s) if t is not None)


# --------------------------------------------------------------------------------------------- computing

def _orth(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column span (Householder QR: orthonormal even for dependent columns)."""
    return torch.linalg.qr(x).Q


def _orth_fast(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of a tall sketch by Cholesky QR (two BLAS-3 products instead of a Householder QR,
    2-3x faster); Householder when the sketch is too close to rank-deficient for a Cholesky factor."""
    gram = (x.T @ x).double()
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return _orth(x)
    return torch.linalg.solve_triangular(chol.to(x.dtype).T, x, upper=True, left=False)   # X L^-T


def _gram(w: torch.Tensor, rank: int):
    """Top-``rank`` triplets of ``w`` from the float64 eigendecomposition of its smaller Gram matrix (``W^T W``
    or ``W W^T``, formed in float64); the other side is ``W V`` (or ``W^T U``) in ``w``'s dtype, made
    orthonormal by a QR.

    The Gram is float64 even for the "gram" method's float32 ``w``: a float32 Gram rounds every entry by
    1e-3..1e-2 ``eps32 s_1^2`` (rms in its eigenbasis), which on trained-looking spectra (slow bulk, s_1 / s_r
    up to 1e4) moved the top-320 projector by 1e-2 to 0.7 relative; only zoo-like 1/i weights with a small
    condition number stayed within 1e-3. Deciding per weight needs the spectrum, i.e. a second
    eigendecomposition, which costs more than the float64 Gram product (+0.04 s at 1280 x 1280, +0.24 s at
    10240 x 1280 on one core). The float32 ``W V`` rounds u_i by ~eps32 s_1 / s_i: 6e-4 at s_1 / s_r = 1e4."""
    m, n = w.shape
    tall = m >= n
    wd = w.double()
    evals, evecs = torch.linalg.eigh(wd.T @ wd if tall else wd @ wd.T)
    del wd
    small = evecs[:, -rank:].flip(-1).to(device=w.device, dtype=w.dtype)
    big = _orth(w @ small) if tall else _orth(w.T @ small)
    s = evals[-rank:].flip(-1).clamp_min(0).sqrt().to(w.device)
    return (big, small, s) if tall else (small, big, s)


def _exact(w: torch.Tensor, rank: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    m, n = w.shape
    d = min(m, n)
    if rank >= d:
        # Full rank: the smaller side is the whole space, the other the span of W's rows or columns.
        u = None if m == d else _orth(w)
        v = None if n == d else _orth(w.T)
        return u, v, None
    u, v, s = _gram(w.double(), rank)
    return u.float(), v.float(), s.float()


@functools.lru_cache(maxsize=8)
def _sketch_matrix(n: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(n, cols, generator=torch.Generator().manual_seed(seed))


def _randomized(w: torch.Tensor, spec: SubspaceSpec):
    """Sketched top-r triplets ``(u, v, s, estimate)``; a Gram basis (``estimate`` False) where the sketch's own
    Ritz values cannot promise :data:`SKETCH_TOLERANCE` within :data:`MAX_POWER_ITERS` iterations."""
    m, n = w.shape
    if m > n:   # sketch the short side, so every orthonormalisation is on [min(m, n), l]
        v, u, s, estimate = _randomized(w.T, spec)
        return u, v, s, estimate
    dt = getattr(torch, spec.sketch_dtype)
    a = w.to(dt)
    width = spec.rank + spec.oversample
    omega = _sketch_matrix(n, width, spec.seed).to(device=w.device, dtype=dt)
    q = _orth_fast((a @ omega).float())
    # entries of W rounded to the sketch dtype: relative error uniform in +-eps/2, rms eps / sqrt(12)
    rounding = torch.finfo(dt).eps / math.sqrt(12) * float(torch.linalg.vector_norm(w)) / math.sqrt(m * n)
    done, goal = 0, spec.power_iters
    while True:
        for _ in range(goal - done):
            q = _orth_fast((a @ _orth_fast((a.T @ q.to(dt)).float()).to(dt)).float())
        done = goal
        # the certificate needs the Ritz values only: their eigenvalues alone (a third of the eigh) decide
        # whether this sketch is returned, iterated further, or given up for the Gram
        bt, small = _projected(w, q)
        ritz = torch.linalg.eigvalsh(small).flip(0).clamp_min(0).sqrt()
        goal = _iterations_needed(ritz, spec.rank, m, rounding, done)
        if goal == done:
            return (*_rayleigh_ritz(w, q, spec.rank, bt, small), True)
        if goal > MAX_POWER_ITERS:
            return (*_gram(w, spec.rank), False)
        # else top up: a look costs ~5% of the Gram (a 1280 x 2048 zoo weight with bfloat16 products asked for
        # q = 4, then 5: stopping after one top-up sent all 140 of SDXL's cross-attention k/v to the Gram)


def _projected(w: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q^T W)^T`` ``[n, l]`` and its float64 Gram ``[l, l]``, whose eigenvalues are the squared Ritz values.
    The product with ``w`` runs in float32 whatever the sketch dtype: bfloat16 here would cap the accuracy at
    bfloat16's rounding of W; the Gram is float64, as float32 moved similarities by up to 0.008."""
    bt = w.T @ q
    return bt, (bt.T @ bt).double()


def _rayleigh_ritz(w: torch.Tensor, q: torch.Tensor, rank: int, bt: torch.Tensor, small: torch.Tensor):
    """Best top-``rank`` triplets of ``w`` ``[m, n]`` within the span of ``q`` ``[m, l]`` (``bt``, ``small``
    from :func:`_projected`)."""
    evals, evecs = torch.linalg.eigh(small)
    ub = evecs[:, -rank:].flip(-1).to(device=w.device, dtype=torch.float32)
    s = evals[-rank:].flip(0).clamp_min(0).sqrt().to(device=w.device, dtype=torch.float32)
    u = q @ ub
    # (Q^T W)^T ub has orthogonal columns of norms s (ub are eigenvectors of its Gram): scaling replaces a QR
    bu = bt @ ub
    v = bu / s.clamp_min(torch.finfo(torch.float32).tiny)
    if not bool(torch.isfinite(v).all()) or float(s[-1]) <= float(s[0]) * 1e-6:
        v = _orth(bu)                               # (numerically) rank-deficient sketch
    return u, v, s


def _iterations_needed(ritz: torch.Tensor, rank: int, dim: int, rounding: float, done: int) -> int:
    """The fewest power iterations (>= ``done``) after which a sketch with these Ritz values (descending,
    float64, ``l`` of them, of a weight whose short side is ``dim``) captures all but
    :data:`SKETCH_TOLERANCE` of the exact top-``rank`` subspace, or ``MAX_POWER_ITERS + 1``.

    Subspace iteration turns direction i away from the exact one by about ``(s_{l+1} / s_i)^(2q+1)``
    (Halko et al. 2011, Thm 9.2, per direction): the predicted loss ``1 - ||U^T U_exact||_F^2 / r`` is
    ``SKETCH_SAFETY * mean_i (s_{l+1} / s_i)^(4q+2)``. ``s_{l+1}`` is not in the sketch; the Ritz values
    over ``[r/2, r]`` (converged first) are fitted by a power law and extrapolated to ``l + 1``. Rounding W
    to the sketch dtype (rms entry error ``rounding``) moves the subspace by ``rounding^2 (dim - l) / (s_i -
    s_{l+1})^2`` per direction whatever q is: bfloat16 sketches of ill-conditioned weights cannot converge."""
    width = ritz.shape[0]
    theta = ritz[:rank]
    if rank < 2 or float(theta[-1]) <= 0.0:     # no decay to fit: the Gram decides
        return MAX_POWER_ITERS + 1
    lo = rank // 2
    x = torch.log(torch.arange(lo, rank + 1, dtype=torch.float64))
    y = torch.log(ritz[lo - 1:rank])
    x, y = x - x.mean(), y - y.mean()
    decay = max(-float((x * y).sum() / (x * x).sum()), 0.0)
    next_value = float(theta[-1]) * ((width + 1) / rank) ** -decay
    ratio = next_value / theta
    floor = float((rounding ** 2 * max(dim - width, 0) / (theta - next_value).square()).clamp(max=1.0).mean())
    for q in range(done, MAX_POWER_ITERS + 1):
        loss = SKETCH_SAFETY * float(ratio.pow(4 * q + 2).clamp(max=1.0).mean()) + floor
        if loss <= SKETCH_TOLERANCE:
            return q
    return MAX_POWER_ITERS + 1


def compute_basis(w: torch.Tensor, spec: SubspaceSpec, device="cpu") -> Basis:
    """Top-r subspaces of ``w`` (2-D, or 4-D read as ``[m, c*kh*kw]``), computed on ``device``, returned on CPU."""
    w = w.reshape(w.shape[0], -1)
    m, n = w.shape
    eff = spec.effective(m, n)
    w = w.to(device=device, dtype=torch.float32)
    estimate = False
    if eff.method == "exact":
        u, v, s = _exact(w, eff.rank)
    elif eff.method == "gram":
        u, v, s = _gram(w, eff.rank)
    else:
        u, v, s, estimate = _randomized(w, eff)
    cpu = lambda t: None if t is None else t.to("cpu", torch.float32).contiguous()  # noqa: E731
    return Basis((m, n), cpu(u), cpu(v), cpu(s), eff.describe(), estimate)


# --------------------------------------------------------------------------------------------- cache

def cache_key(fingerprint: str, shape: tuple[int, int], spec: SubspaceSpec) -> str:
    """Everything a basis depends on, as one string (its sha256 names the disk entry)."""
    eff = spec.effective(*shape)
    return f"lorax-subspace-v{ALGORITHM_VERSION}|{fingerprint}|{shape[0]}x{shape[1]}|{eff.describe()}|float32"


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
        poorly. An error surfaces at its key; close the generator (``contextlib.closing``) when stopping
        early: that waits for the running bases and restores torch's thread count."""
        keys = list(keys)
        workers = default_workers(device) if workers is None else workers
        if workers <= 1 or len(keys) <= 1:
            for key in keys:
                yield key, self.get(weights, key, spec, device)
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // workers))
        pool = ThreadPoolExecutor(workers, thread_name_prefix="lorax-basis")
        pending: deque = deque()
        todo = iter(keys)
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

    def _get(self, weights, key: str, spec: SubspaceSpec, device) -> Basis:
        with self._lock:
            t0 = time.perf_counter()
            shape = matrix_shape(weights.shape(key))
            fingerprint = weights.fingerprint(key)
            ckey = cache_key(fingerprint, shape, spec)
            self.stats.read_seconds += time.perf_counter() - t0
            # a sketch that cannot certify itself falls back to the Gram basis, which is also what the transfer
            # projects with: a Gram basis already at hand serves the sketch's key, and a fallback serves the Gram's
            gram = SubspaceSpec(spec.rank, "gram") if spec.effective(*shape).method == "randomized" else None
            for k, s in ((ckey, spec), *(((cache_key(fingerprint, shape, gram), gram),) if gram else ())):
                basis = self._lookup(k, shape, s)
                if basis is not None:
                    return basis
            t0 = time.perf_counter()
            w = weights.matrix(key)
            self.stats.read_seconds += time.perf_counter() - t0
        if not _all_finite(w):
            raise LoraFileError(getattr(weights, "name", "model"),
                                f"weight {key} holds NaN or infinite values; the model file is damaged")
        t0 = time.perf_counter()
        basis = compute_basis(w, spec, device)
        del w
        _validate(basis, spec.effective(*shape).rank, content=True)
        seconds = time.perf_counter() - t0
        if gram is not None and not basis.estimate:
            ckey, basis = cache_key(fingerprint, shape, gram), replace(basis, method=gram.effective(*shape).describe())
        self._write(ckey, basis)
        with self._lock:
            self.stats.compute_seconds += seconds
            self.stats.computed += 1
            self._remember(ckey, basis)
        return basis

    def _lookup(self, ckey: str, shape: tuple[int, int], spec: SubspaceSpec) -> Basis | None:
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
    def _remember(self, ckey: str, basis: Basis):
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

    def _read(self, ckey: str, shape: tuple[int, int], spec: SubspaceSpec) -> Basis | None:
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
            estimate = metadata.get("lorax.estimate")
            if estimate not in ("0", "1"):
                raise ValueError("entry does not say whether it is an estimate")
            basis = Basis(shape, t.get("u"), t.get("v"), t.get("s"), eff.describe(), estimate == "1")
            _validate(basis, eff.rank)      # the checksum vouches for the values, checked when written
        except (SafetensorError, ValueError, RuntimeError, OSError):
            self.stats.discarded += 1
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)                  # mtime = last use, for the disk budget's LRU eviction
        except OSError:
            pass                            # a read-only cache still serves its entries
        return basis

    def _write(self, ckey: str, basis: Basis):
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
                                                       "lorax.estimate": str(int(basis.estimate)),
                                                       "lorax.crc32": _checksum(tensors)})
        except (OSError, SafetensorError):     # safetensors reports a full disk as SafetensorError
            pass    # a read-only or full cache disk costs speed, never the result


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``: min and max propagate both, in one pass (~8x faster than isfinite().all())."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


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


def _validate(basis: Basis, rank: int, content: bool = False):
    """Raise ValueError unless ``basis`` has the shapes and dtype its key promises (``content``: and finite
    values with unit columns, a full pass over the data)."""
    m, n = basis.shape
    d = min(m, n)
    for side, t, dim in (("u", basis.u, m), ("v", basis.v, n)):
        full = rank >= dim          # only possible when rank == d == dim
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
    if basis.s is not None and (tuple(basis.s.shape) != (min(rank, d),) or not bool(torch.isfinite(basis.s).all())):
        raise ValueError("singular values malformed")
