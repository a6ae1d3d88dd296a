"""Exercise 5: FastV's scores, spread over the image: every row of patches keeps its share.

With RoPE, the last token favours the image tokens closest to it, the bottom rows of the image, so
FastV tends to keep the bottom of the picture (FEATHER, arXiv 2412.13180; tutorial chapter 6,
"Write your own rule"). FEATHER's answer includes coverage: it keeps uniformly sampled patches
beside its top-scored ones. `grid_rule` in minifastv/rules.py is such a uniform sample alone: it
spreads the kept patches evenly but ignores the attention. Here you do both at once: each row of
each image's grid keeps the same number of patches, chosen by FastV's score.

Use it:    FastV(k=2, r=0.5, rule=row_balanced_rule)
Check it:  python -m pytest homework/check_5_spread_rule.py
"""

import torch

from minifastv.model import PruningInputs


def row_balanced_rule(inputs: PruningInputs):
    """Keep `inputs.num_keep` image tokens, the same number in every row of patches,
    the best of each row.

    Returns (B, num_keep) indices into the image tokens (0 .. N-1), in any order.

    - The score of an image token is FastV's: inputs.last_token_attention (B, H, T), mean over
      heads, at the columns inputs.image_positions (see fastv_rule in model.py).
    - The rows: image token j belongs to image j // tokens_per_image, and within it to grid row
      (j % tokens_per_image) // grid_size. With n images there are n * grid_size rows of grid_size
      patches (LLaVA-1.5: 24 rows of 24 patches per image), and the image tokens come row by row,
      so scores.view(B, rows, grid_size) lines them up.
    - Every row keeps its per_row = num_keep // rows best patches.
    - That leaves extra = num_keep - per_row * rows to place: they go to the best-scoring patches
      not kept yet, wherever they are.
    """
    raise NotImplementedError(
        "fill in row_balanced_rule() in homework/spread_rule.py first (exercise 5)"
    )
