"""Benchmark FastV's prefill speed-up against its FLOPs prediction: python -m minifastv.bench

By default it builds a random LLaVA-shaped model that fits a laptop (576 image tokens per image, a
1024-wide 12-layer decoder with SwiGLU at 11/4 of the width, a small vision tower); --model runs a
checkpoint instead: `--model tiny` (built offline in a second), or a real one, e.g.
`python -m minifastv.bench --model llava-hf/llava-1.5-7b-hf --device cuda`. It prints, for each R at
K=2: the prefill time, its ratio to the unpruned model, the FLOPs ratio (exact count), and how much of
the predicted speed-up was realized; then the cost of FastV's scoring alone (R=0 against no FastV)
and the KV-cache size. When transformers is installed, it also runs the same weights through
transformers' LlavaForConditionalGeneration (SDPA) and compares prefill time, decode speed and, on
CUDA, peak GPU memory.
"""

import argparse
import dataclasses
import statistics
import sys
import time

import torch

from . import cli
from .checkpoint import file_name, read_config
from .errors import UsageError
from .flops import exact_prefill_flops
from .generation import synchronize
from .model import FastV, Llava, LlavaConfig, TextConfig, VisionConfig, attention_rows, fastv_rule


def random_llava(device, dtype, layers=12, width=1024, video=False):
    """A LLaVA-shaped model with random weights: real image geometry, smaller widths. video=True: Video-LLaVA's
    shape (224 px, two towers, 8 frames of 257 tokens)."""
    config = LlavaConfig(
        text=TextConfig(vocab_size=32064, hidden_size=width, intermediate_size=width * 11 // 4, num_hidden_layers=layers,
                        num_attention_heads=max(1, width // 128), max_position_embeddings=4096, rms_norm_eps=1e-5),
        vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                            image_size=224 if video else 336, patch_size=14),
        video_token_id=32001 if video else None, pad_token_id=32002 if video else 32001,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Llava(config)
    model.init_rope()
    return model.to(dtype).eval().requires_grad_(False)


def benchmark_prompt(config, num_text_tokens=40, video=False):
    """A prompt laid out like LLaVA's: BOS, some text, one image's (or video's) tokens, the question; random words
    of the vocabulary. Returns the ids (1, T) and the model's visual input, {"pixel_values": ...} or
    {"pixel_values_videos": ...}."""
    generator = torch.Generator().manual_seed(0)
    special = (*config.visual_token_ids, config.pad_token_id)
    words = torch.tensor([i for i in range(3, config.text.vocab_size) if i not in special])
    before = words[torch.randint(len(words), (num_text_tokens // 2,), generator=generator)].tolist()
    after = words[torch.randint(len(words), (num_text_tokens - num_text_tokens // 2 - 1,), generator=generator)].tolist()
    size = config.vision.image_size
    if video:
        visual_ids = [config.video_token_id] * config.tokens_per_video
        visual = {"pixel_values_videos": torch.randn(1, config.num_frames, 3, size, size, generator=generator)}
    else:
        visual_ids = [config.image_token_id] * config.image_tokens_per_image
        visual = {"pixel_values": torch.randn(1, 3, size, size, generator=generator)}
    return torch.tensor([[1] + before + visual_ids + after]), visual


@torch.inference_mode()
def time_prefills(model, ids, visual, settings, repeats):
    """Median prefill seconds per setting; the settings take turns so that drift hits all alike."""
    times = {name: [] for name in settings}
    caches = {}
    for round_number in range(repeats + 1):  # round 0 warms up
        for name, fastv in settings.items():
            cache = model.new_cache()
            synchronize(model.device)
            started = time.perf_counter()
            model(ids, **visual, cache=cache, fastv=fastv, last_logits_only=True)
            synchronize(model.device)
            if round_number:
                times[name].append(time.perf_counter() - started)
            caches[name] = cache.nbytes()
    return {name: statistics.median(values) for name, values in times.items()}, caches


@torch.inference_mode()
def time_scoring(model, ids, visual, k, repeats=50):
    """Median seconds of FastV's scoring step alone: the last token's attention row and the top-k."""
    captured = {}

    def spy(inputs):
        captured["inputs"] = inputs
        return fastv_rule(inputs)

    model(ids, **visual, fastv=FastV(k, 0.5, rule=spy), last_logits_only=True)
    inputs = captured["inputs"]
    times = []
    for _ in range(repeats + 1):
        synchronize(model.device)
        started = time.perf_counter()
        row = attention_rows(inputs.queries, inputs.keys, inputs.attention_mask)[:, :, -1]
        fastv_rule(dataclasses.replace(inputs, last_token_attention=row))
        synchronize(model.device)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def transformers_twin(model, folder=None):
    """transformers' LLaVA or Video-LLaVA (SDPA) with the same weights, dtype and device; None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    video = model.config.video_token_id is not None
    model_class = transformers.VideoLlavaForConditionalGeneration if video else transformers.LlavaForConditionalGeneration
    if folder is not None:  # a real checkpoint: transformers reads the same files
        return model_class.from_pretrained(folder, dtype=model.dtype).to(model.device).eval()
    config = model.config
    text = dataclasses.asdict(config.text)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
    ids = dict(video_token_index=config.video_token_id, video_seq_length=config.tokens_per_video) if video else {}
    config_class = transformers.VideoLlavaConfig if video else transformers.LlavaConfig
    hf_config = config_class(
        text_config=transformers.LlamaConfig(**text), vision_config=transformers.CLIPVisionConfig(**dataclasses.asdict(config.vision)),
        image_token_index=config.image_token_id, pad_token_id=config.pad_token_id, **ids,
        vision_feature_layer=config.vision_feature_layer, vision_feature_select_strategy=config.vision_feature_select_strategy)
    twin = model_class(hf_config).to(model.dtype)
    twin.load_state_dict({file_name(name, "transformers"): tensor for name, tensor in model.state_dict().items()}, strict=True)
    return twin.to(model.device).eval()


@torch.inference_mode()
def compare_with_transformers(model, twin, ids, visual, repeats, new_tokens=16):
    """Median prefill seconds, decode tokens/s and peak GPU bytes of minifastv and of transformers.

    Both are timed the same way: the prefill as one forward pass, the decode as the time of a greedy
    generate() of `new_tokens` tokens minus that of a generate() of one token, over new_tokens - 1 steps.
    """
    device = model.device
    visual = {name: pixels.to(device, model.dtype) for name, pixels in visual.items()}
    runs = {
        "transformers": {
            "prefill": lambda: twin(input_ids=ids.to(device), **visual, logits_to_keep=1),
            "generate": lambda n: twin.generate(input_ids=ids.to(device), **visual, max_new_tokens=n,
                                                min_new_tokens=n, do_sample=False),
        },
        "minifastv": {
            "prefill": lambda: model(ids, **visual, cache=model.new_cache(), last_logits_only=True),
            "generate": lambda n: model.generate(ids, **visual, max_new_tokens=n, eos_token_id=-1),
        },
    }

    def timed(function):
        synchronize(device)
        started = time.perf_counter()
        function()
        synchronize(device)
        return time.perf_counter() - started

    results = {name: {"prefill": [], "decode": [], "memory": None} for name in runs}
    for round_number in range(repeats + 1):  # round 0 warms up; the two take turns
        for name, run in runs.items():
            prefill = timed(run["prefill"])
            one, many = timed(lambda: run["generate"](1)), timed(lambda: run["generate"](new_tokens))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                run["generate"](new_tokens)
                results[name]["memory"] = torch.cuda.max_memory_allocated(device)
            if round_number:
                results[name]["prefill"].append(prefill)
                results[name]["decode"].append((new_tokens - 1) / max(many - one, 1e-9))
    return {name: {"prefill": statistics.median(r["prefill"]), "decode": statistics.median(r["decode"]),
                   "memory": r["memory"]} for name, r in results.items()}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m minifastv.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a llava-hf folder, a hub repo id, or 'tiny' (default: a random LLaVA-shaped model)")
    cli.add_device_arguments(parser)
    parser.add_argument("--k", type=int, default=2, help="FastV's K (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed prefills per setting, the median is shown (default 5)")
    parser.add_argument("--text-tokens", type=int, default=40, help="text tokens around the image (default 40)")
    parser.add_argument("--video", action="store_true",
                        help="a video prompt (8 frames, 2,056 tokens) instead of an image: the random model is then "
                             "Video-LLaVA-shaped, and --model must be a Video-LLaVA checkpoint")
    parser.add_argument("--layers", type=int, default=12, help="decoder layers of the random model (default 12)")
    parser.add_argument("--width", type=int, default=1024, help="decoder width of the random model, a multiple of 64 (default 1024)")
    parser.add_argument("--no-transformers", action="store_true",
                        help="skip the comparison with transformers, which holds a second copy of the weights "
                             "(loaded through host memory): needed where two copies do not fit, e.g. the 7B on a T4")
    return parser.parse_args(argv)


def build_model(args, device, dtype):
    """The model to time, with every argument checked first: a checkpoint (--model) or a random one."""
    if args.model is None:
        cli.check_at_least("--layers", args.layers, 2)
        if args.width < 64 or args.width % 64:
            raise UsageError(f"--width must be a multiple of 64, got {args.width}.")
        cli.check_fastv(args.k, 0.0, args.layers)
        return random_llava(device, dtype, args.layers, args.width, args.video), None
    folder = cli.model_folder(args.model)
    config = read_config(folder)
    cli.check_fastv(args.k, 0.0, config.text.num_hidden_layers)
    if args.video and config.video_token_id is None:
        raise UsageError(f"--video needs a Video-LLaVA checkpoint: the model in {folder} has no video tower.")
    return cli.load_model(folder, device, dtype, towers=("video",) if args.video else ("image",)), folder


def main(argv=None):
    args = parse_args(argv)
    cli.check_fastv(args.k, 0.0)
    cli.check_at_least("--repeats", args.repeats)
    cli.check_at_least("--text-tokens", args.text_tokens)
    device = cli.pick_device(args.device)
    model, folder = build_model(args, device, cli.pick_dtype(args.dtype, device))
    config = model.config
    ids, visual = benchmark_prompt(config, args.text_tokens, args.video)
    if ids.shape[1] + 16 > config.text.max_position_embeddings:  # 16: the tokens generated for transformers' comparison
        raise UsageError(f"--text-tokens {args.text_tokens} makes a {ids.shape[1]}-token prompt, too long for the "
                         f"model's context of {config.text.max_position_embeddings} tokens.")
    num_tokens, num_image_tokens = ids.shape[1], config.tokens_per_video if args.video else config.image_tokens_per_image
    num_videos = int(args.video)
    ratios = [0.0, 0.25, 0.5, 0.75]
    settings = {"no FastV": None, **{f"R={r:.2f}": FastV(args.k, r) for r in ratios}}
    seconds, cache_bytes = time_prefills(model, ids, visual, settings, args.repeats)

    text = config.text
    print(f"model: {args.model or 'random LLaVA-shaped'} | decoder {text.hidden_size} wide, {text.num_hidden_layers} layers | "
          f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}) | "
          f"{model.dtype} | prompt {num_tokens} tokens, {num_image_tokens} of them {'video' if args.video else 'image'} | "
          f"K={args.k} | median of {args.repeats}")
    print(f"{'setting':>9} {'prefill ms':>10} {'speed-up':>9} {'FLOPs ratio':>11} {'predicted':>9} {'realized/predicted':>18} {'KV cache MB':>11}")
    baseline = seconds["no FastV"]
    unpruned_flops = exact_prefill_flops(config, num_tokens, num_image_tokens, num_videos=num_videos)
    for name, fastv in settings.items():
        flops = unpruned_flops if fastv is None else exact_prefill_flops(config, num_tokens, num_image_tokens, fastv.k,
                                                                          fastv.r, num_videos)
        realized, predicted = baseline / seconds[name], unpruned_flops / flops
        print(f"{name:>9} {seconds[name] * 1e3:>10.1f} {realized:>8.2f}x {flops / unpruned_flops:>11.3f} {predicted:>8.2f}x "
              f"{realized / predicted:>18.1%} {cache_bytes[name] / 2**20:>11.1f}")
    overhead = seconds["R=0.00"] / baseline - 1
    scoring = time_scoring(model, ids, visual, args.k)
    print(f"scoring overhead: FastV R=0 vs no FastV {overhead:+.1%} of the prefill (timing noise included); "
          f"the scoring step alone {scoring * 1e3:.2f} ms = {scoring / baseline:.2%} of the prefill")

    twin = None if args.no_transformers else transformers_twin(model, folder)
    if twin is None:
        print("transformers comparison skipped" + ("" if args.no_transformers else ": transformers is not installed"))
        return
    import transformers

    results = compare_with_transformers(model, twin, ids, visual, args.repeats)
    print(f"same weights through transformers {transformers.__version__} {type(twin).__name__} (sdpa), "
          f"unpruned, greedy, 16 new tokens:")
    print(f"{'':>13} {'prefill ms':>10} {'decode tokens/s':>15} {'peak GPU MiB':>12}")
    for name, r in results.items():
        memory = f"{r['memory'] / 2**20:.0f}" if r["memory"] is not None else "-"
        print(f"{name:>13} {r['prefill'] * 1e3:>10.1f} {r['decode']:>15.1f} {memory:>12}")
    ours, theirs = results["minifastv"], results["transformers"]
    print(f"minifastv / transformers: prefill time {ours['prefill'] / theirs['prefill']:.2f} (target <= 1.00), "
          f"decode speed {ours['decode'] / theirs['decode']:.2f}x")


def command(argv=None):
    return cli.report_errors(main, argv)


if __name__ == "__main__":
    sys.exit(command())
