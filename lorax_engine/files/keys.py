"""LoRA key names: every common scheme parsed into canonical base-weight keys, and back to kohya names.

Canonical keys are ComfyUI model state-dict keys (see :mod:`lorax_engine.files.lora`). A LoRA file key is
split into a *module* (which weight it patches, in the file's naming) and a *part* (which factor:
up, down, alpha, hada_w1_a, ...). Modules are named in one of these schemes:

* kohya / LyCORIS: ``lora_unet_<path with _>``, ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` text encoders,
  where the UNet path is either SGM/ldm (``input_blocks_4_1_...``) or diffusers (``down_blocks_1_...``);
* diffusers (old attention processors, new ``lora_A/lora_B``) and PEFT, dotted, with ``unet.`` /
  ``text_encoder.`` / ``text_encoder_2.`` / ``base_model.model.`` prefixes;
* ComfyUI's generic ``diffusion_model.<path>`` / ``text_encoders.<model key>``.

Underscore names are tokenised with a vocabulary of the module names that occur in these models
(``transformer_blocks``, ``to_out``, ``in_layers``, ``proj_in`` ...), never by splitting every ``_``.
The diffusers <-> ldm correspondence is derived from the UNet configuration by walking the UNet's
structure (:func:`unet_layout`), which also yields the shape of every weight.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from ..errors import ArchitectureError
from .architectures import UNetConfig, lora_unet_config

UNET_PREFIX = "diffusion_model."
TEXT_ENCODER_PREFIXES = {"clip_l": "clip_l.transformer.", "clip_g": "clip_g.transformer."}
TEXT_ENCODER_SIZES = {"clip_l": (12, 768), "clip_g": (32, 1280)}   # layers, hidden width

# --- the UNet structure ---------------------------------------------------------------------------

_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
           ("out_layers.0", "norm2"), ("out_layers.3", "conv2"))
_SKIP = ("skip_connection", "conv_shortcut")
_TRANSFORMER_BLOCK = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                      "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


@dataclass(frozen=True)
class UNetLayout:
    """Every weight of a UNet: ldm module path -> diffusers module path and ldm weight key -> shape."""

    to_diffusers: dict[str, str]
    from_diffusers: dict[str, str]
    shapes: dict[str, tuple[int, ...]]      # canonical key (``diffusion_model.<path>.weight``) -> shape


def _walk_unet(cfg: UNetConfig):
    """Yield ``(ldm module, diffusers module, weight shape)`` for every weight, in model order."""
    mc = cfg.model_channels
    temb = 4 * mc

    def resnet(ldm, dif, c_in, c_out):
        shapes = ((c_in,), (c_out, c_in, 3, 3), (c_out, temb), (c_out,), (c_out, c_out, 3, 3))
        for (a, b), shape in zip(_RESNET, shapes, strict=True):
            yield f"{ldm}.{a}", f"{dif}.{b}", shape
        if c_in != c_out:   # only then does the block need a 1x1 conv on its shortcut
            yield f"{ldm}.{_SKIP[0]}", f"{dif}.{_SKIP[1]}", (c_out, c_in, 1, 1)

    def attention(ldm, dif, c, depth):
        proj = (c, c) if cfg.use_linear_in_transformer else (c, c, 1, 1)
        ctx = cfg.context_dim or c
        yield f"{ldm}.norm", f"{dif}.norm", (c,)
        yield f"{ldm}.proj_in", f"{dif}.proj_in", proj
        shapes = ((c,), (c,), (c,), (c, c), (c, c), (c, c), (c, c), (c, c), (c, ctx), (c, ctx), (c, c),
                  (8 * c, c), (c, 4 * c))   # GEGLU: ff.net.0.proj outputs 2 x (4c)
        for t in range(depth):
            for m, shape in zip(_TRANSFORMER_BLOCK, shapes, strict=True):
                yield f"{ldm}.transformer_blocks.{t}.{m}", f"{dif}.transformer_blocks.{t}.{m}", shape
        yield f"{ldm}.proj_out", f"{dif}.proj_out", proj

    yield "time_embed.0", "time_embedding.linear_1", (temb, mc)
    yield "time_embed.2", "time_embedding.linear_2", (temb, temb)
    if cfg.adm_in_channels:
        yield "label_emb.0.0", "add_embedding.linear_1", (temb, cfg.adm_in_channels)
        yield "label_emb.0.2", "add_embedding.linear_2", (temb, temb)
    yield "input_blocks.0.0", "conv_in", (mc, cfg.in_channels, 3, 3)

    levels = len(cfg.channel_mult)
    skip_channels = [mc]        # output width of every input block: the decoder concatenates them back
    depth_in = iter(cfg.transformer_depth)
    ch, n = mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for i in range(cfg.num_res_blocks[level]):
            yield from resnet(f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{i}", ch, mc * mult)
            ch = mc * mult
            depth = next(depth_in)
            if depth:
                yield from attention(f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{i}", ch, depth)
            skip_channels.append(ch)
            n += 1
        if level != levels - 1:
            yield f"input_blocks.{n}.0.op", f"down_blocks.{level}.downsamplers.0.conv", (ch, ch, 3, 3)
            skip_channels.append(ch)
            n += 1

    if cfg.transformer_depth_middle >= -1:
        yield from resnet("middle_block.0", "mid_block.resnets.0", ch, ch)
        if cfg.transformer_depth_middle >= 0:
            yield from attention("middle_block.1", "mid_block.attentions.0", ch, cfg.transformer_depth_middle)
            yield from resnet("middle_block.2", "mid_block.resnets.1", ch, ch)

    depth_out = list(cfg.transformer_depth_output)
    j = 0
    for up, level in enumerate(reversed(range(levels))):
        for i in range(cfg.num_res_blocks[level] + 1):
            c_out = mc * cfg.channel_mult[level]
            yield from resnet(f"output_blocks.{j}.0", f"up_blocks.{up}.resnets.{i}", ch + skip_channels.pop(), c_out)
            ch = c_out
            depth = depth_out.pop()    # stored from the highest resolution: the decoder reads it backwards
            sub = 1
            if depth:
                yield from attention(f"output_blocks.{j}.1", f"up_blocks.{up}.attentions.{i}", ch, depth)
                sub = 2
            # The upsampler is the next module of the level's last block: .1 without attention, .2 with it
            # (hence SD1.5 output_blocks.2.1.conv but SDXL output_blocks.2.2.conv).
            if level != 0 and i == cfg.num_res_blocks[level]:
                yield f"output_blocks.{j}.{sub}.conv", f"up_blocks.{up}.upsamplers.0.conv", (ch, ch, 3, 3)
            j += 1

    yield "out.0", "conv_norm_out", (ch,)
    yield "out.2", "conv_out", (cfg.out_channels, ch, 3, 3)


@functools.lru_cache(maxsize=16)
def unet_layout(cfg: UNetConfig) -> UNetLayout:
    to_dif, from_dif, shapes = {}, {}, {}
    for ldm, dif, shape in _walk_unet(cfg):
        to_dif[ldm] = dif
        from_dif[dif] = ldm
        shapes[f"{UNET_PREFIX}{ldm}.weight"] = shape
    # Older diffusers UNets call the SDXL add-embedding "class_embedding".
    for dif, ldm in list(from_dif.items()):
        if dif.startswith("add_embedding."):
            from_dif["class_embedding." + dif[len("add_embedding."):]] = ldm
    return UNetLayout(to_dif, from_dif, shapes)


def text_encoder_shapes(encoder: str) -> dict[str, tuple[int, ...]]:
    """Canonical key -> shape of every LoRA-patchable weight of CLIP-L (``clip_l``) or OpenCLIP-G (``clip_g``)."""
    layers, w = TEXT_ENCODER_SIZES[encoder]
    pre = TEXT_ENCODER_PREFIXES[encoder]
    out = {}
    for i in range(layers):
        for m in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{pre}text_model.encoder.layers.{i}.self_attn.{m}.weight"] = (w, w)
        out[f"{pre}text_model.encoder.layers.{i}.mlp.fc1.weight"] = (4 * w, w)
        out[f"{pre}text_model.encoder.layers.{i}.mlp.fc2.weight"] = (w, 4 * w)
    out[f"{pre}text_projection.weight"] = (w, w)
    return out


def expected_shape(canonical_key: str, architecture: str) -> tuple[int, ...] | None:
    """Shape of the base weight a canonical key names in ``architecture``'s model, or None if it has none."""
    if canonical_key.startswith(UNET_PREFIX):
        return unet_layout(lora_unet_config(architecture)).shapes.get(canonical_key)
    for enc, pre in TEXT_ENCODER_PREFIXES.items():
        if canonical_key.startswith(pre):
            return text_encoder_shapes(enc).get(canonical_key)
    return None


# --- module-name grammar --------------------------------------------------------------------------

_RESNET_PART = r"(in_layers\.[02]|emb_layers\.1|out_layers\.[03]|skip_connection)"
_TBLOCK_PART = r"transformer_blocks\.\d+\.(norm[123]|attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2))"
_ATTN_PART = rf"(norm|proj_in|proj_out|{_TBLOCK_PART})"
SGM_MODULE = re.compile(
    rf"(input_blocks\.0\.0|input_blocks\.\d+\.0\.({_RESNET_PART}|op)|input_blocks\.\d+\.1\.{_ATTN_PART}"
    rf"|middle_block\.[02]\.{_RESNET_PART}|middle_block\.1\.{_ATTN_PART}"
    rf"|output_blocks\.\d+\.0\.{_RESNET_PART}|output_blocks\.\d+\.1\.{_ATTN_PART}|output_blocks\.\d+\.[12]\.conv"
    rf"|time_embed\.[02]|label_emb\.0\.[02]|out\.[02])")
TEXT_MODULE = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])|text_projection")
_SGM_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
_DIFFUSERS_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "conv_norm_out",
                    "time_embedding.", "add_embedding.", "class_embedding.")

# Module names that contain underscores, plus the single words; digits are always tokens of their own.
_VOCABULARY = {
    # ldm / SGM
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "time_embed", "label_emb", "op", "out",
    # diffusers
    "down_blocks", "mid_block", "up_blocks", "attentions", "resnets", "downsamplers", "upsamplers",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "add_embedding", "class_embedding", "linear_1", "linear_2",
    # both
    "transformer_blocks", "proj_in", "proj_out", "norm", "norm1", "norm2", "norm3", "attn1", "attn2",
    "to_q", "to_k", "to_v", "to_out", "ff", "net", "proj", "conv",
    # text encoders
    "text_model", "encoder", "layers", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "mlp", "fc1", "fc2",
    "text_projection",
}
_MAX_WORD_ATOMS = max(w.count("_") + 1 for w in _VOCABULARY)


def underscore_to_dotted(name: str) -> str | None:
    """``input_blocks_4_1_transformer_blocks_0_attn1_to_out_0`` ->
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_out.0``.

    Greedy longest match against the vocabulary; None if some part is not a known module name.
    """
    atoms = name.split("_")
    tokens, i = [], 0
    while i < len(atoms):
        for n in range(min(_MAX_WORD_ATOMS, len(atoms) - i), 0, -1):
            word = "_".join(atoms[i:i + n])
            if word in _VOCABULARY or (n == 1 and word.isdigit()):
                tokens.append(word)
                i += n
                break
        else:
            return None
    return ".".join(tokens)


# --- file keys --------------------------------------------------------------------------------------

# tensor-name suffix -> (part, naming family it implies or None)
_SUFFIXES = [
    (".lora_up.weight", "up", None), (".lora_down.weight", "down", None), (".lora_mid.weight", "mid", None),
    ("_lora.up.weight", "up", "diffusers-old"), ("_lora.down.weight", "down", "diffusers-old"),
    (".lora_linear_layer.up.weight", "up", "diffusers-old"),
    (".lora_linear_layer.down.weight", "down", "diffusers-old"),
    (".lora_B.default.weight", "up", "peft"), (".lora_A.default.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"), (".lora_A.weight", "down", "peft"),
    (".lora.up.weight", "up", "peft"), (".lora.down.weight", "down", "peft"),
    *((f".hada_{p}", f"hada_{p}", None) for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")),
    *((f".lokr_{p}", f"lokr_{p}", None) for p in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2")),
    (".alpha", "alpha", None), (".dora_scale", "dora_scale", None),
]
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lycoris_": "unet", "lora_te_": "clip_l", "lora_te1_": "clip_l",
                   "lora_te2_": "clip_g"}
_DOTTED_PREFIXES = {"unet.": "unet", "text_encoder.": "clip_l", "text_encoder_2.": "clip_g",
                    "diffusion_model.": "sgm", "text_encoders.": "comfy-text", "base_model.model.": None,
                    "model.": None}


@dataclass(frozen=True)
class KeyPart:
    module: str          # the file's name for the patched weight (key without the part suffix)
    part: str            # "up", "down", "mid", "alpha", "hada_w1_a", "lokr_w1", "dora_scale", ...
    family: str | None   # naming family: "kohya", "diffusers-old", "peft", "comfyui"; None for alpha etc.
    peft_marker: bool = False   # ".default" adapter name or "base_model.model." prefix seen


def split_key(key: str) -> KeyPart | None:
    """Split a LoRA file key into module and part; None if the suffix is not a LoRA factor."""
    for suffix, part, family in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            module = key[: -len(suffix)]
            if family is None and (part in ("up", "down", "mid") or part.startswith(("hada_", "lokr_"))):
                family = "kohya" if module.startswith(tuple(_KOHYA_PREFIXES)) else "comfyui"
            peft = family == "peft" and (".default." in suffix or "base_model.model." in module)
            return KeyPart(module, part, family, peft)
    return None


def module_to_canonical(module: str, architecture: str) -> str | None:
    """The canonical key of the weight a LoRA module name patches, or None if the name is not understood.

    Diffusers UNet names are resolved against ``architecture``'s UNet layout; SGM names map 1:1.
    """
    component, path = None, None
    for prefix, comp in _KOHYA_PREFIXES.items():
        if module.startswith(prefix):
            component, path = comp, underscore_to_dotted(module[len(prefix):])
            if path is None:
                return None
            break
    else:
        path = module
        while component not in ("sgm", "comfy-text"):
            prefix = next((p for p in _DOTTED_PREFIXES if path.startswith(p)), None)
            if prefix is None:
                break
            path = path[len(prefix):]
            component = _DOTTED_PREFIXES[prefix] or component
        if component == "comfy-text":
            for pre in TEXT_ENCODER_PREFIXES.values():
                if path.startswith(pre) and TEXT_MODULE.fullmatch(path[len(pre):]):
                    return f"{path}.weight"
            return None
        # diffusers attention processors name the modules ".processor.to_q" and drop to_out's ".0"
        path = path.replace(".processor.", ".")
        if path.endswith(".to_out"):
            path += ".0"
        if component is None:
            component = "clip_l" if path.startswith("text_model.") else "unet"
    if component in TEXT_ENCODER_PREFIXES:
        return f"{TEXT_ENCODER_PREFIXES[component]}{path}.weight" if TEXT_MODULE.fullmatch(path) else None
    if path.startswith(_SGM_ROOTS):
        return f"{UNET_PREFIX}{path}.weight" if SGM_MODULE.fullmatch(path) else None
    if component == "sgm":
        return None
    if path.startswith(_DIFFUSERS_ROOTS):
        ldm = unet_layout(lora_unet_config(architecture)).from_diffusers.get(path)
        return f"{UNET_PREFIX}{ldm}.weight" if ldm else None
    return None


def canonical_to_kohya(canonical_key: str, architecture: str) -> str:
    """The kohya/SAI module name for a canonical key: what SDXL LoRAs in the wild use.

    UNet: SGM names (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), 1:1 with the model.
    Text: ``lora_te_`` for SD1.x CLIP-L, ``lora_te1_`` / ``lora_te2_`` for SDXL's CLIP-L / OpenCLIP-G.
    """
    if not canonical_key.endswith(".weight"):
        raise ValueError(f"not a canonical weight key: {canonical_key!r}")
    if canonical_key.startswith(UNET_PREFIX):
        return "lora_unet_" + canonical_key[len(UNET_PREFIX):-len(".weight")].replace(".", "_")
    for enc, pre in TEXT_ENCODER_PREFIXES.items():
        if canonical_key.startswith(pre):
            rest = canonical_key[len(pre):-len(".weight")].replace(".", "_")
            if enc == "clip_g":
                if architecture != "sdxl":
                    raise ArchitectureError(f"{canonical_key}: OpenCLIP-G (clip_g) weights exist only in SDXL, "
                                            f"not in {architecture!r}")
                return "lora_te2_" + rest
            # ComfyUI accepts the CLIP-L text projection only as lora_te1_ (on SD1.x as well).
            if architecture == "sdxl" or rest == "text_projection":
                return "lora_te1_" + rest
            return "lora_te_" + rest
    raise ValueError(f"not a canonical weight key: {canonical_key!r}")
