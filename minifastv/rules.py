"""Example pruning rules: swap one in with FastV(k, r, rule=...). Each gets a PruningInputs and
returns (B, num_keep) indices into the prompt's image tokens (see fastv_rule in model.py).

Write your own the same way: score the N image tokens, keep the top num_keep.
"""

import importlib.util
from pathlib import Path

import torch

from .errors import UsageError
from .model import PruningInputs, apply_rope, attention_rows, fastv_rule


def random_rule(inputs: PruningInputs):
    """Keep a random subset (the paper's baseline: pruning without looking). Seed it with
    torch.manual_seed."""
    batch_size, num_image_tokens = inputs.image_positions.shape
    scores = torch.rand(batch_size, num_image_tokens, device=inputs.image_positions.device)
    return scores.topk(inputs.num_keep, dim=-1).indices


def bayer_matrix(size):
    """The size x size ordered-dither matrix: its first j cells are spread evenly, for any j."""
    matrix = torch.zeros(1, 1, dtype=torch.long)
    while matrix.shape[0] < size:
        top = torch.cat([4 * matrix, 4 * matrix + 2], 1)
        bottom = torch.cat([4 * matrix + 3, 4 * matrix + 1], 1)
        matrix = torch.cat([top, bottom], 0)
    return matrix


def grid_rule(inputs: PruningInputs):
    """Keep patches spread uniformly over each image or frame, whatever the model attends to
    (ordered dithering)."""
    grid = inputs.grid_size
    tile = bayer_matrix(8)
    # A patch's rank in the tiled matrix: lower ranks are kept first.
    rank = tile.repeat(grid // 8 + 1, grid // 8 + 1)[:grid, :grid].flatten().to(inputs.patch.device)
    rank = torch.where(inputs.patch >= 0, rank[inputs.patch.clamp(min=0)], -1)  # (B, N); CLS first
    return rank.argsort(dim=-1, stable=True)[:, : inputs.num_keep]


def no_rope_rule(inputs: PruningInputs):
    """FastV's score with the rotary position embedding taken out of the queries and keys.

    FEATHER (arXiv 2412.13180) shows that RoPE makes the last token favour the image tokens closest
    to it, i.e. the bottom of the image; scoring without RoPE removes that bias.
    """
    # Turning back by the same angle undoes RoPE.
    queries = apply_rope(inputs.queries, inputs.cos, -inputs.sin)  # (B, H, T, D)
    keys = apply_rope(inputs.keys, inputs.cos, -inputs.sin)  # (B, H_kv, T, D)
    attention = attention_rows(queries, keys, inputs.attention_mask)[:, :, -1]  # (B, H, T)
    image_attention = attention.mean(dim=1).gather(1, inputs.image_positions)  # (B, N)
    return image_attention.topk(inputs.num_keep, dim=-1).indices


RULES = {"fastv": fastv_rule, "random": random_rule, "grid": grid_rule, "no_rope": no_rope_rule}


def load_rule(name):
    """fastv, random, grid, no_rope, or a function in a file: path/to/file.py:function."""
    if name in RULES:
        return RULES[name]
    path, _, function = name.rpartition(":")
    if not path.endswith(".py") or not function:
        raise UsageError(f"Unknown rule {name!r}: use {', '.join(RULES)} or "
                         "path/to/file.py:function.")
    if not Path(path).is_file():
        raise UsageError(f"--rule {name}: there is no file {path}.")
    try:
        spec = importlib.util.spec_from_file_location(f"rule_file_{Path(path).stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as error:  # the file's own code failed on import
        reason = " ".join(str(error).split())
        raise UsageError(f"--rule {name}: {path} cannot be imported ({type(error).__name__}: "
                         f"{reason}).") from error
    if not callable(getattr(module, function, None)):
        raise UsageError(f"--rule {name}: {path} has no function {function}.")
    return getattr(module, function)
