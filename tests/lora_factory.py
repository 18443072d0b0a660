"""Synthetic LoRA files in every supported scheme, built from the same random factors.

Module names come from ComfyUI's own key map (``lorax_zoo/tables/<arch>_lora_keys.json``, what
``model_lora_keys_unet`` + ``model_lora_keys_clip`` produce), never from the engine under test, and shapes
from the real layout tables. Expected ΔW are computed here from the format's formulas, independently of
``lorax_engine``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

import lorax_zoo

# A few layers of every kind per architecture: self/cross attention, feed-forward, proj_in (1x1 conv in
# SD1.5, linear in SDXL), 3x3 and 1x1 resnet convs, the upsampler whose name differs between the two, and
# text-encoder attention / MLP.
TARGETS = {
    "sd1": [
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_out.0.weight",
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight",
        "diffusion_model.input_blocks.4.1.proj_in.weight",
        "diffusion_model.input_blocks.4.0.in_layers.2.weight",
        "diffusion_model.input_blocks.4.0.skip_connection.weight",
        "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight",
        "diffusion_model.output_blocks.2.1.conv.weight",
        "diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.2.weight",
        "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "clip_l.transformer.text_model.encoder.layers.11.mlp.fc1.weight",
    ],
    "sdxl": [
        "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight",
        "diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight",
        "diffusion_model.input_blocks.4.1.proj_in.weight",
        "diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "diffusion_model.middle_block.1.transformer_blocks.3.ff.net.2.weight",
        "diffusion_model.output_blocks.0.1.transformer_blocks.0.attn1.to_out.0.weight",
        "diffusion_model.output_blocks.2.2.conv.weight",
        "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "clip_g.transformer.text_model.encoder.layers.31.mlp.fc2.weight",
    ],
}
TABLE = {"sd1": "sd15", "sdxl": "sdxl"}
# The spellings lora_state_dict can write (kohya: SGM names; kohya_diffusers: diffusers module names).
SCHEMES = ("kohya", "kohya_diffusers", "diffusers_old", "diffusers", "peft", "peft_default", "lora_dot")


def model_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Canonical key -> shape of every weight of the real model (UNet + text encoders)."""
    out = {f"diffusion_model.{k}": v for k, v in lorax_zoo.key_table(f"{TABLE[arch]}_unet").items()}
    out.update({f"clip_l.transformer.{k}": v for k, v in lorax_zoo.key_table("clip_l").items()})
    if arch == "sdxl":
        out.update({f"clip_g.transformer.{k}": v for k, v in lorax_zoo.key_table("clip_g").items()})
    return out


def comfy_names(arch: str, canonical: str) -> list[str]:
    """Every module name ComfyUI maps to ``canonical``."""
    return sorted(k for k, v in lorax_zoo.lora_key_map(TABLE[arch]).items() if v == canonical)


def module_name(arch: str, canonical: str, scheme: str) -> str:
    """The module name of ``canonical`` in ``scheme``, taken from (or minimally respelled from) ComfyUI's map."""
    names = comfy_names(arch, canonical)

    def one(pred):
        hits = [n for n in names if pred(n)]
        assert len(hits) == 1, (canonical, scheme, hits)
        return hits[0]

    text = not canonical.startswith("diffusion_model.")
    te = "lora_te_" if arch == "sd1" else ("lora_te2_" if canonical.startswith("clip_g") else "lora_te1_")
    if scheme in ("kohya", "kohya_diffusers") and text:
        return one(lambda n: n.startswith(te))
    if scheme == "kohya":
        sgm = "lora_unet_" + canonical[len("diffusion_model."):-len(".weight")].replace(".", "_")
        return one(lambda n: n == sgm)
    if scheme == "kohya_diffusers":
        sgm = "lora_unet_" + canonical[len("diffusion_model."):-len(".weight")].replace(".", "_")
        return one(lambda n: n.startswith("lora_unet_") and n != sgm)
    # dotted schemes
    if text:
        prefix = "text_encoder_2." if canonical.startswith("clip_g") else "text_encoder."
        dotted = one(lambda n: n.startswith(prefix))
        comp, path = prefix, dotted[len(prefix):]
    else:
        dotted = one(lambda n: n.startswith("unet."))       # e.g. unet.down_blocks...attn1.processor.to_q
        comp, path = "unet.", dotted[len("unet."):]
    if scheme == "diffusers_old":
        return dotted
    path = path.replace(".processor.", ".")
    if path.endswith(".to_out"):
        path += ".0"
    if scheme in ("peft", "peft_default"):
        return ("" if comp == "unet." else comp) + "base_model.model." + path
    return comp + path


def tensor_names(module: str, scheme: str, text: bool) -> tuple[str, str]:
    """(up, down) tensor names of a module in ``scheme``."""
    if scheme in ("kohya", "kohya_diffusers"):
        return f"{module}.lora_up.weight", f"{module}.lora_down.weight"
    if scheme == "diffusers_old":
        if text:
            return f"{module}.lora_linear_layer.up.weight", f"{module}.lora_linear_layer.down.weight"
        return f"{module}_lora.up.weight", f"{module}_lora.down.weight"
    if scheme == "peft_default":
        return f"{module}.lora_B.default.weight", f"{module}.lora_A.default.weight"
    if scheme in ("diffusers", "peft"):
        return f"{module}.lora_B.weight", f"{module}.lora_A.weight"
    if scheme == "lora_dot":
        return f"{module}.lora.up.weight", f"{module}.lora.down.weight"
    raise ValueError(scheme)


@dataclass
class Factors:
    up: torch.Tensor          # [m, k]
    down: torch.Tensor        # [k, n], n = prod(shape[1:])
    alpha: float | None
    shape: tuple[int, ...]    # the patched weight's shape

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        scale = 1.0 if self.alpha is None else self.alpha / self.rank
        return scale * (self.up.double() @ self.down.double())


def random_factors(arch: str, rank: int = 4, seed: int = 0, alpha: float | None = 2.0,
                   targets=None) -> dict[str, Factors]:
    """Seeded factors for ``targets`` (default TARGETS[arch]); values are exactly representable in fp16."""
    shapes = model_shapes(arch)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in targets or TARGETS[arch]:
        shape = shapes[key]
        m, n = shape[0], math.prod(shape[1:])
        # rounding through fp16 first makes every dtype hold the same numbers
        up = (torch.randn(m, rank, generator=gen) * 0.05).half().float()
        down = (torch.randn(rank, n, generator=gen) / math.sqrt(n)).half().float()
        out[key] = Factors(up, down, alpha, shape)
    return out


def lora_state_dict(factors: dict[str, Factors], arch: str, scheme: str, dtype=torch.float16,
                    with_alpha: bool = True) -> dict[str, torch.Tensor]:
    """The factors spelled in ``scheme``; conv factors are 4-D (down [k, c, kh, kw], up [m, k, 1, 1])."""
    sd = {}
    for key, f in factors.items():
        text = not key.startswith("diffusion_model.")
        module = module_name(arch, key, scheme)
        up_name, down_name = tensor_names(module, scheme, text)
        up, down = f.up, f.down
        if len(f.shape) == 4:
            up = up.reshape(f.shape[0], f.rank, 1, 1)
            down = down.reshape(f.rank, *f.shape[1:])
        sd[up_name] = up.to(dtype)
        sd[down_name] = down.to(dtype)
        if with_alpha and f.alpha is not None:
            sd[f"{module}.alpha"] = torch.tensor(f.alpha, dtype=dtype)
    return sd


def locon_mid_state_dict(arch: str, key: str, rank: int = 3, alpha: float = 1.5, seed: int = 1):
    """A kohya LoCon conv layer with a Tucker ``lora_mid`` core, and its ΔW [m, c*kh*kw] computed here."""
    m, c, kh, kw = model_shapes(arch)[key]
    gen = torch.Generator().manual_seed(seed)
    up = torch.randn(m, rank, 1, 1, generator=gen) * 0.05
    mid = torch.randn(rank, rank, kh, kw, generator=gen) * 0.3
    down = torch.randn(rank, c, 1, 1, generator=gen) / math.sqrt(c)
    name = module_name(arch, key, "kohya")
    sd = {f"{name}.lora_up.weight": up, f"{name}.lora_mid.weight": mid, f"{name}.lora_down.weight": down,
          f"{name}.alpha": torch.tensor(alpha)}
    delta = torch.zeros(m, c, kh, kw, dtype=torch.float64)
    for i in range(rank):
        for j in range(rank):
            # ΔW[o, ch, a, b] += up[o, i] * mid[i, j, a, b] * down[j, ch]
            delta += (up[:, i, 0, 0].double()[:, None, None, None] * mid[i, j].double()[None, None]
                      * down[j, :, 0, 0].double()[None, :, None, None])
    return sd, (alpha / rank) * delta.reshape(m, -1)


def loha_state_dict(arch: str, keys, rank: int = 4, alpha: float | None = 2.0, seed: int = 2, tucker: bool = False):
    """A LyCORIS LoHa over ``keys`` (kohya names) and the ΔW [m, n] of each layer, computed here."""
    shapes = model_shapes(arch)
    gen = torch.Generator().manual_seed(seed)
    sd, expected = {}, {}
    for key in keys:
        shape = shapes[key]
        m, n = shape[0], math.prod(shape[1:])
        name = module_name(arch, key, "kohya")
        scale = 1.0 if alpha is None else alpha / rank
        if tucker:
            _, c, kh, kw = shape
            # CP form: W_i[o, ch, a, b] = sum_{p,q} t_i[p, q, a, b] * a_i[p, o] * b_i[q, ch]
            mats = {}
            for i in (1, 2):
                t = torch.randn(rank, rank, kh, kw, generator=gen) * 0.5
                a = torch.randn(rank, m, generator=gen) * 0.1
                b = torch.randn(rank, c, generator=gen) / math.sqrt(c)
                sd[f"{name}.hada_t{i}"], sd[f"{name}.hada_w{i}_a"], sd[f"{name}.hada_w{i}_b"] = t, a, b
                full = torch.zeros(m, c, kh, kw, dtype=torch.float64)
                for p in range(rank):
                    for q in range(rank):
                        full += (t[p, q].double()[None, None] * a[p].double()[:, None, None, None]
                                 * b[q].double()[None, :, None, None])
                mats[i] = full
            expected[key] = (scale * mats[1] * mats[2]).reshape(m, n)
        else:
            w1a = torch.randn(m, rank, generator=gen) * 0.1
            w1b = torch.randn(rank, n, generator=gen) / math.sqrt(n)
            w2a = torch.randn(m, rank, generator=gen) * 0.1
            w2b = torch.randn(rank, n, generator=gen) / math.sqrt(n)
            sd.update({f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b,
                       f"{name}.hada_w2_a": w2a, f"{name}.hada_w2_b": w2b})
            # Hadamard product of the two low-rank products, element by element
            expected[key] = scale * (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double())
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd, expected


def _kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product of two matrices, by its definition (block (i, j) = a[i, j] * b)."""
    rows = [torch.cat([a[i, j] * b for j in range(a.shape[1])], dim=1) for i in range(a.shape[0])]
    return torch.cat(rows, dim=0)


def lokr_state_dict(arch: str, keys, factor: int = 4, rank: int = 4, alpha: float | None = 2.0, seed: int = 3,
                    w2_lowrank: bool = True):
    """A LyCORIS LoKr: ΔW = scale * kron(w1, w2), w1 [f, f] full, w2 = w2_a @ w2_b (or full); ΔW computed here."""
    shapes = model_shapes(arch)
    gen = torch.Generator().manual_seed(seed)
    sd, expected = {}, {}
    for key in keys:
        shape = shapes[key]
        m, n = shape[0], math.prod(shape[1:])
        name = module_name(arch, key, "kohya")
        w1 = torch.randn(factor, factor, generator=gen)
        if w2_lowrank:
            w2a = torch.randn(m // factor, rank, generator=gen) * 0.1
            w2b = torch.randn(rank, n // factor, generator=gen) / math.sqrt(n)
            sd.update({f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b})
            w2 = w2a.double() @ w2b.double()
            scale = 1.0 if alpha is None else alpha / rank
        else:
            w2 = torch.randn(m // factor, n // factor, generator=gen) * 0.01
            sd.update({f"{name}.lokr_w1": w1, f"{name}.lokr_w2": w2})
            w2 = w2.double()
            scale = 1.0   # ComfyUI ignores alpha when neither factor is low-rank
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
        expected[key] = scale * _kron(w1.double(), w2)
    return sd, expected


def save(sd: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> Path:
    path = Path(path)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path
