"""minifastv: LLaVA-1.5 and FastV in one readable file, minifastv/model.py."""

from .model import (CheckpointError, FastV, GenerationStats, KVCache, Llava, LlavaConfig, PruningInputs, fastv_rule,
                    load)

__version__ = "0.1.0"
