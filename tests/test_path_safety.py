"""Path inputs read only ComfyUI's model folders (Load Source LoRA's ``lora_path``), in-process on real ComfyUI:
``..``, absolute paths and links leading out are refused with one line that reveals nothing about the server's
files, unless ComfyUI was started with LORAX_ALLOW_ANY_PATH=1."""
from __future__ import annotations

import os

import pytest
import torch

REFUSAL = "lora_path: only files inside ComfyUI's models/loras folders can be read"


@pytest.fixture
def folders(comfy, zoo, tmp_path, monkeypatch):
    """Two configured loras folders (ComfyUI allows several), a LoRA in each, and one LoRA outside both."""
    monkeypatch.delenv("LORAX_ALLOW_ANY_PATH", raising=False)
    first, second, outside = tmp_path / "models" / "loras", tmp_path / "extra_loras", tmp_path / "private"
    for folder in (first, second, outside):
        folder.mkdir(parents=True)
    fnp = comfy.folder_paths.folder_names_and_paths
    monkeypatch.setitem(fnp, "loras", ([str(first), str(second)], fnp["loras"][1]))
    zoo.make_sd15_lora(first / "inside.safetensors", rank=4, seed=1)
    zoo.make_sd15_lora(second / "second.safetensors", rank=4, seed=2)
    zoo.make_sd15_lora(outside / "secret.safetensors", rank=4, seed=3)
    return first, second, outside


def _load(pack, lora_path):
    node = pack.NODE_CLASS_MAPPINGS["LoRAX_LoadSourceLoRA"]()
    with torch.inference_mode():
        return node.load(lora_name="unused", strength=1.0, lora_path=str(lora_path))["result"][0]


def test_paths_inside_any_loras_folder_are_read(pack, folders):
    first, second, _ = folders
    assert _load(pack, first / "inside.safetensors").layers
    assert _load(pack, second / "second.safetensors").layers
    assert _load(pack, first / "sub" / ".." / "inside.safetensors").layers      # '..' that stays inside


@pytest.mark.parametrize("case", ["dotdot", "absolute", "missing", "link_out", "linked_folder", "folder_prefix"])
def test_paths_leading_out_are_refused_alike(pack, folders, case):
    first, _, outside = folders
    if case == "dotdot":
        path = first / ".." / ".." / "private" / "secret.safetensors"
    elif case == "absolute":
        path = outside / "secret.safetensors"
    elif case == "missing":              # no "does not exist": the same refusal as for a file that exists
        path = outside / "nothing_here.safetensors"
    elif case == "link_out":
        path = first / "innocent.safetensors"
        path.symlink_to(outside / "secret.safetensors")
    elif case == "linked_folder":
        (first / "shared").symlink_to(outside, target_is_directory=True)
        path = first / "shared" / "secret.safetensors"
    else:                                # a sibling folder whose name starts like the loras folder's
        sibling = first.parent / "loras_private"
        sibling.mkdir()
        os.link(outside / "secret.safetensors", sibling / "secret.safetensors")
        path = sibling / "secret.safetensors"
    with pytest.raises(Exception) as info:
        _load(pack, path)
    message = str(info.value)
    assert message.startswith(REFUSAL) and "\n" not in message
    assert "private" not in message and str(first) not in message and "exist" not in message


def test_any_path_with_the_opt_in(pack, folders, monkeypatch):
    _, _, outside = folders
    monkeypatch.setenv("LORAX_ALLOW_ANY_PATH", "1")
    assert _load(pack, outside / "secret.safetensors").layers
    with pytest.raises(Exception, match="file not found"):       # with the opt-in, the usual file errors
        _load(pack, outside / "nothing_here.safetensors")
