"""The pack's one registration point: node ids (stable, prefixed) -> classes and display names."""
from .transfer_nodes import ApplyToSDXL, ComparisonGrid, LoadSourceLoRA, ProjectLoRAX, SaveLoRAX, SubspaceSimilarity

NODE_CLASS_MAPPINGS = {
    "LoRAX_LoadSourceLoRA": LoadSourceLoRA,
    "LoRAX_SubspaceSimilarity": SubspaceSimilarity,
    "LoRAX_ProjectLoRA": ProjectLoRAX,
    "LoRAX_ApplyToSDXL": ApplyToSDXL,
    "LoRAX_SaveLoRA": SaveLoRAX,
    "LoRAX_ComparisonGrid": ComparisonGrid,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoRAX_LoadSourceLoRA": "Load Source LoRA (LoRA-X)",
    "LoRAX_SubspaceSimilarity": "Subspace Similarity (LoRA-X)",
    "LoRAX_ProjectLoRA": "Project LoRA-X",
    "LoRAX_ApplyToSDXL": "Apply LoRA-X to SDXL",
    "LoRAX_SaveLoRA": "Save LoRA-X",
    "LoRAX_ComparisonGrid": "Comparison Grid (LoRA-X)",
}
