"""Check exercise 1 (homework/text_attention_rule.py):
python -m pytest homework/check_1_text_attention.py

The reference is transformers' own attention weights of layer K-1 (eager attention,
output_attentions), mean over heads, then, one image token at a time, the mean of its column over
the rows that vote: every text row (1a), or every real row that can see it (1b). It runs
transformers' whole model on the prompt's ids and pixels; your rule gets minifastv's queries and
keys, not this matrix, so agreeing with it means something. The rule must keep a top num_keep of
those scores (ties within 1e-7 count as ties) on every case: 3 prompts of random lengths per batch,
3 random batches, with and without left padding, one and two images, K = 1, 2, 3 and
R = 0.25, 0.5, 0.75; and inside generate, on prompts of their own.
"""

from types import SimpleNamespace

import pytest
import torch

import minifastv
import minifastv.model as M

# tiny: a pytest fixture
from checking import (  # noqa: F401
    ask_rule, choice_mistake, exercise, is_top_k, once, pruning_inputs, require, tiny,
)

RULES = {
    "1a": exercise("text_attention_rule.py", "all_text_tokens_rule"),
    "1b": exercise("text_attention_rule.py", "all_tokens_rule"),
}
VOTERS = {"1a": "text", "1b": "all"}
WHO_VOTES = {"text": "every text row", "all": "every row that can see the token",
             "last": "the last token alone (fastv_rule)"}
SEEDS, LAYERS, SHARES = (0, 1, 2), (1, 2, 3), (0.25, 0.5, 0.75)


@torch.no_grad()
def reference_scores(hf, input_ids, attention_mask, pixel_values, layer, image_token_id):
    """The score of every image token of every prompt, {voters: (B, N)}, from the attention weights
    of decoder layer `layer` in transformers' model `hf` (mean over heads), prompt by prompt and
    column by column:

    "text": the mean over the rows of every real text token, those before the image (weight 0)
      included.
    "all": the mean over the rows that can see the token, text and image: its own row and every
      real row after it.
    "last": the last token's row alone (FastV's own score).
    """
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as minifastv numbers left padding
    attentions = hf(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                    position_ids=positions, output_attentions=True, logits_to_keep=1,
                    use_cache=False).attentions
    attention = attentions[layer].float().mean(dim=1)  # (B, T, T)
    position = torch.arange(input_ids.shape[1])
    scores = {"text": [], "all": [], "last": []}
    for prompt in range(len(input_ids)):
        is_image = input_ids[prompt] == image_token_id
        is_real = attention_mask[prompt].bool()
        voting_rows = {"text": lambda column: is_real & ~is_image,
                       "all": lambda column: is_real & (position >= column),
                       "last": lambda column: position == len(position) - 1}
        for voters, rows in voting_rows.items():
            scores[voters].append(torch.stack([attention[prompt, rows(column), column].mean()
                                               for column in is_image.nonzero()[:, 0]]))
    return {voters: torch.stack(per_prompt) for voters, per_prompt in scores.items()}


@torch.no_grad()
def build_cases(tiny, num_images, pad):
    """Every seed and K of one kind of batch: the prompts, what FastV hands a rule there, and the
    reference scores."""
    cases = []
    for seed in SEEDS:
        ids, mask, pixels = tiny.batch(seed, num_images, pad)
        for k in LAYERS:
            cases.append(SimpleNamespace(
                seed=seed, k=k, ids=ids, mask=mask, pixels=pixels,
                inputs=pruning_inputs(tiny.ours, ids, mask, pixels, k),
                scores=reference_scores(tiny.hf, ids, mask, pixels, k - 1, tiny.image_token_id),
            ))
    return cases


def cases(tiny, num_images, pad):
    return once(("check 1", num_images, pad), lambda: build_cases(tiny, num_images, pad))


def num_keep(inputs, r):
    return round(inputs.image_positions.shape[1] * (1 - r))


def explain(rule, failures, count):
    """What the failures of the match test have in common, in a few sentences."""
    voters = VOTERS[rule]
    lines = [f"{rule}: on {len(failures)} of {count} prompts your rule keeps image tokens that the "
             f"reference ({WHO_VOTES[voters]} votes, transformers' attention of layer K-1) "
             f"drops."]
    if all(failure.padded for failure in failures):
        lines.append("Only prompts with left padding go wrong: a padding token neither votes nor "
                     "receives attention, and it is not a text token.")
    for other in ("last", "text", "all"):
        if other != voters and all(failure.same_as[other] for failure in failures):
            lines.append(f"On every one of them your choice is what the scores of another way of "
                         f"voting choose: {WHO_VOTES[other]}.")
    first = failures[0]
    lines.append(f"For example ({first.description}): {first.mistake}.")
    return "\n".join(lines)


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("k, r, num_images, batch_size",
                         [(2, 0.5, 1, 1), (1, 0.75, 2, 2), (3, 0.25, 2, 3)])
def test_keeps_the_requested_number_of_distinct_tokens(tiny, rule, k, r, num_images, batch_size):
    ids, mask, pixels = tiny.case(num_images, batch_size)
    fastv = M.FastV(k, r, rule=RULES[rule])
    cache = tiny.ours.new_cache(ids, fastv)  # after the prefill, it knows which tokens were kept
    # FastV itself checks the rule's answer (shape, distinct, in range) with a clear ValueError
    with torch.no_grad():
        tiny.ours(ids, pixels, attention_mask=mask, cache=cache, fastv=fastv,
                  last_logits_only=True)
    wanted = round(num_images * tiny.tokens_per_image * (1 - r))
    require(cache.kept_image_tokens.shape[1] == wanted,
            f"{num_images} images at R={r}: each prompt should keep {wanted} image tokens, your "
            f"rule kept {cache.kept_image_tokens.shape[1]}")


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("num_images", [1, 2])
@pytest.mark.parametrize("pad", [False, True], ids=["same-length", "left-padded"])
def test_matches_transformers_attention_matrix(tiny, rule, num_images, pad):
    failures, count = [], 0
    for case in cases(tiny, num_images, pad):
        for r in SHARES:
            kept = ask_rule(RULES[rule], case.inputs, num_keep(case.inputs, r))
            for prompt, scores in enumerate(case.scores[VOTERS[rule]]):
                count += 1
                mistake = choice_mistake(kept[prompt], scores, tiny.tokens_per_image,
                                         tiny.grid_size)
                if mistake:
                    failures.append(SimpleNamespace(
                        description=f"seed {case.seed}, K={case.k}, R={r}, prompt {prompt}",
                        mistake=mistake, padded=bool((case.mask[prompt] == 0).any()),
                        same_as={voters: is_top_k(kept[prompt], other[prompt])
                                 for voters, other in case.scores.items()},
                    ))
    if failures:
        pytest.fail(explain(rule, failures, count), pytrace=False)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_differs_from_the_last_token_rule(tiny, rule):
    """More voters is not the same as asking the last token alone: some case must differ."""
    differs = [not torch.equal(ask_rule(RULES[rule], case.inputs, num_keep(case.inputs, r)),
                               ask_rule(M.fastv_rule, case.inputs, num_keep(case.inputs, r)))
               for case in cases(tiny, 1, True) for r in SHARES]
    if not any(differs):
        pytest.fail(f"{rule} chose exactly what fastv_rule (the last token alone) chooses in all "
                    f"{len(differs)} cases: the other tokens' votes are not counted",
                    pytrace=False)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_generates_end_to_end(tiny, rule):
    """Inside generate, on left-padded prompts of their own: the choice is still the reference's."""
    ids, mask, pixels = tiny.case(1, 2)
    stats = minifastv.GenerationStats()
    tokens = minifastv.generate(tiny.ours, ids, pixels, attention_mask=mask, max_new_tokens=4,
                                fastv=M.FastV(2, 0.5, rule=RULES[rule]), stats=stats,
                                eos_token_id=-1)
    require(tokens.shape == (2, 4), f"generate with your rule gave {tuple(tokens.shape)} new "
                                    f"tokens, not 4 for each of the 2 prompts")
    scores = reference_scores(tiny.hf, ids, mask, pixels, 1, tiny.image_token_id)[VOTERS[rule]]
    mistakes = [choice_mistake(kept, row, tiny.tokens_per_image, tiny.grid_size)
                for kept, row in zip(stats.kept_image_indices, scores)]
    if any(mistakes):
        pytest.fail(f"{rule} inside generate (K=2, R=0.5), on prompts of this test's own: "
                    f"{next(filter(None, mistakes))}", pytrace=False)
