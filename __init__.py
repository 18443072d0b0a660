"""LoRA-X for ComfyUI: carry SD1.5 LoRAs over to SDXL without training (arXiv 2501.16559).

ComfyUI imports this file when the pack sits in its custom_nodes folder.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
