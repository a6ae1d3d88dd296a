"""Ask LLaVA-1.5 about an image, with FastV: python -m minifastv --help"""

import argparse
import statistics
import sys
import time

import torch

from . import cli
from .errors import UsageError
from .flops import flops_text
from .generation import GenerationStats, Sampling, generate, stream, synchronize

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
  python -m minifastv --compare --runs 7                  # the prefill times: medians of 7 runs
  python -m minifastv --k 3 --r 0.75 --max-new-tokens 32  # prune harder, a bit later
  python -m minifastv --compile --compare                 # compiled: slow to start, then faster
  python -m minifastv --image a.png b.png --prompt "<image> then <image>: what changed?"
  python -m minifastv --model LanguageBind/Video-LLaVA-7B-hf --video clip.gif \\
      --prompt "What happens?"
"""


MIN_RUNS = 3  # --compare times each prefill at least this often: a median and a spread need 3


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m minifastv", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_version_argument(parser)
    cli.add_model_arguments(parser)
    cli.add_question_arguments(parser, max_new_tokens=128)
    cli.add_system_argument(parser)
    cli.add_fastv_arguments(parser)
    parser.add_argument("--no-fastv", action="store_true", help="run the plain model, no pruning")
    parser.add_argument("--compare", action="store_true",
                        help="run without and with FastV, print both answers and stats; the "
                             "prefill times are medians of --runs runs, interleaved")
    parser.add_argument("--runs", type=int,
                        help=f"with --compare: time each setting's prefill this many times, "
                             f"interleaved, and print the medians and the spread (default "
                             f"{MIN_RUNS}, the fewest allowed)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default) picks the likeliest token; > 0 samples")
    parser.add_argument("--top-p", type=float,
                        help="when sampling (--temperature > 0): only from the smallest set of "
                             "tokens whose probability reaches top-p, in (0, 1] (default 1: all)")
    parser.add_argument("--seed", type=int,
                        help="when sampling: the random seed (default 0)")
    cli.add_compile_argument(parser)
    # These start as None, "not given", so that refuse_ignored_flags can tell; then the defaults.
    defaults = dict(k=parser.get_default("k"), r=parser.get_default("r"), runs=MIN_RUNS,
                    top_p=1.0, seed=0)
    parser.set_defaults(k=None, r=None)
    args = parser.parse_args(argv)
    refuse_ignored_flags(args)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def refuse_ignored_flags(args):
    """Flags that contradict each other, or that the others make pointless: one sentence naming
    them, rather than a run that silently leaves one out."""
    if args.no_fastv and args.compare:
        raise UsageError("--no-fastv and --compare contradict each other (--compare runs without "
                         "and with FastV): leave one of them out.")
    fastv_flags = [flag for flag, value in (("--k", args.k), ("--r", args.r)) if value is not None]
    if args.no_fastv and fastv_flags:
        raise UsageError(f"--no-fastv turns FastV off, so {' and '.join(fastv_flags)} would do "
                         "nothing: leave out one or the other.")
    if args.runs is not None and not args.compare:
        raise UsageError("--runs counts the timed prefills of --compare: add --compare, or leave "
                         "--runs out.")
    for flag, value in (("--top-p", args.top_p), ("--seed", args.seed)):
        if value is not None and args.temperature == 0:
            raise UsageError(f"{flag} applies only when sampling: set --temperature above 0 too, "
                             f"or leave {flag} out.")


def prepare(args):
    """Check every input before the (slow) model load; return what generation needs (see
    cli.prepare_question)."""
    sampling = Sampling(args.temperature, args.top_p, args.seed)
    if args.compare and args.runs < MIN_RUNS:
        raise UsageError(f"--runs must be at least {MIN_RUNS}, got {args.runs}: a median and a "
                         "spread need three runs or more.")
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


def stats_lines(stats, prefill_seconds=None):
    """The numbers of one run, one per line; prefill_seconds in place of the run's own prefill
    time (--compare: the median of its timed runs)."""
    flops = stats.flops
    fastv = f"FastV K={stats.k}, R={stats.r}" if stats.k is not None else "no FastV"
    kinds = {0: "image", stats.image_tokens: "video"}.get(stats.video_tokens, "image and video")
    seconds = stats.prefill_seconds if prefill_seconds is None else prefill_seconds
    return [
        f"{fastv}: {kinds} tokens {stats.image_tokens} -> {stats.image_tokens_kept} kept",
        f"prefill {seconds:.2f} s, {flops_text(flops['exact'])} "
        f"({flops['exact_ratio']:.0%} of unpruned; paper formula {flops['paper_ratio']:.0%})",
        f"decode {stats.decode_tokens_per_second:.1f} tokens/s ({stats.decode_tokens} tokens)",
        f"KV cache {stats.kv_cache_bytes / 2**20:.1f} MiB",
    ]


def side_by_side(left, right, width=60):
    rows = [f"{'without FastV':<{width}} | with FastV"]
    for a, b in zip(left, right):
        rows.append(f"{a:<{width}} | {b}")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------
# --compare: one prefill time means little on a busy machine, so each is the median of several


def prefill_seconds(model, question, fastv):
    """One prefill, timed: the model alone (no cache, no answer), the last token's logits."""
    synchronize(model.device)
    started = time.perf_counter()
    with torch.inference_mode():
        model(question.input_ids, question.pixel_values, question.pixel_values_videos,
              fastv=fastv, last_logits_only=True)
    synchronize(model.device)
    return time.perf_counter() - started


def times_faster(ratio):
    """'1.52x faster' for a ratio of 1.52 (time without / time with), '1.20x slower' for 0.83."""
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def prefill_sentence(seconds_plain, seconds_fast):
    """'prefill 1.52x faster with FastV (median of 3 interleaved runs each; 1.41x-1.60x faster
    run by run)': the ratio of the medians, and the range of the ratios of the runs side by side."""
    ratio = statistics.median(seconds_plain) / max(statistics.median(seconds_fast), 1e-9)
    ratios = [plain / max(fast, 1e-9) for plain, fast in zip(seconds_plain, seconds_fast)]
    low, high = min(ratios), max(ratios)
    if low >= 1:
        spread = f"{low:.2f}x-{high:.2f}x faster"
    elif high < 1:
        spread = f"{1 / high:.2f}x-{1 / low:.2f}x slower"
    else:
        spread = f"from {1 / low:.2f}x slower to {high:.2f}x faster"
    return (f"prefill {times_faster(ratio)} with FastV (median of {len(seconds_plain)} "
            f"interleaved runs each, after a warm-up; {spread} run by run)")


def decode_sentence(stats_plain, stats_fast):
    """'decode 1.05x faster with FastV (tokens/s over all 127 decode steps of each answer)'."""
    ratio = stats_fast.decode_tokens_per_second / max(stats_plain.decode_tokens_per_second, 1e-9)
    steps = sorted({stats_plain.decode_tokens, stats_fast.decode_tokens})
    each = "each answer" if len(steps) == 1 else "the answers"
    return (f"decode {times_faster(ratio)} with FastV (tokens/s over all "
            f"{' and '.join(map(str, steps))} decode steps of {each})")


def compare(model, question, args, out):
    """Warm up both settings, time their prefills `args.runs` times each, interleaved (plain,
    FastV, plain, ...: a busy moment of the machine slows both alike), then answer once with each
    and print the numbers side by side."""
    visual = (question.pixel_values, question.pixel_values_videos)
    for fastv in (None, question.fastv):  # untimed: kernels, allocator, the first decode step
        generate(model, question.input_ids, *visual, max_new_tokens=2, fastv=fastv)
    print(f"timing the prefill: {args.runs} interleaved runs per setting",
          file=sys.stderr, flush=True)
    seconds_plain, seconds_fast = [], []
    for _ in range(args.runs):
        seconds_plain.append(prefill_seconds(model, question, None))
        seconds_fast.append(prefill_seconds(model, question, question.fastv))
    print("--- without FastV ---", file=out)
    answer_plain, stats_plain = run(model, question, None, args.max_new_tokens, out)
    print(f"--- with FastV (K={args.k}, R={args.r}) ---", file=out)
    answer_fast, stats_fast = run(model, question, question.fastv, args.max_new_tokens, out)
    print("---", file=out)
    print(side_by_side(stats_lines(stats_plain, statistics.median(seconds_plain)),
                       stats_lines(stats_fast, statistics.median(seconds_fast))), file=out)
    print(prefill_sentence(seconds_plain, seconds_fast), file=out)
    if stats_plain.decode_tokens and stats_fast.decode_tokens:
        print(decode_sentence(stats_plain, stats_fast), file=out)
    same = "the same answer" if answer_plain == answer_fast else "different answers"
    print(f"{same} without and with FastV", file=out)


def main(argv=None, out=None):
    out = out or sys.stdout  # looked up now, not at import: tests and notebooks replace sys.stdout
    args = parse_args(argv)
    question = prepare(args)
    if args.compile:
        cli.check_compile(question.device)
    model = cli.load_model(question.folder, question.device, question.dtype, question.towers)
    if args.compile:  # compile for the settings that will run, with and without FastV, first
        settings = [None, question.fastv] if args.compare else [question.fastv]
        cli.compile_and_warm_up(model, lambda: [
            generate(model, question.input_ids, question.pixel_values,
                     question.pixel_values_videos, max_new_tokens=args.max_new_tokens,
                     fastv=fastv) for fastv in settings])
    if args.compare:
        compare(model, question, args, out)
    else:
        _, stats = run(model, question, question.fastv, args.max_new_tokens, out)
        print("---", file=out)
        print("\n".join(stats_lines(stats)), file=out)


def command(argv=None):
    return cli.report_errors(main, argv)


if __name__ == "__main__":
    sys.exit(command())
