"""What the four commands share: their common arguments, one way of checking them, device and dtype
choice, opening the model folder, and the reporter that turns bad input into one sentence and exit
code 2.

The commands are python -m minifastv (__main__.py), -m minifastv.analyze, -m minifastv.bench and
-m minifastv.flops (flops/__main__.py). Each imports this module and none imports another command.
"""

import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from .checkpoint import DEFAULT_REPO, default_dtype, load, read_config, resolve_folder
from .compiled import compile_model
from .errors import CheckpointError, MinifastvError, UsageError
from .image import ImageProcessorConfig, load_image, preprocess
from .model import FastV
from .prompt import (SYSTEM_PROMPTS, Tokenizer, count_images, count_videos, encode_prompt,
                     format_prompt)
from .tiny import TINY_NOTE, tiny_checkpoint
from .video import load_video, preprocess_video

# the cat photo shipped in the repo
DEFAULT_IMAGE = Path(__file__).resolve().parent / "assets" / "chelsea.png"
DTYPES = ["auto", "float16", "bfloat16", "float32"]
VERSION = "0.1.0"  # the package's version: pyproject.toml and minifastv.__version__ read it here

# ------------------------------------------------------------------------------------------------
# Arguments


def add_version_argument(parser):
    parser.add_argument("--version", action="version", version=f"minifastv {VERSION}")


def add_model_arguments(parser):
    parser.add_argument(
        "--model", default=DEFAULT_REPO,
        help=f"hub repo id or local llava-hf folder (default {DEFAULT_REPO}; downloads land in "
             "weights/), or 'tiny' ('tiny-video'): a tiny random LLaVA (Video-LLaVA) built "
             "offline in a second, for trying things out")
    add_device_arguments(parser)


def add_device_arguments(parser):
    parser.add_argument(
        "--device", default="auto", help="cuda, cuda:1, cpu (default: cuda when there is one)")
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPES,
        help="auto: bfloat16 on GPUs that have it, float16 on others (T4), float32 on the CPU")


def add_compile_argument(parser):
    parser.add_argument(
        "--compile", action="store_true",
        help="run the model compiled (torch.compile; CUDA graphs for decoding on a GPU): slow to "
             "start, then faster; the first run's time, compilation included, is printed")


def add_fastv_arguments(parser):
    parser.add_argument(
        "--k", type=int, default=2,
        help="FastV: the first decoder layer that sees fewer image tokens (default 2)")
    parser.add_argument(
        "--r", type=float, default=0.5,
        help="FastV: the share of image tokens to drop, in [0, 1) (default 0.5)")


def add_question_arguments(parser, max_new_tokens):
    parser.add_argument(
        "--image", nargs="+", action="extend", metavar="PATH",
        help="one or more images, in prompt order; --image a b and --image a --image b are the "
             "same (default, without --video: a photo of a cat shipped in the repo)")
    parser.add_argument(
        "--video", metavar="PATH",
        help="a video for Video-LLaVA: an animated GIF/WebP/PNG, a folder of frames, or an "
             "MP4/WebM/AVI file (needs PyAV: pip install av); 8 frames are sampled uniformly")
    parser.add_argument(
        "--prompt", default="Describe this image.",
        help="the question; write <image> (<video>) where each image (the video) goes, or leave "
             "it out and the images, then the video, come first (default: %(default)r)")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help=f"at most this many answer tokens (default {max_new_tokens})")
    parser.add_argument(
        "--pad", action="store_true",
        help="pad each image to a square (original LLaVA) instead of center-cropping it (llava-hf)")


def add_system_argument(parser, default="none"):
    parser.add_argument(
        "--system", choices=["none", *SYSTEM_PROMPTS], default=default,
        help="the system prompt before the first turn: none (llava-hf's chat template), vicuna_v1 "
             "(what LLaVA-1.5 was trained with and its authors evaluated with) or llava_v1 "
             "(FastV's scripts: 'human' for 'user') (default %(default)s)")


def system_prompt(name):
    """The text of --system NAME; None for none."""
    return SYSTEM_PROMPTS.get(name)


# ------------------------------------------------------------------------------------------------
# Checks: every command asks the same questions the same way, before the (slow) model load


def check_at_least(name, value, minimum=1):
    if value < minimum:
        raise UsageError(f"{name} must be at least {minimum}, got {value}.")
    return value


def check_fastv(k, r, num_layers=None, num_image_tokens=0):
    """FastV(k, r), checked: call it once before the model folder is known (K >= 1, R in [0, 1)),
    and again with the model's layer count and the prompt's image tokens (K below the layer count,
    R keeps a token)."""
    if k < 1:
        raise UsageError(
            "--k is the first decoder layer that sees fewer image tokens and must be at least 1, "
            f"got {k}.")
    if num_layers is not None and k >= num_layers:
        raise UsageError(
            f"--k must be between 1 and {num_layers - 1} for this model ({num_layers} layers), "
            f"got {k}.")
    if not 0 <= r < 1:
        raise UsageError(
            f"--r is the share of image tokens to drop and must be in [0, 1), got {r}.")
    if num_image_tokens and round(num_image_tokens * (1 - r)) == 0:
        raise UsageError(
            f"--r {r} would keep none of the prompt's {num_image_tokens} image tokens: "
            "use a smaller --r.")
    return FastV(k, r)


def check_output(path, flag, folder=False):
    """Refuse an output that cannot be written, before any slow work: a file output must not be a
    folder, and the nearest folder of the path that exists must take a file. Creates nothing, so
    that a refused run leaves nothing behind: the writer makes the missing folders."""
    path = Path(path)
    if not folder and path.is_dir():
        raise UsageError(f"{flag} {path} cannot be written (it is a folder): choose another place.")
    existing = next(where for where in (path, *path.parents) if where.exists())
    if not existing.is_dir():
        raise UsageError(f"{flag} {path} cannot be written: a file stands where a folder of its "
                         f"path should be ({existing} is a file).")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise UsageError(f"{flag} {path} cannot be written ({error.strerror or error}): "
                         "choose another place.") from None
    return path


def write_output(path, text):
    """Write an output checked by check_output, making its missing folders first."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"Unknown device {name!r}: use cpu, cuda or cuda:N.") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"Device {name!r} is not supported: use cpu, cuda or cuda:N.")
    if device.type == "cpu" and device.index is not None:
        raise UsageError(f"Device {name!r}: the CPU is one device, write --device cpu.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"Device {name!r} was asked for, but PyTorch sees no CUDA GPU here: "
            "use --device cpu.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(
            f"Device {name!r} does not exist: this machine has {torch.cuda.device_count()} "
            "GPU(s).")
    return device


def pick_dtype(name, device):
    return default_dtype(device) if name == "auto" else getattr(torch, name)


def model_folder(name):
    """The folder of --model: 'tiny' or 'tiny-video' (built on first use), a local folder, or a hub
    repo id."""
    if name in ("tiny", "tiny-video"):
        print(TINY_NOTE.format(name, "Video-LLaVA" if name == "tiny-video" else "LLaVA"),
              file=sys.stderr, flush=True)
        return tiny_checkpoint(video=name == "tiny-video")
    return resolve_folder(name)


def prepare_question(args, use_fastv=True):
    """Everything a command needs to answer --image/--video/--prompt, checked before the (slow)
    model load: device, dtype, folder, config, tokenizer, input_ids, pixel_values,
    pixel_values_videos, fastv, towers."""
    if use_fastv:
        check_fastv(args.k, args.r)  # what can be checked without the model, before a download
    check_at_least("--max-new-tokens", args.max_new_tokens)
    device = pick_device(args.device)
    folder = model_folder(args.model)
    config = read_config(folder)
    image_paths = args.image or ([] if args.video else [str(DEFAULT_IMAGE)])
    video_paths = [args.video] if args.video else []
    tokenizer, input_ids, pixel_values, pixel_values_videos = encode_question(
        folder, config, image_paths, video_paths, args.prompt, args.pad, args.max_new_tokens,
        system_prompt(getattr(args, "system", "none")))
    num_image_tokens = int(config.is_visual(input_ids).sum())
    fastv = check_fastv(
        args.k, args.r, config.text.num_hidden_layers, num_image_tokens) if use_fastv else None
    # Video-LLaVA loads only these
    towers = ("image",) * bool(image_paths) + ("video",) * bool(video_paths)
    return SimpleNamespace(
        device=device, dtype=pick_dtype(args.dtype, device), folder=folder, config=config,
        tokenizer=tokenizer, input_ids=input_ids, pixel_values=pixel_values,
        pixel_values_videos=pixel_values_videos, fastv=fastv, towers=towers)


def encode_question(folder, config, image_paths, video_paths, prompt, pad, max_new_tokens,
                    system=None):
    """(tokenizer, input_ids (1, T), pixel_values, pixel_values_videos) for a question about images
    and videos, checked against the model; the pixels are None where there is no image (no
    video). system: a system prompt's text, or None."""
    tokenizer = Tokenizer.from_folder(folder)
    if video_paths and config.video_token_id is None:
        raise UsageError(
            "--video needs a Video-LLaVA checkpoint, such as LanguageBind/Video-LLaVA-7B-hf or "
            f"--model tiny-video: the model in {folder} has no video tower.")
    if ((tokenizer.image_token_id, tokenizer.video_token_id if video_paths else None)
            != (config.image_token_id, config.video_token_id if video_paths else None)
            or tokenizer.vocab_size > config.text.vocab_size):
        raise CheckpointError(
            f"tokenizer.json and config.json in {folder} do not belong together: <image> is id "
            f"{tokenizer.image_token_id} in one and {config.image_token_id} in the other, "
            f"<video> {tokenizer.video_token_id} and {config.video_token_id}, "
            f"{tokenizer.vocab_size} ids against a vocabulary of {config.text.vocab_size}.")
    image_config = ImageProcessorConfig.from_folder(folder)
    size = config.vision.image_size
    if (image_config.crop_height, image_config.crop_width) != (size, size):
        raise CheckpointError(
            f"preprocessor_config.json in {folder} makes {image_config.crop_height} x "
            f"{image_config.crop_width} images, but the vision tower takes {size} x {size}.")
    for kind, paths, placeholders in (("image", image_paths, count_images(prompt)),
                                      ("video", video_paths, count_videos(prompt))):
        for tag in re.findall(rf"<\s*{kind}\s*>", prompt, flags=re.IGNORECASE):
            if tag != f"<{kind}>":
                raise UsageError(f"The prompt writes {tag}: the placeholder is <{kind}>, in lower "
                                 "case and without spaces.")
        if placeholders and placeholders != len(paths):
            raise UsageError(
                f"The prompt has {placeholders} <{kind}> placeholder(s) but {len(paths)} "
                f"{kind}(s) were given.")
    pixel_values = preprocess(
        [load_image(path) for path in image_paths], image_config, pad=pad) if image_paths else None
    videos = []
    for path in video_paths:
        frames, note = load_video(path, config.num_frames)
        if note:
            print(note, file=sys.stderr, flush=True)
        videos.append(preprocess_video(frames, image_config))
    pixel_values_videos = torch.stack(videos) if videos else None  # (num_videos, 8, 3, 224, 224)
    text = format_prompt(prompt, num_images=len(image_paths), num_videos=len(video_paths),
                         system=system)
    input_ids = encode_prompt(
        tokenizer, text, config.image_tokens_per_image, config.tokens_per_video)
    context = config.text.max_position_embeddings
    if input_ids.shape[1] + max_new_tokens > context:
        raise UsageError(
            f"The prompt has {input_ids.shape[1]} tokens and --max-new-tokens asks for "
            f"{max_new_tokens} more, but the model's context is {context} tokens: "
            "use a smaller --max-new-tokens, fewer images or a shorter prompt.")
    return tokenizer, input_ids, pixel_values, pixel_values_videos


def load_model(folder, device, dtype, towers=("image", "video")):
    """minifastv.load, saying what it loads and how long it took."""
    print(f"loading {folder} on {device} in {str(dtype).removeprefix('torch.')}",
          file=sys.stderr, flush=True)
    started = time.perf_counter()
    model = load(folder, device=device, dtype=dtype, towers=towers)
    print(f"loaded in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return model


def check_compile(device):
    """--compile on the CPU needs a C++ compiler (torch.compile writes and builds C++ there): say so
    before loading."""
    if device.type == "cpu" and not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        raise UsageError(
            "--compile on the CPU needs a C++ compiler (g++ or clang++), which torch.compile uses "
            "to build its kernels: install one, or leave --compile out.")


def compile_and_warm_up(model, warm_up):
    """minifastv.compile_model(model), then `warm_up()` (short runs in the shapes that will come),
    which compiles; says once how long that took."""
    print("compiling (torch.compile): the first runs build the kernels",
          file=sys.stderr, flush=True)
    started = time.perf_counter()
    compile_model(model)
    warm_up()
    seconds = time.perf_counter() - started
    print(f"compiled in {seconds:.1f} s (warm-up runs included)", file=sys.stderr, flush=True)
    return seconds


# ------------------------------------------------------------------------------------------------
# The bench's settings by name, the keys of its JSON's tables: bench.py writes, figures.py reads.


def setting_name(fastv):
    """A FastV setting's key in the bench's tables: "no_fastv", or "K2_R0.5" for FastV(2, 0.5)."""
    return "no_fastv" if fastv is None else f"K{fastv.k}_R{fastv.r:g}"


def setting_of(name):
    """(k, r) of a setting's key: "K2_R0.5" -> (2, 0.5); "no_fastv" -> (None, 0.0): none dropped."""
    if name == "no_fastv":
        return None, 0.0
    k, r = name.removeprefix("K").split("_R")
    return int(k), float(r)


# ------------------------------------------------------------------------------------------------
# The reporter


def report_errors(main, argv=None):
    """Run a command's main(); minifastv's own errors become one sentence on stderr and exit code 2.

    Only those: any other exception is a bug (in minifastv, or in code you changed) and keeps its
    traceback, so that you can see where it happened.
    """
    try:
        main(argv)
    except KeyboardInterrupt:
        return interrupted()
    except torch.cuda.OutOfMemoryError:
        sys.stdout.flush()
        print("error: the GPU ran out of memory. Try --dtype float16, a smaller --max-new-tokens, "
              "fewer images, or the 7B model instead of 13B.", file=sys.stderr)
        return 2
    except MinifastvError as error:
        sys.stdout.flush()
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # Ctrl-C inside a library (torch.compile) may come back wrapped
        if not any(isinstance(cause, KeyboardInterrupt) for cause in causes(error)):
            raise
        return interrupted()
    return 0


def causes(error):
    """The exception and the ones it was raised from or during."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def interrupted():
    """Ctrl-C: one line and exit code 130 (the shell's 128 + SIGINT), what was printed stays."""
    sys.stdout.flush()
    print("\ninterrupted (Ctrl-C)", file=sys.stderr, flush=True)
    return 130
