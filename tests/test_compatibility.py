"""Inputs the transfer does not expect are refused before any work, in one line (METHOD §4, last paragraph;
lorax_engine/files/compatibility.py): the LoRA's architecture must be the source model's, the target one the pack
writes for. The models here are the real SD1.5 and SDXL layouts (names and shapes from ComfyUI's own classes,
lorax_zoo/tables) with no weights behind them: any read of a weight, any hash, fails the test, so a refusal is
proven to come before the work. The LoRAs are real files, read back, so their architecture is detected from
their keys as a user's would be."""
from __future__ import annotations

import lora_factory
import pytest

from lorax_engine.errors import ArchitectureError, IncompatibleLoraError
from lorax_engine.files.lora_formats import read_lora
from lorax_engine.projection.transfer import TransferOptions, compute_similarity_map, transfer

SD15_NAME, SDXL_NAME = "v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors"
# layers SD1.5 and SDXL both have, by name and shape: an SDXL LoRA on them "fits" SD1.5 in part
SHARED_UNET = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"     # [640, 640] in both
CLIP_L = "clip_l.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight"
SD15_ONLY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"       # 320 channels
SDXL_DEEP = "diffusion_model.input_blocks.7.1.transformer_blocks.9.attn1.to_q.weight"        # depth 10


class LayoutOnly:
    """A model's weight names and shapes and its architecture, nothing else: reading or hashing a weight fails."""

    def __init__(self, arch: str, name: str, architecture: str | None = None, evidence: str = ""):
        self.name = name
        self.architecture = architecture or {"sd15": "sd1"}.get(arch, arch)
        self.architecture_evidence = evidence
        self._shapes = lora_factory.model_shapes("sd1" if arch == "sd15" else arch)

    def keys(self):
        return list(self._shapes)

    def __contains__(self, key):
        return key in self._shapes

    def shape(self, key):
        return tuple(self._shapes[key])

    def matrix(self, key):
        raise AssertionError(f"weight {key} read before the inputs were checked")

    def fingerprint(self, key):
        raise AssertionError(f"weight {key} hashed before the inputs were checked")


def _lora_file(tmp_path, name: str, arch: str, keys) -> object:
    factors = lora_factory.random_factors(arch, rank=4, seed=1, targets=list(keys))
    path = lora_factory.save(lora_factory.lora_state_dict(factors, arch, "kohya"), tmp_path / name)
    return read_lora(path)


def _refused(lora, source, target, error=ArchitectureError) -> str:
    """The one line both entry points give (the similarity map is the first step of every transfer)."""
    with pytest.raises(error) as first:
        transfer(lora, source, target, TransferOptions())
    with pytest.raises(error) as second:
        compute_similarity_map(source, target, TransferOptions(), lora=lora)
    assert str(first.value) == str(second.value) and "\n" not in str(first.value)
    return str(first.value)


def test_an_sdxl_lora_in_the_sd15_slot_is_already_an_sdxl_lora(tmp_path):
    # it shares layers with SD1.5 by name and shape: before, those were "transferred" SDXL-on-SDXL
    lora = _lora_file(tmp_path, "xl_style.safetensors", "sdxl", [SHARED_UNET, SDXL_DEEP,
                                                                   CLIP_L.replace("layers.3", "layers.4")])
    assert lora.architecture == "sdxl"
    message = _refused(lora, LayoutOnly("sd15", SD15_NAME), LayoutOnly("sdxl", SDXL_NAME))
    assert message == (f"{tmp_path / 'xl_style.safetensors'}: this is already an SDXL LoRA: use Load LoRA (or any "
                       "SDXL LoRA loader) instead; LoRA-X carries SD1.5 LoRAs to SDXL")


def test_an_sdxl_checkpoint_picked_as_the_sd15_source_is_refused(tmp_path):
    # the SD1.5 LoRA's shared layers and CLIP-L exist in SDXL with the same names and shapes
    lora = _lora_file(tmp_path, "style.safetensors", "sd1", [SHARED_UNET, CLIP_L, SD15_ONLY])
    message = _refused(lora, LayoutOnly("sdxl", SDXL_NAME), LayoutOnly("sdxl", "sdxl_finetune.safetensors"))
    assert message == (f"{tmp_path / 'style.safetensors'} is an SD1.5 LoRA, but the source model {SDXL_NAME} is "
                       "SDXL: pick the SD1.5 checkpoint it was trained on (e.g. v1-5-pruned-emaonly)")


def test_an_sdxl_lora_with_an_sd15_source_and_target_names_the_mismatch(tmp_path):
    lora = _lora_file(tmp_path, "xl.safetensors", "sdxl", [SDXL_DEEP])
    message = _refused(lora, LayoutOnly("sd15", SD15_NAME), LayoutOnly("sd15", "sd15_finetune.safetensors"))
    assert message == (f"{tmp_path / 'xl.safetensors'} is an SDXL LoRA, but the source model {SD15_NAME} is SD1.5: "
                       "pick the SDXL checkpoint it was trained on")


def test_a_target_the_pack_cannot_write_for_is_refused_up_front(tmp_path):
    """An SDXL-family model without a layer map (KOALA: ComfyUI's model class, detected from the weights) is
    refused before the transfer, not when the result cannot be written."""
    lora = _lora_file(tmp_path, "style.safetensors", "sd1", [SHARED_UNET])
    koala = LayoutOnly("sdxl", "koala_700m.safetensors", architecture="unknown",
                       evidence="SDXL-like, but input transformer depths [0, 2, 5] match neither SDXL, SSD-1B nor Vega")
    message = _refused(lora, LayoutOnly("sd15", SD15_NAME), koala)
    assert message == ("the target model koala_700m.safetensors is not a model LoRA-X knows (SDXL-like, but input "
                       "transformer depths [0, 2, 5] match neither SDXL, SSD-1B nor Vega): LoRA-X writes LoRAs for "
                       "SD1.5, SDXL, SSD-1B and Segmind Vega only")


def test_sdxl_to_sd15_is_not_a_direction_the_pack_carries(tmp_path):
    lora = _lora_file(tmp_path, "xl.safetensors", "sdxl", [SDXL_DEEP])
    message = _refused(lora, LayoutOnly("sdxl", SDXL_NAME), LayoutOnly("sd15", SD15_NAME))
    assert message == (f"the source model {SDXL_NAME} is SDXL and the target model {SD15_NAME} is SD1.5: LoRA-X "
                       "carries LoRAs from SD1.5 to SD1.5 or SDXL, and from SDXL to SDXL-family models")


def test_a_lora_whose_keys_do_not_tell_must_fit_the_source_whole(tmp_path):
    """A LoRA on layers SD1.5 and SDXL (and SD 2.x) share in name cannot be placed by its keys: it is accepted
    when every layer exists in the source with its shape, refused when any does not."""
    lora = _lora_file(tmp_path, "plain.safetensors", "sd1", [SHARED_UNET])
    assert lora.architecture == "unknown"
    odd = _lora_file(tmp_path, "odd.safetensors", "sd1", [SHARED_UNET, SHARED_UNET.replace("to_q", "to_k")])
    odd.layers[SHARED_UNET.replace("to_q", "to_k")].weight_shape = (640, 1024)
    odd.layers[SHARED_UNET.replace("to_q", "to_k")].down = odd.layers[SHARED_UNET].down.new_zeros(4, 1024)
    message = _refused(odd, LayoutOnly("sd15", SD15_NAME), LayoutOnly("sdxl", SDXL_NAME), IncompatibleLoraError)
    assert message == (f"{tmp_path / 'odd.safetensors'}: its keys do not tell SD1.x from SDXL, and 1 of its 2 layers "
                       f"do not exist in the source model {SD15_NAME} with the same shape; the source model must be "
                       "the one the LoRA was trained on")
    from lorax_engine.files.compatibility import check_transfer_inputs
    check_transfer_inputs(lora, LayoutOnly("sd15", SD15_NAME), LayoutOnly("sdxl", SDXL_NAME))   # accepted


def test_a_lora_of_another_size_fits_nothing(tmp_path):
    lora = _lora_file(tmp_path, "style.safetensors", "sd1", [SD15_ONLY])
    lora.layers[SD15_ONLY].up = lora.layers[SD15_ONLY].up.new_zeros(640, 4)    # an SD1.5-named layer 640 wide
    message = _refused(lora, LayoutOnly("sd15", SD15_NAME), LayoutOnly("sdxl", SDXL_NAME), IncompatibleLoraError)
    assert message == (f"{tmp_path / 'style.safetensors'} does not fit the source model {SD15_NAME}: none of its 1 "
                       "layers exists there with the same shape; the source model must be the one the LoRA was "
                       "trained on")
