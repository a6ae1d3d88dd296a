"""minifastv: LLaVA-1.5 and FastV in one readable file, minifastv/model.py.

    import minifastv
    model = minifastv.load("llava-hf/llava-1.5-7b-hf")  # checkpoint.py: read, check, load
    fastv = minifastv.FastV(k=2, r=0.5)
    tokens = minifastv.generate(model, input_ids, pixel_values, fastv=fastv)  # generation.py
    minifastv.compile_model(model)  # optional, compiled.py: the same model, fewer kernel launches
    model = minifastv.load(minifastv.tiny_checkpoint())  # offline: a tiny random LLaVA (tiny.py)
"""

from .checkpoint import load
from .cli import VERSION
from .compiled import compile_model
from .errors import (CheckpointError, ImageError, MinifastvError, SettingsError, UsageError,
                     VideoError)
from .generation import GenerationStats, Sampling, generate, stream
from .model import (FastV, KVCache, LayerView, Llava, LlavaConfig, PruningInputs, attention_rows,
                    fastv_rule)
from .tiny import tiny_checkpoint

__all__ = ["CheckpointError", "FastV", "GenerationStats", "ImageError", "KVCache", "LayerView",
           "Llava", "LlavaConfig", "MinifastvError", "PruningInputs", "Sampling", "SettingsError",
           "UsageError", "VideoError", "attention_rows", "compile_model", "fastv_rule", "generate",
           "load", "stream", "tiny_checkpoint"]
__version__ = VERSION
# Where the project lives. README.md's Colab badge and clone command, and tutorial.ipynb's
# REPO_URL, repeat it (tests/test_docs.py checks that they agree); "OWNER" marks it as the
# placeholder it still is.
REPOSITORY_URL = "https://github.com/OWNER/minifastv"
