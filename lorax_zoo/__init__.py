"""Synthetic model zoo for tests, demo and benchmark: seeded checkpoints and LoRAs with real key layouts.

See :mod:`lorax_zoo.zoo` (checkpoints), :mod:`lorax_zoo.trained` (their trained-looking weights) and
:mod:`lorax_zoo.pairs` (single layer pairs of every similarity). Command line: ``python -m lorax_zoo build [names...]``.
"""
from .zoo import (
                  CHECKPOINTS,
                  TRIGGER_WORD,
                  ZOO_VERSION,
                  build,
                  cache_dir,
                  checkpoint,
                  checkpoint_dtypes,
                  checkpoint_keys,
                  checkpoint_path,
                  key_table,
                  lora_key_map,
                  make_sd15_lora,
                  sd15_lora_state_dict,
                  sd15_lora_targets,
                  set_cache_dir,
                  spectral_matrix,
                  weight,
                  write_streamed,
)

__all__ = ["CHECKPOINTS", "TRIGGER_WORD", "ZOO_VERSION", "build", "cache_dir", "checkpoint", "checkpoint_dtypes",
           "checkpoint_keys", "checkpoint_path", "key_table", "lora_key_map", "make_sd15_lora", "sd15_lora_state_dict",
           "sd15_lora_targets", "set_cache_dir", "spectral_matrix", "weight", "write_streamed"]
