"""Exercise 2: prune twice, a pyramid.

FastV prunes once, at layer K. Later work prunes in stages: a few image tokens go early, more go
deeper, where the image matters even less (PyramidDrop, arXiv 2410.17247: in its example for
LLaVA-1.5, half of the image tokens after layer 8, half of the rest after 16, and again after 24).
Write the decoder loop by hand and prune with FastV's rule at every stage of a schedule.

Use it:    logits = pyramid_forward(model, input_ids, pixel_values, [(2, 0.5), (3, 0.5)])
Check it:  python -m pytest homework/check_2_pyramid.py
"""

import torch

from minifastv.model import attention_rows, fastv_rule  # noqa: F401  (you will want them)


@torch.no_grad()
def pyramid_forward(model, input_ids, pixel_values, schedule):
    """Last-token logits (B, vocab) of `model` on the prompts, pruning image tokens at each
    stage of `schedule`.

    schedule: [(k1, r1), (k2, r2), ...] with 1 <= k1 < k2 < ... < the number of decoder layers.
    Before layer k1 runs, drop the share r1 of the image tokens; before layer k2, drop the share
    r2 of the image tokens that are still there; and so on. Each stage ranks its image tokens
    with FastV's rule: the last token's attention in the layer just before (k - 1), on the
    sequence that layer saw, mean over heads. A stage with n image tokens keeps
    round(n * (1 - r)) of them (Python's round, as Llava.forward), every text token, the original
    order, and each token's ORIGINAL position.

    Keep it simple: no padding. Every prompt of the batch has the same length, and attention is
    plain causal attention, which the layers do when their mask is None.

    Llava.forward in minifastv/model.py is your model; its FastV block is the one stage you repeat:
      - x = model.embed(input_ids, pixel_values): the token embeddings with the image features
        in, (B, T, C)
      - positions (B, T): 0 .. T-1 for every prompt; cos, sin = model.rope(positions, x.dtype)
      - for index, layer in enumerate(model.language_model.layers):
            (prune here when index is the k of a stage)
            x, (queries, keys) = layer(x, cos, sin, None)
        (a layer returns its output and its queries (B, H, T, D) and keys (B, H_kv, T, D),
        RoPE applied)
      - attention_rows(queries, keys, key_mask)[:, :, -1] is the last token's attention row,
        (B, H, T), from the queries and keys of the layer just run (key_mask: all ones, nothing is
        padded)
      - track which of the remaining tokens are image tokens: gather that mask as you gather x
        and positions
      - at the end: model.lm_head(model.language_model.norm(x))[:, -1]

    With one stage, [(k, r)], the result equals
    model(input_ids, pixel_values, fastv=FastV(k, r))[:, -1].
    """
    raise NotImplementedError("fill in pyramid_forward() in homework/pyramid.py first (exercise 2)")
