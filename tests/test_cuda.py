"""minifastv against transformers on a CUDA GPU in float16 (and bfloat16 where the GPU supports it).

Half precision rounds, so exact equality is not the test. The tolerances are derived from the reference's
own rounding error: both models are compared with the float32 answer (transformers on the CPU), and
minifastv must be about as accurate as transformers at the same dtype:

- float16 keeps 11 significant bits (unit roundoff 2^-11), bfloat16 8 bits (2^-8). One rounding of a
  logit of size |x| costs up to that fraction of |x|, and a forward pass rounds thousands of times, so
  transformers' own error against float32 (measured on the spot, `hf_error`) is the natural yardstick.
- minifastv's error against float32 may exceed transformers' by at most 25%, plus one ulp of the largest
  logit at that dtype (room for a single differently-rounded final value).
- minifastv and transformers may differ from each other by at most max(hf_error, 2 ulp): two faithful
  half-precision computations should not disagree by more than either one's distance from float32.
- Greedy tokens must be identical, except that a half-precision rounding may flip a genuine near-tie:
  a mismatch is accepted only at a step where the reference's own top-2 logits are within 2 * hf_error
  (tokens before it must agree exactly; the rest of that sequence is then not compared).
"""

import pytest
import torch

from conftest import PAD_TOKEN, image_prompt, left_pad, random_pixels

from minifastv import generate, load

DEVICE = "cuda"
TOKENS_PER_IMAGE = 36
NO_EOS = 1_000_000  # an EOS id outside the vocabulary: generation never stops early

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [
    pytest.param(torch.float16, id="float16"),
    pytest.param(
        torch.bfloat16, id="bfloat16",
        marks=pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)),
                                 reason="the GPU has no bfloat16"),
    ),
]


# ----------------------------------------------------------------------------------------------------
# Helpers and fixtures


def hf_logits(model, ids, px=None, mask=None):
    device = model.device
    kwargs = {}
    if mask is not None:
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        kwargs = dict(attention_mask=mask.to(device), position_ids=positions.to(device))
    if px is not None:
        kwargs["pixel_values"] = px.to(device, model.dtype)
    with torch.no_grad():
        return model(input_ids=ids.to(device), **kwargs).logits.float().cpu()


def ulp(dtype, magnitude):
    """Spacing of `dtype` values near `magnitude`."""
    return torch.finfo(dtype).eps * 2.0 ** torch.floor(torch.log2(torch.tensor(float(magnitude)))).item()


def check_half_precision(ours, expected, exact, dtype, what):
    """Apply the tolerances of the module docstring; return (our diff to transformers, transformers' error)."""
    hf_error = (expected - exact).abs().max().item()
    our_error = (ours - exact).abs().max().item()
    one_ulp = ulp(dtype, exact.abs().max())
    diff = (ours - expected).abs().max().item()
    print(f"\n[parity] {what}: max abs diff {diff:.3g}; error vs float32: minifastv {our_error:.3g}, "
          f"transformers {hf_error:.3g}")
    assert our_error <= 1.25 * hf_error + one_ulp, what
    assert diff <= max(hf_error, 2 * one_ulp), what
    return diff, hf_error


def assert_same_greedy(tokens, expected, margins, tie):
    """Greedy tokens equal, but for a near-tie (reference top-2 margin <= tie) where they first differ."""
    assert tokens.shape == expected.shape
    for row in range(tokens.shape[0]):
        differs = (tokens[row] != expected[row]).nonzero()
        if len(differs):
            step = int(differs[0])
            assert margins[row, step] <= tie, (
                f"row {row} differs at step {step} ({tokens[row].tolist()} vs {expected[row].tolist()}) "
                f"where the reference's top-2 margin {margins[row, step]:.3g} exceeds {tie:.3g}")


def top2_margin(logits):
    top = logits.float().topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def hf_greedy(model, ids, px, mask=None, steps=20):
    """transformers' greedy tokens (B, steps) and the top-2 margin of the logits behind each."""
    device = model.device
    extra = {} if mask is None else {"attention_mask": mask.to(device)}
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), pixel_values=px.to(device, model.dtype), do_sample=False,
                             max_new_tokens=steps, eos_token_id=NO_EOS, pad_token_id=PAD_TOKEN,
                             output_scores=True, return_dict_in_generate=True, **extra)
    margins = torch.stack([top2_margin(s) for s in out.scores], dim=1).cpu()
    return out.sequences[:, ids.shape[1] :].cpu(), margins


def greedy_without_cache(model, ids, px, mask=None, steps=20):
    """minifastv without its KV cache: the full forward on everything so far at each step."""
    ids = ids.to(DEVICE)
    mask = torch.ones_like(ids) if mask is None else mask.to(DEVICE)
    tokens, margins = [], []
    for _ in range(steps):
        with torch.no_grad():
            last = model(ids, px, attention_mask=mask)[:, -1]
        token = last.argmax(-1)
        tokens.append(token)
        margins.append(top2_margin(last))
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(tokens, dim=1).cpu(), torch.stack(margins, dim=1).cpu()


@pytest.fixture(scope="module")
def exact_model(hf_model):
    """The float32 answer: transformers on the CPU (no TF32 anywhere)."""
    return hf_model


@pytest.fixture(scope="module", params=DTYPES)
def pair(request, hub_checkpoint, saved_checkpoint):
    """(minifastv, transformers, dtype), both on the GPU at the same half precision."""
    from transformers import LlavaForConditionalGeneration

    dtype = request.param
    ours = load(str(hub_checkpoint), device=DEVICE, dtype=dtype, progress=False)
    hf = LlavaForConditionalGeneration.from_pretrained(saved_checkpoint, dtype=dtype).to(DEVICE).eval()
    yield ours, hf, dtype
    del ours, hf
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def padded_batch():
    long = image_prompt(1, TOKENS_PER_IMAGE, text_before=5, text_after=7, seed=0)
    short = image_prompt(1, TOKENS_PER_IMAGE, text_before=2, text_after=3, seed=1)
    ids, mask = left_pad([long, short])
    return ids, mask, random_pixels(2, seed=3)


# ----------------------------------------------------------------------------------------------------
# Logits


def test_loaded_on_gpu(pair):
    ours, _, dtype = pair
    device_type = torch.device(DEVICE).type
    assert ours.lm_head.weight.device.type == device_type and ours.lm_head.weight.dtype == dtype
    assert ours.rope_cos.device.type == device_type and ours.rope_cos.dtype == torch.float32


def test_text_only_logits(pair, exact_model):
    ours, hf, dtype = pair
    ids = image_prompt(0, TOKENS_PER_IMAGE, text_after=23)
    with torch.no_grad():
        logits = ours(ids.to(DEVICE))
    assert logits.dtype == dtype
    check_half_precision(logits.float().cpu(), hf_logits(hf, ids), hf_logits(exact_model, ids), dtype,
                         f"{dtype} text only")


def test_one_image_logits(pair, exact_model):
    ours, hf, dtype = pair
    ids, px = image_prompt(1, TOKENS_PER_IMAGE), random_pixels(1)
    with torch.no_grad():
        logits = ours(ids.to(DEVICE), px.to(DEVICE)).float().cpu()
    check_half_precision(logits, hf_logits(hf, ids, px), hf_logits(exact_model, ids, px), dtype,
                         f"{dtype} one image")


def test_padded_batch_logits(pair, exact_model):
    ours, hf, dtype = pair
    ids, mask, px = padded_batch()
    with torch.no_grad():
        logits = ours(ids.to(DEVICE), px.to(DEVICE), attention_mask=mask.to(DEVICE)).float().cpu()
    real = mask.bool()
    check_half_precision(logits[real], hf_logits(hf, ids, px, mask)[real], hf_logits(exact_model, ids, px, mask)[real],
                         dtype, f"{dtype} padded batch of 2")


# ----------------------------------------------------------------------------------------------------
# Greedy generation


@pytest.mark.parametrize("batch", ["one image", "padded batch of 2"])
def test_greedy_generate(pair, exact_model, batch):
    ours, hf, dtype = pair
    if batch == "one image":
        ids, mask, px = image_prompt(1, TOKENS_PER_IMAGE), None, random_pixels(1)
    else:
        ids, mask, px = padded_batch()
    # The prefill's own rounding error sets what counts as a near-tie.
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    hf_error = (hf_logits(hf, ids, px, mask) - hf_logits(exact_model, ids, px, mask))[real].abs().max().item()
    tie = 2 * hf_error

    tokens = generate(ours, ids.to(DEVICE), px.to(DEVICE),
                      attention_mask=None if mask is None else mask.to(DEVICE),
                      max_new_tokens=20, eos_token_id=NO_EOS).cpu()
    assert tokens.shape == (ids.shape[0], 20)
    expected, margins = hf_greedy(hf, ids, px, mask)
    assert_same_greedy(tokens, expected, margins, tie)
    no_cache, own_margins = greedy_without_cache(ours, ids, px.to(DEVICE), mask)
    assert_same_greedy(tokens, no_cache, own_margins, tie)
    exact = (tokens == expected).float().mean().item()
    print(f"\n[parity] {dtype} greedy {batch}: {exact:.0%} of tokens identical to transformers")


# ----------------------------------------------------------------------------------------------------
# The compiled path on the GPU: inductor's kernels and a CUDA graph for the decode step


@pytest.mark.parametrize("fastv", [None, (2, 0.5)], ids=["no FastV", "FastV K=2 R=0.5"])
def test_compiled_gives_the_eager_tokens_on_cuda(hub_checkpoint, fastv, fresh_compiler, monkeypatch):
    """float32 (TF32 off): the compiled path, CUDA graph included, gives the eager path's greedy
    tokens; then, on the same recorded graph and cache buffers, another prompt of the same cache
    shape, and the decode step's logits token by token."""
    import minifastv

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    eager = load(str(hub_checkpoint), device=DEVICE, dtype=torch.float32, progress=False)
    compiled = minifastv.compile_model(
        load(str(hub_checkpoint), device=DEVICE, dtype=torch.float32, progress=False))
    fastv = None if fastv is None else minifastv.FastV(*fastv)
    ids, mask, pixels = padded_batch()
    options = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=NO_EOS, fastv=fastv)
    expected = generate(eager, ids, pixels, **options)
    for _ in range(2):  # the second run replays the recorded CUDA graph
        assert torch.equal(generate(compiled, ids, pixels, **options), expected)
    # Another, shorter prompt: the same 256-slot cache buffers, the same graph, its stale slots
    # masked out.
    other_ids, other_mask = left_pad([image_prompt(1, TOKENS_PER_IMAGE, text_before=1, seed=7),
                                      image_prompt(1, TOKENS_PER_IMAGE, text_before=3, seed=8)])
    other = dict(options, attention_mask=other_mask)
    assert torch.equal(generate(compiled, other_ids, pixels, **other),
                       generate(eager, other_ids, pixels, **other))
    # The replayed graph's logits, step by step, against eager's decode step.
    with torch.inference_mode():
        caches = [model.new_cache(ids, fastv, room=12) for model in (eager, compiled)]
        for model, cache in zip((eager, compiled), caches):
            model(ids, pixels, attention_mask=mask, cache=cache, fastv=fastv, last_logits_only=True)
        for token in (5, 17, 300, 2000, 31000, 7):
            token = torch.full((ids.shape[0],), token, device=DEVICE)
            want = eager.decode_step(token, caches[0])
            torch.compiler.cudagraph_mark_step_begin()
            got = compiled.decode_step(token, caches[1]).clone()  # the next replay overwrites it
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fastv_step_and_decode_step_never_synchronize_on_cuda(hub_checkpoint):
    """From the first decoder layer to the last, FastV's step included, and in the decode step,
    nothing makes the host wait for the GPU: torch.cuda's sync debug mode turns any synchronizing
    call there into an error."""
    import minifastv

    model = load(str(hub_checkpoint), device=DEVICE, dtype=torch.float16, progress=False)
    ids, mask, pixels = padded_batch()
    fastv = minifastv.FastV(2, 0.5)
    layers = model.language_model.layers
    start = layers[0].register_forward_pre_hook(
        lambda *_: torch.cuda.set_sync_debug_mode("error"))
    stop = layers[-1].register_forward_hook(lambda *_: torch.cuda.set_sync_debug_mode("default"))
    try:
        with torch.inference_mode():
            cache = model.new_cache(ids, fastv, room=3)
            model(ids, pixels, attention_mask=mask, fastv=fastv, cache=cache)
            start.remove()
            stop.remove()
            tokens = [torch.full((ids.shape[0],), token, device=DEVICE) for token in (5, 17, 300)]
            torch.cuda.set_sync_debug_mode("error")
            for token in tokens:
                model.decode_step(token, cache)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        start.remove()
        stop.remove()


# ----------------------------------------------------------------------------------------------------
# Loading onto the GPU; the bench's GPU-busy measure


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_loading_onto_the_gpu_gives_every_tensor_of_the_cpu_load(hub_checkpoint, dtype):
    """load(device="cuda") gives every tensor of load(device="cpu") at that dtype, on the GPU and
    with the same values, bit for bit."""
    expected = load(str(hub_checkpoint), device="cpu", dtype=dtype, progress=False).state_dict()
    loaded = load(str(hub_checkpoint), device=DEVICE, dtype=dtype, progress=False).state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in loaded.items():
        assert tensor.device.type == "cuda" and tensor.dtype == expected[name].dtype == dtype, name
        assert torch.equal(tensor.cpu(), expected[name]), name


def test_device_busy_tells_a_busy_gpu_from_a_waiting_one():
    import time

    from minifastv.bench import device_busy

    device = torch.device(DEVICE)
    a = torch.randn(4096, 4096, device=device)

    def matmuls():  # queued back to back: the GPU never waits
        for _ in range(20):
            a @ a

    def small_kernels_and_sleeps():  # the host dawdles between tiny kernels
        for _ in range(20):
            a[0, 0] += 1
            time.sleep(0.002)

    device_busy(device, matmuls)  # the profiler's first start is slow
    busy, wall = device_busy(device, matmuls)
    assert 0.8 < busy / wall <= 1.01, (busy, wall)
    busy, wall = device_busy(device, small_kernels_and_sleeps)
    assert busy / wall < 0.2, (busy, wall)
