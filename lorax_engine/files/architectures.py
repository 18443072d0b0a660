"""UNet configurations of the supported model families and architecture detection from keys and shapes.

Detection never trusts file metadata (many LoRAs carry none, some carry wrong values): it reads the
names and shapes of the tensors, and always returns a short human-readable reason (the evidence).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

ARCHITECTURES = ("sd1", "sdxl")


@dataclass(frozen=True)
class UNetConfig:
    """The structural parameters of an SD-style UNet (``openaimodel.UNetModel``).

    ``transformer_depth`` has one entry per input res block (level by level); ``transformer_depth_output``
    one entry per output block, stored level by level from the highest resolution, so output block 0
    (the lowest resolution) uses its last entry. ``transformer_depth_middle`` -1 means the middle block
    holds a single res block and no attention; -2 means there is no middle block.
    """

    name: str
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    transformer_depth: tuple[int, ...]
    transformer_depth_output: tuple[int, ...]
    transformer_depth_middle: int
    context_dim: int | None
    use_linear_in_transformer: bool
    adm_in_channels: int | None = None
    in_channels: int = 4
    out_channels: int = 4


SD15 = UNetConfig("SD1.5", 320, (1, 2, 4, 4), (2, 2, 2, 2), (1, 1, 1, 1, 1, 1, 0, 0),
                  (1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0), 1, 768, False)
SDXL = UNetConfig("SDXL", 320, (1, 2, 4), (2, 2, 2), (0, 0, 2, 2, 10, 10),
                  (0, 0, 0, 2, 2, 2, 10, 10, 10), 10, 2048, True, 2816)
SSD1B = replace(SDXL, name="SSD-1B", transformer_depth=(0, 0, 2, 2, 4, 4),
                transformer_depth_output=(0, 0, 0, 1, 1, 2, 10, 4, 4), transformer_depth_middle=-1)
VEGA = replace(SDXL, name="Segmind Vega", transformer_depth=(0, 0, 1, 1, 2, 2),
               transformer_depth_output=(0, 0, 0, 1, 1, 1, 2, 2, 2), transformer_depth_middle=-1)

UNET_CONFIGS: dict[str, UNetConfig] = {"sd15": SD15, "sdxl": SDXL, "ssd1b": SSD1B, "vega": VEGA}

# Text-encoder widths: SD1.x and SDXL share CLIP-L (768); SDXL adds OpenCLIP-G (1280); SD2 uses OpenCLIP-H (1024).
CLIP_L_WIDTH, CLIP_G_WIDTH, CLIP_H_WIDTH = 768, 1280, 1024


def lora_unet_config(architecture: str) -> UNetConfig:
    """The UNet layout a LoRA of ``architecture`` is resolved against.

    SSD-1B and Vega LoRAs count as "sdxl": their blocks are a subset of SDXL's. An "unknown" LoRA with
    SD-style names is resolved against the SD1.5 layout (SD2.x shares it), so it can still be inspected.
    """
    return SDXL if architecture == "sdxl" else SD15


class Detection(NamedTuple):
    architecture: str            # "sd1" | "sdxl" | "unknown" (checkpoints: also "ssd1b" | "vega")
    reason: str                  # the evidence, for people
    unet_config: UNetConfig | None = None   # checkpoints only: the layout read from the weights


# --- LoRA detection -------------------------------------------------------------------------------

# Keys of other model families (DiT-style transformers) whose LoRAs this pack cannot handle.
_FOREIGN = [
    (re.compile(r"double_blocks|single_blocks|single_transformer_blocks"), "Flux"),
    (re.compile(r"joint_blocks|context_block|x_block"), "SD3"),
    (re.compile(r"lora_transformer_|(^|[._])transformer[._]transformer_blocks"), "a DiT model (Flux/SD3-like)"),
]
_CROSS_KV = re.compile(r"attn2[._](processor[._])?to_[kv](?=[._]|$)")
# tensor suffixes whose shape[1] is the layer's input width (the "down" factor)
_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora_A.default.weight", "_lora.down.weight",
                  ".lora.down.weight", ".lora_linear_layer.down.weight", ".hada_w1_b", ".hada_w2_b")
_TE2 = re.compile(r"^(lora_te2_|text_encoder_2\.)")
_TE1 = re.compile(r"^lora_te1_")
_TE = re.compile(r"^(lora_te_|text_encoder\.)")
# SD1.x-only stages: 320-channel attention and the fourth resolution level.
_SD1_ONLY = re.compile(r"(down_blocks[._]0[._]attentions|up_blocks[._]3[._]attentions|input_blocks[._][12][._]1[._]"
                       r"|output_blocks[._](9|10|11)[._]1[._]|down_blocks[._]3|up_blocks[._]3"
                       r"|input_blocks[._](10|11)[._]|output_blocks[._](9|10|11)[._])")
_DEEP = re.compile(r"transformer_blocks[._]([1-9]\d*)(?=[._])")
_PROJ = re.compile(r"[._]proj_(in|out)(?=[._])")


def _down_width(key: str, shape: Sequence[int]) -> int | None:
    if len(shape) >= 2 and any(key.endswith(s) for s in _DOWN_SUFFIXES):
        return int(shape[1])
    return None


def detect_lora_architecture(shapes: Mapping[str, Sequence[int]]) -> Detection:
    """"sd1", "sdxl" or "unknown" for a LoRA, from its tensor names and shapes (never its metadata).

    ``shapes`` maps every tensor name of the file to its shape.
    """
    keys = list(shapes)
    for pattern, family in _FOREIGN:
        hit = next((k for k in keys if pattern.search(k)), None)
        if hit:
            return Detection("unknown", f"keys of {family} ({hit!r}); only SD1.x and SDXL LoRAs are supported")

    votes: dict[str, str] = {}     # architecture -> first piece of evidence
    weak: dict[str, str] = {}      # evidence that counts only when nothing else decides

    def vote(arch, evidence, strong=True):
        (votes if strong else weak).setdefault(arch, evidence)

    for k in keys:
        if _CROSS_KV.search(k):
            w = _down_width(k, shapes[k])
            if w == 768:
                vote("sd1", f"cross-attention to_k/to_v read a 768-wide context (CLIP-L): {k!r}")
            elif w == 2048:
                vote("sdxl", f"cross-attention to_k/to_v read a 2048-wide context (CLIP-L + OpenCLIP-G): {k!r}")
            elif w == 1024:
                vote("sd2", f"cross-attention to_k/to_v read a 1024-wide context (SD 2.x): {k!r}")
            elif w is not None:
                vote("other", f"cross-attention to_k/to_v read a {w}-wide context: {k!r}")
    for k in keys:
        if _TE2.search(k):
            vote("sdxl", f"second text encoder (OpenCLIP-G) keys: {k!r}")
        elif _TE1.search(k):
            vote("sdxl", f"SDXL text-encoder naming (lora_te1_): {k!r}")
        elif _TE.search(k):
            w = _down_width(k, shapes[k])
            if w == CLIP_L_WIDTH or (w == 4 * CLIP_L_WIDTH and "fc2" in k):
                # SDXL's first text encoder is the same CLIP-L: decisive only without other evidence
                vote("sd1", f"single 768-wide text encoder (CLIP-L): {k!r}", strong=False)
            elif w in (CLIP_H_WIDTH, 4 * CLIP_H_WIDTH):
                vote("sd2", f"single 1024-wide text encoder (OpenCLIP-H, SD 2.x): {k!r}")
    for k in keys:
        if _SD1_ONLY.search(k):
            vote("sd1", f"blocks that exist only in SD1.x (320-channel attention or a 4th level): {k!r}")
        m = _DEEP.search(k)
        if m:
            vote("sdxl", f"transformer_blocks.{m.group(1)} (SD1.x has one transformer block per stage): {k!r}")
        if _PROJ.search(k):
            shape = shapes[k]
            if any(k.endswith(s) for s in (".lora_down.weight", ".lora_up.weight")):
                kind = "1x1 convolutions (SD1.x)" if len(shape) == 4 else "linear (SDXL)"
                vote("sd1" if len(shape) == 4 else "sdxl", f"proj_in/proj_out are {kind}: {k!r}")

    if not votes:
        votes = weak
    if "sd2" in votes:
        return Detection("unknown", f"looks like SD 2.x: {votes['sd2']}")
    if "other" in votes and not ({"sd1", "sdxl"} & set(votes)):
        return Detection("unknown", votes["other"])
    if "sd1" in votes and "sdxl" in votes:
        return Detection("unknown", f"conflicting evidence: {votes['sd1']}; but {votes['sdxl']}")
    for arch in ARCHITECTURES:
        if arch in votes:
            return Detection(arch, votes[arch])
    return Detection("unknown", "no key or shape decides between SD1.x and SDXL")


# --- checkpoint detection -------------------------------------------------------------------------

_INDEX = re.compile(r"(?:^|(?<=\.))(\d+)\.")


def _index_table(keys: set[str]) -> dict[str, set[int]]:
    """``{prefix: indices}`` for every ``prefix{i}.`` in ``keys`` (prefix empty or ending with "."): one pass over
    the keys instead of one per question (a checkpoint has ~2500 names)."""
    table: dict[str, set[int]] = {}
    for k in keys:
        for m in _INDEX.finditer(k):
            table.setdefault(k[:m.start()], set()).add(int(m.group(1)))
    return table


def _count_indices(table: dict[str, set[int]], prefix: str) -> int:
    """How many consecutive ``prefix{i}.`` indices (from 0) occur (``table`` from :func:`_index_table`)."""
    found = table.get(prefix, set())
    n = 0
    while n in found:
        n += 1
    return n


def unet_config_from_keys(keys: Iterable[str], shape_fn: Callable[[str], Sequence[int]],
                          prefix: str) -> UNetConfig | None:
    """The UNet layout read from a checkpoint's weight names and shapes, or None if it is not SD-style."""
    keys = {k[len(prefix):] for k in keys if k.startswith(prefix)}
    if "input_blocks.0.0.weight" not in keys:
        return None
    indices = _index_table(keys)
    mc = int(shape_fn(prefix + "input_blocks.0.0.weight")[0])
    in_ch = int(shape_fn(prefix + "input_blocks.0.0.weight")[1])
    channel_mult, num_res, depth = [], [], []
    context_dim, use_linear = None, False
    n, count = 1, 0
    while True:
        if f"input_blocks.{n}.0.op.weight" in keys or f"input_blocks.{n}.0.conv.weight" in keys:
            num_res.append(count)
            count = 0
        elif f"input_blocks.{n}.0.in_layers.2.weight" in keys:
            out = int(shape_fn(f"{prefix}input_blocks.{n}.0.in_layers.2.weight")[0])
            if count == 0:
                channel_mult.append(out // mc)
            count += 1
            d = _count_indices(indices, f"input_blocks.{n}.1.transformer_blocks.")
            depth.append(d)
            if d:
                k = f"input_blocks.{n}.1.transformer_blocks.0.attn2.to_k.weight"
                if k in keys:
                    context_dim = int(shape_fn(prefix + k)[1])
                use_linear = len(shape_fn(f"{prefix}input_blocks.{n}.1.proj_in.weight")) == 2
        else:
            break
        n += 1
    if count:
        num_res.append(count)
    out_depth = []
    for j in range(_count_indices(indices, "output_blocks.")):
        out_depth.append(_count_indices(indices, f"output_blocks.{j}.1.transformer_blocks."))
    if "middle_block.1.proj_in.weight" in keys:
        mid = _count_indices(indices, "middle_block.1.transformer_blocks.")
        k = "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
        if context_dim is None and k in keys:
            context_dim = int(shape_fn(prefix + k)[1])
        use_linear = use_linear or len(shape_fn(prefix + "middle_block.1.proj_in.weight")) == 2
    elif "middle_block.0.in_layers.0.weight" in keys:
        mid = -1
    else:
        mid = -2
    adm = int(shape_fn(prefix + "label_emb.0.0.weight")[1]) if "label_emb.0.0.weight" in keys else None
    out_ch = int(shape_fn(prefix + "out.2.weight")[0]) if "out.2.weight" in keys else 4
    return UNetConfig("detected", mc, tuple(channel_mult), tuple(num_res), tuple(depth), tuple(out_depth[::-1]),
                      mid, context_dim, use_linear, adm, in_ch, out_ch)


def _unet_prefix(keys: Iterable[str]) -> str | None:
    for k in keys:
        if k.endswith("input_blocks.0.0.weight"):
            return k[: -len("input_blocks.0.0.weight")]
    return None


def detect_checkpoint_architecture(keys: Iterable[str], shape_fn: Callable[[str], Sequence[int]]) -> Detection:
    """"sd1", "sdxl", "ssd1b", "vega" or "unknown" for a base checkpoint (or a bare UNet state dict).

    Decided like ComfyUI's own detection: cross-attention context width (attn2.to_k), the SDXL class
    embedding (label_emb, 2816 wide) and the per-block transformer depths, all read from the weights.
    """
    keys = list(keys)
    prefix = _unet_prefix(keys)
    if prefix is None:
        return Detection("unknown", "no SD-style UNet weights (input_blocks.0.0.weight) found")
    cfg = unet_config_from_keys(keys, shape_fn, prefix)
    depth = cfg.transformer_depth
    if cfg.context_dim == 768 and cfg.model_channels == 320 and not cfg.use_linear_in_transformer \
            and cfg.adm_in_channels is None:
        return Detection("sd1", "768-wide cross-attention context (CLIP-L), 1x1-conv proj_in, no class "
                                f"embedding; transformer depths {list(depth)}", cfg)
    if cfg.context_dim == 2048 and cfg.adm_in_channels == 2816 and cfg.model_channels == 320 \
            and cfg.use_linear_in_transformer:
        for name, arch in (("sdxl", SDXL), ("ssd1b", SSD1B), ("vega", VEGA)):
            if depth == arch.transformer_depth:
                return Detection(name, f"2048-wide cross-attention context, 2816-wide class embedding, input "
                                       f"transformer depths {list(depth)} ({arch.name})", cfg)
        return Detection("unknown", f"SDXL-like, but input transformer depths {list(depth)} match neither "
                                    "SDXL, SSD-1B nor Vega", cfg)
    if cfg.context_dim == 1024:
        return Detection("unknown", "1024-wide cross-attention context: SD 2.x, not supported", cfg)
    return Detection("unknown", f"UNet with context width {cfg.context_dim}, class embedding "
                                f"{cfg.adm_in_channels}, depths {list(depth)} matches no supported model", cfg)
