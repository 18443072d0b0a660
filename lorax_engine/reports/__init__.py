"""What comes out besides the LoRA: the per-layer report, the similarity plot, image grids, file inspection."""
