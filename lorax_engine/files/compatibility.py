"""Which inputs a transfer accepts, decided before any work (METHOD §4, last paragraph).

SD1.5 and SDXL share about 50 UNet weights by name and shape, and CLIP-L whole. So a LoRA "fits" a model of
the other family in part, and those layers would meet identical weights and pass through: an SDXL-on-SDXL copy
that reads like a good SD1.5 transfer. The architectures are known before anything is computed (read from key
names and shapes, files/architectures.py), so the pairing is checked on them first and refused in one line
that says what is wrong and what to pick instead; only a LoRA whose keys cannot tell SD1.x from SDXL is judged
by whether its layers exist in the source model.
"""
from __future__ import annotations

import math

from ..errors import ArchitectureError, IncompatibleLoraError
from .lora import LoraLayer, LoraModel
from .provenance import UNKNOWN_MODEL

# a checkpoint's architecture -> the LoRA architecture trained on it (SSD-1B and Vega LoRAs read as "sdxl")
LORA_FAMILY = {"sd1": "sd1", "sdxl": "sdxl", "ssd1b": "sdxl", "vega": "sdxl"}
# source family -> target families the pack carries LoRAs to
DIRECTIONS = {"sd1": ("sd1", "sdxl"), "sdxl": ("sdxl",)}
LABELS = {"sd1": "SD1.5", "sdxl": "SDXL", "ssd1b": "SSD-1B", "vega": "Segmind Vega"}
SD15_EXAMPLE = "v1-5-pruned-emaonly"


def layer_fits(layer: LoraLayer, shape) -> bool:
    """Whether ``layer`` patches a weight of ``shape`` (conv kernels compared as ``[out, in*kh*kw]`` matrices)."""
    shape = tuple(shape or ())
    return bool(shape) and (shape[0], math.prod(shape[1:])) == (layer.up.shape[0], math.prod(layer.down.shape[1:]))


def _model(provider, role: str) -> str:
    name = getattr(provider, "name", UNKNOWN_MODEL)
    return f"the {role} model" if name == UNKNOWN_MODEL else f"the {role} model {name}"


def _kind(provider) -> str:
    """What a model is, in words: its family, or the evidence that it is none the pack knows."""
    arch = provider.architecture
    if arch in LABELS:
        return LABELS[arch]
    evidence = getattr(provider, "architecture_evidence", "")
    return f"not a model LoRA-X knows ({evidence})" if evidence else "not a model LoRA-X knows"


def _trained_on(family: str, lora: str = "it") -> str:
    example = f" (e.g. {SD15_EXAMPLE})" if family == "sd1" else ""
    return f"the {LABELS[family]} checkpoint {lora} was trained on{example}"


def check_model_pair(source, target, *, source_family: str | None = None, target_family: str | None = None):
    """Refuse a source or target model the transfer cannot use, or a direction it does not carry LoRAs in;
    ``source_family`` / ``target_family`` narrow what is accepted (the one-node loader: "sd1" -> "sdxl")."""
    src, tgt = LORA_FAMILY.get(source.architecture), LORA_FAMILY.get(target.architecture)
    if tgt is None or (target_family is not None and tgt != target_family):
        wanted = [LABELS[arch] for arch, family in LORA_FAMILY.items() if target_family in (None, family)]
        listed = " and ".join([", ".join(wanted[:-1]), wanted[-1]] if len(wanted) > 1 else wanted)
        raise ArchitectureError(f"{_model(target, 'target')} is {_kind(target)}: LoRA-X writes LoRAs for {listed} "
                                "only")
    if src is None or (source_family is not None and src != source_family):
        family = source_family or "sd1"
        raise ArchitectureError(f"{_model(source, 'source')} is {_kind(source)}, not {LABELS[family]}: pick "
                                f"{_trained_on(family, 'the LoRA')}")
    if tgt not in DIRECTIONS[src]:
        raise ArchitectureError(f"{_model(source, 'source')} is {LABELS[src]} and {_model(target, 'target')} is "
                                f"{LABELS[tgt]}: LoRA-X carries LoRAs from SD1.5 to SD1.5 or SDXL, and from SDXL to "
                                "SDXL-family models")


def check_transfer_inputs(lora: LoraModel, source, target, *, lora_name: str | None = None,
                          source_family: str | None = None, target_family: str | None = None):
    """Refuse, in one line, a LoRA, source model or target model that the transfer does not expect: the LoRA's
    architecture must be the source model's, the target one the pack writes for (``source_family`` /
    ``target_family`` narrow both, as in :func:`check_model_pair`). Reads names and shapes only: call it before
    any hashing or basis work. ``lora_name``: how to name the LoRA (default its path)."""
    name = lora_name or lora.source_path or "the LoRA"
    family = lora.architecture if lora.architecture in DIRECTIONS else None    # None: keys do not tell
    actual = LORA_FAMILY.get(source.architecture)
    if family == "sdxl" and (source_family or actual) != "sdxl" and LORA_FAMILY.get(target.architecture) == "sdxl":
        raise ArchitectureError(f"{name}: this is already an SDXL LoRA: use Load LoRA (or any SDXL LoRA loader) "
                                "instead; LoRA-X carries SD1.5 LoRAs to SDXL")
    if family is not None and actual is not None and family != actual:
        raise ArchitectureError(f"{name} is an {LABELS[family]} LoRA, but {_model(source, 'source')} is "
                                f"{_kind(source)}: pick {_trained_on(family)}")
    check_model_pair(source, target, source_family=source_family or family, target_family=target_family)
    missing = [k for k, layer in lora.layers.items() if not (k in source and layer_fits(layer, source.shape(k)))]
    if len(missing) == len(lora.layers):
        raise IncompatibleLoraError(f"{name} does not fit {_model(source, 'source')}: none of its {len(lora.layers)} "
                                    "layers exists there with the same shape; the source model must be the one the "
                                    "LoRA was trained on")
    if missing and family is None:
        # keys that cannot tell SD1.x from SDXL (nor from SD 2.x, which shares SD1.5's names): only a full fit
        # shows the LoRA was trained on this model
        raise IncompatibleLoraError(f"{name}: its keys do not tell SD1.x from SDXL, and {len(missing)} of its "
                                    f"{len(lora.layers)} layers do not exist in {_model(source, 'source')} with the "
                                    "same shape; the source model must be the one the LoRA was trained on")
