"""Check exercise 2 (homework/pyramid.py): python -m pytest homework/check_2_pyramid.py

One stage must be FastV exactly. Two stages are compared with a reference built from transformers' own
decoder layers (eager attention): the full attention matrix of layer k-1 at each stage, the last token's
row, top round(n * (1 - r)), original positions, like tests/test_fastv.py's reference_fastv, twice.
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
]


def prompts(tiny, num_images=1, batch_size=1):
    ids, _, pixels = tiny.case(num_images, batch_size, pad=False)  # one length: no padding
    return ids, pixels


@torch.no_grad()
def reference_pyramid(tiny, ids, pixels, schedule):
    """Last-token logits (B, vocab), from transformers' layers, pruning at every stage of the schedule."""
    hf = tiny.hf
    language_model = hf.model.language_model
    out = hf(input_ids=ids, pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    B, T = ids.shape
    first_k = schedule[0][0]
    hidden = out.hidden_states[first_k]  # the input of layer k1
    attention = out.attentions[first_k - 1]  # (B, H, T, T): the full matrix of layer k1 - 1
    positions = torch.arange(T).expand(B, T)
    is_image = ids == tiny.image_token_id
    captured = {}
    ends = [k for k, _ in schedule[1:]] + [len(language_model.layers)]
    for (k, r), end in zip(schedule, ends):
        last_row = attention.float().mean(dim=1)[:, -1]  # (B, T_now): mean over heads, the last token's row
        keep = []
        for row in range(B):
            image_positions = is_image[row].nonzero()[:, 0]
            top = last_row[row, image_positions].topk(round(len(image_positions) * (1 - r))).indices
            keep.append(torch.cat([(~is_image[row]).nonzero()[:, 0], image_positions[top]]).sort().values)
        keep = torch.stack(keep)  # (B, T_kept)
        hidden = hidden.gather(1, keep[..., None].expand(-1, -1, hidden.shape[-1]))
        positions, is_image = positions.gather(1, keep), is_image.gather(1, keep)
        n = keep.shape[1]
        causal = torch.full((n, n), float("-inf")).triu(1)[None, None]  # eager attention adds its mask
        rope = language_model.rotary_emb(hidden, positions)  # ORIGINAL positions
        hook = language_model.layers[end - 1].self_attn.register_forward_hook(
            lambda module, args, output: captured.update(attention=output[1]))
        for layer in language_model.layers[k:end]:
            hidden = layer(hidden, attention_mask=causal, position_embeddings=rope)
        hook.remove()
        attention = captured["attention"]  # the next stage scores with the last layer just run
    return hf.lm_head(language_model.norm(hidden))[:, -1]


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


@pytest.mark.parametrize("k, r, num_images, batch_size", [(2, 0.5, 1, 1), (1, 0.75, 2, 1), (3, 0.25, 1, 2)])
def test_one_stage_is_fastv(tiny, k, r, num_images, batch_size):
    ids, pixels = prompts(tiny, num_images, batch_size)
    logits = pyramid_forward(tiny.ours, ids, pixels, [(k, r)])
    with torch.no_grad():
        expected = tiny.ours(ids, pixels, fastv=M.FastV(k, r))[:, -1]
    assert logits.shape == expected.shape, f"expected last-token logits {tuple(expected.shape)}, got {tuple(logits.shape)}"
    difference = (logits - expected).abs().max().item()
    assert difference < 1e-6, f"max abs difference to model(..., fastv=FastV({k}, {r}))[:, -1]: {difference}"


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("num_images, batch_size", [(1, 1), (2, 2)])
def test_two_stages_match_reference(tiny, schedule, num_images, batch_size):
    ids, pixels = prompts(tiny, num_images, batch_size)
    logits = pyramid_forward(tiny.ours, ids, pixels, schedule)
    expected = reference_pyramid(tiny, ids, pixels, schedule)
    assert logits.shape == expected.shape, f"expected last-token logits {tuple(expected.shape)}, got {tuple(logits.shape)}"
    difference = (logits - expected).abs().max().item()
    assert difference < 1e-5, f"max abs difference to the two-stage reference: {difference}"


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_image_tokens_left_after_each_stage(tiny, schedule):
    ids, pixels = prompts(tiny, num_images=2)
    num_text = int((ids != tiny.image_token_id).sum())
    image_tokens = 2 * tiny.tokens_per_image
    expected, left = [], image_tokens
    stages = dict(schedule)
    for index in range(len(tiny.ours.language_model.layers)):
        if index in stages:
            left = round(left * (1 - stages[index]))
        expected.append(num_text + left)
    lengths = sequence_lengths(tiny.ours, lambda: pyramid_forward(tiny.ours, ids, pixels, schedule))
    assert [length - num_text for length in lengths] == [n - num_text for n in expected], (
        f"image tokens entering each layer: expected {[n - num_text for n in expected]}, "
        f"got {[length - num_text if length is not None else None for length in lengths]}"
    )


def test_pruning_twice_differs_from_once(tiny):
    """A guard against a second stage that does nothing."""
    ids, pixels = prompts(tiny)
    once = pyramid_forward(tiny.ours, ids, pixels, [(1, 0.5)])
    twice = pyramid_forward(tiny.ours, ids, pixels, [(1, 0.5), (2, 0.75)])
    assert not torch.allclose(once, twice, atol=1e-4)
