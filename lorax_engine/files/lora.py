"""The canonical in-memory LoRA: one low-rank update per base weight, keyed by the base weight's name.

Keys are ComfyUI model state-dict keys, the same for every file format a LoRA came from:
``diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight`` for the UNet and
``clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight`` (``clip_g.`` for SDXL's
OpenCLIP-G) for the text encoders.

All subspace math treats a weight of shape ``[m, c, kh, kw]`` as the matrix ``[m, c*kh*kw]``, so a layer
stores its factors as matrices and remembers the shape of the weight it patches.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LoraLayer:
    """ΔW = (alpha / rank) * up @ down, reshaped to ``weight_shape``.

    ``up`` is ``[m, k]`` and ``down`` is ``[k, n]`` with ``n = prod(weight_shape[1:])``.
    """

    up: torch.Tensor
    down: torch.Tensor
    alpha: float
    weight_shape: tuple[int, ...]

    def __post_init__(self):
        self.weight_shape = tuple(int(s) for s in self.weight_shape)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def _float_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """up and down in float32, down placed with up: results live where the LoRA's up factor lives."""
        return self.up.float(), self.down.to(device=self.up.device, dtype=torch.float32)

    def delta(self) -> torch.Tensor:
        """Dense ΔW as a matrix ``[m, n]`` in float32 (for tests and reports; transfers use factors)."""
        up, down = self._float_factors()
        return self.scale * (up @ down)

    def delta_weight(self) -> torch.Tensor:
        """Dense ΔW in the shape of the patched weight."""
        return self.delta().reshape(self.weight_shape)

    def squared_norm(self) -> torch.Tensor:
        """||ΔW||_F^2 as a 0-d tensor on the LoRA's device, from the factors (trace of a k x k product)."""
        up, down = self._float_factors()
        return (self.scale ** 2) * torch.sum((up.T @ up) * (down @ down.T))

    def energy(self) -> float:
        """||ΔW||_F^2 as a number: computed where the factors live, only the scalar reaches the host."""
        return float(self.squared_norm())

    def to(self, device=None, dtype=None) -> LoraLayer:
        return LoraLayer(self.up.to(device=device, dtype=dtype), self.down.to(device=device, dtype=dtype),
                         self.alpha, self.weight_shape)


@dataclass
class LoraModel:
    """A whole LoRA in canonical form plus what is known about where it came from."""

    layers: dict[str, LoraLayer]
    architecture: str = "unknown"          # "sd1", "sdxl" or "unknown"
    source_format: str = "unknown"         # e.g. "kohya", "lycoris-loha", "diffusers", "peft"
    metadata: dict[str, str] = field(default_factory=dict)   # the file's safetensors metadata, as read
    source_path: str | None = None
    source_dtypes: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)           # e.g. re-factorisation ranks and energy kept

    def to(self, device=None, dtype=None) -> LoraModel:
        return LoraModel({k: v.to(device, dtype) for k, v in self.layers.items()}, self.architecture,
                         self.source_format, dict(self.metadata), self.source_path, self.source_dtypes,
                         list(self.notes))

    def unet_keys(self) -> list[str]:
        return sorted(k for k in self.layers if k.startswith("diffusion_model."))

    def text_keys(self) -> list[str]:
        return sorted(k for k in self.layers if not k.startswith("diffusion_model."))
