"""Ask LLaVA-1.5 about an image, with FastV: python -m minifastv --help"""

import argparse
import sys
import time
from pathlib import Path

import torch

from .image import ImageError, ImageProcessorConfig, load_image, preprocess
from .model import (DEFAULT_REPO, CheckpointError, FastV, GenerationStats, LlavaConfig, default_dtype, load,
                    resolve_folder)
from .prompt import Tokenizer, encode_prompt, format_prompt

DEFAULT_IMAGE = Path(__file__).resolve().parent / "assets" / "chelsea.png"

DESCRIPTION = """\
Ask LLaVA-1.5 a question about one or more images, and watch FastV prune the image tokens.

LLaVA-1.5 turns each image into 576 tokens and reads them with a 32-layer decoder. FastV ranks
those tokens after layer K-1 by the attention the last prompt token paid them, keeps the top
(1 - R) and runs the remaining layers on the shorter sequence. Defaults: K=2, R=0.5.

examples:
  python -m minifastv                                     # the cat photo, "Describe this image."
  python -m minifastv --image photo.jpg --prompt "What is written on the sign?"
  python -m minifastv --compare                           # with and without FastV, side by side
  python -m minifastv --k 3 --r 0.75 --max-new-tokens 32  # prune harder, a bit later
  python -m minifastv --image a.png b.png --prompt "<image> then <image>: what changed?"
"""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m minifastv", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_REPO,
                        help=f"hub repo id or local llava-hf folder (default {DEFAULT_REPO}; downloads land in weights/)")
    parser.add_argument("--image", nargs="+", default=[str(DEFAULT_IMAGE)], metavar="PATH",
                        help="one or more images, in prompt order (default: a photo of a cat shipped in the repo)")
    parser.add_argument("--prompt", default="Describe this image.",
                        help="the question; write <image> where each image goes, or leave it out and the images "
                             "come first (default: %(default)r)")
    parser.add_argument("--k", type=int, default=2, help="FastV: the first decoder layer that sees fewer image tokens (default 2)")
    parser.add_argument("--r", type=float, default=0.5, help="FastV: the share of image tokens to drop, in [0, 1) (default 0.5)")
    parser.add_argument("--no-fastv", action="store_true", help="run the plain model, no pruning")
    parser.add_argument("--compare", action="store_true", help="run without and with FastV, print both answers and stats")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="at most this many answer tokens (default 128)")
    parser.add_argument("--device", default="auto", help="cuda, cuda:1, cpu, ... (default: cuda when there is one)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                        help="auto: bfloat16 on GPUs that have it, float16 on others (T4), float32 on the CPU")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) picks the likeliest token; > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="with --temperature: sample from the top-p nucleus")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    parser.add_argument("--pad", action="store_true",
                        help="pad each image to a square (original LLaVA) instead of center-cropping it (llava-hf)")
    return parser.parse_args(argv)


class UserError(Exception):
    """A problem with what the user asked for: printed as one sentence, exit code 2."""


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"Unknown device {name!r}: use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"Device {name!r} was asked for, but PyTorch sees no CUDA GPU here: use --device cpu.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"Device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s).")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"Device {name!r} is not supported: use cpu, cuda or cuda:N.")
    return device


def pick_dtype(name, device):
    return default_dtype(device) if name == "auto" else getattr(torch, name)


def prepare(args):
    """Check every input before the (slow) model load; return what generation needs."""
    if not 0 <= args.r < 1:
        raise UserError(f"--r is the share of image tokens to drop and must be in [0, 1), got {args.r}.")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    device = pick_device(args.device)
    folder = resolve_folder(args.model)
    if not (folder / "config.json").exists():
        raise UserError(f"No config.json in {folder}: a llava-hf model folder holds config.json, *.safetensors and tokenizer.json.")
    config = LlavaConfig.from_file(folder / "config.json")
    layers = config.text.num_hidden_layers
    if not args.no_fastv and not 1 <= args.k < layers:
        raise UserError(f"--k must be between 1 and {layers - 1} for this model ({layers} layers), got {args.k}.")
    tokenizer = Tokenizer.from_folder(folder)
    images = [load_image(path) for path in args.image]
    pixel_values = preprocess(images, ImageProcessorConfig.from_folder(folder), pad=args.pad)
    placeholders = args.prompt.count("<image>")
    if placeholders and placeholders != len(images):
        raise UserError(f"The prompt has {placeholders} <image> placeholder(s) but {len(images)} image(s) were given.")
    input_ids = encode_prompt(tokenizer, format_prompt(args.prompt, num_images=len(images)), config.image_tokens_per_image)
    context = config.text.max_position_embeddings
    if input_ids.shape[1] + args.max_new_tokens > context:
        raise UserError(f"The prompt has {input_ids.shape[1]} tokens and --max-new-tokens asks for {args.max_new_tokens} "
                        f"more, but the model's context is {context} tokens: use fewer images or tokens.")
    return device, folder, tokenizer, input_ids, pixel_values


def run(model, tokenizer, input_ids, pixel_values, fastv, args, out):
    """Generate, printing the answer as it comes; return the answer and the stats."""
    stats = GenerationStats()
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    decoder = tokenizer.stream_decoder()
    pieces = []
    for token in model.stream(input_ids, pixel_values, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, generator=generator, fastv=fastv, stats=stats):
        piece = decoder.push(int(token[0]))
        pieces.append(piece)
        print(piece, end="", flush=True, file=out)
    pieces.append(decoder.flush())
    print(pieces[-1], file=out, flush=True)
    return "".join(pieces).strip(), stats


def stats_lines(stats):
    """The numbers of one run, one per line."""
    flops = stats.flops
    fastv = f"FastV K={stats.k}, R={stats.r}" if stats.k is not None else "no FastV"
    return [
        f"{fastv}: image tokens {stats.image_tokens} -> {stats.image_tokens_kept} kept",
        f"prefill {stats.prefill_seconds:.2f} s, {flops['exact'] / 1e12:.2f} TFLOPs "
        f"({flops['exact_ratio']:.0%} of unpruned; paper formula {flops['paper_ratio']:.0%})",
        f"decode {stats.decode_tokens_per_second:.1f} tokens/s ({stats.decode_tokens} tokens)",
        f"KV cache {stats.kv_cache_bytes / 2**20:.1f} MiB",
    ]


def side_by_side(left, right, width=60):
    rows = [f"{'without FastV':<{width}} | with FastV"]
    for a, b in zip(left, right):
        rows.append(f"{a:<{width}} | {b}")
    return "\n".join(rows)


def main(argv=None, out=None):
    out = out or sys.stdout  # looked up now, not at import: tests and notebooks replace sys.stdout
    args = parse_args(argv)
    device, folder, tokenizer, input_ids, pixel_values = prepare(args)
    dtype = pick_dtype(args.dtype, device)
    print(f"loading {folder} on {device} in {str(dtype).removeprefix('torch.')}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    model = load(folder, device=device, dtype=dtype)
    print(f"loaded in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    fastv = FastV(args.k, args.r)
    if args.compare:
        with torch.inference_mode():  # warm up (kernels, allocator) so that neither run pays for it in the timings
            model(input_ids, pixel_values, last_logits_only=True)
        print("--- without FastV ---", file=out)
        answer_plain, stats_plain = run(model, tokenizer, input_ids, pixel_values, None, args, out)
        print(f"--- with FastV (K={args.k}, R={args.r}) ---", file=out)
        answer_fast, stats_fast = run(model, tokenizer, input_ids, pixel_values, fastv, args, out)
        print("---", file=out)
        print(side_by_side(stats_lines(stats_plain), stats_lines(stats_fast)), file=out)
        same = "the same answer" if answer_plain == answer_fast else "different answers"
        print(f"{stats_plain.prefill_seconds / max(stats_fast.prefill_seconds, 1e-9):.2f}x faster prefill with FastV; {same}", file=out)
    else:
        _, stats = run(model, tokenizer, input_ids, pixel_values, None if args.no_fastv else fastv, args, out)
        print("---", file=out)
        print("\n".join(stats_lines(stats)), file=out)


def report_errors(main_function, argv=None):
    """Run a command's main(); every expected failure becomes one sentence on stderr and exit code 2."""
    try:
        main_function(argv)
    except torch.cuda.OutOfMemoryError:
        print("error: the GPU ran out of memory. Try --dtype float16, a smaller --max-new-tokens, fewer images, "
              "or the 7B model instead of 13B.", file=sys.stderr)
        return 2
    except (UserError, ImageError, CheckpointError, FileNotFoundError, ConnectionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def cli(argv=None):
    return report_errors(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
