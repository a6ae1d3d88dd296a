"""Exercise 1: rank the image tokens by the attention MANY tokens pay them, not the last
token's alone.

FastV's code, and minifastv's `fastv_rule`, rank the image tokens by the attention of the LAST
prompt token alone. The paper's text speaks of "the average attention score one token received from
all other tokens". Write two rules that let more tokens vote:

  1a. all_text_tokens_rule: every TEXT token of the prompt votes.
  1b. all_tokens_rule: every token votes, text and image alike: the paper's average,
      made exact below.

Use them:  FastV(k=2, r=0.5, rule=all_text_tokens_rule), FastV(k=2, r=0.5, rule=all_tokens_rule)
Check it:  python -m pytest homework/check_1_text_attention.py
"""

import torch

# you will want them
from minifastv.model import PruningInputs, attention_rows, visible_keys  # noqa: F401


def all_text_tokens_rule(inputs: PruningInputs):
    """1a. Keep the `inputs.num_keep` image tokens that the text tokens attended to most in
    layer K-1.

    Returns (B, num_keep) indices into the image tokens (0 .. N-1), in any order, like `fastv_rule`.

    What you get (PruningInputs in minifastv/model.py):
      inputs.queries  (B, H, T, D)     layer K-1's queries, RoPE already applied
      inputs.keys     (B, H_kv, T, D)  layer K-1's keys, RoPE already applied
      inputs.image_positions (B, N)    where the image tokens sit in the sequence
      inputs.attention_mask  (B, T)    1 for real tokens, 0 for left padding

    The score of image token j, exactly: the mean over the heads and over the rows of ALL the text
    tokens (the real tokens that are not image tokens) of layer K-1's attention weight on j. Text
    tokens before the image cannot see it (causal mask): their weight on it is 0, and they count in
    the mean all the same. Every image token of a prompt is divided by the same number of rows, so
    this ranks the image tokens exactly as the total attention the text pays them.

    The steps:
      1. Layer K-1's attention weights, every row of them: `attention_rows` in model.py (FastV takes
         the last row from it) gives them with num_rows=T, (B, H, T, T), float32, causal and padding
         masks applied. Read it first: it is ten lines.
      2. Average the rows of the text tokens, and the heads: (B, T), what each key received
         from the text.
      3. Read the image columns (`gather` with image_positions) and keep the top num_keep.
    """
    raise NotImplementedError(
        "fill in all_text_tokens_rule() in homework/text_attention_rule.py first (exercise 1a)"
    )


def all_tokens_rule(inputs: PruningInputs):
    """1b. Keep the `inputs.num_keep` image tokens with the highest average attention received in
    layer K-1.

    Returns (B, num_keep) indices into the image tokens (0 .. N-1), in any order. Same inputs as 1a.

    "Average attention received" with a causal mask, exactly: a token can be attended to only by
    itself and the real tokens after it (a query never sees a later key, padding never sees a real
    token). The score of image token j is the mean, over the heads and over exactly those rows (real
    rows i >= j: text rows and image rows, j's own row included), of the attention weight on j. The
    rows before j are left out, not counted as zeros: they could not vote. (Counting them, i.e.
    dividing every column by the same number of rows, would rank by the total received, which
    favours the early tokens: they have more rows that see them.)

    The steps: the full attention matrix as in 1a; for each key, the sum of its column over the
    real rows and the number of real rows that can see it (`visible_keys` in model.py says which
    query sees which key: True where row i may look at column j); divide; the image columns; the
    top num_keep.
    """
    raise NotImplementedError(
        "fill in all_tokens_rule() in homework/text_attention_rule.py first (exercise 1b)"
    )
