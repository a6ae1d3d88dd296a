"""Ask LLaVA-1.5 about an image, with FastV: python -m minifastv --help"""

import argparse
import sys

import torch

from . import cli
from .generation import GenerationStats, Sampling, generate, stream

DESCRIPTION = """\
Ask LLaVA-1.5 a question about one or more images, and watch FastV prune the image tokens.

LLaVA-1.5 turns each image into 576 tokens and reads them with a 32-layer decoder. FastV ranks
those tokens after layer K-1 by the attention the last prompt token paid them, keeps the top
(1 - R) and runs the remaining layers on the shorter sequence. Defaults: K=2, R=0.5.

examples:
  python -m minifastv --model tiny                        # offline, in seconds: a tiny random model
  python -m minifastv                                     # the cat photo, "Describe this image."
  python -m minifastv --image photo.jpg --prompt "What is written on the sign?"
  python -m minifastv --compare                           # with and without FastV, side by side
  python -m minifastv --k 3 --r 0.75 --max-new-tokens 32  # prune harder, a bit later
  python -m minifastv --compile --compare                 # compiled: slow to start, then faster
  python -m minifastv --image a.png b.png --prompt "<image> then <image>: what changed?"
  python -m minifastv --model LanguageBind/Video-LLaVA-7B-hf --video clip.gif \\
      --prompt "What happens?"
"""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m minifastv", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_arguments(parser)
    cli.add_question_arguments(parser, max_new_tokens=128)
    cli.add_fastv_arguments(parser)
    parser.add_argument("--no-fastv", action="store_true", help="run the plain model, no pruning")
    parser.add_argument("--compare", action="store_true",
                        help="run without and with FastV, print both answers and stats")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default) picks the likeliest token; > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="when sampling (--temperature > 0): only from the smallest set of "
                             "tokens whose probability reaches top-p, in (0, 1] (default 1: all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    cli.add_compile_argument(parser)
    return parser.parse_args(argv)


def prepare(args):
    """Check every input before the (slow) model load; return what generation needs (see
    cli.prepare_question)."""
    sampling = Sampling(args.temperature, args.top_p, args.seed)
    question = cli.prepare_question(args, use_fastv=args.compare or not args.no_fastv)
    question.sampling = sampling
    return question


def run(model, question, fastv, max_new_tokens, out):
    """Generate, printing the answer as it comes; return the answer and the stats."""
    stats = GenerationStats()
    decoder = question.tokenizer.stream_decoder()
    pieces = []
    for token in stream(model, question.input_ids, question.pixel_values,
                        question.pixel_values_videos, max_new_tokens=max_new_tokens, fastv=fastv,
                        sampling=question.sampling, stats=stats):
        piece = decoder.push(int(token[0]))
        pieces.append(piece)
        print(piece, end="", flush=True, file=out)
    pieces.append(decoder.flush())
    print(pieces[-1], file=out, flush=True)
    return "".join(pieces).strip(), stats


def flops_text(flops):
    """8.51 TFLOPs for a real model, 12.3 GFLOPs for a tiny one."""
    return f"{flops / 1e12:.2f} TFLOPs" if flops >= 1e12 else f"{flops / 1e9:.2f} GFLOPs"


def stats_lines(stats):
    """The numbers of one run, one per line."""
    flops = stats.flops
    fastv = f"FastV K={stats.k}, R={stats.r}" if stats.k is not None else "no FastV"
    kinds = {0: "image", stats.image_tokens: "video"}.get(stats.video_tokens, "image and video")
    return [
        f"{fastv}: {kinds} tokens {stats.image_tokens} -> {stats.image_tokens_kept} kept",
        f"prefill {stats.prefill_seconds:.2f} s, {flops_text(flops['exact'])} "
        f"({flops['exact_ratio']:.0%} of unpruned; paper formula {flops['paper_ratio']:.0%})",
        f"decode {stats.decode_tokens_per_second:.1f} tokens/s ({stats.decode_tokens} tokens)",
        f"KV cache {stats.kv_cache_bytes / 2**20:.1f} MiB",
    ]


def side_by_side(left, right, width=60):
    rows = [f"{'without FastV':<{width}} | with FastV"]
    for a, b in zip(left, right):
        rows.append(f"{a:<{width}} | {b}")
    return "\n".join(rows)


def speed_up_sentence(seconds_without, seconds_with):
    """'1.52x faster prefill with FastV', or 'slower' when it was: the ratio always above 1."""
    ratio = seconds_without / max(seconds_with, 1e-9)
    if ratio >= 1:
        return f"{ratio:.2f}x faster prefill with FastV"
    return f"{1 / ratio:.2f}x slower prefill with FastV"


def main(argv=None, out=None):
    out = out or sys.stdout  # looked up now, not at import: tests and notebooks replace sys.stdout
    args = parse_args(argv)
    question = prepare(args)
    if args.compile:
        cli.check_compile(question.device)
    model = cli.load_model(question.folder, question.device, question.dtype, question.towers)
    visual = (question.pixel_values, question.pixel_values_videos)
    if args.compile:  # compile for the settings that will run, with and without FastV, first
        settings = [None, question.fastv] if args.compare else [question.fastv]
        cli.compile_and_warm_up(model, lambda: [
            generate(model, question.input_ids, *visual, max_new_tokens=args.max_new_tokens,
                     fastv=fastv) for fastv in settings])
    if args.compare:
        with torch.inference_mode():  # warm up (kernels, allocator): neither timed run pays for it
            model(question.input_ids, *visual, last_logits_only=True)
        print("--- without FastV ---", file=out)
        answer_plain, stats_plain = run(model, question, None, args.max_new_tokens, out)
        print(f"--- with FastV (K={args.k}, R={args.r}) ---", file=out)
        answer_fast, stats_fast = run(model, question, question.fastv, args.max_new_tokens, out)
        print("---", file=out)
        print(side_by_side(stats_lines(stats_plain), stats_lines(stats_fast)), file=out)
        same = "the same answer" if answer_plain == answer_fast else "different answers"
        speed_up = speed_up_sentence(stats_plain.prefill_seconds, stats_fast.prefill_seconds)
        print(f"{speed_up}; {same}", file=out)
    else:
        _, stats = run(model, question, question.fastv, args.max_new_tokens, out)
        print("---", file=out)
        print("\n".join(stats_lines(stats)), file=out)


def command(argv=None):
    return cli.report_errors(main, argv)


if __name__ == "__main__":
    sys.exit(command())
