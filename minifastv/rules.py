"""Example pruning rules: swap one in with FastV(k, r, rule=...). Each gets a PruningInputs and
returns (B, num_keep) indices into the prompt's image tokens (see fastv_rule in model.py).

Write your own the same way: score the N image tokens, keep the top num_keep.
"""

import torch

from .model import PruningInputs, attention_rows


def random_rule(inputs: PruningInputs):
    """Keep a random subset (the paper's baseline of pruning without looking). Seed with torch.manual_seed."""
    batch_size, num_image_tokens = inputs.image_positions.shape
    scores = torch.rand(batch_size, num_image_tokens, device=inputs.image_positions.device)
    return scores.topk(inputs.num_keep, dim=-1).indices


def bayer_matrix(size):
    """The size x size ordered-dither matrix: the first j cells in its order are spread evenly, for any j."""
    matrix = torch.zeros(1, 1, dtype=torch.long)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([4 * matrix, 4 * matrix + 2], 1), torch.cat([4 * matrix + 3, 4 * matrix + 1], 1)], 0)
    return matrix


def grid_rule(inputs: PruningInputs):
    """Keep patches spread uniformly over each image or frame, whatever the model attends to (ordered dithering)."""
    grid = inputs.grid_size
    tile = bayer_matrix(8)
    rank = tile.repeat(grid // 8 + 1, grid // 8 + 1)[:grid, :grid].flatten().to(inputs.patch.device)  # lower: kept first
    rank = torch.where(inputs.patch >= 0, rank[inputs.patch.clamp(min=0)], -1)  # (B, N); a CLS token goes first
    return rank.argsort(dim=-1, stable=True)[:, : inputs.num_keep]


def no_rope_rule(inputs: PruningInputs):
    """FastV's score with the rotary position embedding taken out of the queries and keys.

    FEATHER (arXiv 2412.13180) shows that RoPE makes the last token favour the image tokens closest
    to it, i.e. the bottom of the image; scoring without RoPE removes that bias.
    """
    attention = attention_rows(inputs.queries_without_rope, inputs.keys_without_rope, inputs.attention_mask)[:, :, -1]
    image_attention = attention.mean(dim=1).gather(1, inputs.image_positions)  # (B, N)
    return image_attention.topk(inputs.num_keep, dim=-1).indices
