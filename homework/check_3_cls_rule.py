"""Check exercise 3 (homework/cls_rule.py): python -m pytest homework/check_3_cls_rule.py

The reference is transformers' CLIP vision tower run with eager attention and output_attentions: in
the layer whose output LLaVA reads, the CLS token's row (query 0), the patch columns (keys 1 ..),
mean over heads. Your rule must keep a top num_keep of those scores (ties within 1e-7 count as ties)
for every case: 6 sets of random images, one and two per prompt, batches of one to three prompts,
R = 0.1, 0.25, 0.5, 0.75, 0.9.
"""

import pytest
import torch

import minifastv
import minifastv.model as M

# tiny: a pytest fixture
from checking import (
    ask_rule, exercise, once, pruning_inputs, test_helpers, tiny, top_k_mistake,  # noqa: F401
)

make_cls_rule = exercise("cls_rule.py", "make_cls_rule")

PROMPTS = [(1, 1), (2, 1), (1, 3), (2, 2)]  # (images per prompt, batch size)
SEEDS, SHARES = range(6), (0.1, 0.25, 0.5, 0.75, 0.9)


@torch.no_grad()
def reference_scores(tiny, pixels, batch_size):
    """(B, N): the score of every image token of every prompt, from transformers' CLIP
    attention weights."""
    vision = tiny.hf.model.vision_tower
    # attentions[i]: (images, H, 1 + P, 1 + P) of CLIP layer i
    out = vision(pixels, output_attentions=True)
    # hidden state f (f = vision_feature_layer) is the output of the (f mod (L + 1))-th
    # layer, counting from 1
    layers_run = tiny.hf.config.vision_feature_layer % (len(out.attentions) + 1)
    cls_row = out.attentions[layers_run - 1][:, :, 0, 1:].float().mean(dim=1)  # (images, P)
    return cls_row.reshape(batch_size, -1)  # (B, N): each prompt's images, in order


def kept_by(tiny, rule, ids, mask, pixels, k, r):
    fastv = M.FastV(k, r, rule=rule)
    cache = tiny.ours.new_cache(ids, fastv)  # after the prefill, it knows which tokens were kept
    # FastV checks the rule's answer (shape, distinct, in range) and says what is wrong
    with torch.no_grad():
        tiny.ours(ids, pixels, attention_mask=mask, cache=cache, fastv=fastv,
                  last_logits_only=True)
    return cache.kept_image_tokens  # (B, num_keep), sorted


def prompts(tiny, num_images, batch_size, seed):
    ids, mask, _ = tiny.case(num_images, batch_size, seed=seed)
    # an image of its own
    return ids, mask, test_helpers.random_pixels(num_images * batch_size, seed=50 + seed)


@pytest.mark.parametrize("r", [0.25, 0.5, 0.9])
def test_keeps_the_requested_number(tiny, r):
    for num_images, batch_size in PROMPTS:
        ids, mask, pixels = prompts(tiny, num_images, batch_size, seed=0)
        kept = kept_by(tiny, make_cls_rule(tiny.ours, pixels), ids, mask, pixels, 2, r)
        assert kept.shape == (batch_size, round(num_images * tiny.tokens_per_image * (1 - r)))


def case(tiny, num_images, batch_size, seed):
    """(pixels, what FastV hands a rule at K=2 for prompts with these images, the reference
    scores): built once."""
    def build():
        ids, mask, pixels = prompts(tiny, num_images, batch_size, seed)
        return (pixels, pruning_inputs(tiny.ours, ids, mask, pixels, 2),
                reference_scores(tiny, pixels, batch_size))
    return once(("check 3", num_images, batch_size, seed), build)


@pytest.mark.parametrize("num_images, batch_size", PROMPTS)
def test_matches_transformers_clip_attention(tiny, num_images, batch_size):
    mistakes, count = [], 0
    for seed in SEEDS:
        pixels, inputs, scores = case(tiny, num_images, batch_size, seed)
        rule = make_cls_rule(tiny.ours, pixels)
        for r in SHARES:
            kept = ask_rule(rule, inputs, round(scores.shape[1] * (1 - r)))
            for prompt in range(batch_size):
                count += 1
                mistake = top_k_mistake(kept[prompt], scores[prompt])
                if mistake:
                    mistakes.append(f"seed {seed}, R={r}, prompt {prompt}: {mistake}")
    assert not mistakes, (
        f"on {len(mistakes)} of {count} prompts the choice is not a top num_keep of the CLS "
        f"token's attention (transformers' CLIP, the layer LLaVA reads, mean over heads). "
        f"First ones:\n"
        + "\n".join(mistakes[:3])
    )


def test_choice_does_not_depend_on_k_or_the_prompt(tiny):
    """Scored before the LLM: neither the layer K nor the question's words can change the choice."""
    ids, mask, pixels = tiny.case(1, 1)
    other_ids, other_mask, _ = tiny.case(1, 1, seed=5)  # other text, same image
    rule = make_cls_rule(tiny.ours, pixels)
    choices = [kept_by(tiny, rule, ids, mask, pixels, k, 0.5) for k in (1, 2, 3)]
    choices.append(kept_by(tiny, rule, other_ids, other_mask, pixels, 2, 0.5))
    assert all(torch.equal(choice, choices[0]) for choice in choices), (
        [choice.tolist() for choice in choices]
    )


def test_generates_end_to_end(tiny):
    ids, mask, pixels = tiny.case(2, 2)
    fastv = M.FastV(2, 0.5, rule=make_cls_rule(tiny.ours, pixels))
    stats = minifastv.GenerationStats()
    tokens = minifastv.generate(tiny.ours, ids, pixels, attention_mask=mask, max_new_tokens=4,
                                fastv=fastv, stats=stats, eos_token_id=-1)
    assert tokens.shape == (2, 4)
    scores = reference_scores(tiny, pixels, 2)
    assert not any(top_k_mistake(kept, row) for kept, row in zip(stats.kept_image_tokens, scores))
