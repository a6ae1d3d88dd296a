"""python -m minifastv.flops: a LLaVA prefill's FLOPs with and without FastV, the paper's formula
and the exact count."""

import argparse
import sys
from pathlib import Path

from .. import cli
from ..checkpoint import PRESETS, config_by_name, read_config
from ..errors import UsageError
from . import exact_prefill_flops, flops_unit, kv_cache_bytes, paper_flops, parameter_count


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m minifastv.flops",
        description=("Prefill FLOPs of LLaVA with and without FastV: "
                     "the paper's model and an exact count."),
    )
    cli.add_version_argument(parser)
    parser.add_argument("--config", default="llava-1.5-13b",
                        help=(f"{', '.join(PRESETS)}, tiny, tiny-video, or a config.json or "
                              "model folder (default llava-1.5-13b, the paper's Table 1)"))
    cli.add_fastv_arguments(parser)
    parser.add_argument("--text-tokens", type=int, default=36,
                        help="text tokens in the prompt (default 36, as in the paper)")
    parser.add_argument("--images", type=int,
                        help="images in the prompt (default 1, or 0 for Video-LLaVA)")
    parser.add_argument("--videos", type=int,
                        help="videos in the prompt, for Video-LLaVA (default 1 there, else 0)")
    return parser.parse_args(argv)


def model_config(name):
    """A built-in config by name, or a config.json file, or the config.json of a model folder."""
    if name in PRESETS:
        return config_by_name(name)
    if name in ("tiny", "tiny-video"):
        return read_config(cli.model_folder(name))
    if not Path(name).exists():
        raise UsageError(
            f"--config {name} is neither a built-in config ({', '.join(PRESETS)}, tiny, "
            "tiny-video) nor a config.json or model folder that exists."
        )
    return read_config(name)


def main(argv=None):
    args = parse_args(argv)
    cli.check_fastv(args.k, args.r)
    cli.check_at_least("--text-tokens", args.text_tokens, 0)
    config = model_config(args.config)
    video_llava = config.video_token_id is not None
    num_images = cli.check_at_least(
        "--images", int(not video_llava) if args.images is None else args.images, 0
    )
    num_videos = cli.check_at_least(
        "--videos", int(video_llava) if args.videos is None else args.videos, 0
    )
    if num_videos and not video_llava:
        raise UsageError(
            f"--videos needs a Video-LLaVA config such as video-llava-7b: {args.config} "
            "has no video tower."
        )
    if num_images + num_videos == 0:
        raise UsageError("The prompt needs at least one image or video: FastV prunes their tokens.")
    # FastV's pool
    num_image = num_images * config.image_tokens_per_image + num_videos * config.tokens_per_video
    cli.check_fastv(args.k, args.r, config.text.num_hidden_layers, num_image)
    num_tokens = args.text_tokens + num_image
    kinds = " + ".join(part for part in (
        f"{num_images * config.image_tokens_per_image} image" * bool(num_images),
        f"{num_videos * config.tokens_per_video} video" * bool(num_videos),
    ) if part)
    context = config.text.max_position_embeddings
    if num_tokens > context:
        raise UsageError(
            f"--text-tokens {args.text_tokens} and {kinds} tokens make a {num_tokens}-token "
            f"prompt, past the model's context of {context} tokens: use a smaller --text-tokens, "
            "--images or --videos.")
    layers = config.text.num_hidden_layers
    paper_base = paper_flops(config, args.text_tokens, num_image) / layers
    paper_fast = paper_flops(config, args.text_tokens, num_image, args.k, args.r) / layers
    exact_base = exact_prefill_flops(config, num_tokens, num_image, num_videos=num_videos)
    exact_fast = exact_prefill_flops(config, num_tokens, num_image, args.k, args.r, num_videos)
    print(f"{args.config}: {args.text_tokens} text + {kinds} tokens, FastV K={args.k} R={args.r}")
    scale, unit = flops_unit(paper_base)  # both numbers in the unit of the larger
    print(f"paper's formula, per decoder layer: {paper_base / scale:.1f} -> "
          f"{paper_fast / scale:.1f} {unit} ({1 - paper_fast / paper_base:.1%} fewer)")
    scale, unit = flops_unit(exact_base)
    print(f"exact prefill (vision, decoder with SwiGLU's 3 matrices, lm_head): "
          f"{exact_base / scale:.2f} -> {exact_fast / scale:.2f} {unit} "
          f"({1 - exact_fast / exact_base:.1%} fewer)")
    weights_bytes = 2 * parameter_count(config)  # float16: 2 bytes a value
    scale, unit = bytes_unit(weights_bytes)
    weights = f"weights {weights_bytes / scale:.2f} {unit}"
    needed = ("image",) * bool(num_images) + ("video",) * bool(num_videos)
    if video_llava and len(needed) == 1:  # load(towers=needed) leaves the other tower out
        weights += (f" ({2 * parameter_count(config, needed) / scale:.2f} {unit} "
                    f"with the {needed[0]} tower only)")
    kv_base, kv_fast = (kv_cache_bytes(config, num_tokens, num_image, k, args.r)
                        for k in (None, args.k))
    scale, unit = bytes_unit(kv_base)
    print(f"float16 memory: {weights}; the prompt's KV cache {kv_base / scale:.2f} -> "
          f"{kv_fast / scale:.2f} {unit}")


def bytes_unit(num_bytes):
    """(scale, name): GiB for a real model's weights and cache, MiB for a tiny model's."""
    return (2**30, "GiB") if num_bytes >= 0.01 * 2**30 else (2**20, "MiB")


def command(argv=None):
    return cli.report_errors(main, argv)


if __name__ == "__main__":
    sys.exit(command())
