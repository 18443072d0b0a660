"""``inspect``: what a LoRA file is — format, architecture and why, layers per UNet stage, ranks, trigger words."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from ..files.architectures import detect_lora_architecture, lora_unet_config
from ..files.keys import TEXT_ENCODER_PREFIXES, UNET_PREFIX, unet_layout
from ..files.lora import LoraModel
from ..files.lora_formats import load_lora_file, lora_from_state_dict

METADATA_VALUE_CHARS = 160
TOP_TAGS = 10
TEXT_ENCODER_NAMES = {"clip_l": "CLIP-L (clip_l)", "clip_g": "OpenCLIP-G (clip_g)"}


def _stage(key: str, architecture: str) -> dict:
    """The group a canonical key is counted in: a UNet stage (section + resolution level) or a text encoder."""
    for enc, prefix in TEXT_ENCODER_PREFIXES.items():
        if key.startswith(prefix):
            return {"section": "text encoder", "name": TEXT_ENCODER_NAMES[enc]}
    cfg = lora_unet_config(architecture)
    module = key[len(UNET_PREFIX):-len(".weight")]
    section = module.split(".")[0]
    dif = unet_layout(cfg).to_diffusers.get(module, "")
    parts = dif.split(".")
    if section == "input_blocks" and parts[0] == "down_blocks":
        level = int(parts[1])
    elif section == "output_blocks" and parts[0] == "up_blocks":
        level = len(cfg.channel_mult) - 1 - int(parts[1])
    elif section == "middle_block" and dif:
        return {"section": section, "channels": cfg.model_channels * cfg.channel_mult[-1]}
    else:
        return {"section": "other" if dif else section, "name": "embeddings, conv_in, conv_out" if dif else "unmapped"}
    return {"section": section, "level": level, "channels": cfg.model_channels * cfg.channel_mult[level]}


def _stages(lora: LoraModel) -> list[dict]:
    order = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2, "other": 3, "text encoder": 4}
    groups: dict[tuple, dict] = {}
    for key in lora.layers:
        st = _stage(key, lora.architecture)
        ident = tuple(sorted(st.items()))
        g = groups.setdefault(ident, {**st, "blocks": set(), "layers": 0})
        g["layers"] += 1
        if key.startswith(UNET_PREFIX) and st["section"] in ("input_blocks", "output_blocks"):
            g["blocks"].add(int(key[len(UNET_PREFIX):].split(".")[1]))
    out = []
    for g in groups.values():
        g["blocks"] = sorted(g["blocks"])
        out.append(g)
    # decoder stages are listed from the lowest resolution, as the blocks run
    return sorted(out, key=lambda g: (order.get(g["section"], 5), g.get("blocks") or [0], g.get("name", "")))


def trigger_words(metadata: dict[str, str], top: int = TOP_TAGS) -> list[tuple[str, int]]:
    """The most frequent training tags from kohya's ``ss_tag_frequency`` ({dataset: {tag: count}})."""
    try:
        freq = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except (ValueError, RecursionError):   # not JSON, or nested absurdly deep: no trigger words to show
        return []
    counts: Counter = Counter()
    if isinstance(freq, dict):
        for tags in freq.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    if isinstance(n, (int, float)) and math.isfinite(n):   # JSON allows Infinity and NaN
                        counts[tag.strip()] += int(n)
    return counts.most_common(top)


def _number(x: float):
    return int(x) if float(x).is_integer() else round(float(x), 6)


def inspect_lora(path) -> dict:
    """A JSON-ready description of a LoRA file."""
    path = Path(path)
    sd, metadata = load_lora_file(path)
    lora = lora_from_state_dict(sd, metadata, path=path)
    evidence = detect_lora_architecture({k: tuple(v.shape) for k, v in sd.items()}).reason
    del sd
    ranks = Counter(layer.rank for layer in lora.layers.values())
    alphas = Counter(_number(layer.alpha) for layer in lora.layers.values())
    metadata = {k: (v if len(v) <= METADATA_VALUE_CHARS else f"{v[:METADATA_VALUE_CHARS]}… ({len(v)} chars)")
                for k, v in sorted(lora.metadata.items())}
    return {
        "file": str(path),
        "bytes": path.stat().st_size,
        "format": lora.source_format,
        "architecture": lora.architecture,
        "evidence": evidence,
        "layers": len(lora.layers),
        "unet_layers": len(lora.unet_keys()),
        "text_encoder_layers": len(lora.text_keys()),
        "stages": _stages(lora),
        "ranks": {"min": min(ranks), "max": max(ranks), "histogram": {str(r): n for r, n in sorted(ranks.items())}},
        "alphas": {str(a): n for a, n in sorted(alphas.items())},
        "dtypes": list(lora.source_dtypes),
        "trigger_words": [{"tag": t, "count": n} for t, n in trigger_words(lora.metadata)],
        "notes": lora.notes,
        "metadata": metadata,
    }


def _histogram(h: dict) -> str:
    if len(h) == 1:
        return f"{next(iter(h))} (all layers)"
    return ", ".join(f"{k} ×{n}" for k, n in h.items())


def format_report(r: dict) -> str:
    """The report as text for a terminal."""
    size = r["bytes"] / 1e6
    lines = [
        f"file:          {r['file']} ({size:.1f} MB)",
        f"format:        {r['format']}",
        f"architecture:  {r['architecture']} — {r['evidence']}",
        f"layers:        {r['layers']} (UNet {r['unet_layers']}, text encoders {r['text_encoder_layers']})",
    ]
    for g in r["stages"]:
        if "level" in g:
            channels = f"({g['channels']} ch)"
            where = f"{g['section']:<14} level {g['level']} {channels:<10} " \
                    f"blocks {','.join(map(str, g['blocks']))}"
        elif "channels" in g:
            where = f"{g['section']:<14} ({g['channels']} ch)"
        else:
            where = f"{g['section']:<14} {g['name']}"
        lines.append(f"  {where:<52} {g['layers']:>5}")
    ranks = r["ranks"]
    lines.append(f"ranks:         {_histogram(ranks['histogram'])}"
                 + (f"  (min {ranks['min']}, max {ranks['max']})" if len(ranks["histogram"]) > 1 else ""))
    lines.append(f"alphas:        {_histogram(r['alphas'])}")
    lines.append(f"dtypes:        {', '.join(r['dtypes'])}")
    tags = ", ".join(f"{t['tag']} ({t['count']})" for t in r["trigger_words"]) or "(none recorded)"
    lines.append(f"trigger words: {tags}")
    summary = [n for n in r["notes"] if not n.startswith("re-factorised ")]
    for note in summary:
        lines.append(f"note:          {note}")
    lines.append(f"metadata:      {len(r['metadata'])} keys" + (":" if r["metadata"] else ""))
    lines.extend(f"  {k}: {v}" for k, v in r["metadata"].items())
    return "\n".join(lines)


def add_arguments(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="describe a LoRA file: format, architecture, layers, ranks, "
                                              "trigger words, metadata")
    p.add_argument("file", help="LoRA file (.safetensors)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    report = inspect_lora(args.file)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else format_report(report))
    return 0
