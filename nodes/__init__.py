"""The pack's one registration point: node ids (stable, prefixed) -> classes and display names."""
from .comfy_bridge import install_free_memory_hook
from .transfer_nodes import (
    ApplyToSDXL,
    ComparisonGrid,
    LoadSD15LoRAIntoSDXL,
    LoadSourceLoRA,
    ProjectLoRAX,
    SaveLoRAX,
    SubspaceSimilarity,
    TransferOptionsNode,
)

NODE_CLASS_MAPPINGS = {
    "LoRAX_LoadSD15LoRAIntoSDXL": LoadSD15LoRAIntoSDXL,
    "LoRAX_Options": TransferOptionsNode,
    "LoRAX_LoadSourceLoRA": LoadSourceLoRA,
    "LoRAX_SubspaceSimilarity": SubspaceSimilarity,
    "LoRAX_ProjectLoRA": ProjectLoRAX,
    "LoRAX_ApplyToSDXL": ApplyToSDXL,
    "LoRAX_SaveLoRA": SaveLoRAX,
    "LoRAX_ComparisonGrid": ComparisonGrid,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoRAX_LoadSD15LoRAIntoSDXL": "Load SD1.5 LoRA into SDXL (LoRA-X)",
    "LoRAX_Options": "LoRA-X Options",
    "LoRAX_LoadSourceLoRA": "Load Source LoRA (LoRA-X)",
    "LoRAX_SubspaceSimilarity": "Subspace Similarity (LoRA-X)",
    "LoRAX_ProjectLoRA": "Project LoRA-X",
    "LoRAX_ApplyToSDXL": "Apply LoRA-X to SDXL",
    "LoRAX_SaveLoRA": "Save LoRA-X",
    "LoRAX_ComparisonGrid": "Comparison Grid (LoRA-X)",
}

# the pack's in-memory caches are emptied whenever ComfyUI frees memory ("Unload models" / "Free memory")
install_free_memory_hook()
