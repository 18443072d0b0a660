"""Files in and out: LoRA formats, checkpoint weights read lazily, key names, architectures, output names."""
