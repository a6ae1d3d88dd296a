"""Check exercise 3 (homework/cls_rule.py): python -m pytest homework/check_3_cls_rule.py

The reference is transformers' CLIP vision tower run with eager attention and output_attentions: in the
layer whose output LLaVA reads, the CLS token's row (query 0), the patch columns (1 ..), mean over heads,
top num_keep.
"""

import pytest
import torch

import minifastv
import minifastv.model as M

from checking import exercise, tiny  # noqa: F401  (tiny: a pytest fixture)

make_cls_rule = exercise("cls_rule.py", "make_cls_rule")


@torch.no_grad()
def reference_kept(tiny, pixels, batch_size, r):
    vision = tiny.hf.model.vision_tower
    out = vision(pixels, output_attentions=True)  # attentions[i]: (images, H, 1 + P, 1 + P) of CLIP layer i
    # hidden state f (f = vision_feature_layer) is the output of the (f mod (L + 1))-th layer, counting from 1
    layers_run = tiny.hf.config.vision_feature_layer % (len(out.attentions) + 1)
    cls_row = out.attentions[layers_run - 1][:, :, 0, 1:].float().mean(dim=1)  # (images, P)
    scores = cls_row.reshape(batch_size, -1)  # (B, N): each prompt's images, in order
    return scores.topk(round(scores.shape[1] * (1 - r))).indices.sort().values


def kept_by(tiny, rule, ids, mask, pixels, k, r):
    cache = M.KVCache(len(tiny.ours.language_model.layers))
    with torch.no_grad():
        tiny.ours(ids, pixels, attention_mask=mask, cache=cache, fastv=M.FastV(k, r, rule=rule))
    return cache.kept_image_tokens  # (B, num_keep), sorted


CASES = [(0.5, 1, 1), (0.75, 1, 1), (0.5, 2, 1), (0.25, 1, 2), (0.5, 2, 2)]  # (r, images per prompt, batch size)


@pytest.mark.parametrize("r, num_images, batch_size", CASES)
def test_keeps_the_requested_number(tiny, r, num_images, batch_size):
    ids, mask, pixels = tiny.case(num_images, batch_size)
    rule = make_cls_rule(tiny.ours, pixels)
    kept = kept_by(tiny, rule, ids, mask, pixels, 2, r)  # FastV raises a clear ValueError for a bad answer
    assert kept.shape == (batch_size, round(num_images * tiny.tokens_per_image * (1 - r)))


@pytest.mark.parametrize("r, num_images, batch_size", CASES)
def test_matches_transformers_clip_attention(tiny, r, num_images, batch_size):
    ids, mask, pixels = tiny.case(num_images, batch_size)
    kept = kept_by(tiny, make_cls_rule(tiny.ours, pixels), ids, mask, pixels, 2, r)
    expected = reference_kept(tiny, pixels, batch_size, r)
    assert torch.equal(kept, expected), (
        f"kept {kept.tolist()}, but the CLS token's attention ranks {expected.tolist()} highest"
    )


def test_choice_does_not_depend_on_k_or_the_prompt(tiny):
    """Scored before the LLM: neither the layer K nor the question's words can change the choice."""
    ids, mask, pixels = tiny.case(1, 1)
    other_ids, other_mask, _ = tiny.case(1, 1, seed=5)  # other text, same image
    rule = make_cls_rule(tiny.ours, pixels)
    choices = [kept_by(tiny, rule, ids, mask, pixels, k, 0.5) for k in (1, 2, 3)]
    choices.append(kept_by(tiny, rule, other_ids, other_mask, pixels, 2, 0.5))
    assert all(torch.equal(choice, choices[0]) for choice in choices)


def test_generates_end_to_end(tiny):
    ids, mask, pixels = tiny.case(2, 2)
    fastv = M.FastV(2, 0.5, rule=make_cls_rule(tiny.ours, pixels))
    stats = minifastv.GenerationStats()
    tokens = tiny.ours.generate(ids, pixels, attention_mask=mask, max_new_tokens=4, fastv=fastv, stats=stats, eos_token_id=-1)
    assert tokens.shape == (2, 4)
    assert torch.equal(stats.kept_image_tokens, reference_kept(tiny, pixels, 2, 0.5))
