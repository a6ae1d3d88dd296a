"""Check exercise 1 (homework/text_attention_rule.py):
python -m pytest homework/check_1_text_attention.py

The reference is transformers' own full attention matrix of layer K-1 (eager attention,
output_attentions), mean over heads, then, one image token at a time, the mean of its column over
the rows that vote: every text row (1a), or every real row that can see it (1b). Your rule gets
minifastv's queries and keys, not this matrix, so agreeing with it means something. The rule must
keep a top num_keep of those scores (ties within 1e-7 count as ties) on every case: 3 prompts of
random lengths per batch, 3 random batches, with and without left padding, one and two images,
K = 1, 2, 3 and R = 0.25, 0.5, 0.75.
"""

from types import SimpleNamespace

import pytest
import torch

import minifastv
import minifastv.model as M

# tiny: a pytest fixture
from checking import ask_rule, exercise, once, pruning_inputs, tiny, top_k_mistake  # noqa: F401

RULES = {
    "1a": exercise("text_attention_rule.py", "all_text_tokens_rule"),
    "1b": exercise("text_attention_rule.py", "all_tokens_rule"),
}
VOTERS = {"1a": "text", "1b": "all"}
SEEDS, LAYERS, SHARES = (0, 1, 2), (1, 2, 3), (0.25, 0.5, 0.75)


def reference_scores(attention, input_ids, attention_mask, image_token_id, voters):
    """(N,): the score of every image token of ONE prompt, from transformers' attention matrix
    (T, T), mean over heads.

    voters "text": the mean over the rows of every real text token, those before the image
      (weight 0) included.
    voters "all": the mean over the rows that can see the token, text and image: its own row and
      every real row after it.
    voters "last": the last token's row alone (FastV's own score).
    """
    is_image, is_real = input_ids == image_token_id, attention_mask.bool()
    position = torch.arange(len(input_ids))
    scores = []
    for column in is_image.nonzero()[:, 0]:
        if voters == "text":
            rows = is_real & ~is_image
        elif voters == "all":
            rows = is_real & (position >= column)
        else:
            rows = position == len(input_ids) - 1
        scores.append(attention[rows, column].mean())
    return torch.stack(scores)


@torch.no_grad()
def build_cases(tiny, num_images, pad):
    """Every seed, K and R of one kind of batch: what FastV hands a rule, and the reference scores
    of each prompt."""
    cases = []
    for seed in SEEDS:
        ids, mask, pixels = tiny.batch(seed, num_images, pad)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as minifastv numbers left-padded prompts
        attentions = tiny.hf(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                             position_ids=positions, output_attentions=True, logits_to_keep=1,
                             use_cache=False).attentions
        for k in LAYERS:
            inputs = pruning_inputs(tiny.ours, ids, mask, pixels, k)
            # (B, T, T): layer K-1, mean over heads
            attention = attentions[k - 1].float().mean(dim=1)
            scores = {voters: [reference_scores(attention[prompt], ids[prompt], mask[prompt],
                                                tiny.image_token_id, voters)
                               for prompt in range(len(ids))]
                      for voters in ("text", "all")}
            for r in SHARES:
                cases.append(SimpleNamespace(
                    description=f"seed {seed}, K={k}, R={r}", inputs=inputs, ids=ids, mask=mask,
                    num_keep=round(inputs.image_positions.shape[1] * (1 - r)),
                    attention=attention, scores=scores,
                ))
    return cases


def cases(tiny, num_images, pad):
    return once(("check 1", num_images, pad), lambda: build_cases(tiny, num_images, pad))


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
    assert tuple(cache.kept_image_tokens.shape) == (
        batch_size, round(num_images * tiny.tokens_per_image * (1 - r))
    )


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("num_images", [1, 2])
@pytest.mark.parametrize("pad", [False, True], ids=["same-length", "left-padded"])
def test_matches_transformers_attention_matrix(tiny, rule, num_images, pad):
    mistakes, count = [], 0
    for case in cases(tiny, num_images, pad):
        kept = ask_rule(RULES[rule], case.inputs, case.num_keep)
        for prompt, scores in enumerate(case.scores[VOTERS[rule]]):
            mistake = top_k_mistake(kept[prompt], scores)
            count += 1
            if mistake:
                padding = int((case.mask[prompt] == 0).sum())
                mistakes.append(
                    f"{case.description}, prompt {prompt} ({padding} padding tokens): {mistake}"
                )
    assert not mistakes, (
        f"{rule}: on {len(mistakes)} of {count} prompts the choice is not a top num_keep of the "
        f"reference scores (layer K-1's attention from transformers, mean over heads, the rows "
        f"that vote). First ones:\n"
        + "\n".join(mistakes[:3])
    )


@pytest.mark.parametrize("rule", sorted(RULES))
def test_differs_from_the_last_token_rule(tiny, rule):
    """More voters is not the same as asking the last token alone: some case must differ."""
    differs = [not torch.equal(ask_rule(RULES[rule], case.inputs, case.num_keep),
                               ask_rule(M.fastv_rule, case.inputs, case.num_keep))
               for case in cases(tiny, 1, True)]
    assert any(differs), (
        f"{rule} chose exactly what fastv_rule (the last token alone) chooses in all "
        f"{len(differs)} cases"
    )


@pytest.mark.parametrize("rule", sorted(RULES))
def test_generates_end_to_end(tiny, rule):
    ids, mask, pixels = tiny.case(1, 2)
    tokens = minifastv.generate(tiny.ours, ids, pixels, attention_mask=mask, max_new_tokens=4,
                                fastv=M.FastV(2, 0.5, rule=RULES[rule]), eos_token_id=-1)
    assert tokens.shape == (2, 4)
