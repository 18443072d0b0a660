"""The verdict a node shows (nodes/ui_summary.py) and the report's text (Report.format_table), from reports built
here layer by layer: GOOD, WEAK (for each measure that can fall short) and NONE, each with the line saying what
it rests on; unscored pairs give no number and count in no median."""
from __future__ import annotations

import pytest
from comfy_harness import load_ui_summary

from lorax_engine.reports.report import CandidateRecord, LayerRecord, Report

ui_summary = load_ui_summary()      # ComfyUI-free: loaded without the pack (whose package imports ComfyUI)

Q = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
K = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"
T = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"


def _sim(score: float, unscored: bool = False, estimate: bool = False) -> dict:
    return {"score": score, "unscored": unscored, "estimate": estimate}


def _layer(key, score, kept=0.9, applied=True, target=None, unscored=False, energy=1.0, reason=None, change=None):
    target = target or key.replace("transformer_blocks.0", "transformer_blocks.1")
    cand = CandidateRecord(target, "same", _sim(score, unscored), kept if applied else None, applied,
                           1.0 if applied else 0.0, None if applied else reason, operator="auto" if applied else None,
                           w_u=0.5 if applied else None, w_v=0.5 if applied else None, change=change)
    return LayerRecord(key, "input@640", "input_blocks.4.1.transformer_blocks.0", "attn1.to_q", [640, 640], 4,
                       energy, [cand], applied, None if applied else reason, kept if applied else 0.0,
                       1 if applied else 0, 1.0 if applied else 0.0)


def _report(*layers, mode="auto") -> Report:
    return Report("v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors", "sd1", "sdxl", mode, {},
                  list(layers))


def test_good_rests_on_scores_and_energy():
    summary = ui_summary.transfer_summary(_report(_layer(Q, 0.9, kept=0.95), _layer(K, 0.8, kept=0.95)))
    assert summary["verdict"] == "good"
    assert summary["lines"] == ["GOOD: 2/2 layers applied (auto); rests on:",
                                "  median score 0.85 >= 0.2 (0 = chance, 1 = same)", "  energy kept 95% >= 50%",
                                "dropped: none"]
    assert summary["median_score"] == pytest.approx(0.85)


@pytest.mark.parametrize("layers, shortfall", [
    ((_layer(Q, 0.04), _layer(K, 0.1)), ["median score 0.07 < 0.2 (0 = chance, 1 = same)"]),
    ((_layer(Q, 0.9, kept=0.3), _layer(K, 0.8, kept=0.3)), ["energy kept 30% < 50%"]),
    ((_layer(Q, 0.04, kept=0.3), _layer(K, 0.1, kept=0.3)),
     ["median score 0.07 < 0.2 (0 = chance, 1 = same)", "energy kept 30% < 50%"]),
], ids=["near chance", "energy cut", "both"])
def test_weak_names_each_shortfall(layers, shortfall):
    summary = ui_summary.transfer_summary(_report(*layers))
    assert summary["verdict"] == "weak"
    assert summary["lines"] == ["WEAK: 2/2 layers applied (auto); falls short on:", *(f"  {s}" for s in shortfall),
                                "dropped: none"]


def test_scores_alone_are_not_enough_when_the_updates_moved():
    """Score 1.00 and energy kept 99% over updates that turned by 40%: WEAK, as METHOD §2c asks."""
    layers = [_layer(k, 1.0, kept=0.99, change=c) for k, c in ((Q, 0.01), (K, 0.4), (T, 0.3))]
    summary = ui_summary.transfer_summary(_report(*layers))
    assert summary["verdict"] == "weak" and summary["lines"][1:] == ["  1 of 3 updates changed little",
                                                                     "dropped: none"]
    layers[1].candidates[0].change = 0.0
    summary = ui_summary.transfer_summary(_report(*layers))
    assert summary["verdict"] == "good"
    assert summary["lines"][1:4] == ["  median score 1.00 >= 0.2 (0 = chance, 1 = same)", "  energy kept 99% >= 50%",
                                     "  2 of 3 updates changed little"]
    text = _report(*layers).format_table().splitlines()
    assert text[3] == "what moved, against a direct copy: 1 updates arrived whole, 1 changed by at most 2%, 1 more " \
                      "(largest change 30%)"
    assert [line.split()[-4] for line in text if line.startswith(("input_blocks", "clip_l"))] == ["1.0%", "0.0%",
                                                                                                 "30.0%"]


def test_none_when_nothing_is_applied():
    summary = ui_summary.transfer_summary(_report(_layer(Q, 0.01, applied=False, reason="below threshold"),
                                                  _layer(K, 0.02, applied=False, reason="below threshold")))
    assert summary["verdict"] == "none"
    assert summary["lines"] == ["NONE: 0/2 layers applied (auto)", "dropped: 2 below threshold"]


def test_unscored_pairs_count_in_no_median_and_show_no_number():
    unscored = _layer(T, 1.0, unscored=True, target=T)
    summary = ui_summary.transfer_summary(_report(unscored, _layer(Q, 0.1)))
    assert summary["median_score"] == pytest.approx(0.1) and summary["verdict"] == "weak"
    assert "  median score 0.10 < 0.2 (0 = chance, 1 = same)" in summary["lines"]
    alone = ui_summary.transfer_summary(_report(unscored))
    assert alone["verdict"] == "weak" and alone["median_score"] is None
    assert alone["lines"][1] == "  no layer pair could be scored"
    assert not any("median" in line for line in alone["lines"])

    rows = {line.split()[0]: line for line in _report(unscored, _layer(Q, 0.1)).format_table().splitlines()
            if line.startswith(("clip_l.", "input_blocks."))}
    assert rows["clip_l.layers.0.self_attn.q_proj"].split()[1:5] == ["same", "layer", "unscored", "90%"]
    assert rows["input_blocks.4.1.tb.0.attn1.to_q"].split()[1:4] == ["input_blocks.4.1.tb.1", "0.10", "90%"]


def test_report_text_is_summary_first_then_a_table_with_plain_column_names():
    report = _report(_layer(Q, 0.9, kept=0.95), _layer(K, 0.03, applied=False, reason="below threshold"))
    report.notes.append("note: something the user should know")
    lines = report.format_table().splitlines()
    assert lines[:4] == ["LoRA-X auto: v1-5-pruned-emaonly.safetensors (sd1) -> sd_xl_base_1.0.safetensors (sdxl)",
                         "1 of 2 source layers applied to 0 target layers; dropped: 1 below threshold",
                         "energy kept 47.5%, injected 0.0%; 0.0 s",
                         "note: something the user should know"]
    head = lines.index(next(line for line in lines if line.startswith("layer ")))
    assert lines[head - 1].startswith("similarity: 0 = no more alike than chance, 1 = the same subspace")
    assert lines[head].split() == ["layer", "sent", "to", "similarity", "kept", "changed", "result"]
    assert lines[head + 2].split() == ["input_blocks.4.1.tb.0.attn1.to_q", "input_blocks.4.1.tb.1", "0.90", "95%",
                                       "-", "applied", "auto", "w=0.50/0.50"]
    assert lines[head + 3].split() == ["input_blocks.4.1.tb.0.attn1.to_k", "-", "0.03", "-", "-", "dropped:",
                                       "below", "threshold"]
    assert max(len(line) for line in lines[head:]) <= 130
