"""Reading LoRA files of every common format into a :class:`LoraModel`, and writing kohya/SAI LoRA files.

Read: kohya LoRA / LoCon (``lora_up``/``lora_down``/``alpha``, optional Tucker ``lora_mid``), LyCORIS LoHa
(``hada_*``) and LoKr (``lokr_*``), diffusers (old attention-processor and new ``lora_A/lora_B`` names) and
PEFT, in fp32/fp16/bf16. LoHa and LoKr are not low-rank products, so their ΔW is materialised exactly as
ComfyUI computes it and re-factorised by truncated SVD at the smallest rank keeping 99.9% of its energy.

Write: kohya/SAI names (what SDXL LoRAs in the wild use), kohya and SAI ModelSpec metadata, atomically.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import safetensors.torch
import torch

from ..errors import LoraFileError, OutputPathError
from ..tensor_checks import all_finite
from .architectures import detect_lora_architecture
from .keys import KeyPart, canonical_to_kohya, expected_shape, module_to_canonical, split_key
from .lora import LoraLayer, LoraModel
from .safetensors_file import PICKLE_SUFFIXES, SafetensorsFile, check_regular_file, load_state_dict_file

REFACTOR_ENERGY = 0.999          # LoHa/LoKr re-factorisation keeps at least this share of ||ΔW||_F^2
MAX_METADATA_VALUE_CHARS = 4_000_000

BASE_MODEL_VERSION = {"sdxl": "sdxl_base_v1-0", "sd1": "sd_v1"}
MODELSPEC_ARCHITECTURE = {"sdxl": "stable-diffusion-xl-v1-base/lora", "sd1": "stable-diffusion-v1/lora"}
# The repository whose key naming the file follows (ldm/SGM names for both families).
MODELSPEC_IMPLEMENTATION = {"sdxl": "https://github.com/Stability-AI/generative-models",
                            "sd1": "https://github.com/CompVis/stable-diffusion"}
MODELSPEC_RESOLUTION = {"sdxl": "1024x1024", "sd1": "512x512"}


# --- reading ----------------------------------------------------------------------------------------

def load_lora_file(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The raw tensors and metadata of a LoRA file (``.safetensors``, or a weights-only pickle)."""
    path = Path(path)
    check_regular_file(path)   # "is a directory" / "file not found" say more than a wrong extension would
    suffix = path.suffix.lower()
    if suffix == ".safetensors" or suffix in PICKLE_SUFFIXES:
        return load_state_dict_file(path)
    raise LoraFileError(path, f"not a LoRA file type: {suffix or '(no extension)'!r} (expected .safetensors)")


def read_lora(path) -> LoraModel:
    """Read a LoRA file into canonical form."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors" and path.is_file():
        # names first: a checkpoint picked by mistake is refused before gigabytes of it are read
        with SafetensorsFile(path) as f:
            _lora_parts(f.keys(), str(path))
    sd, metadata = load_lora_file(path)
    return lora_from_state_dict(sd, metadata, path=path)


def _examples(keys, n=5) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _lora_parts(keys, name: str) -> dict[str, KeyPart | None]:
    """Every key split into module and part, after the checks that need only the names."""
    parts = {k: split_key(k) for k in keys}
    if not parts:
        raise LoraFileError(name, "holds no tensors at all")
    if not any(p and p.part not in ("alpha", "dora_scale") for p in parts.values()):
        raise LoraFileError(name, f"holds no LoRA weights ({len(parts)} tensors, e.g. {_examples(parts, 3)}) — is it "
                                  "a checkpoint or an embedding rather than a LoRA?")
    if any(p and p.part == "dora_scale" for p in parts.values()):
        raise LoraFileError(name, "is a DoRA (weight-decomposed LoRA); DoRA cannot be expressed as a plain LoRA and "
                                  "is not supported")
    return parts


def lora_from_state_dict(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                         path=None) -> LoraModel:
    """Canonical LoraModel from a LoRA state dict of any supported format.

    ``path`` only names the source in errors and in the result. Every problem raises one
    :class:`LoraFileError` naming the file and the problem.
    """
    name = str(path) if path is not None else "<LoRA state dict>"

    def fail(problem):
        raise LoraFileError(name, problem)

    metadata = dict(metadata or {})
    parts = _lora_parts(sd, name)
    factor_keys = [k for k, p in parts.items() if p and p.part not in ("alpha", "dora_scale")]

    detection = detect_lora_architecture({k: tuple(v.shape) for k, v in sd.items()})
    arch = detection.architecture

    unknown = [k for k, p in parts.items() if p is None]
    canon = {}
    for k, p in parts.items():
        if p is not None:
            c = module_to_canonical(p.module, arch)
            if c is None:
                unknown.append(k)
            canon[k] = c
    if unknown:
        hint = f" ({detection.reason})" if arch == "unknown" else ""
        fail(f"unknown key scheme: {len(unknown)} of {len(sd)} keys name no SD1.x/SDXL weight the pack "
             f"understands, e.g. {_examples(unknown)}{hint}")

    families = {}
    for k in factor_keys:
        families.setdefault(parts[k].family, k)
    if len(families) > 1:
        fail("mixed key schemes in one file: " + "; ".join(f"{f} (e.g. {k!r})" for f, k in sorted(families.items())))
    family = next(iter(families))

    groups: dict[str, dict[str, str]] = {}
    modules: dict[str, str] = {}
    for k, c in canon.items():
        p = parts[k]
        if modules.setdefault(c, p.module) != p.module:
            fail(f"two different entries patch the same weight {c}: {modules[c]!r} and {p.module!r}")
        if p.part in groups.setdefault(c, {}):
            fail(f"duplicate {p.part} tensor for {p.module!r}")
        groups[c][p.part] = k

    layers: dict[str, LoraLayer] = {}
    notes = []
    refactored = []
    kinds = set()
    for c in sorted(groups):
        keys = groups[c]
        module = modules[c]
        for k in keys.values():
            t = sd[k]
            if not all_finite(t):
                fail(f"layer {module!r}: tensor {k!r} contains NaN or Inf values")
        alpha = _alpha(sd, keys, module, fail)
        factors = {part: sd[k] for part, k in keys.items() if part != "alpha"}
        adapters = {"lokr" if p.startswith("lokr_") else "loha" if p.startswith("hada_") else "lora" for p in factors}
        if len(adapters) > 1:
            fail(f"layer {module!r} mixes {' and '.join(sorted(adapters))} tensors")
        if "up" in factors or "down" in factors:
            kinds.add("lora")
            layers[c] = _lora_layer(factors, alpha, module, c, arch, fail)
            if layers[c].weight_shape[2:] not in ((), (1, 1)):   # LoCon: LoRA on kxk convolutions
                kinds.add("locon")
        elif any(p.startswith("hada_") for p in factors):
            kinds.add("loha")
            delta = _loha_delta(factors, alpha, module, fail)
            layers[c], kept = _refactor(delta, c, arch, module, fail)
            refactored.append((c, layers[c].rank, kept))
        elif any(p.startswith("lokr_") for p in factors):
            kinds.add("lokr")
            delta = _lokr_delta(factors, alpha, module, fail)
            layers[c], kept = _refactor(delta, c, arch, module, fail)
            refactored.append((c, layers[c].rank, kept))
        else:
            fail(f"layer {module!r} has an alpha but no weights")

    if refactored:
        ranks = [r for _, r, _ in refactored]
        notes.append(f"{len(refactored)} LyCORIS layers materialised and re-factorised by truncated SVD keeping "
                     f">= {REFACTOR_ENERGY:.1%} of the energy: ranks {min(ranks)}..{max(ranks)}, "
                     f"lowest energy kept {min(k for _, _, k in refactored):.4%}")
        notes.extend(f"re-factorised {c}: rank {r}, energy kept {kept:.4%}" for c, r, kept in refactored)

    source_dtypes = tuple(sorted({_dtype_name(sd[k]) for k in factor_keys}))
    return LoraModel(layers, architecture=arch, source_format=_format_label(family, kinds, parts.values()),
                     metadata=metadata, source_path=str(path) if path is not None else None,
                     source_dtypes=source_dtypes, notes=notes)


def _format_label(family: str, kinds: set[str], parts) -> str:
    lyco = [f"lycoris-{k}" for k in ("loha", "lokr") if k in kinds]
    if family == "kohya":
        base = ["kohya-locon" if "locon" in kinds else "kohya"] if "lora" in kinds else []
        return "+".join(base + lyco)
    if family == "peft":
        label = "peft" if any(p and p.peft_marker for p in parts) else "diffusers"
    else:
        label = family
    return "+".join([label] + lyco) if lyco else label


def _alpha(sd, keys, module, fail) -> float | None:
    if "alpha" not in keys:
        return None
    t = sd[keys["alpha"]]
    if t.numel() != 1:
        fail(f"layer {module!r}: alpha must be a single number but has shape {list(t.shape)}")
    value = float(t.float().item())
    if not math.isfinite(value):
        fail(f"layer {module!r}: alpha is {value}")
    return value


def _lora_layer(f, alpha, module, canonical, arch, fail) -> LoraLayer:
    if "up" not in f or "down" not in f:
        fail(f"layer {module!r} has a LoRA {'up' if 'up' in f else 'down'} factor but no "
             f"{'down' if 'up' in f else 'up'} factor")
    up, down = f["up"].float(), f["down"].float()
    if up.ndim not in (2, 4) or down.ndim not in (2, 4):
        fail(f"layer {module!r}: LoRA factors must be 2-D or 4-D, got up {list(up.shape)} and down {list(down.shape)}")
    rank = down.shape[0]
    if rank == 0 or up.shape[1] == 0:
        fail(f"layer {module!r} has rank 0 (up {list(up.shape)}, down {list(down.shape)})")
    if up.shape[1] != rank:
        fail(f"layer {module!r}: inner ranks differ: up {list(up.shape)} has {up.shape[1]} columns but down "
             f"{list(down.shape)} has {rank} rows")
    if "mid" in f:
        mid = f["mid"].float()
        if mid.ndim != 4 or mid.shape[:2] != (rank, rank) or down.ndim != 4 or down.shape[2:] != (1, 1):
            fail(f"layer {module!r}: lora_mid {list(mid.shape)} does not fit down {list(down.shape)} "
                 f"(expected [{rank}, {rank}, kh, kw] and a [{rank}, c, 1, 1] down)")
        # Tucker: the mid core carries the spatial kernel; folding it into down is exact and keeps the rank.
        down = torch.einsum("ij...,jc->ic...", mid, down.flatten(1))
    natural = (up.shape[0], *down.shape[1:])
    return LoraLayer(up.flatten(1), down.flatten(1), rank if alpha is None else alpha,
                     _weight_shape(natural, canonical, arch))


def _weight_shape(natural, canonical, arch) -> tuple[int, ...]:
    """The patched weight's shape: the model's own where it agrees with the factors (a 2-D ΔW may patch a conv)."""
    m, n = natural[0], math.prod(natural[1:])
    expected = expected_shape(canonical, arch)
    if expected and expected[0] == m and math.prod(expected[1:]) == n:
        return tuple(expected)
    return tuple(natural)


def _loha_delta(f, alpha, module, fail) -> torch.Tensor:
    """ΔW of a LoHa layer, computed as ComfyUI's LoHaAdapter does."""
    need = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    missing = [p for p in need if p not in f]
    if missing or (("hada_t1" in f) != ("hada_t2" in f)):
        fail(f"LoHa layer {module!r} is incomplete (missing {', '.join(missing) or 'hada_t1/hada_t2 pair'})")
    if any(f[p].ndim != 2 for p in need):
        fail(f"LoHa layer {module!r}: its w1/w2 factors must be matrices: {_shapes(f)}")
    w1a, w1b, w2a, w2b = (f[p].float() for p in need)
    rank = w1b.shape[0]
    if rank == 0:
        fail(f"LoHa layer {module!r} has rank 0")
    scale = 1.0 if alpha is None else alpha / rank
    try:
        if "hada_t1" in f:
            m1 = torch.einsum("ijkl,jr,ip->prkl", f["hada_t1"].float(), w1b, w1a)
            m2 = torch.einsum("ijkl,jr,ip->prkl", f["hada_t2"].float(), w2b, w2a)
        else:
            m1, m2 = w1a @ w1b, w2a @ w2b
        return m1 * m2 * scale
    except RuntimeError:
        fail(f"LoHa layer {module!r}: factor shapes do not fit together: {_shapes(f)}")


def _shapes(f) -> str:
    return ", ".join(f"{p} {list(f[p].shape)}" for p in sorted(f))


def _lokr_delta(f, alpha, module, fail) -> torch.Tensor:
    """ΔW of a LoKr layer, computed as ComfyUI's LoKrAdapter does (kron(w1, w2), scaled by alpha/dim)."""
    try:
        dim = None
        if "lokr_w1" in f:
            w1 = f["lokr_w1"].float()
        else:
            w1 = f["lokr_w1_a"].float() @ f["lokr_w1_b"].float()
            dim = f["lokr_w1_b"].shape[0]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"].float()
        else:
            dim = f["lokr_w2_b"].shape[0]
            if "lokr_t2" in f:
                w2 = torch.einsum("ijkl,jr,ip->prkl", f["lokr_t2"].float(), f["lokr_w2_b"].float(),
                                  f["lokr_w2_a"].float())
            else:
                w2 = f["lokr_w2_a"].float() @ f["lokr_w2_b"].float()
        if dim == 0:
            fail(f"LoKr layer {module!r} has rank 0")
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        return torch.kron(w1, w2) * scale
    except KeyError as err:
        fail(f"LoKr layer {module!r} is incomplete (missing {err.args[0]})")
    except (RuntimeError, IndexError):    # IndexError: a factor of too few dimensions
        fail(f"LoKr layer {module!r}: factor shapes do not fit together: {_shapes(f)}")


def _refactor(delta: torch.Tensor, canonical: str, arch: str, module: str, fail) -> tuple[LoraLayer, float]:
    """Smallest-rank LoRA keeping >= REFACTOR_ENERGY of ||ΔW||_F^2, and the share actually kept."""
    if delta.ndim < 2 or delta.numel() == 0:
        fail(f"layer {module!r}: its factors make a {list(delta.shape)} update, not a weight")
    if not torch.isfinite(delta).all():
        fail(f"layer {module!r}: its update overflows (values too large to multiply out)")
    shape = _weight_shape(tuple(delta.shape), canonical, arch)
    mat = delta.reshape(delta.shape[0], -1).double()
    try:
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    except torch.linalg.LinAlgError:
        fail(f"layer {module!r}: its update cannot be factorised (the SVD did not converge)")
    energy = s.square()
    total = float(energy.sum())
    if total == 0.0:
        r, kept = 1, 1.0
    else:
        cum = torch.cumsum(energy, 0) / total
        r = int(torch.searchsorted(cum, torch.tensor(REFACTOR_ENERGY, dtype=cum.dtype)).item()) + 1
        r = min(r, s.numel())
        kept = float(cum[r - 1])
    root = s[:r].sqrt()
    # Split the singular values evenly so neither factor over/underflows when stored as fp16.
    up = (u[:, :r] * root).float()
    down = (root[:, None] * vh[:r]).float()
    return LoraLayer(up, down, float(r), shape), kept


# --- writing ----------------------------------------------------------------------------------------

def to_kohya_state_dict(lora: LoraModel, architecture: str, dtype: torch.dtype = torch.float16
                        ) -> dict[str, torch.Tensor]:
    """kohya/SAI tensors of a LoRA: ``<name>.lora_down.weight`` [k, *weight_shape[1:]],
    ``<name>.lora_up.weight`` [m, k] (+ [1, 1] for conv weights) and a scalar ``<name>.alpha``.

    The tensors are on the CPU whatever device the LoRA is on: files and hashes need host bytes, and ComfyUI keeps
    LoRA patches on the CPU (it moves each to the weight's device when it patches), as its own loader does."""
    out = {}
    limit = torch.finfo(dtype).max
    for key in sorted(lora.layers):
        layer = lora.layers[key]
        name = canonical_to_kohya(key, architecture)
        k = layer.rank
        ws = layer.weight_shape
        up, down = layer.up, layer.down
        big_up, big_down = float(up.abs().max()), float(down.abs().max())
        if max(big_up, big_down) > limit and big_up > 0 and big_down > 0:
            # only the product counts: share the magnitude evenly so both factors fit the stored dtype
            c = math.sqrt(big_down / big_up)
            up, down = up * c, down / c
        down = down.reshape(k, *ws[1:])
        up = up.reshape(ws[0], k, *([1] * (len(ws) - 2)))
        out[f"{name}.lora_down.weight"] = down.to(device="cpu", dtype=dtype).contiguous()
        out[f"{name}.lora_up.weight"] = up.to(device="cpu", dtype=dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(layer.alpha), dtype=torch.float32)
    return out


def _format_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def lora_metadata(lora: LoraModel, architecture: str, output_name: str,
                  extra_metadata: dict[str, str] | None = None) -> dict[str, str]:
    """kohya + SAI ModelSpec metadata for a written LoRA, the LoRA's own ``lorax.*`` provenance (a transfer
    result carries its report's), then ``extra_metadata``."""
    ranks = {layer.rank for layer in lora.layers.values()}
    alphas = {float(layer.alpha) for layer in lora.layers.values()}
    md = {
        "ss_network_module": "networks.lora",
        # kohya's own resize tool writes "Dynamic" when the rank varies per layer
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": _format_number(alphas.pop()) if len(alphas) == 1 else "Dynamic",
        "ss_base_model_version": BASE_MODEL_VERSION[architecture],
        "ss_output_name": output_name,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[architecture],
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION[architecture],
        "modelspec.resolution": MODELSPEC_RESOLUTION[architecture],
        "modelspec.title": lora.metadata.get("modelspec.title") or output_name,
    }
    tags = _fit_tag_frequency(lora.metadata.get("ss_tag_frequency"))    # the trigger words
    if tags is not None:
        md["ss_tag_frequency"] = tags
    md.update({k: v for k, v in lora.metadata.items() if k.startswith("lorax.")})
    md.update(extra_metadata or {})
    return md


def _fit_tag_frequency(text: str | None) -> str | None:
    """kohya's ``ss_tag_frequency`` ({dataset: {tag: count}}) within the metadata size limit: when the source's
    list is larger, the most frequent tags of each dataset (trigger words are the frequent ones); None if
    there is nothing that can be kept."""
    if text is None or len(text) <= MAX_METADATA_VALUE_CHARS:
        return text
    try:
        freq = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(freq, dict) or not all(isinstance(tags, dict) for tags in freq.values()):
        return None

    def count(item):
        n = item[1]
        return n if isinstance(n, (int, float)) and math.isfinite(n) else 0

    ranked = {d: sorted(tags.items(), key=count, reverse=True) for d, tags in freq.items()}
    keep = max((len(tags) for tags in ranked.values()), default=0)
    while keep > 1:
        keep //= 2
        fitted = json.dumps({d: dict(tags[:keep]) for d, tags in ranked.items()}, ensure_ascii=False)
        if len(fitted) <= MAX_METADATA_VALUE_CHARS:
            return fitted
    return None


def _check_metadata(md: dict, path: Path):
    for k, v in md.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise LoraFileError(path, f"metadata {k!r} must map a string to a string, got {type(v).__name__}")
        for what, s in (("name", k), ("value", v)):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise LoraFileError(path, f"metadata {what} of {k[:60]!r} is not valid UTF-8 text") from None
        if len(v) > MAX_METADATA_VALUE_CHARS:
            raise LoraFileError(path, f"metadata value of {k!r} is too large ({len(v)} characters; the limit "
                                      f"is {MAX_METADATA_VALUE_CHARS})")


def write_lora(lora: LoraModel, path, *, architecture: str, extra_metadata: dict[str, str] | None = None,
               dtype: torch.dtype = torch.float16) -> Path:
    """Write ``lora`` as a kohya/SAI ``.safetensors`` LoRA for ``architecture`` ("sd1" or "sdxl").

    Atomic: the file is written next to its destination and renamed over it only when complete, so a
    failure leaves any previous file of that name untouched and no partial file behind.
    """
    path = Path(path)
    sd, md = prepare_lora_file(lora, path, architecture=architecture, extra_metadata=extra_metadata, dtype=dtype)
    return save_lora_file(sd, md, path)


def prepare_lora_file(lora: LoraModel, path: Path, *, architecture: str, extra_metadata: dict[str, str] | None = None,
                      dtype: torch.dtype = torch.float16) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata :func:`write_lora` writes to ``path``, after every check of the inputs."""
    if architecture not in BASE_MODEL_VERSION:
        raise LoraFileError(path, f"cannot write a LoRA for architecture {architecture!r} (use 'sd1' or 'sdxl')")
    if not lora.layers:
        raise LoraFileError(path, "nothing to write: the LoRA has no layers")
    if not path.parent.is_dir():
        raise OutputPathError(f"{path}: the folder {path.parent} does not exist")
    sd = to_kohya_state_dict(lora, architecture, dtype)
    too_large = sorted(k for k, t in sd.items() if not all_finite(t))
    if too_large:
        raise LoraFileError(path, f"{len(too_large)} tensors hold values too large for {_dtype_name(sd[too_large[0]])} "
                                  f"(e.g. {too_large[0]!r}); lower the LoRA's strength")
    # a file name that is not UTF-8 (Python keeps its bytes as lone surrogates) cannot go into the metadata as is
    md = lora_metadata(lora, architecture, os.fsencode(path.stem).decode("utf-8", "replace"), extra_metadata)
    _check_metadata(md, path)
    return sd, md


def save_lora_file(sd: dict[str, torch.Tensor], md: dict[str, str], path: Path) -> Path:
    """Write prepared tensors and metadata to ``path`` atomically (see :func:`write_lora`)."""
    _check_metadata(md, path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        safetensors.torch.save_file(sd, tmp, metadata=md)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OutputPathError(f"{path}: cannot be written ({err.strerror or err})") from err
        if isinstance(err, safetensors.SafetensorError):
            # how safetensors reports a failed write: "Error while serializing: I/O error: <reason> (os error N)"
            reason = str(err).rpartition("I/O error: ")[2] or str(err)
            raise OutputPathError(f"{path}: cannot be written ({reason})") from err
        raise
    return path
