"""The compiled path (minifastv/compiled.py) gives what the eager path gives, and FastV never waits for the GPU.

Compiling with inductor on a CPU takes minutes, so most tests capture the graphs with the "aot_eager"
backend (the same tracing, functionalization and graph checks, no generated code) and one test runs
inductor end to end. Each test loads its own model: compile_model changes a model in place.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import minifastv
import minifastv.model as M
from minifastv.compiled import StaticKVCache, decode_step, towers

from conftest import image_prompt, left_pad, random_pixels

TOKENS_PER_IMAGE = 36  # the tiny 84 px images: a 6 x 6 grid


def load(checkpoint):
    return minifastv.load(checkpoint, device="cpu", dtype=torch.float32, progress=False)


def padded_batch():
    prompts = [image_prompt(1, TOKENS_PER_IMAGE, text_before=4 + 3 * row, text_after=6 + row, seed=row) for row in range(2)]
    ids, mask = left_pad(prompts)
    return ids, mask, random_pixels(2, seed=1)


def one_prompt():
    return image_prompt(1, TOKENS_PER_IMAGE), None, random_pixels(1)


CASES = {
    "one prompt": (one_prompt, None),
    "one prompt, FastV": (one_prompt, M.FastV(2, 0.5)),
    "padded batch": (padded_batch, None),
    "padded batch, FastV K=1 R=0.75": (padded_batch, M.FastV(1, 0.75)),
}


@pytest.fixture(scope="module")
def eager(hub_checkpoint):
    return load(hub_checkpoint)


@pytest.fixture(scope="module")
def captured(hub_checkpoint):
    torch._dynamo.reset()  # this module's compiled code only (see conftest.fresh_compiler)
    return minifastv.compile_model(load(hub_checkpoint), backend="aot_eager")


@pytest.mark.parametrize("case", CASES)
def test_compiled_generation_gives_the_eager_tokens(eager, captured, case):
    make_inputs, fastv = CASES[case]
    ids, mask, pixels = make_inputs()
    options = dict(attention_mask=mask, max_new_tokens=10, fastv=fastv, eos_token_id=-1)
    expected = eager.generate(ids, pixels, **options)
    stats = minifastv.GenerationStats()
    assert torch.equal(captured.generate(ids, pixels, stats=stats, **options), expected)
    assert stats.kv_cache_bytes > 0


def test_a_second_generation_of_the_same_shape_reuses_the_buffers(eager, captured):
    """The decode step's buffers keep their addresses from one generation to the next (a CUDA graph replays on
    the addresses it recorded), refilled with the new prompt: the tokens are still the eager ones."""
    first, second = image_prompt(1, TOKENS_PER_IMAGE, seed=5), image_prompt(1, TOKENS_PER_IMAGE, seed=6)
    pixels = random_pixels(1, seed=5)
    options = dict(max_new_tokens=8, eos_token_id=-1, fastv=M.FastV(2, 0.5))
    assert torch.equal(captured.generate(first, pixels, **options), eager.generate(first, pixels, **options))
    addresses = {shape: cache.keys[0].data_ptr() for shape, cache in captured.static_caches.items()}
    assert torch.equal(captured.generate(second, pixels, **options), eager.generate(second, pixels, **options))
    assert {shape: cache.keys[0].data_ptr() for shape, cache in captured.static_caches.items()} == addresses
    assert len(captured.static_caches) <= 2  # the last two shapes only


@pytest.mark.parametrize("compiled", [False, True], ids=["decode_step", "compiled decode_step"])
@pytest.mark.parametrize("case", CASES)
def test_static_cache_decodes_as_the_growing_cache_does(eager, captured, case, compiled):
    """Token by token, the static cache's decode step (as written, and compiled) and Llava.forward with a KVCache
    give the same logits, within float32 rounding: the buffer's unwritten slots are masked out, positions move on."""
    step = captured.compiled_decode_step if compiled else decode_step
    make_inputs, fastv = CASES[case]
    ids, mask, pixels = make_inputs()
    with torch.inference_mode():
        growing = eager.new_cache()
        eager(ids, pixels, attention_mask=mask, cache=growing, fastv=fastv, last_logits_only=True)
        static_source = eager.new_cache()
        eager(ids, pixels, attention_mask=mask, cache=static_source, fastv=fastv, last_logits_only=True)
        static = StaticKVCache(static_source, max_new_tokens=6, bucket=1)
        assert (static.group[-1] == 1) == (fastv is not None)  # after FastV, the last layers hold fewer tokens
        tokens = torch.tensor([[5, 17, 300, 2000, 31000, 7]] * ids.shape[0])  # (B, 6)
        for step_index in range(6):
            expected = eager(tokens[:, step_index : step_index + 1], cache=growing, last_logits_only=True)[:, -1]
            got = step(eager, static, tokens[:, step_index])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert static.write_index[0].item() == ids.shape[1] + 6
        assert torch.equal(static.next_position, mask.sum(1) + 6 if mask is not None else torch.tensor([ids.shape[1] + 6]))


def test_static_cache_refuses_to_grow_past_its_size(eager):
    """Writing past the buffer is an index error, not a silent overwrite of the prompt."""
    ids, _, pixels = one_prompt()
    with torch.inference_mode():
        cache = eager.new_cache()
        eager(ids, pixels, cache=cache, last_logits_only=True)
        static = StaticKVCache(cache, max_new_tokens=1, bucket=1)
        assert static.keys[0].shape[2] == ids.shape[1] + 1
        decode_step(eager, static, torch.tensor([5]))
        with pytest.raises((IndexError, RuntimeError)):
            decode_step(eager, static, torch.tensor([6]))


def test_static_cache_sizes_come_in_buckets(eager):
    """Prompts of different lengths share a buffer size, so the decode step is compiled for few shapes."""
    sizes = set()
    for text_before in (3, 20, 60):
        ids, pixels = image_prompt(1, TOKENS_PER_IMAGE, text_before=text_before), random_pixels(1)
        with torch.inference_mode():
            cache = eager.new_cache()
            eager(ids, pixels, cache=cache, last_logits_only=True)
        static = StaticKVCache(cache, max_new_tokens=10)
        assert static.keys[0].shape[2] % 256 == 0 and static.keys[0].shape[2] >= ids.shape[1] + 10
        sizes.add(static.keys[0].shape[2])
    assert sizes == {256}


def test_decode_step_is_one_graph(eager):
    """No graph break in the decode step: nothing in it makes the host wait for the device."""
    ids, mask, pixels = padded_batch()
    with torch.inference_mode():
        cache = eager.new_cache()
        eager(ids, pixels, attention_mask=mask, cache=cache, fastv=M.FastV(2, 0.5), last_logits_only=True)
        explanation = torch._dynamo.explain(decode_step)(eager, StaticKVCache(cache, max_new_tokens=2), ids[:, -1])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_a_vision_tower_is_one_graph(eager):
    """compile_model compiles each CLIP tower whole: nothing in it breaks the graph, or it would run in pieces."""
    _, _, pixels = padded_batch()
    with torch.inference_mode():
        explanation = torch._dynamo.explain(eager.vision_tower)(pixels, eager.config.vision_feature_layer)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    assert towers(eager) == [eager.vision_tower]


def test_every_loaded_tower_is_compiled():
    """Video-LLaVA has two towers, and load(towers=("video",)) leaves the image tower out."""
    from minifastv.checkpoint import config_by_name

    with torch.device("meta"):
        video_llava = M.Llava(config_by_name("video-llava-7b"))
    assert towers(video_llava) == [video_llava.image_tower, video_llava.video_tower]
    video_llava.image_tower = None
    assert towers(video_llava) == [video_llava.video_tower]


# Operations that make the host wait for the device on a GPU: a value read on the host (item(), bool(),
# int(), if tensor:), or an output whose size depends on the data (nonzero, masked_select, unique).
HOST_SYNCS = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "unique")


class SyncRecorder(TorchDispatchMode):
    """Records the host-synchronizing operations dispatched while `recording` is on."""

    def __init__(self):
        super().__init__()
        self.recording, self.syncs = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.recording and any(name in func.__name__ for name in HOST_SYNCS):
            self.syncs.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", CASES)
def test_fastv_step_never_waits_for_the_device(eager, case):
    """From the first decoder layer to the last, FastV's step included, no operation reads a device value on
    the host: on a GPU the host keeps queuing kernels while FastV ranks and gathers. The ops are recorded on
    the CPU; they are the ones that synchronize on a GPU (restoring `is_kept.nonzero()` fails this test)."""
    make_inputs, fastv = CASES[case]
    ids, mask, pixels = make_inputs()
    recorder = SyncRecorder()
    layers = eager.language_model.layers
    start = layers[0].register_forward_pre_hook(lambda *_: setattr(recorder, "recording", True))
    stop = layers[-1].register_forward_hook(lambda *_: setattr(recorder, "recording", False))
    try:
        with torch.inference_mode(), recorder:
            eager(ids, pixels, attention_mask=mask, fastv=fastv or M.FastV(2, 0.5), cache=eager.new_cache())
    finally:
        start.remove()
        stop.remove()
    assert recorder.syncs == []


def test_the_recorder_sees_a_sync():
    """The recorder is not blind: nonzero() and bool() are recorded."""
    recorder = SyncRecorder()
    recorder.recording = True
    with recorder:
        mask = torch.tensor([True, False, True])
        mask.nonzero()
        bool(mask.any())
    assert "nonzero.default" in recorder.syncs and "_local_scalar_dense.default" in recorder.syncs


def test_inductor_end_to_end(hub_checkpoint, fresh_compiler):
    """The real compiler: generated kernels give the eager tokens, with FastV and padding (slow: one test)."""
    eager = load(hub_checkpoint)
    compiled = minifastv.compile_model(load(hub_checkpoint))
    ids, mask, pixels = padded_batch()
    options = dict(attention_mask=mask, max_new_tokens=5, fastv=M.FastV(2, 0.5), eos_token_id=-1)
    assert torch.equal(compiled.generate(ids, pixels, **options), eager.generate(ids, pixels, **options))
