"""Check exercise 2 (homework/pyramid.py): python -m pytest homework/check_2_pyramid.py

With one stage your logits must equal FastV's, model(..., fastv=FastV(k, r))[:, -1], within 1e-5
(the same layers as yours; the last bits of a float32 depend on how you slice). Two stages are
compared with a reference that never removes a token: removing a token before layer k changes
the last token's logits exactly as hiding it from every layer from k on does (a key nobody may
attend to counts for nothing), so the reference runs transformers' whole model (eager attention)
on the full sequence, each layer with an attention mask that hides the tokens pruned so far;
every token keeps its place, so positions need no tracking there. transformers' layers round
differently from minifastv's: within 1e-4, far less than a wrong token kept or a wrong position
changes. Your function must really shorten the sequence: a third test counts the image tokens
entering each of minifastv's layers.
"""

import pytest
import torch

import minifastv.model as M

from checking import exercise, require, tiny  # noqa: F401  (tiny: a pytest fixture)

pyramid_forward = exercise("pyramid.py", "pyramid_forward")

SCHEDULES = [  # two stages: (k1, r1), (k2, r2)
    [(1, 0.5), (3, 0.5)],
    [(2, 0.25), (3, 0.5)],
    [(1, 0.75), (2, 0.5)],
    [(1, 0.25), (2, 0.75)],
]


def prompts(tiny, num_images=1, batch_size=1, seed=0):
    # one length: no padding
    ids, _, pixels = tiny.batch(seed, num_images, pad=False, batch_size=batch_size)
    return ids, pixels


@torch.no_grad()
def reference_pyramid(tiny, ids, pixels, schedule):
    """Last-token logits (B, vocab) of transformers' model, pruning at every stage of the schedule
    by hiding tokens."""
    layers = tiny.hf.model.language_model.layers
    B, T = ids.shape
    is_image = ids == tiny.image_token_id
    # the first layer that may no longer attend to each token: none yet
    hidden_from = torch.full((B, T), len(layers))
    causal = torch.ones(T, T, dtype=torch.bool).tril()

    def mask_hook(index):  # layer `index` sees, causally, the tokens not hidden from it
        def hook(module, args, kwargs):
            visible = causal & (hidden_from > index)[:, None, :]  # (B, T, T)
            kwargs["attention_mask"] = torch.zeros(B, 1, T, T).masked_fill(
                ~visible[:, None], float("-inf")
            )
            return args, kwargs
        return hook

    def run():
        hooks = [layer.register_forward_pre_hook(mask_hook(index), with_kwargs=True)
                 for index, layer in enumerate(layers)]
        try:
            return tiny.hf(input_ids=ids, pixel_values=pixels, output_attentions=True,
                           logits_to_keep=1, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()

    for k, r in schedule:
        # (B, T): layer k-1, mean over heads, last token
        last_row = run().attentions[k - 1].float().mean(dim=1)[:, -1]
        for prompt in range(B):
            still_there = (is_image[prompt] & (hidden_from[prompt] > k)).nonzero()[:, 0]
            kept = last_row[prompt, still_there].topk(round(len(still_there) * (1 - r))).indices
            dropped = torch.ones(len(still_there), dtype=torch.bool)
            dropped[kept] = False
            hidden_from[prompt, still_there[dropped]] = k  # hidden from layer k on: pruned there
    return run().logits[:, -1]


def sequence_lengths(model, run):
    """How many tokens enter each decoder layer while `run()` runs."""
    lengths = {}

    def record(index):
        def hook(module, args, kwargs):
            lengths[index] = (args[0] if args else kwargs["x"]).shape[1]
        return hook

    hooks = [layer.register_forward_pre_hook(record(index), with_kwargs=True)
             for index, layer in enumerate(model.language_model.layers)]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return [lengths.get(index) for index in range(len(model.language_model.layers))]


def same_logits_as(tiny, ids, pixels, logits, tolerance, alternatives):
    """The first of `alternatives` ({description: FastV or None}) whose last-token logits equal
    `logits` within `tolerance`: it names what a wrong pyramid did instead."""
    for description, fastv in alternatives.items():
        with torch.no_grad():
            theirs = tiny.ours(ids, pixels, fastv=fastv, last_logits_only=True)[:, -1]
        if theirs.shape == logits.shape and (theirs - logits).abs().max() < tolerance:
            return description
    return None


@pytest.mark.parametrize("k, r, num_images, batch_size, seed", [
    (2, 0.5, 1, 1, 0), (1, 0.75, 2, 1, 1), (3, 0.25, 1, 2, 2),
    (1, 0.5, 1, 3, 3), (2, 0.75, 2, 2, 4), (3, 0.5, 2, 1, 5)])
def test_one_stage_is_fastv(tiny, k, r, num_images, batch_size, seed):
    ids, pixels = prompts(tiny, num_images, batch_size, seed)
    logits = pyramid_forward(tiny.ours, ids, pixels, [(k, r)])
    with torch.no_grad():
        expected = tiny.ours(ids, pixels, fastv=M.FastV(k, r))[:, -1]
    require(logits.shape == expected.shape,
            f"expected last-token logits of shape {tuple(expected.shape)} (batch, vocabulary), "
            f"got {tuple(logits.shape)}")
    difference = (logits - expected).abs().max().item()
    if difference >= 1e-5:
        layers = len(tiny.ours.language_model.layers)
        instead = same_logits_as(tiny, ids, pixels, logits, 1e-5, {
            "the model's without pruning: the stage removed nothing": None,
            f"FastV's at K={k + 1}: the stage ranks one layer late, by layer K's attention "
            f"instead of layer K-1's": M.FastV(k + 1, r) if k + 1 < layers else None,
            f"FastV's at K={k - 1}: the stage ranks and prunes one layer early":
                M.FastV(k - 1, r) if k > 1 else None,
        })
        hint = (f" They equal {instead}." if instead else
                " Do the kept tokens keep their original positions, and does the stage rank"
                " by the last token's attention in layer K-1, mean over heads after the softmax?")
        pytest.fail(f"with one stage ({k}, {r}) your logits differ from FastV's, "
                    f"model(..., fastv=FastV({k}, {r}))[:, -1], by up to {difference:.2g} "
                    f"(allowed: 1e-5).{hint}", pytrace=False)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("num_images, batch_size", [(1, 1), (2, 2)])
def test_two_stages_match_reference(tiny, schedule, num_images, batch_size):
    ids, pixels = prompts(tiny, num_images, batch_size, seed=SCHEDULES.index(schedule))
    logits = pyramid_forward(tiny.ours, ids, pixels, schedule)
    expected = reference_pyramid(tiny, ids, pixels, schedule)
    require(logits.shape == expected.shape,
            f"expected last-token logits of shape {tuple(expected.shape)} (batch, vocabulary), "
            f"got {tuple(logits.shape)}")
    difference = (logits - expected).abs().max().item()
    if difference >= 1e-4:
        (k1, r1), (k2, r2) = schedule
        instead = same_logits_as(tiny, ids, pixels, logits, 1e-4, {
            f"the first stage's alone, FastV({k1}, {r1}): the second stage at layer {k2} "
            f"changed nothing": M.FastV(k1, r1),
            "the model's without pruning: neither stage removed anything": None,
        })
        hint = (f" They equal {instead}." if instead else
                f" With one stage your function is right if test_one_stage_is_fastv passes: look"
                f" at the second stage, which ranks the image tokens still there by layer"
                f" {k2 - 1}'s attention on the shortened sequence.")
        pytest.fail(f"schedule {schedule}: your logits differ from the two-stage reference by up "
                    f"to {difference:.2g} (allowed: 1e-4).{hint}", pytrace=False)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_image_tokens_left_after_each_stage(tiny, schedule):
    ids, pixels = prompts(tiny, num_images=2)
    num_text = int((ids != tiny.image_token_id).sum())
    expected, left = [], 2 * tiny.tokens_per_image
    stages = dict(schedule)
    for index in range(len(tiny.ours.language_model.layers)):
        if index in stages:
            left = round(left * (1 - stages[index]))
        expected.append(left)
    lengths = sequence_lengths(tiny.ours, lambda: pyramid_forward(tiny.ours, ids, pixels, schedule))
    require(None not in lengths, "a decoder layer never ran: run every layer of "
            "model.language_model.layers, in order")
    got = [length - num_text for length in lengths]
    wrong = next((index for index in range(len(got)) if got[index] != expected[index]), None)
    if wrong is not None:
        before = expected[wrong - 1] if wrong else 2 * tiny.tokens_per_image
        why = (f"the stage ({wrong}, {stages[wrong]}) keeps round({before} x "
               f"(1 - {stages[wrong]})) of the {before} image tokens still there"
               if wrong in stages else "no stage prunes there")
        pytest.fail(f"schedule {schedule}: {got[wrong]} image tokens enter layer {wrong}, where "
                    f"{expected[wrong]} should: {why}", pytrace=False)


def test_pruning_twice_differs_from_once(tiny):
    """A guard against a second stage that does nothing."""
    ids, pixels = prompts(tiny)
    once = pyramid_forward(tiny.ours, ids, pixels, [(1, 0.5)])
    twice = pyramid_forward(tiny.ours, ids, pixels, [(1, 0.5), (2, 0.75)])
    require(not torch.allclose(once, twice, atol=1e-4),
            "pruning at (1, 0.5) and then at (2, 0.75) gives the logits of pruning at (1, 0.5) "
            "alone: the second stage changes nothing")
