"""Weights that look trained (METHOD.md §2b): layer pairs of every similarity (lorax_zoo.pairs), checked against
exact float64 SVDs computed here."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from torch.testing import assert_close

from lorax_zoo.pairs import PAIR_KINDS, random_orthonormal, slot_pair, trained_spectrum, trained_weight, weight_pair


def _fitted_exponent(s: torch.Tensor, start: int) -> float:
    """Least-squares slope of -log s_i against log(i+1) over i >= start (the bulk past the head)."""
    x = torch.log(torch.arange(start, len(s), dtype=torch.float64) + 1)
    y = torch.log(s[start:].double())
    x, y = x - x.mean(), y - y.mean()
    return -float((x * y).sum() / (x * x).sum())


def _svd(w: torch.Tensor):
    return torch.linalg.svd(w.double(), full_matrices=False)


def _overlap(a: torch.Tensor, b: torch.Tensor, r: int) -> float:
    """||A_r^T B_r||_F^2 / r for the first r columns: 1 for equal subspaces, about r/dim for random ones."""
    return float((a[:, :r].T @ b[:, :r]).square().sum()) / r


@pytest.mark.parametrize("d, exponent, cond", [(1280, 0.2, 1e3), (320, 0.5, 1e4), (64, 0.3, 10.0)])
def test_trained_spectrum_is_a_slow_bulk_under_a_decaying_head(d, exponent, cond):
    s = trained_spectrum(d, exponent=exponent, cond=cond, head=16)
    assert s.dtype == torch.float64 and s.shape == (d,)
    assert bool((s[1:] < s[:-1]).all())
    assert float(s[0] / s[-1]) == pytest.approx(cond, rel=1e-12)
    assert _fitted_exponent(s, 16) == pytest.approx(exponent, rel=1e-9)
    # the head stands out of the bulk: its first value is the whole excess over the bulk's own condition number
    assert float(s[0] / s[16]) == pytest.approx(cond / (d / 17) ** exponent, rel=1e-9)


def test_trained_spectrum_refuses_a_condition_number_the_bulk_already_exceeds():
    with pytest.raises(ValueError, match="cond 2 is below the bulk's own condition number"):
        trained_spectrum(1000, exponent=0.5, cond=2.0)
    with pytest.raises(ValueError, match="exponent must be > 0"):
        trained_spectrum(10, exponent=0.0)


def test_random_orthonormal_is_orthonormal_and_seeded():
    q = random_orthonormal(300, 120, torch.Generator().manual_seed(5))
    assert q.dtype == torch.float64 and q.shape == (300, 120)
    assert_close(q.T @ q, torch.eye(120, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(q, random_orthonormal(300, 120, torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="k=4 orthonormal columns in dimension n=3"):
        random_orthonormal(3, 4, torch.Generator())


def test_trained_weight_has_the_spectrum_full_rank_and_entry_scale():
    w = trained_weight(384, 512, exponent=0.3, cond=1e4, seed=3, scale=0.02)
    assert w.dtype == torch.float64 and w.shape == (384, 512)
    s = torch.linalg.svdvals(w)
    expected = trained_spectrum(384, exponent=0.3, cond=1e4)
    assert_close(s / s[0], expected / expected[0], atol=1e-12, rtol=1e-9)
    assert float(w.square().mean().sqrt()) == pytest.approx(0.02, rel=1e-9)
    assert torch.equal(w, trained_weight(384, 512, exponent=0.3, cond=1e4, seed=3, scale=0.02))
    assert not torch.equal(w, trained_weight(384, 512, exponent=0.3, cond=1e4, seed=4, scale=0.02))


M, N, R = 512, 384, 96


@pytest.mark.parametrize("kind", PAIR_KINDS)
def test_weight_pair_top_subspace_overlap_is_what_the_kind_promises(kind):
    source, target = weight_pair(kind, M, N, exponent=0.2, cond=1e3, seed=7, rank=R, overlap=0.6)
    assert source.shape == target.shape == (M, N)
    us, ss, vhs = _svd(source)
    ut, st, vht = _svd(target)
    left, right = _overlap(us, ut, R), _overlap(vhs.T, vht.T, R)
    if kind in ("identical", "same_subspace"):
        assert left == pytest.approx(1, abs=1e-9) and right == pytest.approx(1, abs=1e-9)
    elif kind == "identical_fp32_fp16":
        # fp16 rounding moves a slow bulk's top subspace a little, but far less than any fast path may (0.01)
        assert 0.995 < left <= 1 + 1e-9 and 0.995 < right <= 1 + 1e-9
    elif kind == "partial_overlap":
        assert left == pytest.approx(0.6, abs=0.03) and right == pytest.approx(0.6, abs=0.03)
        assert_close(st, ss, atol=1e-12, rtol=1e-9)      # a fine-tune here moves directions, not the spectrum
    elif kind == "finetune":     # a 1% drift: most of the top subspace stays, some of its boundary turns
        assert 0.9 < left < 0.999 and 0.9 < right < 0.999
        assert float((target - source).norm() / source.norm()) == pytest.approx(0.01)
    else:
        assert left == pytest.approx(R / M, abs=0.05) and right == pytest.approx(R / N, abs=0.05)
    assert float(ss[0] / ss[-1]) == pytest.approx(1e3, rel=1e-6)
    assert torch.equal(source, trained_weight(M, N, exponent=0.2, cond=1e3, seed=7).to(source.dtype))


def test_identical_fp32_fp16_is_the_fp16_cast_of_the_fp32_source():
    source, target = weight_pair("identical_fp32_fp16", 64, 48, seed=1, rank=8)
    assert source.dtype == torch.float32 and target.dtype == torch.float16
    assert torch.equal(target, source.half())
    assert torch.equal(source, trained_weight(64, 48, seed=1).float())


def test_same_subspace_changes_only_the_spectrum():
    source, target = weight_pair("same_subspace", M, N, exponent=0.2, cond=1e3, seed=2)
    st = torch.linalg.svdvals(target)
    assert _fitted_exponent(st, 16) == pytest.approx(0.5, rel=1e-6)
    assert float(st[0] / st[-1]) == pytest.approx(1e3, rel=1e-6)
    assert not torch.allclose(source, target)
    _, explicit = weight_pair("same_subspace", M, N, exponent=0.2, cond=1e3, seed=2, target_exponent=0.5)
    assert torch.equal(target, explicit)


@pytest.mark.parametrize("overlap", [0.3, 0.9])
def test_partial_overlap_follows_the_requested_degree(overlap):
    source, target = weight_pair("partial_overlap", 256, 256, seed=4, rank=64, overlap=overlap)
    us, _, _ = _svd(source)
    ut, _, _ = _svd(target)
    assert _overlap(us, ut, 64) == pytest.approx(overlap, abs=0.03)


def test_weight_pair_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="kind must be one of"):
        weight_pair("similar", 8, 8)
    with pytest.raises(ValueError, match=r"min\(m, n\) - rank = 0"):
        weight_pair("partial_overlap", 320, 320, rank=320, overlap=0.5)
    with pytest.raises(ValueError, match="rank 400 exceeds min"):
        weight_pair("identical", 320, 640, rank=400)
    with pytest.raises(ValueError, match="overlap must be in"):
        weight_pair("partial_overlap", 64, 64, rank=8, overlap=1.5)


@pytest.mark.parametrize("kind", ["identical", "identical_fp32_fp16", "unrelated"])
def test_slot_pair_relates_only_the_clip_l_slot(kind):
    source, target = slot_pair(kind, 320, n_source=96, n_target=256, seed=9, rank=24)
    assert source.shape == (320, 96) and target.shape == (320, 256)
    assert target.dtype == (torch.float16 if kind == "identical_fp32_fp16" else torch.float64)
    _, slot = weight_pair(kind, 320, 96, seed=9, rank=24)
    assert torch.equal(target[:, :96], slot)
    other = target[:, 96:].double()
    assert float(torch.linalg.svdvals(other)[0] / torch.linalg.svdvals(other)[-1]) == pytest.approx(1e3, rel=1e-2)
    # the other columns are a weight of their own: their column space is as unrelated to the source's as chance
    uo = _svd(other)[0]
    assert _overlap(_svd(source)[0], uo, 24) == pytest.approx(24 / 320, abs=0.05)
    assert math.isclose(float(other.square().mean().sqrt()), 0.03, rel_tol=1e-2)



# ---------------------------------------------------------------- trained-looking checkpoints

UNET = "model.diffusion_model."
CLIP_L_SD15 = "cond_stage_model.transformer."
CLIP_L_SDXL = "conditioner.embedders.0.transformer."
CLIP_G = "conditioner.embedders.1.model."


def _gram_svd(w: torch.Tensor, r: int):
    """(s, U_r, V_r) of ``w`` (4-D read as [m, c*kh*kw]) from the smaller float64 Gram matrix: LAPACK's SVD of
    a wide 320 x 2880 matrix is slower."""
    a = w.double().flatten(1)
    wide = a.shape[0] <= a.shape[1]
    evals, evecs = torch.linalg.eigh(a @ a.T if wide else a.T @ a)
    s, small = evals.flip(0).clamp(min=0).sqrt(), evecs.flip(1)[:, :r]
    other = (a.T if wide else a) @ small / s[:r]
    return (s, small, other) if wide else (s, other, small)


def _svdvals(w: torch.Tensor) -> torch.Tensor:
    """Singular values, descending, from the eigenvalues of the smaller float64 Gram matrix (eigenvalues only:
    a 1280 x 1280 eigh with vectors takes half a minute on 2 busy cores)."""
    a = w.double().flatten(1)
    return torch.linalg.eigvalsh(a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a).flip(0).clamp(min=0).sqrt()


def _check_looks_trained(w: torch.Tensor, exponent: float) -> None:
    s = _svdvals(w)
    k = len(s)
    cond = float(s[0] / s[-1])
    assert 80 < cond < 1.3e4, cond                                    # 1e2..1e4 up to fp16 rounding
    assert _fitted_exponent(s[:int(0.8 * k)], 16) == pytest.approx(exponent, abs=0.03)
    assert float(s[0] / s[16]) > 2          # a head above the bulk


@pytest.mark.parametrize("name, key, seed_ns", [
    ("sd15_trained", UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "sd15_unet_trained"),  # 320x768
    ("sd15_trained", UNET + "input_blocks.4.0.out_layers.3.weight", "sd15_unet_trained"),         # 640 x 5760
    ("sd15_trained", CLIP_L_SD15 + "text_model.encoder.layers.3.self_attn.q_proj.weight", "clip_l_trained"),
    ("sdxl_trained", UNET + "output_blocks.0.1.transformer_blocks.4.attn1.to_out.0.weight", "sdxl_unet_trained"),
    ("sdxl_trained", CLIP_G + "transformer.resblocks.7.attn.in_proj_weight", "clip_g_trained"),  # 3840 x 1280
    ("tiny_sd15_trained", UNET + "input_blocks.1.0.in_layers.2.weight", "tiny_sd15_unet_trained"),  # 320 x 2880
    ("demo_sdxl_trained", UNET + "output_blocks.0.0.skip_connection.weight", "tiny_sdxl_unet_trained"),
])
def test_trained_checkpoint_weights_look_trained(zoo, name, key, seed_ns):
    w = zoo.weight(name, key)
    assert w.dtype == zoo.checkpoint_dtypes(name)[key]
    assert 0.019 < float(w.float().std()) < 0.051
    _check_looks_trained(w, zoo.zoo.trained.bulk_exponent(seed_ns, w.shape[0], math.prod(w.shape[1:])))


def test_clip_l_is_one_fp32_weight_set_that_sdxl_stores_as_fp16(zoo):
    """sd15_trained and tiny_sd15_trained store CLIP-L fp32; sdxl_trained and demo_sdxl_trained store exactly its
    fp16 cast, tensor for tensor (the real SD1.5 fp32 vs SDXL fp16 CLIP-L: the identity axiom across dtypes)."""
    path = zoo.checkpoint("tiny_sd15_trained")
    dtypes = zoo.checkpoint_dtypes("tiny_sd15_trained")
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["lorax_zoo.version"] == zoo.checkpoint_path("tiny_sd15_trained").stem.split("-v")[1]
        clip_keys = [k for k in f.keys() if k.startswith(CLIP_L_SD15)]
        assert len(clip_keys) == 196 and {dtypes[k] for k in clip_keys} == {torch.float32}
        assert {dtypes[k] for k in f.keys() if k.startswith(UNET)} == {torch.float16}
        for key in clip_keys:
            fp32 = f.get_tensor(key)
            assert fp32.dtype == torch.float32
            sdxl = zoo.weight("sdxl_trained", CLIP_L_SDXL + key[len(CLIP_L_SD15):])
            assert sdxl.dtype == torch.float16 and torch.equal(sdxl, fp32.half()), key
            if key.endswith("v_proj.weight"):
                assert torch.equal(zoo.weight("sd15_trained", key), fp32)
                assert torch.equal(zoo.weight("demo_sdxl_trained", CLIP_L_SDXL + key[len(CLIP_L_SD15):]), sdxl)
        unet_key = UNET + "middle_block.1.proj_out.weight"
        assert torch.equal(f.get_tensor(unet_key), zoo.weight("tiny_sd15_trained", unet_key))
    assert path.stat().st_size == 8 + int.from_bytes(path.read_bytes()[:8], "little") + sum(
        math.prod(shape) * dtypes[k].itemsize for k, shape in zoo.checkpoint_keys("tiny_sd15_trained").items())


def test_tiny_sd15_trained_loads_in_comfyui_with_its_fp32_clip_l(comfy, zoo, comfy_logs):
    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(zoo.checkpoint("tiny_sd15_trained")),
                                                                  output_vae=False, output_clip=True)
    assert type(model.model.model_config).__name__ == "SD15" and clip is not None
    assert not [m for m in comfy_logs.messages() if "clip missing" in m or "left over" in m]
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(model.model.diffusion_model.state_dict()[key].float(),
                       zoo.weight("tiny_sd15_trained", UNET + key).float())
    l_key = "text_model.encoder.layers.5.mlp.fc1.weight"
    loaded = clip.cond_stage_model.state_dict()["clip_l.transformer." + l_key]
    assert torch.equal(loaded, zoo.weight("tiny_sd15_trained", CLIP_L_SD15 + l_key).to(loaded.dtype))


@pytest.mark.parametrize("key", [UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",    # 320 x 768
                                 UNET + "input_blocks.1.0.in_layers.2.weight",                        # 320 x 2880
                                 UNET + "output_blocks.9.1.proj_in.weight"])                          # 320 x 320
def test_finetune_rotates_part_of_each_top_subspace(zoo, key):
    base, tuned = zoo.weight("sd15_trained", key), zoo.weight("sd15_trained_finetune", key)
    m, n = base.shape[0], math.prod(base.shape[1:])
    promised = zoo.zoo.trained.finetune_overlap("sd15_trained_finetune", m, n)
    assert 0.3 <= promised <= 0.9
    r = min(m, n) // 4           # any r up to min(m, n) // 2 keeps the promise
    s_base, u_base, v_base = _gram_svd(base, r)
    s_tuned, u_tuned, v_tuned = _gram_svd(tuned, r)
    assert _overlap(u_base, u_tuned, r) == pytest.approx(promised, abs=0.05)
    assert _overlap(v_base, v_tuned, r) == pytest.approx(promised, abs=0.05)
    assert_close(s_tuned, s_base, rtol=0.02, atol=1e-3 * float(s_base[0]))      # directions moved, not the spectrum


def test_finetune_overlaps_spread_over_layers_and_leave_1d_tensors(zoo):
    shapes = {(s[0], math.prod(s[1:])) for s in zoo.key_table("sd15_unet").values() if len(s) in (2, 4)}
    overlaps = [zoo.zoo.trained.finetune_overlap("sd15_trained_finetune", m, n) for m, n in shapes]
    assert min(overlaps) < 0.45 and max(overlaps) > 0.75 and all(0.3 <= o <= 0.9 for o in overlaps)
    for key in (UNET + "middle_block.1.norm.weight", CLIP_L_SD15 + "text_model.final_layer_norm.bias"):
        assert torch.equal(zoo.weight("sd15_trained_finetune", key), zoo.weight("sd15_trained", key))


def test_trained_unets_of_sd15_and_sdxl_are_unrelated(zoo):
    key = UNET + "input_blocks.1.0.in_layers.2.weight"        # same name and shape [320, 2880] in both
    _, u15, v15 = _gram_svd(zoo.weight("sd15_trained", key), 80)
    _, uxl, vxl = _gram_svd(zoo.weight("sdxl_trained", key), 80)
    assert _overlap(u15, uxl, 80) == pytest.approx(80 / 320, abs=0.06)
    assert _overlap(v15, vxl, 80) == pytest.approx(80 / 2880, abs=0.02)


def test_trained_values_do_not_depend_on_what_was_computed_before(zoo):
    key = UNET + "input_blocks.2.1.transformer_blocks.0.attn1.to_q.weight"
    first = zoo.weight("sd15_trained_finetune", key)
    zoo.zoo.trained._core.cache_clear()
    zoo.zoo.trained._basis.cache_clear()
    zoo.weight("sd15_trained", UNET + "input_blocks.1.0.in_layers.2.weight")
    assert torch.equal(zoo.weight("sd15_trained_finetune", key), first)


# ---------------------------------------------------------------- full size

@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15_trained", "sdxl_trained", "sd15_trained_finetune", "demo_sdxl_trained"])
def test_full_size_trained_checkpoint_files(zoo, name):
    path = zoo.checkpoint(name)
    dtypes = zoo.checkpoint_dtypes(name)
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(dtypes)
        keys = list(dtypes)
        probe = [k for k in keys if "transformer_blocks.0.attn2.to_k" in k][:2] + [keys[0], keys[-1]]
        probe += [k for k in keys if k.endswith("layers.0.self_attn.k_proj.weight")]
        for key in probe:
            t = f.get_tensor(key)
            assert t.dtype == dtypes[key] and torch.equal(t, zoo.weight(name, key)), key


@pytest.mark.slow
def test_full_size_sdxl_trained_clip_l_is_the_fp16_cast_of_sd15_trained_clip_l(zoo):
    with safe_open(str(zoo.checkpoint("sd15_trained")), "pt") as sd15, \
            safe_open(str(zoo.checkpoint("sdxl_trained")), "pt") as sdxl:
        keys = [k[len(CLIP_L_SD15):] for k in sd15.keys() if k.startswith(CLIP_L_SD15)]
        assert len(keys) == 196
        for key in keys:
            fp32, fp16 = sd15.get_tensor(CLIP_L_SD15 + key), sdxl.get_tensor(CLIP_L_SDXL + key)
            assert fp32.dtype == torch.float32 and fp16.dtype == torch.float16
            assert torch.equal(fp16, fp32.half()), key


@pytest.mark.slow
def test_demo_sdxl_trained_loads_in_comfyui_with_sdxl_trained_clip_l(comfy, zoo, comfy_logs):
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(zoo.checkpoint("demo_sdxl_trained")),
                                                                    output_vae=True, output_clip=True)
    assert type(model.model.model_config).__name__ == "SDXL" and vae is not None
    assert type(clip.cond_stage_model).__name__ == "SDXLClipModel"
    assert not [m for m in comfy_logs.messages() if "clip missing" in m]
    l_key = "text_model.encoder.layers.10.self_attn.out_proj.weight"
    loaded = clip.cond_stage_model.state_dict()["clip_l.transformer." + l_key]
    assert torch.equal(loaded.half(), zoo.weight("sdxl_trained", CLIP_L_SDXL + l_key))
