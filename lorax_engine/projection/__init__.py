"""Carrying a LoRA across: the transfer operators on LoRA factors, and the pipeline that scores, selects and
projects every layer."""
