"""LoRA-X engine: read LoRAs, compare base-model subspaces, project LoRAs across models, write LoRAs.

Pure Python + torch; never imports ComfyUI, so it backs the command line (``python -m lorax_engine``)
as well as the ComfyUI nodes.
"""
__version__ = "0.1.0"
