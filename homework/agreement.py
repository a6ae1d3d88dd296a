"""Exercise 4: does FastV change the answers? Agreement over a folder of images.

    python homework/agreement.py --images FOLDER --prompt "Describe this image." --k 2 --r 0.5

For every image of the folder (sorted by name) the script generates an answer without FastV and one
with FastV, prints both, and reports how far the two lists of answers agree. The loading, the loop
and the printing are written; you write `agreement`.

With a model already loaded (a notebook's: a second 7B does not fit on a T4), call the loop itself:

    from homework.agreement import compare_on_folder
    compare_on_folder(model, folder, "my-photos", prompt="Describe this image.", r=0.75,
                      system=SYSTEM_PROMPTS["llava_v1"])

(`folder` is the notebook's checkpoint folder, the one its model was loaded from.)

Check it:  python -m pytest homework/check_4_agreement.py
"""

import argparse
import sys
from collections import Counter  # noqa: F401  (you may want it)
from pathlib import Path

# run as a script: find minifastv in this repository
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minifastv.image import ImageProcessorConfig, load_image, preprocess  # noqa: E402
from minifastv.checkpoint import DEFAULT_REPO, load, resolve_folder  # noqa: E402
from minifastv.generation import generate  # noqa: E402
from minifastv.model import FastV  # noqa: E402
from minifastv.prompt import Tokenizer, encode_prompt, format_prompt  # noqa: E402

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def agreement(answers_plain, answers_pruned):
    """How far two lists of answers agree, pair by pair: {"exact_match": float, "token_f1": float},
    both in [0, 1].

    answers_plain[i] and answers_pruned[i] answer the same image, without and with FastV.
    - exact_match: the share of pairs whose two strings are equal.
    - token_f1: the mean over pairs of the F1 score of their words (SQuAD's answer metric). Split
      each answer with str.split() (case and punctuation count: "Cat," and "cat" are different
      words). common = how many words the two answers share, counted with repeats ("a a b" and
      "a c a" share 2). precision = common / number of words of the pruned answer,
      recall = common / number of words of the plain answer,
      F1 = 2 * precision * recall / (precision + recall), and 0 when common is 0. Two empty answers
      agree fully (F1 1); an empty answer against a non-empty one scores 0.
    Raise ValueError when the lists have different lengths or are empty.
    """
    raise NotImplementedError("fill in agreement() in homework/agreement.py first (exercise 4)")


# ------------------------------------------------------------------------------------------------
# The rest is given: read the folder, answer each image twice, print.


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python homework/agreement.py",
        description="Answers with and without FastV over a folder of images, and their agreement.",
    )
    parser.add_argument("--model", default=DEFAULT_REPO,
                        help=f"hub repo id or local llava-hf folder (default {DEFAULT_REPO})")
    parser.add_argument("--images", required=True, help="a folder of images")
    parser.add_argument("--prompt", default="Describe this image.",
                        help="the question asked about every image")
    parser.add_argument("--k", type=int, default=2, help="FastV's K (default 2)")
    parser.add_argument("--r", type=float, default=0.5, help="FastV's R (default 0.5)")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="at most this many answer tokens (default 32)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, ... (default: cuda when there is one)")
    return parser.parse_args(argv)


def image_files(folder):
    files = sorted(path for path in Path(folder).iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return files


def answer(model, tokenizer, input_ids, pixel_values, fastv, max_new_tokens):
    """The greedy answer, as text."""
    ids = generate(model, input_ids, pixel_values, max_new_tokens=max_new_tokens, fastv=fastv)
    return tokenizer.decode(ids[0].tolist()).strip()


def compare_on_folder(model, checkpoint, images, prompt="Describe this image.", k=2, r=0.5,
                      max_new_tokens=32, out=None, system=None):
    """Answer every image of the folder `images` with and without FastV(k, r) on `model`, a
    minifastv model already loaded; print both answers; return agreement's dict.

    checkpoint: the model's folder, for its tokenizer and image settings (in the notebook,
    `folder`). Greedy answers of at most max_new_tokens tokens; out: where to print
    (default: sys.stdout). system: the text of a system prompt to put before the question
    (format_prompt's `system`, e.g. SYSTEM_PROMPTS["llava_v1"], which the notebook uses); None,
    the default: none, llava-hf's template.
    """
    out = out or sys.stdout
    files = image_files(images)
    agreement(["probe"], ["probe"])  # an unfilled agreement stops here, before the slow part
    tokenizer = Tokenizer.from_folder(checkpoint)
    processor = ImageProcessorConfig.from_folder(checkpoint)
    input_ids = encode_prompt(tokenizer, format_prompt(prompt, system=system),
                              model.config.image_tokens_per_image)
    fastv = FastV(k, r)

    answers_plain, answers_pruned = [], []
    for file in files:
        pixel_values = preprocess([load_image(file)], processor)
        for answers, setting in ((answers_plain, None), (answers_pruned, fastv)):
            answers.append(
                answer(model, tokenizer, input_ids, pixel_values, setting, max_new_tokens)
            )
        same = "same" if answers_plain[-1] == answers_pruned[-1] else "different"
        print(f"{file.name}: {same}", file=out)
        print(f"  without FastV: {answers_plain[-1]}", file=out)
        print(f"  with FastV:    {answers_pruned[-1]}", file=out, flush=True)

    metrics = agreement(answers_plain, answers_pruned)
    print(f"--- {len(files)} images, {prompt!r}, FastV K={k}, R={r} ---", file=out)
    for name, value in metrics.items():
        print(f"{name}: {value:.3f}", file=out)
    return metrics


def main(argv=None, out=None):
    """Run the script: load the model, then compare_on_folder; returns agreement's dict."""
    args = parse_args(argv)
    image_files(args.images)  # a folder without images fails now, not after the model loads
    folder = resolve_folder(args.model)
    model = load(folder, device=args.device)
    return compare_on_folder(model, folder, args.images, args.prompt, args.k, args.r,
                             args.max_new_tokens, out)


if __name__ == "__main__":
    main()
