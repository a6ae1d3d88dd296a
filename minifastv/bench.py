"""Benchmark FastV on the machine at hand: python -m minifastv.bench

For K=2 and R = 0, 0.25, 0.5, 0.75 against no FastV, the device synchronized around each run:
- the prefill of one prompt (one image, or one video with --video), beside the speed-up its FLOPs
  predict (exact count), the KV cache it leaves and, on CUDA, the peak GPU memory; the same prefill
  for a batch of --batch prompts (default 8 on a GPU, none on the CPU);
- the cost of FastV's scoring step alone;
- decode speed, greedy, without FastV and at R=0.5, against its floor: the weights one decode step
  reads (the decoder's layers and lm_head) over the device's measured copy bandwidth;
- on CUDA, the share of the time the GPU is busy during a prefill and during decoding
  (torch.profiler): at batch 1 on a fast GPU, far below 1, the host's kernel launches are the
  bottleneck;
- the same weights through transformers (SDPA): prefill time and decode speed.

How it times: first every setting runs once, untimed, in every shape that will be timed (the first
run of a shape pays for memory, kernel choices and, with --compile, compiling); then the settings
take turns, one run each per round, every other round in reverse order, and each number is the
median of a setting's --repeats runs. FastV at R=0 does what no FastV does plus the scoring, so
it cannot be faster: when every no-FastV prefill was slower than every R=0 one, the bench says the
timings are not to be trusted.

The model: by default a random LLaVA-shaped one that fits a laptop (576 image tokens per image, a
1024-wide 12-layer decoder, a small vision tower). `--model random-7b` or `random-13b` builds random
weights (normal, std 0.02) in the real checkpoints' shapes directly on the device: a GPU benchmark
without a download or a disk; a checkpoint's load is timed. Progress goes to stderr as each
measurement ends, the tables to stdout at the end; --json's tables are keyed by setting ("no_fastv",
"K2_R0.5": cli.setting_name). Run it with and without --compile (minifastv/compiled.py) to compare.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from . import cli
from .checkpoint import config_by_name, file_name, read_config
from .errors import UsageError
from .flops import exact_prefill_flops
from .generation import GenerationStats, generate, synchronize
from .model import FastV, Llava, LlavaConfig, TextConfig, VisionConfig, attention_rows, fastv_rule

RANDOM_MODELS = {"random-7b": "llava-1.5-7b", "random-13b": "llava-1.5-13b",
                 "random-video-7b": "video-llava-7b"}
RS = (0.0, 0.25, 0.5, 0.75)  # the shares of image tokens dropped, each timed against no FastV
DEFAULT_K = 2
NEW_TOKENS = 16  # tokens generated to time the decode
BASELINE_WARNING = ("no FastV measured slower than FastV at R=0, which does more work: the timings "
                    "are noise or a warm-up effect; rerun")


def random_model(config, device, dtype, std=0.02, seed=0):
    """A Llava with random weights (normal, std) in the shapes of `config`, made on the device in
    the dtype: no download, no disk, and no float32 copy of a 7B model on the way."""
    with torch.device("meta"):
        model = Llava(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    state = {name: torch.empty(tensor.shape, device=device, dtype=dtype)
             .normal_(0.0, std, generator=generator)
             for name, tensor in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    model.init_rope()
    return model.eval().requires_grad_(False)


def random_config(layers=12, width=1024, video=False):
    """The bench's default model: LLaVA's image geometry, smaller widths. video=True: Video-LLaVA's
    shape (224 px, two towers, 8 frames of 257 tokens)."""
    return LlavaConfig(
        text=TextConfig(vocab_size=32064, hidden_size=width, intermediate_size=width * 11 // 4,
                        num_hidden_layers=layers, num_attention_heads=max(1, width // 128),
                        max_position_embeddings=4096, rms_norm_eps=1e-5),
        vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                            num_attention_heads=4, image_size=224 if video else 336, patch_size=14),
        video_token_id=32001 if video else None, pad_token_id=32002 if video else 32001)


def random_llava(device, dtype, layers=12, width=1024, video=False):
    return random_model(random_config(layers, width, video), device, dtype)


def benchmark_prompt(config, num_text_tokens=40, video=False):
    """A prompt laid out like LLaVA's: BOS, some text, one image's (or video's) tokens, the
    question; random words of the vocabulary. Returns the ids (1, T) and the model's visual input,
    {"pixel_values": ...} or {"pixel_values_videos": ...}."""
    generator = torch.Generator().manual_seed(0)
    special = (config.image_token_id, config.video_token_id, config.pad_token_id)
    words = torch.tensor([i for i in range(3, config.text.vocab_size) if i not in special])

    def random_words(count):
        return words[torch.randint(len(words), (count,), generator=generator)].tolist()

    before = random_words(num_text_tokens // 2)
    after = random_words(num_text_tokens - num_text_tokens // 2 - 1)
    size = config.vision.image_size
    if video:
        visual_ids = [config.video_token_id] * config.tokens_per_video
        frames = torch.randn(1, config.num_frames, 3, size, size, generator=generator)
        visual = {"pixel_values_videos": frames}
    else:
        visual_ids = [config.image_token_id] * config.image_tokens_per_image
        visual = {"pixel_values": torch.randn(1, 3, size, size, generator=generator)}
    return torch.tensor([[1] + before + visual_ids + after]), visual


def timed(device, function):
    """Seconds `function()` takes on `device`, the device's queue drained before and after."""
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - started


def progress(text):
    print(text, file=sys.stderr, flush=True)


def in_turns(names, repeats):
    """The order of the timed runs: `repeats` rounds with every setting once, every other round
    in reverse. Each setting's average place in a pair of rounds is the same, so a slow drift
    (heat, clocks, other jobs) hits all alike, and no setting always runs first or always right
    after the same one."""
    names = list(names)
    for round_number in range(repeats):
        yield from reversed(names) if round_number % 2 else names


def medians(runs, what, unit, scale=1):
    """{setting: median of its runs x scale}, each on stderr: "prefill, K=2 R=0.50: 21.3 ms"."""
    results = {name: statistics.median(values) * scale for name, values in runs.items()}
    for name, value in results.items():
        k, r = cli.setting_of(name)
        setting = "no FastV" if k is None else f"K={k} R={r:.2f}"
        progress(f"{what}, {setting}: {value:.1f} {unit}")
    return results


@torch.inference_mode()
def warm_up(model, prompts, decode_settings):
    """Every run the bench will time, once and untimed, before any is timed, eager and compiled
    alike: the first run of a shape pays for memory, kernel choices (and compiling), which no
    setting's timing may carry. prompts: [(ids, visual, settings)], the prefills to time (one
    prompt, then the batch); decode_settings: those whose generations are timed."""
    progress("warming up: every setting once, untimed, in the shapes that will be timed")
    for ids, visual, settings in prompts:
        for fastv in settings.values():
            model(ids, **visual, cache=model.new_cache(ids, fastv), fastv=fastv,
                  last_logits_only=True)
    ids, visual, _ = prompts[0]
    for fastv in decode_settings.values():
        for n in (1, NEW_TOKENS):
            generate(model, ids, **visual, max_new_tokens=n, fastv=fastv, eos_token_id=-1)


@torch.inference_mode()
def time_prefills(model, ids, visual, settings, repeats):
    """Prefill seconds per setting, one per run in the order taken, and the KV-cache bytes each
    setting leaves; the settings take turns (in_turns). warm_up first."""
    runs = {name: [] for name in settings}
    caches = {}
    for name in in_turns(settings, repeats):
        fastv = settings[name]
        cache = model.new_cache(ids, fastv)  # made before the clock starts

        def prefill():
            model(ids, **visual, cache=cache, fastv=fastv, last_logits_only=True)

        runs[name].append(timed(model.device, prefill))
        caches[name] = cache.nbytes()
    return runs, caches


def baseline_check(runs, k):
    """BASELINE_WARNING when no FastV was slower than FastV(k, 0) beyond the measured spread (its
    fastest run slower than R=0's slowest): R=0 does the same work plus the scoring, so that can
    only be noise, a warm-up effect, or a bug that makes the two paths differ. Else None."""
    plain, r0 = runs[cli.setting_name(None)], runs[cli.setting_name(FastV(k, 0.0))]
    return BASELINE_WARNING if min(plain) > max(r0) else None


@torch.inference_mode()
def peak_prefill_memory(model, ids, visual, settings):
    """Peak GPU bytes allocated in one prefill per setting, weights and KV cache included."""
    if model.device.type != "cuda":
        return {name: None for name in settings}
    peaks = {}
    for name, fastv in settings.items():
        torch.cuda.reset_peak_memory_stats(model.device)
        # the cache dies with its prefill: a peak never holds the last setting's cache too
        model(ids, **visual, cache=model.new_cache(ids, fastv), fastv=fastv, last_logits_only=True)
        peaks[name] = torch.cuda.max_memory_allocated(model.device)
    return peaks


@torch.inference_mode()
def scoring_step(model, ids, visual, k, r=0.5):
    """FastV's scoring step alone, as a function to time: from layer k-1's queries and keys (taken
    with the model's `observe` hook), the last token's attention row and fastv_rule's top-k."""
    last_layer = []  # layer k-1's LayerView: the same with FastV or without, which starts at k

    def observe(view):
        if view.index == k - 1:
            last_layer.append(view)

    model(ids, **visual, last_logits_only=True, observe=observe)
    view = last_layer[0]  # queries (1, H, T, D), keys (1, H_kv, T, D), after RoPE
    image_positions = model.config.is_visual(ids[0]).nonzero()[:, 0][None].to(model.device)
    num_keep = FastV(k, r).num_keep(image_positions.shape[1])  # image_positions: (1, N)

    def score():
        rows = attention_rows(view.queries, view.keys, view.attention_mask)  # (1, H, 1, T)
        last_row = rows[:, :, -1]  # (1, H, T): the last token's
        inputs = SimpleNamespace(last_token_attention=last_row, image_positions=image_positions,
                                 num_keep=num_keep)  # the three PruningInputs fields it reads
        return fastv_rule(inputs)  # (1, num_keep)

    return score


@torch.inference_mode()
def time_scoring(model, ids, visual, k, repeats=50):
    """Median seconds of FastV's scoring step alone (scoring_step), after one untimed run."""
    score = scoring_step(model, ids, visual, k)
    score()
    return statistics.median(timed(model.device, score) for _ in range(repeats))


@torch.inference_mode()
def decode_speeds(model, ids, visual, settings, repeats):
    """Decode tokens/s per setting, greedy, one per run, the settings taking turns (in_turns):
    GenerationStats times the NEW_TOKENS - 1 decode steps alone, not the prefill. warm_up first."""
    runs = {name: [] for name in settings}
    for name in in_turns(settings, repeats):
        fastv = settings[name]
        # A compiled model hands back the KV-cache buffers of its last two cache shapes
        # (compiled.reusing_caches); a generation with another shape allocates a new cache and,
        # on a GPU, records new CUDA graphs for its addresses. The settings take turns, so the
        # timed generation must not be the first of this setting's shape: an untimed one of the
        # same setting brings its cache back first. (Eager, every generation allocates.)
        generate(model, ids, **visual, max_new_tokens=1, fastv=fastv, eos_token_id=-1)
        stats = GenerationStats()
        generate(model, ids, **visual, max_new_tokens=NEW_TOKENS, fastv=fastv, eos_token_id=-1,
                 stats=stats)
        runs[name].append(stats.decode_tokens_per_second)
    return runs


class TokenClock:
    """A transformers streamer that notes when each token arrives: generate() hands it the
    prompt first, then each new token as it is picked."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def decode_tokens_per_second(self):
        """Over the decode steps: from the first new token (the prefill's) to the last."""
        return (len(self.times) - 2) / (self.times[-1] - self.times[1])


def device_busy(device, run):
    """(busy, wall) seconds of `run()`: how long the GPU executed kernels and copies, from
    torch.profiler's trace, and how long the run took. busy / wall near 1: the GPU is the
    bottleneck; far below: it waits for the host to launch the next kernel (profiling slows the
    host a little, so the share comes out a little low). CUDA only."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        wall = timed(device, run)
    busy = sum(event.time_range.elapsed_us() for event in trace.events()
               if event.device_type == DeviceType.CUDA) / 1e6
    return busy, wall


@torch.inference_mode()
def device_busy_shares(model, ids, visual, settings):
    """Per setting, the share of the time the GPU is busy during a prefill and during the decode
    steps after it (a generation's busy and wall time minus the prefill's); {} off CUDA."""
    if model.device.type != "cuda":
        return {}
    shares = {}
    # the profiler's first start is slow
    device_busy(model.device, lambda: model(ids, **visual, last_logits_only=True))
    for name, fastv in settings.items():
        # room: the generation's cache shape, whose buffers a compiled model hands back to it
        cache = model.new_cache(ids, fastv, room=NEW_TOKENS)
        prefill = device_busy(model.device, lambda: model(
            ids, **visual, cache=cache, fastv=fastv, last_logits_only=True))
        generation = device_busy(model.device, lambda: generate(
            model, ids, **visual, max_new_tokens=NEW_TOKENS, fastv=fastv, eos_token_id=-1))
        shares[f"prefill_{name}"] = prefill[0] / prefill[1]
        shares[f"decode_{name}"] = (generation[0] - prefill[0]) / (generation[1] - prefill[1])
    return shares


def copy_bandwidth(device, repeats=5):
    """Bytes per second the device moves in a tensor copy, counting each byte read and written:
    1 GiB copied on a GPU (less where less is free: a 7B model leaves a T4 about 1.5 GiB), 256 MiB
    on the CPU."""
    megabytes = 256
    if device.type == "cuda":  # two buffers, half the free memory
        megabytes = min(1024, torch.cuda.mem_get_info(device)[0] // 4 // 2**20)
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = statistics.median(timed(device, lambda: target.copy_(source))
                                for _ in range(repeats + 1))
    return 2 * source.numel() / seconds


def decode_step_bytes(model):
    """The weight bytes one decode step reads: every decoder layer, the final norm and lm_head (the
    embedding table gives one row; the vision tower and the projector do not run)."""
    parts = [model.language_model.layers, model.language_model.norm, model.lm_head]
    return sum(p.numel() * p.element_size() for part in parts for p in part.parameters())


def transformers_twin(model, folder=None):
    """transformers' (Video-)LLaVA, SDPA, on the same weights and device; None if not installed."""
    try:
        import transformers
    except ImportError:
        return None
    video = model.config.video_token_id is not None
    model_class = (transformers.VideoLlavaForConditionalGeneration if video
                   else transformers.LlavaForConditionalGeneration)
    if folder is not None:  # a real checkpoint: transformers reads the same files
        return model_class.from_pretrained(folder, dtype=model.dtype).to(model.device).eval()
    config = model.config
    text = dataclasses.asdict(config.text)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
    ids = (dict(video_token_index=config.video_token_id, video_seq_length=config.tokens_per_video)
           if video else {})
    config_class = transformers.VideoLlavaConfig if video else transformers.LlavaConfig
    hf_config = config_class(
        text_config=transformers.LlamaConfig(**text),
        vision_config=transformers.CLIPVisionConfig(**dataclasses.asdict(config.vision)),
        image_token_index=config.image_token_id, pad_token_id=config.pad_token_id, **ids,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy)
    with torch.device(model.device):  # built in the model's dtype, where the model is
        twin = model_class._from_config(hf_config, dtype=model.dtype)
    state = {file_name(name, "transformers"): tensor for name, tensor in model.state_dict().items()}
    twin.load_state_dict(state, strict=True, assign=True)  # minifastv's tensors, not a copy
    return twin.eval()


@torch.inference_mode()
def compare_with_transformers(model, twin, ids, visual, repeats):
    """Median prefill ms and decode tokens/s of transformers on the same prompt, timed as ours."""
    device = model.device
    visual = {name: pixels.to(device, model.dtype) for name, pixels in visual.items()}
    ids = ids.to(device)
    prefills, decodes = [], []
    for round_number in range(repeats + 1):  # round 0 warms transformers up: not counted
        prefill = timed(device, lambda: twin(input_ids=ids, **visual, logits_to_keep=1))
        clock = TokenClock()
        twin.generate(input_ids=ids, **visual, max_new_tokens=NEW_TOKENS,
                      min_new_tokens=NEW_TOKENS, do_sample=False, streamer=clock)
        if round_number:
            prefills.append(prefill)
            decodes.append(clock.decode_tokens_per_second())
    return {"prefill_ms": statistics.median(prefills) * 1e3,
            "decode_tokens_per_s": statistics.median(decodes)}


def parse_args(argv):
    """The flags, each checked as far as it can be without a model: a bad one is refused in one
    sentence that names it, and names a flag the user gave, never a default."""
    parser = argparse.ArgumentParser(prog="python -m minifastv.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"{', '.join(RANDOM_MODELS)} (random weights in the real "
                        "shapes, built on the device), a llava-hf folder, a hub repo id, or 'tiny' "
                        "(default: a small random LLaVA-shaped model)")
    cli.add_device_arguments(parser)
    parser.add_argument("--k", type=int, help=f"FastV's K (default {DEFAULT_K})")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per setting, the median is shown (default 5)")
    parser.add_argument("--text-tokens", type=int, default=40,
                        help="text tokens around the image (default 40)")
    parser.add_argument("--batch", type=int, help="also time a batch of this many prompts "
                                                  "(default 8 on a GPU, none on the CPU; 0: none)")
    parser.add_argument("--video", action="store_true", help="a video prompt (8 frames, 2,056 "
                        "tokens) instead of an image: the random model is then Video-LLaVA-shaped, "
                        "and --model must be a Video-LLaVA checkpoint")
    parser.add_argument("--layers", type=int,
                        help="decoder layers of the default random model (default 12)")
    parser.add_argument("--width", type=int, help="decoder width of the default random model, a "
                        "multiple of 64 (default 1024)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the comparison with "
                        "transformers (it shares minifastv's weights, but needs its own "
                        "activations; with a checkpoint folder it loads a second copy)")
    parser.add_argument("--json", metavar="FILE", help="also write every number to FILE as JSON")
    cli.add_compile_argument(parser)
    cli.add_version_argument(parser)
    args = parser.parse_args(argv)
    args.given = {flag for flag in ("k", "layers", "width") if getattr(args, flag) is not None}
    for flag, default in (("k", DEFAULT_K), ("layers", 12), ("width", 1024)):
        setattr(args, flag, default if getattr(args, flag) is None else getattr(args, flag))
    cli.check_fastv(args.k, 0.0)  # K >= 1
    cli.check_at_least("--repeats", args.repeats)
    cli.check_at_least("--text-tokens", args.text_tokens)
    if args.batch is not None:
        cli.check_at_least("--batch", args.batch, 0)
    if args.batch == 1:
        raise UsageError("--batch 1 is the one-prompt prefill the bench always times: give 2 or "
                         "more, or 0 for none.")
    if args.model is not None and args.given & {"layers", "width"}:
        raise UsageError(f"--layers and --width size the default random model: leave them out "
                         f"with --model {args.model}.")
    cli.check_at_least("--layers", args.layers, 2)
    if args.width < 64 or args.width % 64:
        raise UsageError(f"--width must be a multiple of 64 from 64 up, got {args.width}.")
    return args


def check_k(args, num_layers):
    """FastV at --k fits the decoder: K from 1 to num_layers - 1. The message blames the flag the
    user gave (--k, --layers or --model), not a default they never wrote."""
    named = f"--model {args.model}"
    if num_layers < 2:
        raise UsageError(f"{named} has {num_layers} decoder layer: FastV prunes at a layer after "
                         "the first, so it needs at least 2.")
    if args.k < num_layers:
        return
    if "k" not in args.given:
        if args.model is None:
            raise UsageError(f"--layers must be above --k ({args.k}, its default), got "
                             f"{num_layers}.")
        raise UsageError(f"{named} has {num_layers} decoder layers, too few for --k {args.k} (its "
                         f"default): give a smaller --k.")
    where = f"{named} ({num_layers} layers)"
    if args.model is None:
        where = f"{'' if 'layers' in args.given else 'the default '}--layers {num_layers}"
    raise UsageError(f"--k must be between 1 and {num_layers - 1} for {where}, got {args.k}.")


def model_config(args):
    """(config, checkpoint folder or None) of the model --model names, read or made without
    building the model, and every argument checked against it before the (slow) build or load."""
    folder = None
    if args.model is None:
        config = random_config(args.layers, args.width, args.video)
    elif args.model in RANDOM_MODELS:
        config = config_by_name(RANDOM_MODELS[args.model])
        if args.video != (config.video_token_id is not None):
            fix = "random-video-7b with --video" if args.video else "--video with random-video-7b"
            raise UsageError(f"--model {args.model} {'has no' if args.video else 'needs a'} video: "
                             f"use {fix}.")
    else:
        folder = cli.model_folder(args.model)
        config = read_config(folder)
        if args.video and config.video_token_id is None:
            raise UsageError(f"--video needs a Video-LLaVA checkpoint: the model in {folder} has "
                             "no video tower.")
    check_k(args, config.text.num_hidden_layers)
    # benchmark_prompt's length: the text tokens (BOS among them) and one image's or video's
    num_tokens = args.text_tokens + (
        config.tokens_per_video if args.video else config.image_tokens_per_image)
    context = config.text.max_position_embeddings
    if num_tokens + NEW_TOKENS > context:
        raise UsageError(f"--text-tokens {args.text_tokens} makes a {num_tokens}-token prompt, too "
                         f"long for the model's context of {context} tokens with the "
                         f"{NEW_TOKENS} tokens the decode timing adds.")
    return config, folder


def measure(args, model, folder, load_seconds):
    """Every number of the benchmark, as the JSON file holds them; a line on stderr as each ends."""
    device, config = model.device, model.config
    ids, visual = benchmark_prompt(config, args.text_tokens, args.video)
    num_tokens = ids.shape[1]
    num_image_tokens = config.tokens_per_video if args.video else config.image_tokens_per_image
    settings = {cli.setting_name(fastv): fastv for fastv in [None, *(FastV(args.k, r) for r in RS)]}

    def only(*rs):  # the settings without FastV and at these R
        return {name: fastv for name, fastv in settings.items() if fastv is None or fastv.r in rs}

    unpruned = exact_prefill_flops(config, num_tokens, num_image_tokens, num_videos=int(args.video))
    predicted = {name: unpruned / exact_prefill_flops(config, num_tokens, num_image_tokens,
                                                      *cli.setting_of(name), int(args.video))
                 for name in settings}
    batch = args.batch if args.batch is not None else (8 if device.type == "cuda" else 0)
    prompts = [(ids, visual, settings)]  # the prefills timed: one prompt, then the batch
    if batch > 1:  # the same prompt `batch` times
        pixels = {name: p.repeat(batch, *[1] * (p.ndim - 1)) for name, p in visual.items()}
        prompts.append((ids.expand(batch, -1), pixels, only(0.5, 0.75)))
    decode_settings = only(0.5)
    compile_seconds = None
    if args.compile:  # the warm-up runs compile
        compile_seconds = cli.compile_and_warm_up(
            model, lambda: warm_up(model, prompts, decode_settings))
    else:
        warm_up(model, prompts, decode_settings)

    progress(f"timing the prefill: {len(settings)} settings in turns, {args.repeats} runs each")
    runs, cache_bytes = time_prefills(model, ids, visual, settings, args.repeats)
    prefill_ms = medians(runs, "prefill", "ms", 1e3)
    warning = baseline_check(runs, args.k)
    scoring_ms = time_scoring(model, ids, visual, args.k) * 1e3
    progress(f"FastV's scoring step alone: {scoring_ms:.2f} ms")
    peak_bytes = peak_prefill_memory(model, ids, visual, settings)
    batch_ms = None
    if batch > 1:
        batch_ids, batch_visual, batch_settings = prompts[1]
        progress(f"timing the prefill of a batch of {batch}: {len(batch_settings)} settings in "
                 f"turns, {args.repeats} runs each")
        batch_runs, _ = time_prefills(model, batch_ids, batch_visual, batch_settings, args.repeats)
        batch_ms = medians(batch_runs, f"prefill of {batch}", "ms", 1e3)
    progress(f"timing the decode: {len(decode_settings)} settings in turns, {args.repeats} runs "
             "each")
    speeds = decode_speeds(model, ids, visual, decode_settings, args.repeats)
    decode = medians(speeds, "decode", "tokens/s")
    floor = copy_bandwidth(device) / decode_step_bytes(model)
    busy = device_busy_shares(model, ids, visual, decode_settings)
    twin = None if args.no_transformers else transformers_twin(model, folder)
    theirs = None
    if twin is not None:
        progress("timing transformers on the same weights, without FastV")
        theirs = compare_with_transformers(model, twin, ids, visual, args.repeats)
        progress(f"transformers: prefill {theirs['prefill_ms']:.1f} ms, decode "
                 f"{theirs['decode_tokens_per_s']:.1f} tokens/s")
    return {
        "model": args.model or f"random {'Video-LLaVA' if args.video else 'LLaVA'}-shaped",
        "device": device_name(device), "dtype": str(model.dtype).removeprefix("torch."),
        "machine": machine_name(), "torch": torch.__version__, "compiled": args.compile,
        "compile_seconds": compile_seconds, "repeats": args.repeats,
        "prompt_tokens": num_tokens, "image_tokens": num_image_tokens, "prefill_ms": prefill_ms,
        # every timed run, in the order taken: the spread behind each median
        "prefill_ms_runs": {name: [seconds * 1e3 for seconds in values]
                            for name, values in runs.items()},
        "warnings": [warning] if warning else [],
        "predicted_speedup": predicted, "kv_cache_bytes": cache_bytes,
        "peak_gpu_bytes": peak_bytes, "scoring_ms": scoring_ms,
        f"prefill_ms_batch{batch}": batch_ms, "load_seconds": load_seconds, "transformers": theirs,
        "decode_tokens_per_s": decode, "decode_floor_tokens_per_s": floor,
        "device_busy_share": busy,
    }


def machine_name():
    """The processor's name, as /proc/cpuinfo or platform says it (the device is named apart)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine())
    return f"{name}, {os.cpu_count()} cores"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def report(results, args, config):
    """The numbers as tables, for people."""
    text, k = config.text, args.k
    no_fastv, r0, half = (cli.setting_name(fastv) for fastv in (None, FastV(k, 0.0), FastV(k, 0.5)))
    compiled = (f"compiled (first runs {results['compile_seconds']:.1f} s)" if results["compiled"]
                else "eager")
    print(f"model: {results['model']} | decoder {text.hidden_size} wide, {text.num_hidden_layers} "
          f"layers | device {results['device']} on {results['machine']} | torch "
          f"{results['torch']}, {compiled} | {results['dtype']} | prompt "
          f"{results['prompt_tokens']} tokens, {results['image_tokens']} of them "
          f"{'video' if args.video else 'image'} | K={k} | median of {results['repeats']}")
    print(f"{'setting':>9} {'prefill ms':>10} {'speed-up':>9} {'FLOPs ratio':>11} {'predicted':>9} "
          f"{'realized/predicted':>18} {'KV cache MB':>11} {'peak GPU MiB':>12}")
    baseline = results["prefill_ms"][no_fastv]
    for name, ms in results["prefill_ms"].items():
        realized, predicted = baseline / ms, results["predicted_speedup"][name]
        peak = results["peak_gpu_bytes"][name]
        peak = "-" if peak is None else f"{peak / 2**20:.0f}"
        label = "no FastV" if name == no_fastv else f"R={cli.setting_of(name)[1]:.2f}"
        print(f"{label:>9} {ms:>10.1f} {realized:>8.2f}x {1 / predicted:>11.3f} {predicted:>8.2f}x "
              f"{realized / predicted:>18.1%} {results['kv_cache_bytes'][name] / 2**20:>11.1f} "
              f"{peak:>12}")
    for warning in results["warnings"]:
        print(f"warning: {warning}")
    overhead = results["prefill_ms"][r0] / baseline - 1
    scoring = results["scoring_ms"]
    print(f"scoring overhead: FastV R=0 vs no FastV {overhead:+.1%} of the prefill (timing noise "
          f"included); the scoring step alone {scoring:.2f} ms = {scoring / baseline:.2%} of the "
          "prefill")
    batch_key = next(key for key in results if key.startswith("prefill_ms_batch"))
    if results[batch_key]:
        plain = results[batch_key][no_fastv]
        batch = ", ".join(f"R={cli.setting_of(name)[1]:g} {ms:.1f} ms ({plain / ms:.2f}x, "
                          f"predicted {results['predicted_speedup'][name]:.2f}x)"
                          for name, ms in results[batch_key].items() if name != no_fastv)
        print(f"batch of {batch_key.removeprefix('prefill_ms_batch')}: no FastV {plain:.1f} ms, "
              f"{batch}")
    decode, floor = results["decode_tokens_per_s"], results["decode_floor_tokens_per_s"]
    print(f"decode, greedy, {NEW_TOKENS} tokens: no FastV {decode[no_fastv]:.1f} tokens/s, R=0.5 "
          f"{decode[half]:.1f} tokens/s; floor (weights read once a token, measured copy "
          f"bandwidth) {floor:.1f} tokens/s: {decode[no_fastv] / floor:.0%} of it")
    if results["device_busy_share"]:
        shares = results["device_busy_share"]
        print(f"GPU busy (torch.profiler): prefill {shares[f'prefill_{no_fastv}']:.0%} of the time "
              f"({shares[f'prefill_{half}']:.0%} at R=0.5), decode "
              f"{shares[f'decode_{no_fastv}']:.0%} ({shares[f'decode_{half}']:.0%}); the rest it "
              "waits for the host")
    if results["load_seconds"] is not None:
        print(f"load: {results['load_seconds']:.1f} s")
    theirs = results["transformers"]
    if theirs is None:
        print("transformers comparison skipped"
              + ("" if args.no_transformers else ": transformers is not installed"))
        return
    print(f"same weights through transformers (sdpa), unpruned: prefill {theirs['prefill_ms']:.1f} "
          f"ms, decode {theirs['decode_tokens_per_s']:.1f} tokens/s")
    print(f"minifastv / transformers: prefill time {baseline / theirs['prefill_ms']:.2f}, decode "
          f"speed {decode[no_fastv] / theirs['decode_tokens_per_s']:.2f}x")


def main(argv=None):
    args = parse_args(argv)
    if args.json:  # before minutes of benchmark, not after
        cli.check_output(args.json, "--json")
    device = cli.pick_device(args.device)
    if args.compile:
        cli.check_compile(device)
    config, folder = model_config(args)
    dtype, load_seconds = cli.pick_dtype(args.dtype, device), None
    if folder is None:
        model = random_model(config, device, dtype)
    else:  # a checkpoint: its load is timed
        started = time.perf_counter()
        model = cli.load_model(folder, device, dtype, towers=("video" if args.video else "image",))
        load_seconds = time.perf_counter() - started
    results = measure(args, model, folder, load_seconds)
    report(results, args, model.config)
    if args.json:
        cli.write_output(args.json, json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return results


def command(argv=None):
    return cli.report_errors(main, argv)


if __name__ == "__main__":
    sys.exit(command())
