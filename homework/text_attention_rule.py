"""Exercise 1: rank the image tokens by the attention ALL the text tokens pay them, as the FastV paper words it.

FastV's code, and minifastv's `fastv_rule`, rank the image tokens by the attention of the LAST prompt token
alone. The paper's text speaks of the average attention a token receives. Write that version: every text
token of the prompt votes, not only the last one.

Use it:    FastV(k=2, r=0.5, rule=all_text_tokens_rule)
Check it:  python -m pytest homework/check_1_text_attention.py
"""

import torch

from minifastv.model import PruningInputs, attention_rows  # noqa: F401  (you will want it)


def all_text_tokens_rule(inputs: PruningInputs):
    """Keep the `inputs.num_keep` image tokens that the text tokens attended to most in layer K-1.

    Returns (B, num_keep) indices into the image tokens (0 .. N-1), in any order, like `fastv_rule`.

    What you get (PruningInputs in minifastv/model.py):
      inputs.queries  (B, H, T, D)     layer K-1's queries, RoPE already applied
      inputs.keys     (B, H_kv, T, D)  layer K-1's keys, RoPE already applied
      inputs.image_positions (B, N)    where the image tokens sit in the sequence
      inputs.attention_mask  (B, T)    1 for real tokens, 0 for left padding

    The steps:
      1. Layer K-1's attention weights, every row of them: `attention_rows` in model.py (FastV takes the last
         row from it) gives them with num_rows=T, (B, H, T, T), float32, causal and padding masks applied.
         Read it first: it is ten lines.
      2. The text tokens are the real tokens that are not image tokens. Average their rows, and the
         heads: how much attention each key received from the text, (B, T).
      3. Read the image columns (`gather` with image_positions) and keep the top num_keep.

    Beware: a padding query has no real key to look at, so attention_rows lets it see only itself. It is
    not a text token: leave its row out of the average.
    """
    raise NotImplementedError("fill in all_text_tokens_rule() in homework/text_attention_rule.py first (exercise 1)")
