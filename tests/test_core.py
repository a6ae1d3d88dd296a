"""minifastv against transformers' LlavaForConditionalGeneration on tiny random checkpoints (CPU).

transformers is the oracle: every expected value here is computed by it (or by minifastv's own forward,
for the cache and padding checks), never copied from the code under test.
"""

import pytest
import torch
from safetensors import safe_open

from conftest import IMAGE_TOKEN, PAD_TOKEN, image_prompt, left_pad, random_pixels

from minifastv import Sampling, generate, load

TOKENS_PER_IMAGE = 36  # tiny config: 84 px images, 14 px patches -> 6 x 6 grid
FP32_TOLERANCE = 1e-5
NO_EOS = 1_000_000  # an EOS id outside the vocabulary: generation never stops early, on either side


# ----------------------------------------------------------------------------------------------------
# Helpers and fixtures


def max_abs_diff(actual, expected, atol, what):
    """Assert that two logit tensors agree within `atol` (max abs) and return the max abs difference."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.float() - expected.float()).abs().max().item()
    print(f"\n[parity] {what}: max abs diff {diff:.3g} (tolerance {atol:.3g})")
    assert diff <= atol, f"{what}: max abs diff {diff} exceeds {atol}"
    return diff


def positions_from_mask(mask):
    """Position ids as transformers' generate derives them from a left-padding mask (pads at 0)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def hf_from_pretrained(folder, dtype):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()


def hf_logits(model, ids, pixel_values=None, mask=None):
    kwargs = {}
    if mask is not None:
        kwargs = dict(attention_mask=mask, position_ids=positions_from_mask(mask))
    if pixel_values is not None:
        kwargs["pixel_values"] = pixel_values.to(model.dtype)
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def hf_generate(model, ids, pixel_values=None, mask=None, **kwargs):
    """New tokens of transformers' greedy generate, the prompt stripped."""
    extra = {} if pixel_values is None else {"pixel_values": pixel_values.to(model.dtype)}
    if mask is not None:
        extra["attention_mask"] = mask
    with torch.no_grad():
        out = model.generate(input_ids=ids, do_sample=False, pad_token_id=PAD_TOKEN, **extra, **kwargs)
    return out[:, ids.shape[1] :]


def tensor_names(folder):
    names = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            names += list(f.keys())
    return names


@pytest.fixture(scope="session")
def reference(saved_checkpoint):
    """transformers' model, loaded the way users load it (SDPA attention, the default)."""
    return hf_from_pretrained(saved_checkpoint, torch.float32)


@pytest.fixture(scope="session")
def ours(hub_checkpoint):
    return load(str(hub_checkpoint), device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture(scope="session")
def internal_names_checkpoint(hf_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("internal_names")
    hf_model.save_pretrained(folder, save_original_format=False)
    return folder


@pytest.fixture(scope="session")
def one_image():
    return image_prompt(1, TOKENS_PER_IMAGE), random_pixels(1)


@pytest.fixture(scope="session")
def padded_batch():
    """Two one-image prompts of different lengths (49 and 42 tokens), the shorter one left-padded."""
    long = image_prompt(1, TOKENS_PER_IMAGE, text_before=5, text_after=7, seed=0)
    short = image_prompt(1, TOKENS_PER_IMAGE, text_before=2, text_after=3, seed=1)
    assert long.shape[1] != short.shape[1]
    ids, mask = left_pad([long, short])
    return ids, mask, random_pixels(2, seed=3), short


def test_reference_is_the_fixture_model(reference, hf_model, one_image):
    """Guard: the from_pretrained reference computes what the in-memory model computes."""
    ids, px = one_image
    with torch.no_grad():
        expected = hf_model(input_ids=ids, pixel_values=px).logits
    assert torch.equal(hf_logits(reference, ids, px), expected)


# ----------------------------------------------------------------------------------------------------
# float32 logits parity


def test_text_only_logits(ours, reference):
    ids = image_prompt(0, TOKENS_PER_IMAGE, text_after=23)
    assert not (ids == IMAGE_TOKEN).any()
    with torch.no_grad():
        logits = ours(ids)
    assert logits.shape == (1, ids.shape[1], 32064)
    max_abs_diff(logits, hf_logits(reference, ids), FP32_TOLERANCE, "float32 text only")


def test_one_image_logits(ours, reference, one_image):
    ids, px = one_image
    with torch.no_grad():
        logits = ours(ids, px)
    max_abs_diff(logits, hf_logits(reference, ids, px), FP32_TOLERANCE, "float32 one image")


def test_two_images_logits(ours, reference):
    ids, px = image_prompt(2, TOKENS_PER_IMAGE, seed=2), random_pixels(2, seed=2)
    with torch.no_grad():
        logits = ours(ids, px)
    expected = hf_logits(reference, ids, px)
    max_abs_diff(logits, expected, FP32_TOLERANCE, "float32 two images")
    # The images are not interchangeable: swapping them changes the answer (features go in order).
    with torch.no_grad():
        swapped = ours(ids, px.flip(0))
    assert (swapped - expected).abs().max() > 1e-3


def test_last_logits_only(ours, one_image):
    ids, px = one_image
    with torch.no_grad():
        full = ours(ids, px)
        last = ours(ids, px, last_logits_only=True)
    assert last.shape == (1, 1, full.shape[-1])
    max_abs_diff(last, full[:, -1:], FP32_TOLERANCE, "last_logits_only vs full")


def test_padded_batch_logits(ours, reference, padded_batch):
    ids, mask, px, short = padded_batch
    with torch.no_grad():
        logits = ours(ids, px, attention_mask=mask)
    expected = hf_logits(reference, ids, px, mask)
    real = mask.bool()  # compare only real tokens: pad positions' logits mean nothing
    max_abs_diff(logits[real], expected[real], FP32_TOLERANCE, "float32 padded batch of 2")

    # The padded row gives what the same prompt gives alone, unpadded.
    with torch.no_grad():
        alone = ours(short, px[1:])
    pad = ids.shape[1] - short.shape[1]
    max_abs_diff(logits[1, pad:], alone[0], FP32_TOLERANCE, "float32 padded row vs alone")


@pytest.mark.parametrize("checkpoint", ["hub_checkpoint", "saved_checkpoint", "internal_names_checkpoint"])
def test_checkpoint_naming_schemes(checkpoint, request, reference, one_image):
    folder = request.getfixturevalue(checkpoint)
    names = tensor_names(folder)
    # Guard that each fixture really holds the naming scheme it stands for.
    scheme = {
        "hub_checkpoint": "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
        "saved_checkpoint": "vision_tower.encoder.layers.0.mlp.fc1.weight",
        "internal_names_checkpoint": "model.vision_tower.encoder.layers.0.mlp.fc1.weight",
    }[checkpoint]
    assert scheme in names
    model = load(str(folder), device="cpu", dtype=torch.float32, progress=False)
    ids, px = one_image
    with torch.no_grad():
        logits = model(ids, px)
    max_abs_diff(logits, hf_logits(reference, ids, px), FP32_TOLERANCE, f"float32 {checkpoint}")


def test_image_features(ours, reference):
    px = random_pixels(2, seed=5)
    features = ours.image_features(px)
    assert features.shape == (2, TOKENS_PER_IMAGE, 64)
    with torch.no_grad():
        out = reference.get_image_features(pixel_values=px)
    # transformers 5 returns a model output whose pooler_output is a list of per-image (tokens, hidden)
    pooled = out.pooler_output if hasattr(out, "pooler_output") else out
    expected = torch.stack(list(pooled)) if isinstance(pooled, (list, tuple)) else pooled
    max_abs_diff(features, expected.reshape(features.shape), FP32_TOLERANCE, "float32 image features")


# ----------------------------------------------------------------------------------------------------
# bfloat16


def test_bfloat16_logits(hub_checkpoint, saved_checkpoint, reference, one_image):
    ids, px = one_image
    ours16 = load(str(hub_checkpoint), device="cpu", dtype=torch.bfloat16, progress=False)
    hf16 = hf_from_pretrained(saved_checkpoint, torch.bfloat16)
    with torch.no_grad():
        logits = ours16(ids, px)
    assert logits.dtype == torch.bfloat16
    expected16 = hf_logits(hf16, ids, px)
    exact = hf_logits(reference, ids, px)  # float32: the "true" answer both bf16 runs approximate
    hf_error = (expected16.float() - exact).abs().max().item()
    our_error = (logits.float() - exact).abs().max().item()
    # bfloat16 keeps 8 significant bits: one rounding of a logit of size |x| costs up to 2^-8 |x|, and a
    # 4-layer forward accumulates many such roundings (transformers' own bf16 error, measured here, is
    # ~0.06 on logits up to ~3.5). A faithful bf16 implementation may round differently from
    # transformers but should not be less accurate: minifastv's error against the float32 answer may
    # exceed transformers' by at most 25% plus one bf16 ulp of the largest logit, and the two bf16
    # results may not disagree by more than transformers' own bf16 error. (Measured: identical, 0.)
    ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().max())).item() - 7)
    print(f"\n[parity] bfloat16 error vs float32: minifastv {our_error:.3g}, transformers {hf_error:.3g}")
    assert 0 < hf_error < 0.5, "the bf16 reference should be close to, but not exactly, float32"
    assert our_error <= 1.25 * hf_error + ulp
    max_abs_diff(logits, expected16, hf_error, "bfloat16 one image, minifastv vs transformers")


# ----------------------------------------------------------------------------------------------------
# Generation


def greedy_without_cache(model, ids, px, steps, mask=None):
    """Re-run the full forward on everything so far at every step: no KV cache involved."""
    mask = torch.ones_like(ids) if mask is None else mask
    new = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, px, attention_mask=mask)
        token = logits[:, -1].argmax(-1)
        new.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(new, dim=1)


def test_greedy_generate_one_image(ours, reference, one_image):
    ids, px = one_image
    # NO_EOS never occurs, so neither side stops early and all 20 tokens are compared.
    tokens = generate(ours, ids, px, max_new_tokens=20, eos_token_id=NO_EOS)
    assert tokens.shape == (1, 20)
    assert torch.equal(tokens, hf_generate(reference, ids, px, max_new_tokens=20, eos_token_id=NO_EOS))
    assert torch.equal(tokens, greedy_without_cache(ours, ids, px, 20))
    # With the default EOS (2), both must still agree, EOS included if it comes.
    default = generate(ours, ids, px, max_new_tokens=20)
    assert torch.equal(default, hf_generate(reference, ids, px, max_new_tokens=20))


def test_greedy_generate_padded_batch(ours, reference, padded_batch):
    ids, mask, px, _ = padded_batch
    tokens = generate(ours, ids, px, attention_mask=mask, max_new_tokens=20, eos_token_id=NO_EOS)
    assert tokens.shape == (2, 20)
    assert torch.equal(tokens, hf_generate(reference, ids, px, mask, max_new_tokens=20, eos_token_id=NO_EOS))
    assert torch.equal(tokens, greedy_without_cache(ours, ids, px, 20, mask))
    assert not torch.equal(tokens[0], tokens[1])


def test_generate_stops_at_eos_and_pads_finished_rows(ours, reference, padded_batch):
    ids, mask, px, _ = padded_batch
    free = generate(ours, ids, px, attention_mask=mask, max_new_tokens=20, eos_token_id=NO_EOS)
    # Make the 5th token of row 0 the EOS, provided row 1 does not produce it first.
    eos = int(free[0, 4])
    assert eos not in free[0, :4].tolist() and eos not in free[1].tolist()
    tokens = generate(ours, ids, px, attention_mask=mask, max_new_tokens=20, eos_token_id=eos)
    assert torch.equal(tokens, hf_generate(reference, ids, px, mask, max_new_tokens=20, eos_token_id=eos))
    assert torch.equal(tokens[0, :5], free[0, :5])
    assert (tokens[0, 5:] == PAD_TOKEN).all()
    assert torch.equal(tokens[1], free[1])
    # A single sequence stops right after its EOS.
    single = generate(ours, ids[:1], px[:1], max_new_tokens=20, eos_token_id=eos)
    assert torch.equal(single, free[:1, :5])


def test_sampling_is_reproducible_and_tiny_top_p_is_greedy(ours, one_image):
    ids, px = one_image

    global_seeds = iter(range(1000, 2000))

    def sample(seed, **kwargs):
        torch.manual_seed(next(global_seeds))  # a new global RNG state each call: only the seed may matter
        return generate(ours, ids, px, max_new_tokens=20, eos_token_id=NO_EOS, sampling=Sampling(seed=seed, **kwargs))

    first = sample(0, temperature=1.0)
    assert torch.equal(first, sample(0, temperature=1.0))
    assert not torch.equal(first, sample(1, temperature=1.0))
    greedy = generate(ours, ids, px, max_new_tokens=20, eos_token_id=NO_EOS)
    assert not torch.equal(first, greedy)  # a flat tiny model: sampling at temperature 1 wanders off
    assert torch.equal(sample(0, temperature=1.0, top_p=1e-6), greedy)
    assert torch.equal(sample(1, temperature=5.0, top_p=1e-6), greedy)


def test_generation_stats_print_counts_not_tensors(ours, one_image):
    """print(stats) shows the counts, the kept indices' shape and the FLOPs' ratio: no 288-number tensor dump."""
    from minifastv import FastV, GenerationStats

    ids, px = one_image
    stats = GenerationStats()
    generate(ours, ids, px, max_new_tokens=3, eos_token_id=NO_EOS, fastv=FastV(2, 0.5), stats=stats)
    text = repr(stats)
    assert stats.image_tokens_kept == 18 and stats.kept_image_indices.shape == (1, 18)
    for shown in ("image_tokens=36", "image_tokens_kept=18", "kept_image_indices=<(1, 18) tensor>", "k=2", "r=0.5",
                  "decode_tokens=2", "of unpruned>"):
        assert shown in text, text
    assert "tensor([" not in text and len(text) < 400, text
    assert "kept_image_indices=None" in repr(GenerationStats())


# ----------------------------------------------------------------------------------------------------
# Errors


def test_image_count_mismatch(ours):
    ids = image_prompt(1, TOKENS_PER_IMAGE)
    with pytest.raises(ValueError, match=r"(?s)(\b36\b.*\b72\b|\b72\b.*\b36\b)"):
        ours(ids, random_pixels(2))
    with pytest.raises(ValueError, match=r"(?s)\b36\b"):
        ours(ids)  # placeholders but no image
    with pytest.raises(ValueError, match=r"(?s)\b0\b.*\b36\b"):
        ours(image_prompt(0, TOKENS_PER_IMAGE), random_pixels(1))  # an image but no placeholders
    with pytest.raises(ValueError, match=r"(?s)\b36\b"):
        generate(ours, ids, random_pixels(2), max_new_tokens=2)


def test_wrong_pixel_size(ours):
    ids = image_prompt(1, TOKENS_PER_IMAGE)
    with pytest.raises(ValueError, match=r"(?s)84.*56"):
        ours(ids, random_pixels(1, image_size=56))
    with pytest.raises(ValueError, match=r"pixel_values"):
        ours.image_features(torch.zeros(3, 84, 84))  # no batch dimension
    with pytest.raises(ValueError, match=r"pixel_values"):
        ours.image_features(torch.zeros(1, 1, 84, 84))  # grayscale


def test_context_length(ours):
    ids = image_prompt(1, TOKENS_PER_IMAGE)  # 49 tokens; the tiny context is 512
    with pytest.raises(ValueError, match=r"(?s)context.*512"):
        generate(ours, ids, random_pixels(1), max_new_tokens=512 - ids.shape[1] + 1)
    with pytest.raises(ValueError, match=r"(?s)context.*512"):
        ours(torch.randint(3, 31000, (1, 513)))
    # Exactly filling the context is allowed.
    long = torch.randint(3, 31000, (1, 510), generator=torch.Generator().manual_seed(0))
    assert generate(ours, long, max_new_tokens=2, eos_token_id=NO_EOS).shape == (1, 2)
    with pytest.raises(ValueError, match=r"context"):
        generate(ours, long, max_new_tokens=3)
