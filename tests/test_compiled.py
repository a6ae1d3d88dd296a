"""The compiled path (minifastv/compiled.py) gives what the eager path gives; the one KV cache
(model.KVCache) and the decode step behave as the cache-free forward pass; nothing waits for the
GPU.

Compiling with inductor on a CPU takes minutes, so most tests capture the graphs with the
"aot_eager" backend (the same tracing, functionalization and graph checks, no generated code) and
one test runs inductor end to end. Each test loads its own model: compile_model changes a model
in place.
"""

import gc
import weakref

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch.utils._python_dispatch import TorchDispatchMode

import minifastv
import minifastv.model as M
from minifastv import generate
from minifastv.compiled import compile_model, reusing_caches

from conftest import IMAGE_TOKEN, image_prompt, left_pad, random_pixels

TOKENS_PER_IMAGE = 36  # the tiny 84 px images: a 6 x 6 grid
DECODE_TOKENS = (5, 17, 300, 2000, 31000, 7)  # fed to decode_step one at a time


def load(checkpoint):
    return minifastv.load(checkpoint, device="cpu", dtype=torch.float32, progress=False)


def padded_batch():
    prompts = [image_prompt(1, TOKENS_PER_IMAGE, text_before=4 + 3 * row, text_after=6 + row,
                            seed=row) for row in range(2)]
    ids, mask = left_pad(prompts)
    return ids, mask, random_pixels(2, seed=1)


def one_prompt():
    return image_prompt(1, TOKENS_PER_IMAGE), None, random_pixels(1)


# name: (inputs, FastV, image tokens kept: 36 x (1 - R))
CASES = {
    "one prompt": (one_prompt, None, 36),
    "one prompt, FastV": (one_prompt, M.FastV(2, 0.5), 18),
    "padded batch": (padded_batch, None, 36),
    "padded batch, FastV K=1 R=0.75": (padded_batch, M.FastV(1, 0.75), 9),
}


def buffers(cache):
    """Every tensor of a KVCache that a compiled decode step reads or writes."""
    return [*cache.keys, *cache.values, *cache.valid, *cache.length, cache.next_position]


def addresses(cache):
    return [tensor.data_ptr() for tensor in buffers(cache)]


@pytest.fixture(scope="module")
def eager(hub_checkpoint):
    return load(hub_checkpoint)


@pytest.fixture(scope="module")
def captured(hub_checkpoint):
    torch._dynamo.reset()  # this module's compiled code only (see conftest.fresh_compiler)
    return compile_model(load(hub_checkpoint), backend="aot_eager")


# ------------------------------------------------------------------------------------------------
# Compiled = eager


@pytest.mark.parametrize("case", CASES)
def test_compiled_generation_gives_the_eager_tokens(eager, captured, case):
    make_inputs, fastv, _ = CASES[case]
    ids, mask, pixels = make_inputs()
    options = dict(attention_mask=mask, max_new_tokens=10, fastv=fastv, eos_token_id=-1)
    expected = generate(eager, ids, pixels, **options)
    stats = minifastv.GenerationStats()
    assert torch.equal(generate(captured, ids, pixels, stats=stats, **options), expected)
    assert stats.kv_cache_bytes > 0


def test_a_second_generation_of_the_same_shape_reuses_the_buffers(eager, captured, monkeypatch):
    """The decode step's buffers keep their addresses from one generation to the next (a CUDA
    graph replays on the addresses it recorded), refilled with the new prompt. The second prompt
    is shorter but in the same bucket: the first one's slots beyond it are stale, and must stay
    masked out, so the tokens are still the eager ones."""
    caches, reusing = [], captured.new_cache

    def recording(*args, **kwargs):
        caches.append(reusing(*args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(captured, "new_cache", recording)
    pixels = random_pixels(1, seed=5)
    options = dict(max_new_tokens=8, eos_token_id=-1, fastv=M.FastV(2, 0.5))
    for prompt in (image_prompt(1, TOKENS_PER_IMAGE, text_before=30, seed=5),
                   image_prompt(1, TOKENS_PER_IMAGE, seed=6)):
        expected = generate(eager, prompt, pixels, **options)
        assert torch.equal(generate(captured, prompt, pixels, **options), expected)
    first, second = caches
    assert addresses(second) == addresses(first)


# ------------------------------------------------------------------------------------------------
# The KV cache: slots, positions, the decode step


@pytest.mark.parametrize("compiled", [False, True], ids=["decode_step", "compiled decode_step"])
@pytest.mark.parametrize("case", CASES)
def test_decode_step_gives_the_cache_free_logits(eager, captured, case, compiled):
    """Token by token, decode_step's logits (as written, and compiled: a bucketed cache, most of
    its 256 slots empty and masked out) equal the last logits of the forward pass without a cache
    over the grown sequence, FastV keeping the same image tokens, within float32 rounding. After
    FastV a slot is not a position: the new tokens' positions count the real tokens."""
    model = captured if compiled else eager
    make_inputs, fastv, num_keep = CASES[case]
    ids, mask, pixels = make_inputs()
    batch_size, prompt_length = ids.shape
    real = torch.ones_like(ids) if mask is None else mask
    with torch.inference_mode():
        cache = model.new_cache(ids, fastv, room=len(DECODE_TOKENS))
        model(ids, pixels, attention_mask=mask, cache=cache, fastv=fastv, last_logits_only=True)
        kept = cache.kept_image_tokens
        same_choice = None if fastv is None else M.FastV(fastv.k, fastv.r, rule=lambda _: kept)
        sequence, sequence_mask = ids, real
        for token in DECODE_TOKENS:
            token = torch.full((batch_size,), token)
            got = model.decode_step(token, cache)
            sequence = torch.cat([sequence, token[:, None]], dim=1)
            sequence_mask = torch.cat([sequence_mask, torch.ones_like(real[:, :1])], dim=1)
            expected = eager(sequence, pixels, attention_mask=sequence_mask, fastv=same_choice)
            torch.testing.assert_close(got, expected[:, -1], rtol=1e-5, atol=1e-5)
    steps, dropped = len(DECODE_TOKENS), TOKENS_PER_IMAGE - num_keep
    assert int(cache.length[0]) == prompt_length + steps
    assert torch.equal(cache.valid[0].sum(1), real.sum(1) + steps)
    if fastv is not None:  # the layers from K on: the kept tokens, then the new ones
        assert int(cache.length[1]) == prompt_length - dropped + steps
        assert torch.equal(cache.valid[1].sum(1), real.sum(1) - dropped + steps)
    assert torch.equal(cache.next_position, real.sum(1) + steps)


def test_after_fastv_the_pruned_layers_hold_the_kept_tokens_in_their_first_slots(eager):
    """Prefill with FastV (K=1, 9 of 36 image tokens kept) into a cache with room for 3 more:
    layer 0 holds every token in its slots, layers >= 1 the kept ones, in sequence order; the rest
    of each buffer is empty (zeros, invalid). The slots of the pruned layers hold tokens at their
    ORIGINAL positions, which no longer match the slot numbers."""
    ids, mask, pixels = padded_batch()
    fastv, room = M.FastV(1, 0.75), 3
    views = []
    with torch.inference_mode():
        cache = eager.new_cache(ids, fastv, room=room)
        eager(ids, pixels, attention_mask=mask, cache=cache, fastv=fastv, observe=views.append)
    length = ids.shape[1]
    kept_length = length - TOKENS_PER_IMAGE + 9
    for view in views:
        slots = length if view.index < 1 else kept_length
        assert cache.keys[view.index].shape[2] == slots + room
        assert torch.equal(cache.keys[view.index][:, :, :slots], view.keys)
        assert not cache.keys[view.index][:, :, slots:].any()
        assert not cache.values[view.index][:, :, slots:].any()
    no_room = torch.zeros(ids.shape[0], room, dtype=torch.bool)
    assert torch.equal(cache.valid[0], torch.cat([mask.bool(), no_room], dim=1))
    # The kept tokens: every text token (padding included) and the 9 kept image tokens, in order.
    is_image = ids == IMAGE_TOKEN
    image_index = is_image.long().cumsum(1) - 1
    survives = ~is_image | (is_image & (image_index[:, :, None] == cache.kept_image_tokens[:, None]
                                        ).any(-1))
    kept_mask = torch.stack([mask[row][survives[row]] for row in range(ids.shape[0])])
    assert torch.equal(cache.valid[1], torch.cat([kept_mask.bool(), no_room], dim=1))
    assert [int(n) for n in cache.length] == [length, kept_length]
    original = (mask.cumsum(1) - 1).clamp(min=0)
    kept_positions = torch.stack([original[row][survives[row]] for row in range(ids.shape[0])])
    assert torch.equal(views[1].positions, kept_positions)
    assert torch.equal(cache.next_position, mask.sum(1))  # the next position, past the last slot
    assert (cache.next_position > kept_length).all()


def test_decode_step_refuses_to_write_past_the_cache(eager):
    """Writing past the buffer is an index error, not a silent overwrite of the prompt."""
    ids, _, pixels = one_prompt()
    with torch.inference_mode():
        cache = eager.new_cache(ids, room=1)
        eager(ids, pixels, cache=cache, last_logits_only=True)
        assert cache.keys[0].shape[2] == ids.shape[1] + 1
        eager.decode_step(torch.tensor([5]), cache)
        with pytest.raises((IndexError, RuntimeError)):
            eager.decode_step(torch.tensor([6]), cache)


def test_cache_capacities_come_in_buckets(eager):
    """The compiled path rounds capacities up to 256, so that prompts of different lengths share
    a shape and the decode step is compiled for few of them; eager allocates what it needs."""
    fastv = M.FastV(2, 0.5)
    new_cache = reusing_caches(eager)
    for text_before, capacity in ((3, 256), (20, 256), (60, 256), (240, 512)):
        ids = image_prompt(1, TOKENS_PER_IMAGE, text_before=text_before)
        for settings in (None, fastv):
            cache = new_cache(ids, settings, room=10)
            assert {keys.shape[2] for keys in cache.keys} == {capacity}
            assert {valid.shape[1] for valid in cache.valid} == {capacity}
        assert eager.new_cache(ids, room=10).keys[0].shape[2] == ids.shape[1] + 10


def test_reusing_caches_keeps_the_buffers_of_its_last_two_shapes(eager):
    """Of one shape, new_cache hands back the same buffers, emptied of their prefill; another
    FastV setting is another shape with buffers of its own; past two shapes the oldest is freed."""
    new_cache = reusing_caches(eager)
    fastv = M.FastV(2, 0.5)
    long = image_prompt(1, TOKENS_PER_IMAGE, text_before=30)
    short = image_prompt(1, TOKENS_PER_IMAGE)
    first = new_cache(long, fastv, room=8)
    first.prefilled = True  # as a prefill leaves it
    again = new_cache(short, fastv, room=8)  # another length, the same bucket
    assert addresses(again) == addresses(first) and not again.prefilled
    without_fastv = new_cache(short, None, room=8)
    assert not set(addresses(without_fastv)) & set(addresses(first))
    new_cache(short, M.FastV(1, 0.5), room=8)  # a third shape: the oldest goes
    assert addresses(new_cache(long, None, room=8)) == addresses(without_fastv)
    freed = weakref.ref(first)
    del first, again
    gc.collect()
    assert freed() is None


# ------------------------------------------------------------------------------------------------
# One graph, compiled once; every loaded tower compiled whole


def test_decode_step_is_one_graph(eager):
    """No graph break in the decode step: nothing in it makes the host wait for the device."""
    ids, mask, pixels = padded_batch()
    fastv = M.FastV(2, 0.5)
    with torch.inference_mode():
        cache = eager.new_cache(ids, fastv, room=2)
        eager(ids, pixels, attention_mask=mask, cache=cache, fastv=fastv, last_logits_only=True)
        explanation = torch._dynamo.explain(eager.decode_step)(ids[:, -1], cache)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_decode_step_compiles_once_per_cache_shape(eager, fresh_compiler):
    """Step after step, and in a second generation of the same cache shape (another prompt
    length, the same bucket), the compiled step reruns the graph it compiled first: a recompile
    would record a new CUDA graph on a GPU."""
    counter = CompileCounter()
    step = torch.compile(eager.decode_step, backend=counter)
    new_cache = reusing_caches(eager)
    fastv = M.FastV(2, 0.5)
    for text_before in (30, 5):
        ids = image_prompt(1, TOKENS_PER_IMAGE, text_before=text_before)
        with torch.inference_mode():
            cache = new_cache(ids, fastv, room=len(DECODE_TOKENS))
            eager(ids, random_pixels(1), cache=cache, fastv=fastv, last_logits_only=True)
            for token in DECODE_TOKENS:
                step(torch.tensor([token]), cache)
    assert counter.frame_count == 1


def test_a_vision_tower_is_one_graph(eager):
    """compile_model compiles each CLIP tower whole: nothing in it breaks the graph, or it would
    run in pieces."""
    _, _, pixels = padded_batch()
    with torch.inference_mode():
        explanation = torch._dynamo.explain(eager.vision_tower)(
            pixels, eager.config.vision_feature_layer)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    assert eager.towers() == [eager.vision_tower]


def test_every_loaded_tower_is_compiled():
    """Video-LLaVA has two towers, and load(towers=("video",)) leaves the image tower out."""
    from minifastv.checkpoint import config_by_name

    with torch.device("meta"):
        video_llava = M.Llava(config_by_name("video-llava-7b"))
    assert video_llava.towers() == [video_llava.image_tower, video_llava.video_tower]
    video_llava.image_tower = None
    assert video_llava.towers() == [video_llava.video_tower]
    compiled = compile_model(video_llava, backend="aot_eager")  # nothing runs: meta tensors
    assert compiled.video_tower._compiled_call_impl is not None  # nn.Module.compile's wrapper
    step = compiled.decode_step
    assert compile_model(compiled, backend="aot_eager").decode_step is step  # compiled once


# ------------------------------------------------------------------------------------------------
# Nothing waits for the device


# Operations that make the host wait for the device on a GPU: a value read on the host (item(),
# bool(), int(), if tensor:), or an output whose size depends on the data (nonzero, unique, ...).
HOST_SYNCS = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "unique")


class SyncRecorder(TorchDispatchMode):
    """Records the host-synchronizing operations dispatched while `recording` is on. Under
    torch.inference_mode, item() and int() of a CPU tensor skip the dispatcher, unseen: the tests
    record under torch.no_grad."""

    def __init__(self):
        super().__init__()
        self.recording, self.syncs = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.recording and any(name in func.__name__ for name in HOST_SYNCS):
            self.syncs.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", CASES)
def test_fastv_step_never_waits_for_the_device(eager, case):
    """From the first decoder layer to the last, FastV's step included, no operation reads a
    device value on the host: on a GPU the host keeps queuing kernels while FastV ranks and
    gathers. The ops are recorded on the CPU; they are the ones that synchronize on a GPU
    (restoring `is_kept.nonzero()` fails this test)."""
    make_inputs, fastv, _ = CASES[case]
    fastv = fastv or M.FastV(2, 0.5)
    ids, mask, pixels = make_inputs()
    recorder = SyncRecorder()
    layers = eager.language_model.layers
    start = layers[0].register_forward_pre_hook(lambda *_: setattr(recorder, "recording", True))
    stop = layers[-1].register_forward_hook(lambda *_: setattr(recorder, "recording", False))
    try:
        with torch.no_grad(), recorder:  # not inference_mode: see SyncRecorder
            eager(ids, pixels, attention_mask=mask, fastv=fastv, cache=eager.new_cache(ids, fastv))
    finally:
        start.remove()
        stop.remove()
    assert recorder.syncs == []


@pytest.mark.parametrize("case", CASES)
def test_decode_step_never_waits_for_the_device(eager, case):
    """The whole decode step, with and without FastV's two groups of layers, queues its kernels
    without reading a device value: what lets it be captured as one CUDA graph."""
    make_inputs, fastv, _ = CASES[case]
    ids, mask, pixels = make_inputs()
    recorder = SyncRecorder()
    with torch.no_grad():  # not inference_mode: see SyncRecorder
        cache = eager.new_cache(ids, fastv, room=3)
        eager(ids, pixels, attention_mask=mask, cache=cache, fastv=fastv, last_logits_only=True)
        recorder.recording = True
        with recorder:
            for token in DECODE_TOKENS[:3]:
                eager.decode_step(torch.full((ids.shape[0],), token), cache)
    assert recorder.syncs == []


def test_the_recorder_sees_a_sync():
    """The recorder is not blind: nonzero() and int() are recorded."""
    recorder = SyncRecorder()
    recorder.recording = True
    with recorder:
        mask = torch.tensor([True, False, True])
        mask.nonzero()
        int(mask.sum())
    assert recorder.syncs == ["nonzero.default", "_local_scalar_dense.default"]


# ------------------------------------------------------------------------------------------------
# The real compiler


def test_inductor_end_to_end(hub_checkpoint, fresh_compiler):
    """The real compiler: generated kernels give the eager tokens, with FastV and padding (slow:
    one test)."""
    eager = load(hub_checkpoint)
    compiled = compile_model(load(hub_checkpoint))
    ids, mask, pixels = padded_batch()
    options = dict(attention_mask=mask, max_new_tokens=5, fastv=M.FastV(2, 0.5), eos_token_id=-1)
    assert torch.equal(generate(compiled, ids, pixels, **options),
                       generate(eager, ids, pixels, **options))
