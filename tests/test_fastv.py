"""FastV checked against an independent reference built from transformers' own decoder layers.

The reference follows the official code: full eager attention in layer K-1 (output_attentions), mean over
heads, the last token's row, top round(N * (1 - R)) image tokens, every text token kept, original order
and original position ids, then transformers' layers K.. run on the kept tokens.
"""

import pytest
import torch

import minifastv
import minifastv.model as M
from minifastv.rules import grid_rule, no_rope_rule, random_rule

from conftest import IMAGE_TOKEN, image_prompt, left_pad, random_pixels

TOKENS_PER_IMAGE = 36  # the tiny 84 px images: a 6 x 6 grid


@pytest.fixture(scope="module")
def ours(hub_checkpoint):
    return minifastv.load(hub_checkpoint, device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def hf_eager(saved_checkpoint):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(saved_checkpoint, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def hf_sdpa(saved_checkpoint):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(saved_checkpoint, dtype=torch.float32).eval()


def make_case(num_images, batch_size):
    prompts = [image_prompt(num_images, TOKENS_PER_IMAGE, text_before=4 + 3 * row, text_after=6 + row, seed=row)
               for row in range(batch_size)]
    ids, mask = left_pad(prompts)
    pixels = random_pixels(num_images * batch_size, seed=num_images)
    return ids, mask, pixels


@torch.no_grad()
def reference_fastv(hf_eager, hf_sdpa, ids, mask, pixels, k, r):
    """Last-token logits (B, vocab) and kept image-token indices (B, kept), the official way."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = hf_eager(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=positions,
                   output_attentions=True, output_hidden_states=True)
    attention = out.attentions[k - 1]  # (B, H, T, T): the full matrix the official code asks for
    hidden = out.hidden_states[k]  # the input of layer k
    last_row = attention.mean(dim=1)[:, -1, :]  # (B, T): mean over heads, last token's row
    is_image = ids == IMAGE_TOKEN
    kept_positions, kept_image = [], []
    for row in range(ids.shape[0]):
        image_positions = is_image[row].nonzero()[:, 0]
        num_keep = round(len(image_positions) * (1 - r))
        top = last_row[row, image_positions].topk(num_keep).indices
        kept_image.append(top.sort().values)
        text_positions = (~is_image[row]).nonzero()[:, 0]
        kept_positions.append(torch.cat([text_positions, image_positions[top]]).sort().values)
    kept_positions = torch.stack(kept_positions)  # (B, T_kept)
    kept_hidden = hidden.gather(1, kept_positions[..., None].expand(-1, -1, hidden.shape[-1]))
    kept_mask = mask.gather(1, kept_positions).bool()
    n = kept_positions.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    attention_mask = causal[None, None] & kept_mask[:, None, None, :]  # (B, 1, T_kept, T_kept)
    language_model = hf_sdpa.model.language_model
    rope = language_model.rotary_emb(kept_hidden, positions.gather(1, kept_positions))  # ORIGINAL positions
    for layer in language_model.layers[k:]:
        kept_hidden = layer(kept_hidden, attention_mask=attention_mask, position_embeddings=rope)
    logits = hf_sdpa.lm_head(language_model.norm(kept_hidden))
    return logits[:, -1], torch.stack(kept_image)


CASES = [  # (k, r, images per prompt, batch size)
    (2, 0.5, 1, 1),
    (1, 0.25, 1, 1),
    (3, 0.75, 2, 1),
    (2, 0.5, 1, 2),
    (3, 0.9, 2, 2),
]


@pytest.mark.parametrize("k, r, num_images, batch_size", CASES)
def test_fastv_matches_reference(ours, hf_eager, hf_sdpa, k, r, num_images, batch_size):
    ids, mask, pixels = make_case(num_images, batch_size)
    expected_logits, expected_kept = reference_fastv(hf_eager, hf_sdpa, ids, mask, pixels, k, r)
    cache = ours.new_cache(ids, M.FastV(k, r))
    with torch.no_grad():
        logits = ours(ids, pixels, attention_mask=mask, cache=cache, fastv=M.FastV(k, r))
    num_images_tokens = num_images * TOKENS_PER_IMAGE
    assert logits.shape[1] == ids.shape[1] - num_images_tokens + round(num_images_tokens * (1 - r))
    assert torch.equal(cache.kept_image_tokens, expected_kept)
    difference = (logits[:, -1] - expected_logits).abs().max().item()
    assert difference < 1e-5, f"max abs difference {difference}"


def test_r_zero_and_no_fastv_are_identical_to_unpruned(ours):
    ids, mask, pixels = make_case(2, 2)
    with torch.no_grad():
        plain = ours(ids, pixels, attention_mask=mask)
        none = ours(ids, pixels, attention_mask=mask, fastv=None)
        zero = ours(ids, pixels, attention_mask=mask, fastv=M.FastV(2, 0.0))
    assert torch.equal(plain, none)
    assert torch.equal(plain, zero)


def test_fastv_without_image_runs_unpruned(ours):
    ids = torch.tensor([[1, 100, 200, 300, 400, 500]])
    with torch.no_grad():
        assert torch.equal(ours(ids), ours(ids, fastv=M.FastV(2, 0.5)))


def test_pruning_changes_the_answer_of_a_pruned_model(ours):
    """A guard against a FastV that silently does nothing: R=0.9 must change the last logits."""
    ids, mask, pixels = make_case(1, 1)
    with torch.no_grad():
        plain = ours(ids, pixels)[:, -1]
        pruned = ours(ids, pixels, fastv=M.FastV(2, 0.9))[:, -1]
    assert not torch.allclose(plain, pruned, atol=1e-4)


@pytest.mark.parametrize("num_images, batch_size", [(1, 1), (2, 2)])
def test_generation_with_pruned_cache_equals_cache_free_loop(ours, num_images, batch_size):
    """Prune once at prefill, then decode against the pruned cache == re-run everything each step with the
    same kept set (a rule that returns the prefill's choice) and unpruned positions for new tokens."""
    ids, mask, pixels = make_case(num_images, batch_size)
    fastv = M.FastV(2, 0.5)
    stats = minifastv.GenerationStats()
    generated = minifastv.generate(ours, ids, pixels, attention_mask=mask, max_new_tokens=12, fastv=fastv, stats=stats, eos_token_id=-1)
    assert generated.shape == (batch_size, 12)
    kept = stats.kept_image_indices
    same_choice = M.FastV(2, 0.5, rule=lambda inputs: kept)
    sequence, sequence_mask = ids, mask
    expected = []
    with torch.no_grad():
        for _ in range(12):
            logits = ours(sequence, pixels, attention_mask=sequence_mask, fastv=same_choice)
            token = logits[:, -1].argmax(-1)
            expected.append(token)
            sequence = torch.cat([sequence, token[:, None]], dim=1)
            sequence_mask = torch.cat([sequence_mask, torch.ones_like(token)[:, None]], dim=1)
    assert torch.equal(generated, torch.stack(expected, dim=1))


def test_pruned_cache_holds_only_kept_tokens(ours):
    ids, mask, pixels = make_case(1, 1)
    full, pruned = ours.new_cache(ids), ours.new_cache(ids, M.FastV(2, 0.5))
    with torch.no_grad():
        ours(ids, pixels, cache=full)
        ours(ids, pixels, cache=pruned, fastv=M.FastV(2, 0.5))
    kept_length = ids.shape[1] - TOKENS_PER_IMAGE + TOKENS_PER_IMAGE // 2
    assert [k.shape[2] for k in pruned.keys] == [ids.shape[1]] * 2 + [kept_length] * 2
    assert [k.shape[2] for k in full.keys] == [ids.shape[1]] * 4
    assert pruned.nbytes() < full.nbytes()


def test_generation_stats(ours):
    ids, mask, pixels = make_case(2, 1)
    stats = minifastv.GenerationStats()
    minifastv.generate(ours, ids, pixels, max_new_tokens=5, fastv=M.FastV(2, 0.75), stats=stats, eos_token_id=-1)
    assert (stats.k, stats.r) == (2, 0.75)
    assert stats.image_tokens == 2 * TOKENS_PER_IMAGE and stats.image_tokens_kept == round(72 * 0.25)
    assert stats.kept_image_indices.shape == (1, stats.image_tokens_kept)
    assert stats.decode_tokens == 4 and stats.prefill_seconds > 0 and stats.decode_tokens_per_second > 0
    assert stats.kv_cache_bytes > 0 and stats.flops["exact"] < stats.flops["exact_unpruned"]
    plain = minifastv.GenerationStats()
    minifastv.generate(ours, ids, pixels, max_new_tokens=5, stats=plain, eos_token_id=-1)
    assert plain.k is None and plain.image_tokens_kept == plain.image_tokens
    assert stats.kv_cache_bytes < plain.kv_cache_bytes


@pytest.mark.parametrize("rule", [fastv_rule := M.fastv_rule, random_rule, grid_rule, no_rope_rule])
@pytest.mark.parametrize("r", [0.25, 0.5, 0.9])
def test_rules_keep_the_requested_number(ours, rule, r):
    ids, mask, pixels = make_case(2, 2)
    cache = ours.new_cache(ids, M.FastV(2, r))
    with torch.no_grad():
        ours(ids, pixels, attention_mask=mask, cache=cache, fastv=M.FastV(2, r, rule=rule))
    kept = cache.kept_image_tokens
    assert kept.shape == (2, round(72 * (1 - r)))
    assert all(len(set(row.tolist())) == kept.shape[1] for row in kept)


def capture_inputs(ours, ids, pixels):
    captured = {}

    def spy(inputs):
        captured["inputs"] = inputs
        return M.fastv_rule(inputs)

    with torch.no_grad():
        ours(ids, pixels, fastv=M.FastV(2, 0.5, rule=spy))
    return captured["inputs"]


def test_no_rope_scores_differ_from_fastv(ours):
    ids, mask, pixels = make_case(1, 1)
    inputs = capture_inputs(ours, ids, pixels)
    with_rope = inputs.last_token_attention
    without_rope = M.attention_rows(M.apply_rope(inputs.queries, inputs.cos, -inputs.sin), M.apply_rope(inputs.keys, inputs.cos, -inputs.sin), inputs.attention_mask)
    assert not torch.allclose(with_rope, without_rope, atol=1e-4)
    # Undoing RoPE and doing it again gives back the rotated queries: the inverse is right.
    again = M.apply_rope(M.apply_rope(inputs.queries, inputs.cos, -inputs.sin), inputs.cos, inputs.sin)
    assert torch.allclose(again, inputs.queries, atol=1e-5)


def test_grid_rule_spreads_kept_patches(ours):
    ids, mask, pixels = make_case(1, 1)
    inputs = capture_inputs(ours, ids, pixels)
    kept = grid_rule(inputs)[0]
    grid = torch.zeros(36, dtype=torch.bool)
    grid[kept] = True
    grid = grid.view(6, 6)
    assert grid.sum(0).tolist() == [3] * 6 and grid.sum(1).tolist() == [3] * 6  # a checkerboard at R=0.5


def test_pruning_inputs_shapes(ours):
    ids, mask, pixels = make_case(2, 1)
    inputs = capture_inputs(ours, ids, pixels)
    T = ids.shape[1]
    assert inputs.last_token_attention.shape == (1, 4, T)
    assert torch.allclose(inputs.last_token_attention.sum(-1), torch.ones(1, 4))
    assert inputs.image_positions.shape == (1, 72) and bool((ids[0, inputs.image_positions[0]] == IMAGE_TOKEN).all())
    assert inputs.hidden_states.shape == (1, T, 64) and inputs.queries.shape == (1, 4, T, 16)
    assert (inputs.grid_size, inputs.num_keep) == (6, 36)
    # two images of 6 x 6 patches, no CLS ("default" strategy), no video: image 0 then image 1, row by row
    assert not inputs.is_video.any()
    assert inputs.frame[0].tolist() == [0] * 36 + [1] * 36 and inputs.patch[0].tolist() == list(range(36)) * 2


@pytest.mark.parametrize("k", [0, 4, 5, -1])
def test_k_out_of_range(ours, k):
    ids, mask, pixels = make_case(1, 1)
    with pytest.raises(ValueError, match="k"):
        ours(ids, pixels, fastv=M.FastV(k, 0.5))


@pytest.mark.parametrize("r", [-0.1, 1.0, 1.5])
def test_r_out_of_range(r):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        M.FastV(2, r)


def test_batch_with_different_image_counts_is_refused(ours):
    ids, mask = left_pad([image_prompt(1, 36), image_prompt(2, 36, seed=1)])
    with pytest.raises(ValueError, match="same number of image tokens"):
        ours(ids, random_pixels(3), attention_mask=mask, fastv=M.FastV(2, 0.5))


@pytest.mark.parametrize("bad_rule", [
    lambda inputs: torch.zeros(1, 3, dtype=torch.long),  # wrong count
    lambda inputs: torch.zeros(1, inputs.num_keep, dtype=torch.long),  # duplicates
    lambda inputs: torch.arange(inputs.num_keep)[None] + 1000,  # out of range
])
def test_bad_rule_output_is_a_clear_error(ours, bad_rule):
    ids, mask, pixels = make_case(1, 1)
    with pytest.raises(ValueError, match="pruning rule"):
        ours(ids, pixels, fastv=M.FastV(2, 0.5, rule=bad_rule))


def test_grouped_query_attention_matches_reference(tmp_path):
    """LLaVA-1.5 has one key/value head per query head; a GQA decoder (2 KV heads for 4 query heads) must
    work too, in the plain forward and in FastV's scoring."""
    from transformers import LlavaForConditionalGeneration

    from conftest import tiny_hf_model

    tiny_hf_model(seed=3, num_key_value_heads=2).save_pretrained(tmp_path)
    eager = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    sdpa = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    gqa = minifastv.load(tmp_path, device="cpu", dtype=torch.float32, progress=False)
    assert gqa.language_model.layers[0].self_attn.k_proj.weight.shape[0] == 2 * 16
    ids, mask, pixels = make_case(1, 2)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = sdpa(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=positions).logits
        logits = gqa(ids, pixels, attention_mask=mask)
    real = mask.bool()
    assert (logits[real] - expected[real]).abs().max().item() < 1e-5
    expected_last, expected_kept = reference_fastv(eager, sdpa, ids, mask, pixels, 2, 0.5)
    cache = gqa.new_cache(ids, M.FastV(2, 0.5))
    with torch.no_grad():
        pruned = gqa(ids, pixels, attention_mask=mask, cache=cache, fastv=M.FastV(2, 0.5))
    assert torch.equal(cache.kept_image_tokens, expected_kept)
    assert (pruned[:, -1] - expected_last).abs().max().item() < 1e-5
