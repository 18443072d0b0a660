"""Runs an API-format workflow's nodes in-process (core's and the pack's), the way ComfyUI's executor calls
them: inputs from linked outputs, the hidden ``unique_id``, under inference mode. For tests that need to see
the values passed between nodes (where their tensors live), which a server run does not show."""
from __future__ import annotations

import os

import torch


def place_model_files(monkeypatch, folder_paths, tmp_path, files: dict[str, dict[str, os.PathLike]]) -> None:
    """Make ``{kind: {name: path}}`` the only files of ComfyUI's ``kind`` folders (links in ``tmp_path``)."""
    fnp = folder_paths.folder_names_and_paths
    for kind, named in files.items():
        folder = tmp_path / kind
        folder.mkdir(parents=True, exist_ok=True)
        for name, path in named.items():
            (folder / name).symlink_to(os.path.abspath(path))
        monkeypatch.setitem(fnp, kind, ([str(folder)], fnp[kind][1]))


def run_nodes(comfy, pack, prompt: dict, wanted, overrides: dict | None = None,
              done: dict[str, tuple] | None = None) -> dict[str, tuple]:
    """Execute the nodes ``wanted`` (ids) and what they depend on, each once; ``overrides`` replace widget
    values (``{node id: {input: value}}``); ``done`` holds outputs of an earlier call, used as they are.
    Returns ``{node id: outputs tuple}`` of every node run or reused."""
    classes = {**comfy.nodes.NODE_CLASS_MAPPINGS, **pack.NODE_CLASS_MAPPINGS}
    overrides = overrides or {}
    outputs: dict[str, tuple] = dict(done or {})

    def run(node_id: str) -> tuple:
        if node_id not in outputs:
            node = prompt[node_id]
            cls = classes[node["class_type"]]
            inputs = {name: run(value[0])[value[1]] if isinstance(value, list) else value
                      for name, value in {**node["inputs"], **overrides.get(node_id, {})}.items()}
            if "unique_id" in cls.INPUT_TYPES().get("hidden", {}):
                inputs["unique_id"] = node_id
            out = getattr(cls(), cls.FUNCTION)(**inputs)
            outputs[node_id] = out["result"] if isinstance(out, dict) else out
        return outputs[node_id]

    with torch.inference_mode():
        for node_id in wanted:
            run(node_id)
    return outputs
