"""What FastV costs in accuracy: python -m minifastv.eval

Answers questions about images without FastV ("none") and with each FastV setting and pruning
rule, the model loaded once, and compares each setting with "none" on the same questions.

The protocol is LLaVA-1.5's own (llava/eval/model_vqa_loader.py, scripts/v1_5/eval/pope.sh):
greedy, at most --max-new-tokens 128 (answers stop after a word or two), each image padded to a
square (--crop: llava-hf's center crop), and the prompt, LLaVA's system prompt first (--system
vicuna_v1, the default; none or llava_v1 change it, and the answers file records which):
  A chat between a curious user and an artificial intelligence assistant. The assistant gives
  helpful, detailed, and polite answers to the user's questions. USER: <image>\\n{question}\\n
  Answer the question using a single word or phrase. ASSISTANT:

--task pope: POPE (lmms-lab/POPE on the Hugging Face hub), 9,000 yes/no questions about 500 COCO
  images, 3,000 per split (adversarial, popular, random); its three files (85 MB each) are
  downloaded once. Needs pyarrow: pip install pyarrow. Scored as LLaVA's eval_pope.py: in the
  answer's first sentence, commas dropped, split at spaces, "No", "no" or "not" means no, anything
  else yes; accuracy, precision, recall and F1 of "yes", share of "yes", per split and over all.
--data FOLDER: your own set, FOLDER/questions.jsonl, one JSON object a line (an optional "split"
  groups them): {"id": "cat1", "image": "cat1.jpg", "question": "What animal?", "answers": ["cat"]}
  An answer is right when it equals one of the answers, both normalized: lower case, punctuation
  and the words a, an, the dropped.

--limit N: a fixed sample, each split shuffled with --seed and dealt in turn, so that the sample
(and any prefix of a run) is balanced over the splits. Each accuracy has its 95% Wilson score
interval; each setting is compared with "none" by the mean per-question difference (right 1,
wrong 0) and its 95% normal interval, mean ± 1.96 sd / sqrt(n): "costs 2.1 points (±1.8)", or
"not distinguishable" when the interval holds 0.

Each answer is appended to --answers FILE (JSON lines after a header naming the model, task,
sample and protocol, system prompt included) as it is made, so a run stopped by Ctrl-C keeps
them; --resume FILE continues it, and refuses a file of another model, task, sample or protocol
(settings and rules may be added). The random rule is seeded with --seed before each batch: its
answers depend on the batch size.

examples:
  python -m minifastv.eval --model tiny --data my_photos --settings none,K2R0.5
  python -m minifastv.eval --limit 200 --settings none,K2R0.5,K2R0.75 --batch-size 8
  python -m minifastv.eval --limit 200 --rule fastv random homework/spread_rule.py:row_balanced_rule
"""

import argparse
import hashlib
import io
import itertools
import json
import math
import os
import random
import re
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from . import cli
from .checkpoint import read_config
from .errors import UsageError
from .generation import generate
from .image import ImageProcessorConfig, load_image, preprocess
from .model import FastV
from .prompt import Tokenizer, encode_prompt, format_prompt, left_pad
from .rules import RULES, load_rule

SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA-1.5's eval prompt
Z = 1.959964  # the standard normal's 97.5% quantile: 95% intervals
# What a file must share with this run for --resume to continue it; its header holds them.
RESUME_KEYS = ("model", "task", "limit", "seed", "system", "prompt", "max_new_tokens", "image",
               "dtype", "sample")

# POPE on the hub, as its dataset card (README.md of lmms-lab/POPE) declares it: a config "Full",
# the splits adversarial, popular and random in Full/<split>-*, and a config "default", one split
# "test" of all 9,000 rows in data/test-0000{0,1,2}-of-00003.parquet (85 MB each). Columns: id,
# question_id, question, answer ("yes"/"no"), image_source (the COCO image's name), image (a
# struct of the JPEG's bytes and path), category (the split). lmms-eval's pope_adv, pope_pop and
# pope_random read "Full"; public scripts fetch these file names at this revision (main then).
POPE_REPO, POPE_REVISION = "lmms-lab/POPE", "4db1276663dfa5eb8ad16a52d24c31a09e470896"
POPE_FILE = "Full/{}-00000-of-00001.parquet"
POPE_SPLITS = ("adversarial", "popular", "random")


def prompt_template(system="vicuna_v1"):
    """The prompt, {question} to fill in: --system's system prompt (none, vicuna_v1, llava_v1),
    then the image, the question and LLaVA-1.5's short-answer instruction."""
    return format_prompt("{question}\n" + SHORT_ANSWER, system=cli.system_prompt(system))


PROMPT = prompt_template()  # the default, vicuna_v1: what LLaVA-1.5's authors evaluated with


@dataclass
class Question:
    id: str  # unique in the task: "adversarial/17" for POPE, the file's "id" for a local set
    split: str  # POPE's split; a local set's "split", or "all"
    question: str
    answers: list  # the right answers: ["yes"] or ["no"] for POPE
    image: object  # a path, or the image file's bytes (POPE's, read from the parquet file)


# ------------------------------------------------------------------------------------------------
# The questions: a local set, or POPE from the hub; a fixed sample balanced over the splits


def read_local_set(folder):
    folder, questions, seen = Path(folder), [], set()
    path = folder / "questions.jsonl"
    if not path.is_file():
        raise UsageError(f"There is no data folder {folder}." if not folder.is_dir() else
                         f"The data folder {folder} has no questions.jsonl (see --help).")
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                item = Question(str(record["id"]), str(record.get("split", "all")),
                                record["question"], record["answers"], folder / record["image"])
                assert isinstance(item.question, str) and isinstance(item.answers, list)
                assert item.answers and all(isinstance(a, str) for a in item.answers)
                assert item.id not in seen
            except (ValueError, KeyError, TypeError, AssertionError):
                raise UsageError(f"{path} line {number} is not a question: write one JSON object "
                                 'a line with a unique "id", "image", "question" (text) and '
                                 '"answers" (a list of texts).') from None
            seen.add(item.id)
            questions.append(item)
    if not questions:
        raise UsageError(f"{path} holds no questions.")
    return questions


def read_pope():
    """POPE's questions, each split's file downloaded once (with a progress bar) into the hub's
    cache; their images come later, for the sample only (add_pope_images)."""
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise UsageError("POPE's files are parquet, which needs pyarrow: pip install "
                         "pyarrow.") from None
    from huggingface_hub import hf_hub_download

    questions = []
    for split in POPE_SPLITS:
        try:
            path = hf_hub_download(POPE_REPO, POPE_FILE.format(split), repo_type="dataset",
                                   revision=POPE_REVISION)
        except Exception as error:  # the hub's errors vary by version and network; all mean this
            reason = " ".join(str(error).split())
            raise UsageError(f"POPE could not be downloaded from the Hugging Face hub "
                             f"({type(error).__name__}: {reason}); check the network, or "
                             "evaluate a local set with --data FOLDER.") from error
        columns = ["question_id", "question", "answer", "image_source"]
        for row in parquet.read_table(path, columns=columns).to_pylist():
            questions.append(Question(f"{split}/{row['question_id']}", split, row["question"],
                                      [row["answer"].strip().lower()], (path, row["image_source"])))
    return questions


def add_pope_images(questions):
    """Each sampled question's image (JPEG bytes), read from its split's file a slice at a time,
    kept once per COCO image: questions share them."""
    import pyarrow.parquet as parquet

    images = {}
    for path in sorted({question.image[0] for question in questions}):
        wanted = {question.image[1] for question in questions if question.image[0] == path}
        for batch in parquet.ParquetFile(path).iter_batches(64, columns=["image_source", "image"]):
            for name, image in zip(*(column.to_pylist() for column in batch.columns)):
                if name in wanted and name not in images:
                    images[name] = image["bytes"]
    for question in questions:
        question.image = images[question.image[1]]


def sample(questions, limit, seed):
    """`limit` questions (all without one): each split shuffled with the seed, then dealt in turn,
    so that the sample, and any prefix of it, holds the splits in equal shares."""
    by_split = {}
    for question in questions:
        by_split.setdefault(question.split, []).append(question)
    for split, group in by_split.items():
        random.Random(f"{seed}/{split}").shuffle(group)
    return [q for turn in itertools.zip_longest(*by_split.values()) for q in turn if q][:limit]


# ------------------------------------------------------------------------------------------------
# Scoring and statistics


def pope_says_yes(answer):
    """LLaVA's eval_pope.py: the first sentence, commas dropped, split at spaces; "No", "no" or
    "not" among the words is a no, anything else a yes ("Not" too, as there)."""
    words = answer.split(".")[0].replace(",", "").split(" ")
    return not any(word in ("No", "no", "not") for word in words)


def normalize(text):
    """Lower case, punctuation and the articles a, an, the dropped, spaces collapsed."""
    text = "".join(" " if char in string.punctuation else char for char in text.lower())
    return " ".join(word for word in text.split() if word not in ("a", "an", "the"))


def is_right(task, question, answer):
    if task == "pope":
        return pope_says_yes(answer) == (question.answers[0] == "yes")
    return normalize(answer) in {normalize(right) for right in question.answers}


def wilson_interval(successes, n, z=Z):
    """The 95% Wilson score interval of a proportion: every p from which successes/n lies within
    z standard errors, sqrt(p (1 - p) / n). Unlike the textbook share ± z standard errors of the
    share, it stays inside [0, 1] and is not a point at 0 or n successes."""
    p, shrink = successes / n, 1 + z * z / n
    center = (p + z * z / (2 * n)) / shrink
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / shrink
    return max(0.0, center - half), min(1.0, center + half)


def paired_difference(right, right_without, z=Z):
    """Mean and 95% half-width of the per-question differences of two 0/1 scores on the same
    questions: the normal interval, mean ± z sd / sqrt(n) (no width below 2 questions: inf)."""
    differences = [int(a) - int(b) for a, b in zip(right, right_without)]
    n = len(differences)
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1) if n > 1 else math.inf
    return mean, z * math.sqrt(variance / n)


def figures(task, scored):
    """The numbers of one setting on (question, answer, right) triples."""
    n, right = len(scored), sum(correct for _, _, correct in scored)
    result = {"questions": n, "accuracy": right / n, "interval": wilson_interval(right, n)}
    if task == "pope":
        said = [(pope_says_yes(answer), q.answers[0] == "yes") for q, answer, _ in scored]
        true_yes = sum(yes and truth for yes, truth in said)
        precision = true_yes / max(1, sum(yes for yes, _ in said))  # 0 when it never says yes
        recall = true_yes / max(1, sum(truth for _, truth in said))
        f1 = 2 * precision * recall / (precision + recall) if true_yes else 0.0
        result.update(precision=precision, recall=recall, f1=f1,
                      yes_share=sum(yes for yes, _ in said) / n)
    return result


# ------------------------------------------------------------------------------------------------
# Settings and rules


@dataclass
class Run:
    name: str  # "none", or the setting and the rule: "K2R0.5 fastv"
    fastv: FastV | None
    rule: str | None = None  # as given to --rule


def parse_settings(text):
    """"none,K2R0.5" -> [None, (2, 0.5)]; "none" is always there, first: the baseline."""
    settings = [None]
    for word in text.split(","):
        match = re.fullmatch(r"K(\d+)R(\d*\.?\d+)", word.strip())
        if not match and word.strip() != "none":
            raise UsageError(f"Unknown setting {word!r} in --settings: write none, or "
                             "K<layer>R<share dropped> such as K2R0.5.")
        if match and (int(match[1]), float(match[2])) not in settings:
            settings.append((int(match[1]), float(match[2])))
            FastV(*settings[-1])  # K >= 1 and R in [0, 1), or a SettingsError: one sentence
    return settings


def make_runs(settings, rules):
    """none, then every setting with every rule ({name as given: function})."""
    runs = [Run("none", None)]
    for k, r in settings[1:]:
        for name, rule in rules.items():
            label = name.rpartition(":")[2]  # a file's rule by its function's name
            runs.append(Run(f"K{k}R{r:g} {label}", FastV(k, r, rule=rule), name))
    return runs


# ------------------------------------------------------------------------------------------------
# Answering, in batches, each answer written as soon as it is made


def answer_batch(model, tokenizer, prompts, pixel_values, fastv, max_new_tokens):
    """Greedy answers to B questions at once: the prompts (1, T_i) left-padded into one (B, T)
    batch, the padding masked out. One image per question gives every row as many image tokens,
    as FastV needs."""
    input_ids, attention_mask = left_pad(prompts, model.config.pad_token_id)  # (B, T) each
    new_tokens = generate(model, input_ids, pixel_values, attention_mask=attention_mask,
                          max_new_tokens=max_new_tokens, fastv=fastv)  # (B, N)
    eos = model.config.text.eos_token_id
    return [tokenizer.decode(row[:row.index(eos)] if eos in row else row).strip()
            for row in new_tokens.tolist()]


def answer_all(model, tokenizer, image_config, task, questions, runs, done, answers_file, args):
    """Every (run, question) not in `done`, batch after batch, each batch through every run
    before the next: a run stopped early holds every setting on the same questions."""
    template = prompt_template(args.system)
    to_do = sum((run.name, q.id) not in done for run in runs for q in questions)
    with tqdm(total=to_do, desc="answers", unit="answer", file=sys.stderr) as progress:
        for start in range(0, len(questions), args.batch_size):
            batch = questions[start:start + args.batch_size]
            if all((run.name, q.id) in done for run in runs for q in batch):
                continue
            prompts = [encode_prompt(tokenizer, template.format(question=q.question),
                                     model.config.image_tokens_per_image) for q in batch]
            images = [Image.open(io.BytesIO(q.image)) if isinstance(q.image, bytes) else q.image
                      for q in batch]  # a file, or POPE's JPEG bytes
            pixels = preprocess(images, image_config, pad=not args.crop)  # (B, 3, 336, 336)
            for run in runs:
                rows = [row for row, q in enumerate(batch) if (run.name, q.id) not in done]
                if rows:
                    torch.manual_seed(args.seed)  # for the random rule
                    answers = answer_batch(model, tokenizer, [prompts[row] for row in rows],
                                           pixels[rows], run.fastv, args.max_new_tokens)
                    records = [{"run": run.name, "id": batch[row].id, "answer": answer,
                                "right": is_right(task, batch[row], answer)}
                               for row, answer in zip(rows, answers)]
                    answers_file.write("".join(json.dumps(record) + "\n" for record in records))
                    answers_file.flush()
                    done.update({(run.name, record["id"]): record for record in records})
                    progress.update(len(rows))


def read_answers(path, header):
    """{(run, id): record} of the file to resume, its header checked against this run's; a last
    line cut off in the middle (the run was killed while writing it) is removed."""
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    lines = text.split("\n")
    try:
        theirs = json.loads(lines[0])
        assert theirs["minifastv_eval"] == 1
    except (ValueError, KeyError, TypeError, AssertionError):
        raise UsageError(f"--resume {path}: no such file, or not an answers file of python -m "
                         "minifastv.eval (its first line is a header).") from None
    for key in RESUME_KEYS:
        if theirs.get(key) != header[key]:
            raise UsageError(f"--resume {path} holds answers for {key} {theirs.get(key)!r}, but "
                             f"this run has {header[key]!r}: run it with the arguments it was "
                             "started with, or start a new --answers file.")
    if lines[-1]:
        path.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    done = {}
    for number, line in enumerate(lines[1:-1], 2):
        try:
            record = json.loads(line)
            done[record["run"], record["id"]] = record
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"--resume {path}: line {number} is damaged.") from None
    return done


# ------------------------------------------------------------------------------------------------
# Results: a table and sentences, JSON, an SVG


def results_of(task, questions, runs, done):
    """Per run: its figures over all questions and per split, and its comparison with none."""
    results, scored_none = {}, None
    for run in runs:
        scored = [(q, done[run.name, q.id]["answer"]) for q in questions]
        scored = [(q, answer, is_right(task, q, answer)) for q, answer in scored]
        scored_none = scored_none or scored  # runs[0] is none
        result = {"k": run.fastv and run.fastv.k, "r": run.fastv and run.fastv.r,
                  "rule": run.rule, "all": figures(task, scored), "splits": {}}
        for split in sorted({q.split for q in questions}):
            result["splits"][split] = figures(task, [s for s in scored if s[0].split == split])
        if run.fastv:
            difference, half = paired_difference([s[2] for s in scored],
                                                 [s[2] for s in scored_none])
            changed = sum(s[1] != b[1] for s, b in zip(scored, scored_none)) / len(scored)
            result["vs_none"] = {"difference": difference, "half_width": half, "changed": changed}
        results[run.name] = result
    return results


def comparison(name, vs_none, n):
    points, half = 100 * vs_none["difference"], 100 * vs_none["half_width"]
    changed = f"{vs_none['changed']:.0%} of the answers changed"
    if abs(points) > half:
        verb = "costs" if points < 0 else "gains"
        return f"{name} {verb} {abs(points):.1f} points (±{half:.1f}) against none; {changed}"
    return (f"{name} is not distinguishable from none on {n} questions ({points:+.1f} ± "
            f"{half:.1f} points); {changed}")


def table(task, results):
    pope = task == "pope"
    lines = [(f"{'setting':<22}{'split':<12}{'n':>5}  {'accuracy (95% interval)':<27}"
              + ("precision  recall  F1     yes" if pope else "")).rstrip()]
    for name, result in results.items():
        splits = list(result["splits"].items()) if len(result["splits"]) > 1 else []
        for split, f in [("all", result["all"])] + splits:
            low, high = f["interval"]
            accuracy = f"{f['accuracy']:>6.1%} ({low:.1%}-{high:.1%})"
            row = (f"{name if split == 'all' else '':<22}{split:<12}{f['questions']:>5}  "
                   f"{accuracy:<27}")
            if pope:
                row += (f"{f['precision']:<11.3f}{f['recall']:<8.3f}{f['f1']:<7.3f}"
                        f"{f['yes_share']:.0%}")
            lines.append(row.rstrip())
    n = results["none"]["all"]["questions"]
    return "\n".join(lines + [""] + [comparison(name, result["vs_none"], n)
                                     for name, result in results.items() if "vs_none" in result])


def svg(results, width=560, height=360):
    """Accuracy against R, one line per rule and K from none at R = 0; bars: 95% intervals."""
    none, lines = results["none"]["all"], {}
    for result in list(results.values())[1:]:
        key = f"{result['rule']}, K={result['k']}"
        lines.setdefault(key, [(0, none)]).append((result["r"], result["all"]))
    ends = [end for line in lines.values() for _, f in line for end in f["interval"]] or [0, 1]
    bottom, top = math.floor(10 * min(ends)) / 10, max(0.1, math.ceil(10 * max(ends)) / 10)
    top = max(top, bottom + 0.1)

    def at(r, accuracy):  # (x, y) in the picture
        return (60 + r * (width - 80),
                height - 40 - (accuracy - bottom) / (top - bottom) * (height - 70))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif" font-size="12"><rect width="100%" height="100%" '
           f'fill="white"/><text x="{width / 2}" y="18" text-anchor="middle">Accuracy against R, '
           'the share of image tokens dropped (bars: 95% intervals)</text>']
    for tick in range(round(bottom * 10), round(top * 10) + 1):
        y = at(0, tick / 10)[1]
        out.append(f'<text x="52" y="{y + 4:.1f}" text-anchor="end">{tick * 10}%</text>'
                   f'<line x1="60" x2="{width - 20}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
    out += [f'<text x="{at(r, 0)[0]:.1f}" y="{height - 22}" text-anchor="middle">{r:g}</text>'
            for r in (0, 0.25, 0.5, 0.75, 1)]
    for index, (key, line) in enumerate(lines.items()):
        colour = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"][index % 5]
        points = [(at(r, f["accuracy"]), at(r, f["interval"][0]), at(r, f["interval"][1]))
                  for r, f in line]
        out.append('<polyline points="' + " ".join(f"{x:.1f},{y:.1f}" for (x, y), _, _ in points)
                   + f'" fill="none" stroke="{colour}"/>')
        out += [f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{low:.1f}" y2="{high:.1f}" stroke="{colour}"'
                f'/><circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>'
                for (x, y), (_, low), (_, high) in points]
        out.append(f'<text x="{width - 30}" y="{40 + 16 * index}" text-anchor="end" '
                   f'fill="{colour}">{key}</text>')
    return "\n".join(out + ["</svg>", ""])


# ------------------------------------------------------------------------------------------------
# The command


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m minifastv.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_version_argument(parser)
    cli.add_model_arguments(parser)
    parser.add_argument("--task", help="pope (the default without --data)")
    parser.add_argument("--data", metavar="FOLDER", help="a local set: FOLDER/questions.jsonl")
    parser.add_argument("--limit", type=int, help="a sample of this many questions (default all)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the sample's seed, and the random rule's (default 0)")
    parser.add_argument("--settings", default="none,K2R0.5",
                        help="none, K<layer>R<share dropped>, ... (default %(default)s)")
    parser.add_argument("--rule", nargs="+", default=["fastv"],
                        help=f"pruning rules: {', '.join(RULES)}, path/to/file.py:function")
    parser.add_argument("--batch-size", type=int, default=1, help="questions at once (default 1)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="(default 128)")
    parser.add_argument("--crop", action="store_true", help="center-crop (llava-hf), not pad")
    cli.add_system_argument(parser, default="vicuna_v1")
    parser.add_argument("--answers", metavar="FILE",
                        help="the answers file to write (default eval-<task>-<time>.jsonl in the "
                             "current folder)")
    parser.add_argument("--resume", metavar="FILE", help="continue the answers file FILE")
    parser.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    parser.add_argument("--svg", metavar="FILE", help="draw accuracy against R per rule")
    return parser.parse_args(argv)


def check_numbers(args):
    """--limit, --batch-size, --max-new-tokens and --seed in range, before anything is read."""
    for option, value in (("--limit", 1 if args.limit is None else args.limit),
                          ("--batch-size", args.batch_size),
                          ("--max-new-tokens", args.max_new_tokens)):
        cli.check_at_least(option, value)
    if not 0 <= args.seed < 2**64:  # what torch.manual_seed takes
        raise UsageError(f"--seed must be within [0, 2**64), got {args.seed}.")


def check_files(args, task):
    """The answers file, --json and --svg checked before anything slow (reading POPE, loading the
    model): each can be written, and --resume can be read. Returns the answers file's path."""
    if args.resume and args.answers:
        raise UsageError("Give --answers FILE to start a run or --resume FILE to continue one, "
                         "not both.")
    if args.resume:
        path = Path(args.resume)
        if path.is_dir():
            raise UsageError(f"--resume {path} is a folder: give the answers file to continue.")
        if not path.is_file():
            raise UsageError(f"--resume {path}: no such file.")
        try:
            open(path, "rb").close()
        except OSError as error:
            raise UsageError(f"--resume {path} cannot be read ({error.strerror}).") from None
        if not os.access(path, os.W_OK):
            raise UsageError(f"--resume {path} cannot be written, and the new answers are "
                             "appended to it: make it writable, or copy it.")
    else:
        path = Path(args.answers or f"eval-{task}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        if path.is_file():
            raise UsageError(f"{path} exists: continue it with --resume {path}, or give another "
                             "--answers file.")
        cli.check_output(path, "--answers")
    for option, output in (("--json", args.json), ("--svg", args.svg)):
        if output:
            cli.check_output(output, option)
    return path


def main(argv=None, out=None):
    out = out or sys.stdout  # looked up now, not at import: tests and notebooks replace sys.stdout
    args = parse_args(argv)
    task = "data" if args.data else "pope"
    if args.task not in (None, "pope"):
        raise UsageError(f"Unknown task {args.task!r}: use --task pope, or --data FOLDER for a "
                         "local set (other benchmarks: lmms-eval).")
    if args.task and args.data:
        raise UsageError("Give --task pope or --data FOLDER, not both.")
    check_numbers(args)
    runs = make_runs(parse_settings(args.settings), {name: load_rule(name) for name in args.rule})
    answers_path = check_files(args, task)
    device = cli.pick_device(args.device)
    dtype = cli.pick_dtype(args.dtype, device)
    template = prompt_template(args.system)

    questions = read_pope() if task == "pope" else read_local_set(args.data)
    questions = sample(questions, args.limit, args.seed)
    if task == "pope":
        print(f"reading the images of {len(questions)} questions from POPE's files",
              file=sys.stderr, flush=True)
        add_pope_images(questions)
    else:
        for path in dict.fromkeys(q.image for q in questions):
            load_image(path)  # a missing or broken image: ImageError, a sentence naming it, now
    ids = hashlib.sha1("\n".join(q.id for q in questions).encode()).hexdigest()[:12]
    header = {"minifastv_eval": 1, "model": args.model, "limit": args.limit, "seed": args.seed,
              "task": "pope" if task == "pope" else str(Path(args.data).resolve()),
              "system": args.system, "prompt": template, "decoding": "greedy",
              "max_new_tokens": args.max_new_tokens, "image": "crop" if args.crop else "pad",
              "dtype": str(dtype).removeprefix("torch."),
              "sample": f"{len(questions)} questions, ids sha1 {ids}",
              "settings": args.settings, "rules": args.rule}
    done = read_answers(answers_path, header) if args.resume else {}

    folder = cli.model_folder(args.model)
    config, tokenizer = read_config(folder), Tokenizer.from_folder(folder)
    layers, image_tokens = config.text.num_hidden_layers, config.image_tokens_per_image
    for run in runs[1:]:
        if run.fastv.k >= layers or run.fastv.num_keep(image_tokens) == 0:
            raise UsageError(f"Setting {run.name.split()[0]} does not fit this model: K must be "
                             f"below its {layers} layers and R keep one of {image_tokens} image "
                             "tokens.")
    longest = max(len(tokenizer.encode(template.format(question=q.question))) for q in questions)
    if longest - 1 + image_tokens + args.max_new_tokens > config.text.max_position_embeddings:
        raise UsageError("A question is too long: with its image tokens and --max-new-tokens it "
                         f"passes the model's {config.text.max_position_embeddings}-token context.")
    model = cli.load_model(folder, device, dtype, towers=("image",))
    answers_path.parent.mkdir(parents=True, exist_ok=True)  # cli.check_output makes no folder
    with open(answers_path, "a", encoding="utf-8") as answers_file:
        if not args.resume:
            answers_file.write(json.dumps(header) + "\n")
        # Ctrl-C keeps every answer written so far: say now how to go on
        print(f"answers go to {answers_path} (after Ctrl-C, --resume {answers_path} goes on)",
              file=sys.stderr, flush=True)
        answer_all(model, tokenizer, ImageProcessorConfig.from_folder(folder), task, questions,
                   runs, done, answers_file, args)

    results = results_of(task, questions, runs, done)
    print(f"{'POPE' if task == 'pope' else args.data}: {len(questions)} questions, LLaVA-1.5's "
          f"protocol (greedy, at most {args.max_new_tokens} new tokens, system prompt "
          f"{args.system}), {args.model}", file=out)
    print(table(task, results), file=out)
    if args.json:
        cli.write_output(args.json, json.dumps({"header": header, "results": results}, indent=1))
    if args.svg:
        cli.write_output(args.svg, svg(results))


def command(argv=None):
    return cli.report_errors(main, argv)


if __name__ == "__main__":
    sys.exit(command())
