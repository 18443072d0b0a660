"""What users read about the nodes: every node has a description and a help page (js/docs/<NodeId>.md), every
input and output a tooltip; tooltips, descriptions and help pages say what a setting does in words and point to
the pack's own docs/method.md, never to equations or to METHOD.md (a document the pack does not ship)."""
from __future__ import annotations

import re

import pytest
from comfy_harness import REPO_ROOT

DOCS_PAGE = REPO_ROOT / "docs" / "method.md"
# equations and references to a document users do not have
JARGON = re.compile(r"METHOD|Eq\.\s*\d|U\s*U\^?T|B' =|Gram|SVD|phi_?[UV]|φ")


def _texts(node_cls) -> list[str]:
    inputs = node_cls.INPUT_TYPES()
    specs = [spec for section in ("required", "optional") for spec in inputs.get(section, {}).values()]
    return [node_cls.DESCRIPTION, *(spec[1]["tooltip"] for spec in specs), *node_cls.OUTPUT_TOOLTIPS]


def test_every_node_has_a_description_tooltips_and_a_help_page(pack):
    for node_id, node_cls in pack.NODE_CLASS_MAPPINGS.items():
        inputs = node_cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in inputs.get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(node_cls.OUTPUT_TOOLTIPS) == len(node_cls.RETURN_TYPES), node_id
        assert node_cls.DESCRIPTION, node_id
        assert (REPO_ROOT / "js" / "docs" / f"{node_id}.md").is_file(), f"{node_id} has no help page"


def test_user_texts_are_in_words_and_point_to_the_docs_page(pack):
    assert DOCS_PAGE.is_file()
    for node_id, node_cls in pack.NODE_CLASS_MAPPINGS.items():
        for text in _texts(node_cls):
            assert not JARGON.search(text), f"{node_id}: {text}"
    help_pages = sorted((REPO_ROOT / "js" / "docs").glob("*.md"))
    for page in help_pages:
        assert not JARGON.search(page.read_text()), page.name
    pointing = [p.name for p in help_pages if "docs/method.md" in p.read_text()]
    assert pointing == ["LoRAX_LoadSD15LoRAIntoSDXL.md", "LoRAX_Options.md", "LoRAX_ProjectLoRA.md",
                        "LoRAX_SubspaceSimilarity.md"]
    assert "docs/method.md" in pack.NODE_CLASS_MAPPINGS["LoRAX_LoadSD15LoRAIntoSDXL"].DESCRIPTION
    readme = (REPO_ROOT / "README.md").read_text()
    assert "METHOD §" not in readme and "docs/method.md" in readme


@pytest.mark.parametrize("node_id", ["LoRAX_LoadSD15LoRAIntoSDXL", "LoRAX_Options"])
def test_the_one_node_path_shows_few_knobs(pack, node_id):
    """The loader shows what a LoRA loader shows plus the SD1.5 checkpoint; the settings live in the Options node."""
    widgets = [name for name, spec in pack.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["required"].items()
               if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")]
    assert widgets == {"LoRAX_LoadSD15LoRAIntoSDXL": ["lora_name", "source_checkpoint", "strength_model",
                                                      "strength_clip"],
                       "LoRAX_Options": ["rank", "threshold", "policy", "mode", "method"]}[node_id]
