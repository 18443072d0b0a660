"""Layer matching (METHOD §4) on the real SD1.5 / SDXL / Vega / CLIP key tables, and the selection policies."""
from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch

from lorax_engine.analysis.matching import (
    UNKNOWN,
    Evidence,
    LayerChoice,
    TargetIndex,
    compatibility,
    decide,
    parse_key,
    stage_label,
)
from lorax_engine.errors import TransferOptionError
from lorax_engine.files.base_weights import StateDictWeights


def _model(zoo, unet_table, clip=True):
    """A shapes-only provider of a real layout (meta tensors: names and shapes, no values)."""
    tensors = {f"diffusion_model.{k}": torch.empty(s, device="meta") for k, s in zoo.key_table(unet_table).items()}
    if clip:
        tensors.update({f"clip_l.transformer.{k}": torch.empty(s, device="meta")
                        for k, s in zoo.key_table("clip_l").items()})
    return StateDictWeights(tensors, architecture="test", name=unet_table)


@pytest.fixture(scope="module")
def sd15(zoo):
    return _model(zoo, "sd15_unet")


@pytest.fixture(scope="module")
def sdxl(zoo):
    return _model(zoo, "sdxl_unet")


def test_parse_key_positions_and_roles():
    ref = parse_key("diffusion_model.output_blocks.4.1.transformer_blocks.7.attn2.to_out.0.weight")
    assert (ref.side, ref.block, ref.depth, ref.role) == ("output", "output_blocks.4.1", 7, "attn2.to_out.0")
    ref = parse_key("diffusion_model.middle_block.1.proj_in.weight")
    assert (ref.side, ref.block, ref.depth, ref.role) == ("middle", "middle_block.1", None, "proj_in")
    assert parse_key("diffusion_model.input_blocks.5.0.in_layers.2.weight").role == "in_layers.2"
    assert parse_key("diffusion_model.input_blocks.0.0.weight").role == "conv"
    assert parse_key("diffusion_model.time_embed.0.weight").side == "unet"
    ref = parse_key("clip_g.transformer.text_model.encoder.layers.31.mlp.fc2.weight")
    assert (ref.side, ref.block, ref.role) == ("clip_g", "clip_g.layers.31", "mlp.fc2")
    assert parse_key("diffusion_model.input_blocks.4.1.proj_in.bias") is None


def test_stage_width_reads_the_input_side_of_up_projections():
    ff0 = "diffusion_model.input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight"
    assert stage_label(parse_key(ff0), (5120, 640)) == "input@640"
    kv = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    assert stage_label(parse_key(kv), (1280, 768)) == "middle@1280"
    fc1 = "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert stage_label(parse_key(fc1), (3072, 768)) == "clip_l@768"


def test_compatibility_rules():
    assert compatibility("attn1.to_q", (640, 640), (640, 640)) == "same"
    assert compatibility("proj_in", (640, 640, 1, 1), (640, 640)) == "squeeze"
    assert compatibility("attn2.to_k", (640, 768), (640, 2048)) == "embed"
    assert compatibility("attn1.to_k", (640, 768), (640, 2048)) is None     # only the context readers embed
    assert compatibility("attn2.to_k", (640, 2048), (640, 768)) is None     # never shrink
    assert compatibility("in_layers.2", (640, 640, 3, 3), (640, 5760)) is None


def _expected(table_keys, pattern):
    return sorted(k for k in table_keys if re.fullmatch(pattern, k))


def test_sd15_to_sdxl_candidates_follow_the_stage_table(sd15, sdxl):
    index = TargetIndex(sdxl)
    xl = sdxl.keys()
    tb = r"diffusion_model\.{}\.transformer_blocks\.\d+\.{}\.weight"

    def cands(key):
        c = index.candidates(key, sd15.shape(key))
        return c, sorted(t for t, _ in c.targets)

    # SD1.5 320-channel attention: nothing in SDXL
    for block in ("input_blocks.1.1", "input_blocks.2.1", "output_blocks.9.1", "output_blocks.11.1"):
        for role in ("attn1.to_q", "attn2.to_k", "ff.net.0.proj"):
            c, t = cands(f"diffusion_model.{block}.transformer_blocks.0.{role}.weight")
            assert t == [] and c.reason == "no counterpart"
    # 640 input stage: input_blocks.4.1 and 5.1 at depth 2 each; k/v embedded into the 2048 context
    c, t = cands("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight")
    assert t == _expected(xl, tb.format(r"input_blocks\.[45]\.1", r"attn2\.to_k")) and len(t) == 4
    assert {compat for _, compat in c.targets} == {"embed"} and c.stage == "input@640"
    # 1280: SD1.5 output_blocks.3-5 face SDXL output_blocks.0-2 (depth 10): 30 candidates
    c, t = cands("diffusion_model.output_blocks.4.1.transformer_blocks.0.attn1.to_q.weight")
    assert t == _expected(xl, tb.format(r"output_blocks\.[012]\.1", r"attn1\.to_q")) and len(t) == 30
    c, t = cands("diffusion_model.output_blocks.7.1.transformer_blocks.0.ff.net.2.weight")
    assert t == _expected(xl, tb.format(r"output_blocks\.[345]\.1", r"ff\.net\.2")) and len(t) == 6
    c, t = cands("diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_out.0.weight")
    assert len(t) == 10
    # proj_in: SD1.5 1x1 conv -> SDXL linear
    c, t = cands("diffusion_model.input_blocks.7.1.proj_in.weight")
    assert t == ["diffusion_model.input_blocks.7.1.proj_in.weight", "diffusion_model.input_blocks.8.1.proj_in.weight"]
    assert {compat for _, compat in c.targets} == {"squeeze"}
    # resnets exist at 320 in both; the text encoder maps CLIP-L to CLIP-L
    c, t = cands("diffusion_model.input_blocks.1.0.in_layers.2.weight")
    assert t == [f"diffusion_model.input_blocks.{b}.0.in_layers.2.weight" for b in (1, 2)]
    c, t = cands("clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight")
    assert len(t) == 12 and c.stage == "clip_l@768" and {x for _, x in c.targets} == {"same"}


def test_sdxl_to_sd15_cannot_shrink_the_context_and_identity_layouts_include_themselves(zoo, sd15, sdxl):
    c = TargetIndex(sd15).candidates("diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
                                     (640, 2048))
    assert c.targets == [] and c.reason == "shape"
    # a model -> its fine-tune: every weight is a candidate for itself (SD1.5, SDXL with both text encoders)
    xl = StateDictWeights({**{k: torch.empty(sdxl.shape(k), device="meta") for k in sdxl.keys()},
                           **{f"clip_g.transformer.{k}": torch.empty(s, device="meta")
                              for k, s in zoo.key_table("clip_g").items()}}, architecture="test")
    for model in (sd15, xl):
        index = TargetIndex(model)
        checked = 0
        for key in model.keys():
            if key.endswith(".weight") and len(model.shape(key)) in (2, 4):
                assert key in [t for t, _ in index.candidates(key, model.shape(key)).targets], key
                checked += 1
        assert checked > 300


def test_sdxl_to_vega_uses_the_blocks_vega_has(zoo, sdxl):
    vega = _model(zoo, "vega_unet", clip=False)
    index = TargetIndex(vega)
    vega_shapes = {k: vega.shape(k) for k in vega.keys()}
    key = "diffusion_model.output_blocks.1.1.transformer_blocks.7.attn1.to_v.weight"
    c = index.candidates(key, sdxl.shape(key))
    expected = _expected(vega.keys(),
                         r"diffusion_model\.output_blocks\.[012]\.1\.transformer_blocks\.\d+\.attn1\.to_v\.weight")
    assert sorted(t for t, _ in c.targets) == expected and 0 < len(expected) < 30
    assert all(vega_shapes[t] == (1280, 1280) for t in expected)


def test_direct_rule_is_name_and_matrix_shape(sd15, sdxl):
    index = TargetIndex(sdxl)
    k = "diffusion_model.input_blocks.4.1.proj_in.weight"
    assert index.direct(k, sd15.shape(k)).targets == [(k, "squeeze")]
    k = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_v.weight"
    assert index.direct(k, sd15.shape(k)).reason == "shape"
    k = "diffusion_model.output_blocks.10.1.transformer_blocks.0.attn1.to_q.weight"
    assert index.direct(k, sd15.shape(k)).reason == "no counterpart"


Q = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
K = Q.replace("to_q", "to_k")
V = Q.replace("to_q", "to_v")
PROJ_IN = "diffusion_model.input_blocks.4.1.proj_in.weight"


def _target(key, block="input_blocks.4.1", depth=0):
    """The key of the same role in another target block / transformer block."""
    out = key.replace("input_blocks.4.1", block)
    return out.replace("transformer_blocks.0.", f"transformer_blocks.{depth}.")


def _exact(score, identical=False):
    return Evidence(score, True, identical)


def _choices(evidence: dict[str, dict[str, Evidence]], weights=None) -> dict[str, LayerChoice]:
    return {s: LayerChoice(parse_key(s), (weights or {}).get(s, 1.0), cands) for s, cands in evidence.items()}


def test_policies_on_exact_scores():
    a, own, b, c = (_target(Q, "input_blocks.5.1"), Q, _target(Q, "input_blocks.7.1"), _target(Q, "input_blocks.8.1"))
    layers = _choices({Q: {a: _exact(0.2), own: _exact(0.9), b: _exact(0.9), c: _exact(-0.01)}})
    best = decide(layers, "best", 0.05)
    assert best.chosen == {Q: {own: 1.0}} and not best.needs          # tie broken towards the source's own block
    assert best.reasons[Q] == {a: "another block scored higher", b: "another block scored higher",
                               c: "another block scored higher"}
    assert decide(layers, "best", 0.95).chosen == {Q: {}}
    above = decide(layers, "all-above-threshold", 0.05)
    assert above.chosen == {Q: {a: 1.0, own: 1.0, b: 1.0}} and above.reasons[Q] == {c: "below threshold"}
    spread = decide(layers, "spread", 0.05).chosen[Q]
    assert spread == {a: pytest.approx(1 / 3), own: pytest.approx(1 / 3), b: pytest.approx(1 / 3)}
    assert len(decide(layers, "spread", -math.inf).chosen[Q]) == 4
    with pytest.raises(TransferOptionError):
        decide(layers, "nearest", 0.0)
    with pytest.raises(TransferOptionError):
        decide(layers, "best", float("nan"))


def test_estimates_only_rule_candidates_out_and_what_may_pass_or_lead_is_scored_exactly():
    """METHOD §2b: an estimate's upper bound below the threshold, or below the leading block's exact score, settles a
    candidate; a decision the bounds cannot settle names the pairs to score exactly (the most promising first)."""
    a, b, c = (_target(V, blk) for blk in ("input_blocks.5.1", "input_blocks.7.1", "input_blocks.8.1"))
    estimates = _choices({V: {a: Evidence(0.60), b: Evidence(0.75), c: Evidence(0.04)}})
    assert decide(estimates, "best", 0.05).needs == {(V, b)}                 # the most promising block first
    assert decide(estimates, "all-above-threshold", 0.05).needs == {(V, a), (V, b)}   # c is ruled out
    one_exact = _choices({V: {a: Evidence(0.60), b: _exact(0.5), c: Evidence(0.04)}})
    assert decide(one_exact, "best", 0.05).needs == {(V, a)}                # its bound reaches b's exact score
    settled = decide(_choices({V: {a: Evidence(0.45), b: _exact(0.5), c: Evidence(0.04)}}), "best", 0.05)
    assert settled.chosen == {V: {b: 1.0}} and not settled.needs
    assert settled.reasons[V] == {a: "another block scored higher", c: "another block scored higher"}
    # nothing known yet: the most promising is any; nothing could pass anywhere: the choice is moot, nothing asked
    assert len(decide(_choices({V: {a: UNKNOWN, b: UNKNOWN}}), "best", 0.05).needs) == 1
    moot = decide(_choices({V: {a: Evidence(0.03), b: Evidence(0.04)}}), "best", 0.05)
    assert not moot.needs and moot.chosen == {V: {}} and set(moot.reasons[V].values()) == {"below threshold"}
    # passing a threshold takes an exact score, and an exact score below it drops the candidate
    assert decide(_choices({V: {a: Evidence(0.2)}}), "all-above-threshold", 0.05).needs == {(V, a)}
    assert decide(_choices({V: {a: _exact(0.04)}}), "all-above-threshold", 0.05).chosen == {V: {}}
    # identical weights win over any other exact score of 1
    same = _choices({V: {a: _exact(1.0), b: _exact(1.0, identical=True)}})
    assert decide(same, "best", 0.05).chosen == {V: {b: 1.0}}


def test_pairs_screening_cannot_settle_are_scored_exactly_at_once():
    """With the threshold off, a screening estimate can only rank a block out below the leader's exact score, which a
    sketch scoring at chance does not reach (its bound, the floor, is above it): such pairs go straight to exact
    scores (``score_now``), the source's own block first; above a leader that scores well they are screened."""
    floor = 0.018                                   # screening_floor of a 1280-wide pair at r = 320
    own, a, b = Q, _target(Q, "input_blocks.2.1"), _target(Q, "input_blocks.7.1")     # a comes first in model order
    unknown = replace(UNKNOWN, floor=floor)
    first = decide(_choices({Q: {a: unknown, own: unknown, b: unknown}}), "best", -math.inf)
    assert first.needs == first.score_now == {(Q, own)}
    low_leader = decide(_choices({Q: {a: unknown, own: _exact(0.001), b: unknown}}), "best", -math.inf)
    assert low_leader.needs == low_leader.score_now == {(Q, a), (Q, b)}
    high_leader = decide(_choices({Q: {a: unknown, own: _exact(0.9), b: unknown}}), "best", -math.inf)
    assert high_leader.needs == {(Q, a), (Q, b)} and not high_leader.score_now
    # what is screened already goes to exact scores the usual way, not "at once"
    estimates = decide(_choices({Q: {a: Evidence(0.3), own: _exact(0.001), b: unknown}}), "best", -math.inf)
    assert estimates.needs == {(Q, a), (Q, b)} and estimates.score_now == {(Q, b)}
    # a threshold above the floor can fail a sketched pair: screened first, as before
    assert not decide(_choices({Q: {a: unknown, own: unknown}}), "best", 0.05).score_now
    assert not decide(_choices({Q: {a: unknown, own: unknown}}), "all-above-threshold", 0.05).score_now
    spread = decide(_choices({Q: {a: unknown, own: unknown}}), "spread", -math.inf)
    assert spread.needs == spread.score_now == {(Q, a), (Q, own)}
    # with a floor that is not known (0), screening may rank any block out: screened first, as before
    assert not decide(_choices({Q: {a: UNKNOWN, own: _exact(0.001)}}), "best", -math.inf).score_now


@pytest.mark.parametrize("policy", ["best", "all-above-threshold", "spread"])
def test_q_and_k_of_one_attention_are_applied_together_or_not_at_all(policy):
    """METHOD §4: q passes in both target blocks, k only in the second: both go to the second, never q alone."""
    first, second = "input_blocks.5.1", "input_blocks.7.1"
    layers = _choices({Q: {_target(Q, first): _exact(0.9), _target(Q, second): _exact(0.6)},
                       K: {_target(K, first): _exact(0.01), _target(K, second): _exact(0.5)}},
                      weights={Q: 10.0, K: 1.0})
    out = decide(layers, policy, 0.05)
    if policy == "best":      # the block score (dominated by q's energy) picks the first block: k fails there
        assert out.chosen == {Q: {}, K: {}}
        assert out.reasons[Q][_target(Q, first)] == "its q/k partner does not pass there"
        assert out.reasons[K][_target(K, first)] == "below threshold"
    else:
        strength = 1.0
        assert out.chosen == {Q: {_target(Q, second): strength}, K: {_target(K, second): strength}}
        assert out.reasons[Q][_target(Q, first)] == "its q/k partner does not pass there"
    # without its partner in the LoRA, q is decided alone
    alone = decide(_choices({Q: dict(layers[Q].candidates)}), policy, 0.05).chosen[Q]
    assert _target(Q, first) in alone


@pytest.mark.parametrize("policy", ["best", "all-above-threshold", "spread"])
def test_a_q_and_k_nothing_is_known_of_are_screened_q_first_and_k_only_if_q_may_pass(policy):
    """One member below the threshold fails the pair, so its partner is asked for only once the first may pass;
    with the threshold off nothing can fail, and both are asked for at once."""
    tq, tk = _target(Q, "input_blocks.5.1"), _target(K, "input_blocks.5.1")
    unknown = _choices({K: {tk: UNKNOWN}, Q: {tq: UNKNOWN}})
    assert decide(unknown, policy, 0.05).needs == {(Q, tq)}
    assert decide(unknown, policy, -math.inf).needs == {(Q, tq), (K, tk)}
    q_fails = decide(_choices({K: {tk: UNKNOWN}, Q: {tq: Evidence(0.03)}}), policy, 0.05)
    assert not q_fails.needs and q_fails.chosen == {Q: {}, K: {}}
    assert q_fails.reasons == {Q: {tq: "below threshold"}, K: {tk: "its q/k partner does not pass there"}}
    assert decide(_choices({K: {tk: UNKNOWN}, Q: {tq: Evidence(0.2)}}), policy, 0.05).needs == {(K, tk)}
    assert decide(_choices({K: {tk: Evidence(0.3)}, Q: {tq: Evidence(0.2)}}), policy, 0.05).needs == \
        {(Q, tq), (K, tk)}


def test_best_scores_a_pair_that_may_pass_before_the_block_scores_that_rank_blocks():
    """One candidate's bound reaches the threshold: that pair is scored exactly first. If it fails, nothing can
    pass anywhere and the blocks are not ranked (no exact score for the others)."""
    out_proj = V.replace("to_v", "to_out.0")
    a, b = "input_blocks.5.1", "input_blocks.7.1"
    bounds = {V: {_target(V, a): Evidence(0.06), _target(V, b): Evidence(0.03)},
              out_proj: {_target(out_proj, a): Evidence(0.04), _target(out_proj, b): Evidence(0.02)}}
    assert decide(_choices(bounds), "best", 0.05).needs == {(V, _target(V, a))}
    settled = decide(_choices({**bounds, V: {**bounds[V], _target(V, a): _exact(-0.002)}}), "best", 0.05)
    assert not settled.needs and settled.chosen == {V: {}, out_proj: {}}
    assert set(settled.reasons[V].values()) == set(settled.reasons[out_proj].values()) == {"below threshold"}


@pytest.mark.parametrize("policy", ["best", "all-above-threshold"])
def test_proj_in_follows_the_transformer_block_it_wraps(policy):
    """proj_in goes to the block its transformer block went to, though another block's proj_in scores higher."""
    went, other = "input_blocks.7.1", "input_blocks.8.1"
    layers = _choices({V: {_target(V, went): _exact(0.8), _target(V, other): _exact(0.01)},
                       PROJ_IN: {_target(PROJ_IN, went): _exact(0.3), _target(PROJ_IN, other): _exact(0.9)}})
    out = decide(layers, policy, 0.05)
    assert out.chosen[V] == {_target(V, went): 1.0}
    assert out.chosen[PROJ_IN] == {_target(PROJ_IN, went): 1.0}
    assert out.reasons[PROJ_IN][_target(PROJ_IN, other)] == "the transformer blocks it wraps went elsewhere"
    # on its own (no transformer-block layer in the LoRA) it goes where it scores best
    alone = decide(_choices({PROJ_IN: dict(layers[PROJ_IN].candidates)}), "best", 0.05)
    assert alone.chosen[PROJ_IN] == {_target(PROJ_IN, other): 1.0}


def test_the_targets_unused_text_layers_are_no_candidates(zoo):
    """SDXL conditions on CLIP-L's penultimate layer: its layer 11 receives nothing (METHOD §4)."""
    clip = {f"clip_l.transformer.{k}": torch.empty(s, device="meta") for k, s in zoo.key_table("clip_l").items()}
    key = "clip_l.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight"
    for arch, layers_seen in (("sdxl", 11), ("sd1", 12)):
        cands = TargetIndex(StateDictWeights(clip, architecture=arch)).candidates(key, (768, 768))
        assert len(cands.targets) == layers_seen
        assert (arch == "sdxl") != any("layers.11." in t for t, _ in cands.targets)
