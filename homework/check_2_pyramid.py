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

from checking import exercise, tiny  # noqa: F401  (tiny: a pytest fixture)

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


@pytest.mark.parametrize("k, r, num_images, batch_size, seed", [
    (2, 0.5, 1, 1, 0), (1, 0.75, 2, 1, 1), (3, 0.25, 1, 2, 2),
    (1, 0.5, 1, 3, 3), (2, 0.75, 2, 2, 4), (3, 0.5, 2, 1, 5)])
def test_one_stage_is_fastv(tiny, k, r, num_images, batch_size, seed):
    ids, pixels = prompts(tiny, num_images, batch_size, seed)
    logits = pyramid_forward(tiny.ours, ids, pixels, [(k, r)])
    with torch.no_grad():
        expected = tiny.ours(ids, pixels, fastv=M.FastV(k, r))[:, -1]
    assert logits.shape == expected.shape, (
        f"expected last-token logits {tuple(expected.shape)}, got {tuple(logits.shape)}"
    )
    difference = (logits - expected).abs().max().item()
    assert difference < 1e-5, (
        f"max abs difference to model(..., fastv=FastV({k}, {r}))[:, -1]: {difference}"
    )


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("num_images, batch_size", [(1, 1), (2, 2)])
def test_two_stages_match_reference(tiny, schedule, num_images, batch_size):
    ids, pixels = prompts(tiny, num_images, batch_size, seed=SCHEDULES.index(schedule))
    logits = pyramid_forward(tiny.ours, ids, pixels, schedule)
    expected = reference_pyramid(tiny, ids, pixels, schedule)
    assert logits.shape == expected.shape, (
        f"expected last-token logits {tuple(expected.shape)}, got {tuple(logits.shape)}"
    )
    difference = (logits - expected).abs().max().item()
    assert difference < 1e-4, (
        f"schedule {schedule}: max abs difference to the two-stage reference: {difference}"
    )


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
    got = [length - num_text if length is not None else None for length in lengths]
    assert got == expected, (
        f"schedule {schedule}: image tokens entering each layer: expected {expected}, got {got}"
    )


def test_pruning_twice_differs_from_once(tiny):
    """A guard against a second stage that does nothing."""
    ids, pixels = prompts(tiny)
    once = pyramid_forward(tiny.ours, ids, pixels, [(1, 0.5)])
    twice = pyramid_forward(tiny.ours, ids, pixels, [(1, 0.5), (2, 0.75)])
    assert not torch.allclose(once, twice, atol=1e-4)
