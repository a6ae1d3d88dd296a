"""Check exercise 1 (homework/text_attention_rule.py): python -m pytest homework/check_1_text_attention.py

The reference is transformers' own full attention matrix of layer K-1 (eager attention, output_attentions):
mean over heads, mean over the rows of the text tokens, the image columns, top num_keep. It is a different
code path from yours (transformers' matrix, not minifastv's queries and keys), so agreeing with it means
something.
"""

import pytest
import torch

import minifastv.model as M

from checking import exercise, tiny  # noqa: F401  (tiny: a pytest fixture)

all_text_tokens_rule = exercise("text_attention_rule.py", "all_text_tokens_rule")

CASES = [  # (k, r, images per prompt, batch size); batches of 2 are left-padded
    (2, 0.5, 1, 1),
    (1, 0.75, 1, 1),
    (3, 0.5, 2, 1),
    (2, 0.25, 1, 2),
    (2, 0.5, 2, 2),
]


def kept_by(model, rule, ids, mask, pixels, k, r):
    """The image tokens a rule keeps, sorted: (B, num_keep). FastV itself checks the rule's answer (shape,
    distinct, in range) and raises a ValueError that says what is wrong."""
    cache = M.KVCache(len(model.language_model.layers))
    with torch.no_grad():
        model(ids, pixels, attention_mask=mask, cache=cache, fastv=M.FastV(k, r, rule=rule))
    return cache.kept_image_tokens


@torch.no_grad()
def reference_kept(tiny, ids, mask, pixels, k, r):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = tiny.hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=positions, output_attentions=True)
    attention = out.attentions[k - 1].float().mean(dim=1)  # (B, T, T): layer K-1, mean over heads
    is_image = ids == tiny.image_token_id
    kept = []
    for row in range(ids.shape[0]):
        text_rows = (~is_image[row] & mask[row].bool()).nonzero()[:, 0]
        image_columns = is_image[row].nonzero()[:, 0]
        received = attention[row][text_rows][:, image_columns].mean(dim=0)  # (N,): what each image token got
        kept.append(received.topk(round(len(image_columns) * (1 - r))).indices.sort().values)
    return torch.stack(kept)


@pytest.mark.parametrize("k, r, num_images, batch_size", CASES)
def test_keeps_the_requested_number_of_distinct_tokens(tiny, k, r, num_images, batch_size):
    ids, mask, pixels = tiny.case(num_images, batch_size)
    captured = {}

    def spy(inputs):
        captured["num_keep"], captured["keep"] = inputs.num_keep, all_text_tokens_rule(inputs)
        return captured["keep"]

    kept = kept_by(tiny.ours, spy, ids, mask, pixels, k, r)
    num_image_tokens = num_images * tiny.tokens_per_image
    assert tuple(captured["keep"].shape) == (batch_size, round(num_image_tokens * (1 - r)))
    assert kept.shape == captured["keep"].shape
    assert all(len(set(row.tolist())) == kept.shape[1] for row in kept), "an image token was chosen twice"


@pytest.mark.parametrize("k, r, num_images, batch_size", CASES)
def test_matches_transformers_attention_matrix(tiny, k, r, num_images, batch_size):
    ids, mask, pixels = tiny.case(num_images, batch_size)
    kept = kept_by(tiny.ours, all_text_tokens_rule, ids, mask, pixels, k, r)
    expected = reference_kept(tiny, ids, mask, pixels, k, r)
    assert torch.equal(kept, expected), (
        f"kept {kept.tolist()}, but the text tokens' mean attention in layer {k - 1} ranks {expected.tolist()} highest"
    )


def test_differs_from_the_last_token_rule(tiny):
    """Averaging over every text token is not the same as asking the last one: some case must differ."""
    differs = []
    for k, r, num_images, batch_size in CASES:
        ids, mask, pixels = tiny.case(num_images, batch_size)
        mine = kept_by(tiny.ours, all_text_tokens_rule, ids, mask, pixels, k, r)
        fastv = kept_by(tiny.ours, M.fastv_rule, ids, mask, pixels, k, r)
        differs.append(not torch.equal(mine, fastv))
    assert any(differs), "the rule chose exactly what fastv_rule (the last token alone) chooses in every case"


def test_generates_end_to_end(tiny):
    ids, mask, pixels = tiny.case(1, 2)
    tokens = tiny.ours.generate(ids, pixels, attention_mask=mask, max_new_tokens=4, fastv=M.FastV(2, 0.5, rule=all_text_tokens_rule), eos_token_id=-1)
    assert tokens.shape == (2, 4)
