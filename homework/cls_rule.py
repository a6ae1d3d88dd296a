"""Exercise 3: rank the image tokens before the LLM sees them, by the attention of CLIP's CLS token.

FastV scores the image tokens inside the decoder, with the text's attention. Several later methods
score them in the vision tower instead (FasterVLM, arXiv 2412.01818, with this very score): CLIP's
CLS token summarizes the image, and the patches it attends to most are taken to be the informative
ones. The choice then depends on the image only, not on the question. (FasterVLM drops the patches
before the LLM; here FastV drops them at layer K, with the same choice for every K.)

Use it:    FastV(k=2, r=0.5, rule=make_cls_rule(model, pixel_values))
Check it:  python -m pytest homework/check_3_cls_rule.py
"""

import torch

from minifastv.model import PruningInputs  # noqa: F401  (what the rule you return receives)


@torch.no_grad()
def make_cls_rule(model, pixel_values):
    """A pruning rule (PruningInputs -> (B, num_keep) indices) that keeps the patches CLIP's CLS
    token attends to most.

    Compute the scores here, once, from the vision tower:
      - the layer: the last CLIP layer that runs for LLaVA, the one whose output is the hidden state
        `model.config.vision_feature_layer`. With -2 and 24 layers, layers 0 .. 22 run and the
        scores come from layer 22. (CLIPVisionTower.forward in model.py computes how many
        layers run.)
      - the score of a patch: the attention weight of the CLS token (query 0) on that patch's
        token (keys 1 .. 576: token 0 is CLS itself), in that layer's softmax, mean over heads.
        One score per image token, since LLaVA-1.5 drops the CLS token ("default" strategy: 576
        image tokens per image).
    The rule you return only picks the top `inputs.num_keep` of those scores.

    pixel_values: (num_images, 3, H, W), the same tensor you pass to the model. With B prompts of n
    images each, prompt b holds images b * n .. (b + 1) * n - 1, and its N = n * 576 image tokens
    are their patches in that order.

    Hints: run the tower as CLIPVisionTower.forward does, but stop before the last layer that
    runs. CLIPAttention uses SDPA, which never makes the attention weights: compute that
    layer's from its q_proj and k_proj, applied to layer_norm1 of the layer's input, split into
    heads like CLIPAttention.forward, softmax of q @ k^T * head_dim ** -0.5 (no mask: every
    patch sees every patch).
    """
    raise NotImplementedError("fill in make_cls_rule() in homework/cls_rule.py first (exercise 3)")
