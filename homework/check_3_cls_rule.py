"""Check exercise 3 (homework/cls_rule.py): python -m pytest homework/check_3_cls_rule.py

The reference is transformers' CLIP vision tower run with eager attention and output_attentions: in
the layer whose output LLaVA reads, the CLS token's row (query 0), the patch columns (keys 1 ..),
mean over heads. Your rule must keep a top num_keep of those scores (ties within 1e-7 count as ties)
for every case: 6 sets of random images, one and two per prompt, batches of one to three prompts,
R = 0.1, 0.25, 0.5, 0.75, 0.9; inside generate; and on a second model whose LLaVA reads another
CLIP layer (the last one).
"""

import pytest
import torch

import minifastv
import minifastv.model as M

# tiny: a pytest fixture
from checking import (  # noqa: F401
    ask_rule, choice_mistake, exercise, is_top_k, once, other_tiny, pruning_inputs, require,
    test_helpers, tiny,
)

make_cls_rule = exercise("cls_rule.py", "make_cls_rule")

PROMPTS = [(1, 1), (2, 1), (1, 3), (2, 2)]  # (images per prompt, batch size)
SEEDS, SHARES = range(6), (0.1, 0.25, 0.5, 0.75, 0.9)


@torch.no_grad()
def reference_scores(hf, pixels, layers_back=1):
    """(images, P): the score of every patch of every image, from the attention weights of
    transformers' CLIP (`hf`'s vision tower): CLS row, patch columns, mean over heads, in the layer
    whose output LLaVA reads (layers_back=1; 2 is the layer before it, 0 the one after it)."""
    # attentions[i]: (images, H, 1 + P, 1 + P) of CLIP layer i
    attentions = hf.model.vision_tower(pixels, output_attentions=True).attentions
    # hidden state f (f = vision_feature_layer) is the output of the (f mod (L + 1))-th
    # layer, counting from 1
    layers_run = hf.config.vision_feature_layer % (len(attentions) + 1)
    layer = layers_run - layers_back
    if not 0 <= layer < len(attentions):
        return None
    return attentions[layer][:, :, 0, 1:].float().mean(dim=1)


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
        wanted = round(num_images * tiny.tokens_per_image * (1 - r))
        require(kept.shape[1] == wanted,
                f"{batch_size} prompts of {num_images} images at R={r}: each should keep {wanted} "
                f"image tokens, your rule kept {kept.shape[1]} each")


def case(tiny, num_images, batch_size, seed):
    """(pixels, what FastV hands a rule at K=2 for prompts with these images, the reference
    scores): built once."""
    def build():
        ids, mask, pixels = prompts(tiny, num_images, batch_size, seed)
        return (pixels, pruning_inputs(tiny.ours, ids, mask, pixels, 2),
                reference_scores(tiny.hf, pixels).reshape(batch_size, -1))
    return once(("check 3", num_images, batch_size, seed), build)


def explain(mistakes, count, hints):
    """The failures of a match test, in a few sentences: how many, a hint, the first one."""
    lines = [f"on {len(mistakes)} of {count} prompts your rule keeps patches that the reference "
             f"(CLIP's CLS row in the layer LLaVA reads, mean over heads, from transformers) "
             f"drops."]
    lines += [hint for hint, holds in hints.items() if all(holds)]
    lines.append(f"For example ({mistakes[0]}.")
    return "\n".join(lines)


def wrong_readings(hf, pixels):
    """What plausible misreadings of CLIP's attention score, each (images, P), to name a mistake:
    the CLIP layer before or after the right one, the CLS row one column to the left, the CLS
    column instead of its row."""
    attentions = hf.model.vision_tower(pixels, output_attentions=True).attentions
    right = attentions[hf.config.vision_feature_layer % (len(attentions) + 1) - 1]
    readings = {
        "the CLIP layer before the one LLaVA reads": reference_scores(hf, pixels, layers_back=2),
        "the CLIP layer after the one LLaVA reads (which LLaVA never runs)":
            reference_scores(hf, pixels, layers_back=0),
        "keys 0 .. P-1 (CLS itself in, the last patch out): the columns are off by one":
            right[:, :, 0, :-1].float().mean(dim=1),
        "the attention each patch pays CLS (a column), not CLS's row": right[:, :, 1:, 0].float()
        .mean(dim=1),
    }
    return {name: scores for name, scores in readings.items() if scores is not None}


@pytest.mark.parametrize("num_images, batch_size", PROMPTS)
def test_matches_transformers_clip_attention(tiny, num_images, batch_size):
    mistakes, count, hints = [], 0, {}
    for seed in SEEDS:
        pixels, inputs, scores = case(tiny, num_images, batch_size, seed)
        readings = once(("check 3 readings", num_images, batch_size, seed),
                        lambda: wrong_readings(tiny.hf, pixels))
        rule = make_cls_rule(tiny.ours, pixels)
        for r in SHARES:
            kept = ask_rule(rule, inputs, round(scores.shape[1] * (1 - r)))
            for prompt in range(batch_size):
                count += 1
                mistake = choice_mistake(kept[prompt], scores[prompt], tiny.tokens_per_image,
                                         tiny.grid_size)
                if mistake:
                    mistakes.append(f"seed {seed}, R={r}, prompt {prompt}): {mistake}")
                    for name, wrong in readings.items():
                        hints.setdefault(f"Your choice is a top num_keep of {name}.", []).append(
                            is_top_k(kept[prompt], wrong.reshape(batch_size, -1)[prompt]))
    if mistakes:
        pytest.fail(explain(mistakes, count, hints), pytrace=False)


def test_reads_the_layer_the_models_config_names(other_tiny):
    """Another model, whose LLaVA reads CLIP's LAST layer (vision_feature_layer -1): the rule
    must read the layer from the config it is given."""
    ids, mask, pixels = prompts(other_tiny, 2, 2, seed=0)
    inputs = pruning_inputs(other_tiny.ours, ids, mask, pixels, 2)
    scores = reference_scores(other_tiny.hf, pixels).reshape(2, -1)
    kept = ask_rule(make_cls_rule(other_tiny.ours, pixels), inputs, scores.shape[1] // 2)
    mistakes = [choice_mistake(row, row_scores, other_tiny.tokens_per_image,
                               other_tiny.grid_size) for row, row_scores in zip(kept, scores)]
    before = reference_scores(other_tiny.hf, pixels, layers_back=2).reshape(2, -1)
    hint = (" Your choice is a top num_keep of the second to last layer's attention: read the "
            "layer from model.config.vision_feature_layer."
            if all(is_top_k(row, row_scores) for row, row_scores in zip(kept, before)) else "")
    if any(mistakes):
        pytest.fail(f"on a model whose LLaVA reads CLIP's last layer (vision_feature_layer -1): "
                    f"{next(filter(None, mistakes))}.{hint}", pytrace=False)


def test_choice_does_not_depend_on_k_or_the_prompt(tiny):
    """Scored before the LLM: neither the layer K nor the question's words can change the choice."""
    ids, mask, pixels = tiny.case(1, 1)
    other_ids, other_mask, _ = tiny.case(1, 1, seed=5)  # other text, same image
    rule = make_cls_rule(tiny.ours, pixels)
    choices = [kept_by(tiny, rule, ids, mask, pixels, k, 0.5) for k in (1, 2, 3)]
    choices.append(kept_by(tiny, rule, other_ids, other_mask, pixels, 2, 0.5))
    differ = [name for name, choice in zip(("K=2", "K=3", "another question"), choices[1:])
              if not torch.equal(choice, choices[0])]
    if differ:
        pytest.fail(f"with {' and with '.join(differ)} your rule keeps other patches than with "
                    f"K=1: the CLS scores come from the image alone, so neither K nor the words "
                    f"may change them", pytrace=False)


def test_generates_end_to_end(tiny):
    ids, mask, pixels = tiny.case(2, 2)
    fastv = M.FastV(2, 0.5, rule=make_cls_rule(tiny.ours, pixels))
    stats = minifastv.GenerationStats()
    tokens = minifastv.generate(tiny.ours, ids, pixels, attention_mask=mask, max_new_tokens=4,
                                fastv=fastv, stats=stats, eos_token_id=-1)
    require(tokens.shape == (2, 4), f"generate with your rule gave {tuple(tokens.shape)} new "
                                    f"tokens, not 4 for each of the 2 prompts")
    scores = reference_scores(tiny.hf, pixels).reshape(2, -1)
    mistakes = [choice_mistake(kept, row, tiny.tokens_per_image, tiny.grid_size)
                for kept, row in zip(stats.kept_image_indices, scores)]
    if any(mistakes):
        pytest.fail(f"inside generate (K=2, R=0.5): {next(filter(None, mistakes))}",
                    pytrace=False)
