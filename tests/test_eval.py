"""python -m minifastv.eval on the tiny random model (--model tiny), offline.

Scoring and intervals against hand-worked cases; answers against `generate` called one question at a
time; batch sizes; one model load for every setting and rule; a killed run resumed; POPE read from a local
copy in the hub's layout (HF_HUB_OFFLINE, HF_HUB_CACHE); and every bad input: one sentence, exit code 2.
"""

import io
import json
import math
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import torch
from PIL import Image

import minifastv
from minifastv import cli
from minifastv import eval as evaluation
from minifastv.generation import generate
from minifastv.image import ImageProcessorConfig, preprocess
from minifastv.model import FastV
from minifastv.prompt import SYSTEM_PROMPTS, Tokenizer, encode_prompt, format_prompt
from minifastv.rules import random_rule
from minifastv.tiny import tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
NEW_TOKENS = 3  # the tiny model never says EOS: every answer is this long
# The local set: questions of different lengths (so that a batch is left-padded), images of different sizes.
LOCAL_SET = [
    ("cat", "cat.png", "What animal is this?", ["cat", "a kitten"], (60, 40), (200, 120, 40)),
    ("red", "red.png", "What colour is the big square in the middle of this picture, please?", ["red"], (50, 90),
     (220, 20, 20)),
    ("blue", "blue.jpg", "Colour?", ["blue"], (80, 80), (20, 20, 220)),
    ("dog", "cat.png", "How many dogs can you count in the picture?", ["none", "0"], (60, 40), (200, 120, 40)),
]
REFERENCE_ARGS = ["--model", "tiny", "--device", "cpu", "--settings", "none,K2R0.5", "--rule", "fastv", "random",
                  "--max-new-tokens", str(NEW_TOKENS)]
POPE_REVISION = "4db1276663dfa5eb8ad16a52d24c31a09e470896"


def llava_says_no(answer):
    """LLaVA's eval_pope rule, written out again here: the first sentence's words, commas dropped."""
    return bool({"No", "no", "not"} & set(answer.split(".")[0].replace(",", "").split(" ")))


@pytest.fixture(scope="module")
def local_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("local_set")
    lines = []
    for identifier, image, question, answers, size, colour in LOCAL_SET:
        picture = Image.new("RGB", size, colour)
        picture.paste((255, 255, 255), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
        picture.save(folder / image)
        lines.append(json.dumps({"id": identifier, "image": image, "question": question, "answers": answers}))
    (folder / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def tiny():
    folder = tiny_checkpoint()
    model = minifastv.load(folder, device="cpu", dtype=torch.float32, progress=False)
    return model, Tokenizer.from_folder(folder), ImageProcessorConfig.from_folder(folder)


def one_at_a_time(tiny, question, image, fastv, seed=0):
    """The answer to one question, from the library calls the protocol names: the prompt with LLaVA's system
    prompt and short-answer instruction, the image padded to a square, greedy generation up to EOS."""
    model, tokenizer, image_config = tiny
    text = format_prompt(question + "\nAnswer the question using a single word or phrase.", system=SYSTEM_PROMPTS["vicuna_v1"])
    ids = encode_prompt(tokenizer, text, model.config.image_tokens_per_image)
    torch.manual_seed(seed)
    tokens = generate(model, ids, preprocess(image, image_config, pad=True), max_new_tokens=NEW_TOKENS,
                      fastv=fastv)[0].tolist()
    eos = model.config.text.eos_token_id
    return tokenizer.decode(tokens[:tokens.index(eos)] if eos in tokens else tokens).strip()


def read_jsonl(path):
    header, *records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return header, {(record["run"], record["id"]): record["answer"] for record in records}


def counting_loads(monkeypatch):
    loads = []
    real = cli.load_model

    def load_model(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "load_model", load_model)
    return loads


@pytest.fixture(scope="module")
def reference(local_set, tmp_path_factory):
    """One uninterrupted run at batch size 1: none, K2R0.5 with fastv and with random."""
    folder = tmp_path_factory.mktemp("reference")
    paths = {name: folder / name for name in ("answers.jsonl", "figures.json", "figure.svg")}
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch:
        loads = counting_loads(monkeypatch)
        evaluation.main(REFERENCE_ARGS + ["--data", str(local_set), "--answers", str(paths["answers.jsonl"]),
                                          "--json", str(paths["figures.json"]), "--svg", str(paths["figure.svg"])],
                        out=out)
    return paths, loads, out.getvalue()


# ------------------------------------------------------------------------------------------------------------
# Scoring and statistics, worked by hand


def test_pope_scoring_of_hand_worked_answers():
    assert evaluation.pope_says_yes("Yes.")
    assert not evaluation.pope_says_yes("No, there is not.")
    assert evaluation.pope_says_yes("There is a dog.")
    assert not evaluation.pope_says_yes("no")
    assert not evaluation.pope_says_yes("Yes, but not the red one.")  # "not" in the first sentence
    assert evaluation.pope_says_yes("Yes. It is not red.")  # only the first sentence counts
    assert evaluation.pope_says_yes("Not at all.")  # LLaVA's rule looks for "No", "no", "not": not for "Not"


def test_pope_figures_of_hand_worked_answers():
    labels = ["yes", "yes", "yes", "no"]
    answers = ["Yes.", "Yes", "No, there is not.", "There is a dog."]  # said: yes, yes, no, yes
    questions = [evaluation.Question(str(i), "random", "Is there a dog?", [label], None) for i, label in enumerate(labels)]
    scored = [(q, a, evaluation.is_right("pope", q, a)) for q, a in zip(questions, answers)]
    assert [right for _, _, right in scored] == [True, True, False, False]
    figures = evaluation.figures("pope", scored)
    # 2 true yes, 1 false yes, 1 false no, 0 true no
    assert figures["accuracy"] == 0.5
    assert figures["precision"] == pytest.approx(2 / 3) and figures["recall"] == pytest.approx(2 / 3)
    assert figures["f1"] == pytest.approx(2 / 3) and figures["yes_share"] == 0.75


def test_local_answers_by_normalized_exact_match():
    question = evaluation.Question("q", "all", "What is it?", ["a cat", "Kitten"], None)
    for answer, right in [("Cat.", True), ("The kitten!", True), ("  CAT ", True), ("cats", False),
                          ("black cat", False), ("", False)]:
        assert evaluation.is_right("data", question, answer) == right, answer


def test_wilson_interval_of_known_cases():
    # 0 of 20: the lower end is 0 and the upper end z^2 / (n + z^2) = 3.8415 / 23.8415
    low, high = evaluation.wilson_interval(0, 20)
    assert low == 0 and high == pytest.approx(0.16113, abs=5e-5)
    # 81 of 263: Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table II: 0.2553-0.3662
    low, high = evaluation.wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    # the ends solve (81/263 - p)^2 = z^2 p (1 - p) / 263
    for end in (low, high):
        assert (81 / 263 - end) ** 2 == pytest.approx(1.959964**2 * end * (1 - end) / 263)


def test_paired_difference_of_a_hand_worked_case():
    # differences 0, 1, 0, -1, 1: mean 0.2, sample variance 2.8 / 4 = 0.7, half-width 1.96 sqrt(0.7 / 5)
    difference, half = evaluation.paired_difference([1, 1, 0, 0, 1], [1, 0, 0, 1, 0])
    assert difference == pytest.approx(0.2) and half == pytest.approx(1.959964 * math.sqrt(0.14))
    assert evaluation.paired_difference([1], [0])[1] == math.inf  # one question says nothing
    sentence = evaluation.comparison("K2R0.5 fastv", {"difference": 0.2, "half_width": half, "changed": 0.6}, 5)
    assert sentence == ("K2R0.5 fastv is not distinguishable from none on 5 questions (+20.0 ± 73.3 points); "
                        "60% of the answers changed")
    sentence = evaluation.comparison("K2R0.75 fastv", {"difference": -0.021, "half_width": 0.018, "changed": 0.05}, 200)
    assert sentence == "K2R0.75 fastv costs 2.1 points (±1.8) against none; 5% of the answers changed"


def test_settings_are_parsed():
    assert evaluation.parse_settings("none,K2R0.5,K3R0.75") == [None, (2, 0.5), (3, 0.75)]
    assert evaluation.parse_settings("K2R.9, K2R0.9,none") == [None, (2, 0.9)]  # none always, first; once each


def test_sample_is_fixed_and_balanced():
    questions = [evaluation.Question(f"{split}/{i}", split, "?", ["yes"], None)
                 for split in ("adversarial", "popular", "random") for i in range(10)]
    chosen = evaluation.sample(list(questions), 7, seed=0)
    assert [q.id for q in chosen] == [q.id for q in evaluation.sample(list(questions), 7, seed=0)]
    assert sorted(sum(q.split == split for q in chosen) for split in ("adversarial", "popular", "random")) == [2, 2, 3]
    assert len({q.id for q in chosen}) == 7
    assert [q.id for q in evaluation.sample(list(questions), 7, seed=1)] != [q.id for q in chosen]


# ------------------------------------------------------------------------------------------------------------
# A run on a local set


def test_answers_equal_generate_one_question_at_a_time(reference, local_set, tiny):
    header, answers = read_jsonl(reference[0]["answers.jsonl"])
    assert header["model"] == "tiny" and header["decoding"] == "greedy" and header["max_new_tokens"] == NEW_TOKENS
    assert header["system"] == "vicuna_v1" and header["prompt"].startswith(SYSTEM_PROMPTS["vicuna_v1"] + " USER:")
    assert json.loads(reference[0]["figures.json"].read_text())["header"]["system"] == "vicuna_v1"
    assert len(answers) == 3 * len(LOCAL_SET)
    for identifier, image, question, *_ in LOCAL_SET:
        path = local_set / image
        assert answers["none", identifier] == one_at_a_time(tiny, question, path, None)
        assert answers["K2R0.5 fastv", identifier] == one_at_a_time(tiny, question, path, FastV(2, 0.5))
        # the random rule is seeded with --seed (0) before each batch, here a batch of one
        assert answers["K2R0.5 random", identifier] == one_at_a_time(tiny, question, path,
                                                                    FastV(2, 0.5, rule=random_rule))


def test_settings_and_rules_load_the_model_once(reference):
    paths, loads, out = reference
    assert len(loads) == 1
    figures = json.loads(paths["figures.json"].read_text())["results"]
    assert list(figures) == ["none", "K2R0.5 fastv", "K2R0.5 random"]
    _, answers = read_jsonl(paths["answers.jsonl"])
    for name, result in figures.items():  # the figures are those of the answers written
        rights = [evaluation.is_right("data", evaluation.Question(i, "all", q, a, None), answers[name, i])
                  for i, _, q, a, *_ in LOCAL_SET]
        assert result["all"]["accuracy"] == sum(rights) / len(rights) and result["all"]["questions"] == 4
    for name in ("K2R0.5 fastv", "K2R0.5 random"):
        changed = sum(answers[name, i] != answers["none", i] for i, *_ in LOCAL_SET) / len(LOCAL_SET)
        assert figures[name]["vs_none"]["changed"] == changed
        assert name in out and ("costs" in out or "gains" in out or "not distinguishable" in out)
    assert "accuracy (95% interval)" in out


def test_svg_has_a_line_per_rule(reference):
    root = ElementTree.fromstring(reference[0]["figure.svg"].read_text())
    polylines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(polylines) == 2  # fastv and random, each from none at R = 0 to R = 0.5
    assert all(len(line.get("points").split()) == 2 for line in polylines)


def test_batch_sizes_1_and_3_give_the_same_answers(reference, local_set, tmp_path):
    """Batches of 3 and 1 questions, the prompts of different lengths: left padding."""
    answers_file = tmp_path / "batch3.jsonl"
    args = REFERENCE_ARGS[:6] + ["--rule", "fastv", "--max-new-tokens", str(NEW_TOKENS)]
    evaluation.main(args + ["--data", str(local_set), "--batch-size", "3", "--answers", str(answers_file)],
                    out=io.StringIO())
    _, batched = read_jsonl(answers_file)
    _, single = read_jsonl(reference[0]["answers.jsonl"])
    assert len(batched) == 2 * len(LOCAL_SET)
    assert batched == {key: answer for key, answer in single.items() if key[0] != "K2R0.5 random"}


def test_a_killed_run_resumed_gives_the_same_results(reference, local_set, tmp_path, monkeypatch):
    answers_file, figures_file = tmp_path / "answers.jsonl", tmp_path / "figures.json"
    args = REFERENCE_ARGS + ["--data", str(local_set), "--json", str(figures_file)]
    real = evaluation.answer_batch
    calls = []

    def killed_in_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) > 4:
            raise KeyboardInterrupt  # as Colab's disconnect, or Ctrl-C
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "answer_batch", killed_in_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluation.main(args + ["--answers", str(answers_file)], out=io.StringIO())
    monkeypatch.setattr(evaluation, "answer_batch", real)
    assert len(read_jsonl(answers_file)[1]) == 4
    with open(answers_file, "a") as file:
        file.write('{"run": "none", "id": "c')  # killed in the middle of writing a line
    loads = counting_loads(monkeypatch)
    evaluation.main(args + ["--resume", str(answers_file)], out=io.StringIO())
    assert len(loads) == 1
    assert read_jsonl(answers_file)[1] == read_jsonl(reference[0]["answers.jsonl"])[1]
    resumed = json.loads(figures_file.read_text())["results"]
    assert resumed == json.loads(reference[0]["figures.json"].read_text())["results"]


def test_a_resume_file_of_another_run_is_refused(reference, local_set, tmp_path, capsys, monkeypatch):
    answers_file = tmp_path / "answers.jsonl"
    shutil.copy(reference[0]["answers.jsonl"], answers_file)
    before = answers_file.read_bytes()
    monkeypatch.setattr(cli, "load_model", too_late)
    args = REFERENCE_ARGS + ["--data", str(local_set), "--resume", str(answers_file)]
    for change, word in [(["--max-new-tokens", "4"], "max_new_tokens"), (["--seed", "1"], "seed"),
                         (["--limit", "3"], "limit"), (["--crop"], "image"), (["--system", "none"], "system"),
                         (["--system", "llava_v1"], "system"),
                         (["--model", "llava-hf/llava-1.5-7b-hf"], "model")]:
        assert evaluation.command(args + change) == 2
        assert word in one_error_line(capsys.readouterr().err)
    other = tmp_path / "other"
    shutil.copytree(local_set, other)
    assert evaluation.command(args + ["--data", str(other)]) == 2
    assert "task" in one_error_line(capsys.readouterr().err)
    assert answers_file.read_bytes() == before  # nothing lost


# ------------------------------------------------------------------------------------------------------------
# POPE through the hub's code, on a local copy in the hub's layout


def write_pope_copy(cache):
    """lmms-lab/POPE's "Full" files as hf_hub_download keeps them in its cache: four questions per split, two
    yes and two no, about two images, in the dataset's columns; row groups of 3 rows."""
    import pyarrow as pa
    import pyarrow.parquet as parquet

    snapshot = cache / "datasets--lmms-lab--POPE" / "snapshots" / POPE_REVISION / "Full"
    snapshot.mkdir(parents=True)
    images, rows = {}, {}
    for colour, name in [((250, 40, 40), "COCO_val2014_000000000042"), ((40, 40, 250), "COCO_val2014_000000000073")]:
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), colour).save(buffer, format="JPEG")
        images[name] = buffer.getvalue()
    for split in ("adversarial", "popular", "random"):
        questions = [(f"Is there a {thing} in the image?", answer, name) for thing, answer, name in
                     [("dog", "no", "COCO_val2014_000000000042"), ("car", "yes", "COCO_val2014_000000000042"),
                      (f"{split} chair", "yes", "COCO_val2014_000000000073"),
                      ("person", "no", "COCO_val2014_000000000073")]]
        table = pa.table({
            "id": [str(i) for i in range(4)], "question_id": [str(i + 1) for i in range(4)],
            "question": [q for q, _, _ in questions], "answer": [a for _, a, _ in questions],
            "image_source": [n for _, _, n in questions],
            "image": pa.array([{"bytes": images[n], "path": None} for _, _, n in questions],
                              type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "category": [split] * 4})
        parquet.write_table(table, snapshot / f"{split}-00000-of-00001.parquet", row_group_size=3)
        rows |= {f"{split}/{i + 1}": (q, a, images[n]) for i, (q, a, n) in enumerate(questions)}
    return rows


def test_pope_is_read_from_a_local_copy_in_the_hubs_layout(tmp_path, tiny):
    pytest.importorskip("pyarrow")  # in requirements-test.txt; optional at run time
    rows = write_pope_copy(tmp_path / "hub")
    answers_file, figures_file = tmp_path / "answers.jsonl", tmp_path / "figures.json"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "-m", "minifastv.eval", "--model", "tiny", "--device", "cpu",
                             "--task", "pope", "--limit", "3", "--settings", "none", "--max-new-tokens",
                             str(NEW_TOKENS), "--answers", str(answers_file), "--json", str(figures_file)],
                            cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    header, answers = read_jsonl(answers_file)
    assert header["task"] == "pope" and len(answers) == 3
    assert sorted(identifier.split("/")[0] for _, identifier in answers) == ["adversarial", "popular", "random"]
    for (_, identifier), answer in answers.items():  # each answer to its row's question about its row's image
        question, _, jpeg = rows[identifier]
        assert answer == one_at_a_time(tiny, question, Image.open(io.BytesIO(jpeg)), None)
    figures = json.loads(figures_file.read_text())["results"]["none"]
    right = [llava_says_no(answers["none", i]) == (rows[i][1] == "no") for _, i in answers]
    assert figures["all"]["accuracy"] == sum(right) / 3
    assert {split: f["questions"] for split, f in figures["splits"].items()} == {
        "adversarial": 1, "popular": 1, "random": 1}
    assert "precision" in result.stdout and "F1" in result.stdout


# ------------------------------------------------------------------------------------------------------------
# Bad input: one sentence, exit code 2, before the model loads


def too_late(*args, **kwargs):
    raise AssertionError("the model was loaded before the bad input was noticed")


def one_error_line(err):
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


def bad_cases(root, local_set):
    """{name: (args, words the sentence must hold)}; `root` holds the broken files."""
    def data_folder(name, lines, images=()):
        folder = root / name
        folder.mkdir()
        (folder / "questions.jsonl").write_text("".join(line + "\n" for line in lines))
        for image in images:
            shutil.copy(local_set / "cat.png", folder / image)
        return str(folder)

    good = json.dumps({"id": 1, "image": "cat.png", "question": "What is it?", "answers": ["cat"]})
    (root / "empty").mkdir()
    (root / "syntax.py").write_text("def rule(inputs)\n    return None\n")
    (root / "fine.py").write_text("def rule(inputs):\n    return None\n")
    (root / "folder").mkdir()
    data = ["--data", str(local_set)]
    return {
        "unknown task": (["--task", "textvqa"], ["Unknown task 'textvqa'", "lmms-eval"]),
        "task and data": (["--task", "pope", *data], ["not both"]),
        "limit zero": ([*data, "--limit", "0"], ["--limit", "at least 1"]),
        "limit negative": ([*data, "--limit", "-5"], ["--limit", "at least 1"]),
        "batch size zero": ([*data, "--batch-size", "0"], ["--batch-size", "at least 1"]),
        "missing data folder": (["--data", str(root / "nope")], ["no data folder", "nope"]),
        "data folder without questions": (["--data", str(root / "empty")], ["no questions.jsonl"]),
        "empty questions file": (["--data", data_folder("blank", ["", "  "])], ["holds no questions"]),
        "broken line": (["--data", data_folder("broken", [good, "", '{"id": 2, "image": '], ["cat.png"])],
                        ["line 3", "questions.jsonl"]),
        "line without answers": (["--data", data_folder("no_answers", [good, json.dumps(
            {"id": 2, "image": "cat.png", "question": "Q"})], ["cat.png"])], ["line 2", '"answers"']),
        "repeated id": (["--data", data_folder("twice", [good, good], ["cat.png"])], ["line 2", "unique"]),
        "missing image": (["--data", data_folder("no_image", [good])], ["cat.png", "does not exist"]),
        "unreadable image": (["--data", data_folder("text_image", [good])], ["cat.png", "cannot be read"]),
        "unknown setting": ([*data, "--settings", "none,K2"], ["Unknown setting 'K2'", "K2R0.5"]),
        "another unknown setting": ([*data, "--settings", "fast"], ["Unknown setting 'fast'"]),
        "r out of range": ([*data, "--settings", "K2R1.5"], ["r", "[0, 1)", "1.5"]),
        "k zero": ([*data, "--settings", "K0R0.5"], ["k", ">= 1", "got 0"]),
        "k too large for the model": ([*data, "--settings", "K9R0.5"], ["K9R0.5", "4 layers"]),
        "unknown rule": ([*data, "--rule", "magic"], ["Unknown rule 'magic'", "no_rope"]),
        "rule file missing": ([*data, "--rule", f"{root}/nope.py:rule"], ["no file", "nope.py"]),
        "rule file that does not import": ([*data, "--rule", f"{root}/syntax.py:rule"],
                                           ["syntax.py", "cannot be imported", "SyntaxError"]),
        "rule function missing": ([*data, "--rule", f"{root}/fine.py:other"], ["fine.py", "no function other"]),
        "resume file missing": ([*data, "--resume", str(root / "nope.jsonl")], ["nope.jsonl", "no such file"]),
        "resume file of something else": ([*data, "--resume", str(root / "syntax.py")], ["not an answers file"]),
        "answers file exists": ([*data, "--answers", str(root / "fine.py")], ["exists", "--resume"]),
        "json under a file": ([*data, "--json", str(root / "fine.py" / "out.json")], ["--json", "cannot be written"]),
        "svg is a folder": ([*data, "--svg", str(root / "folder")], ["--svg", "cannot be written"]),
        "svg under a file": ([*data, "--svg", str(root / "fine.py" / "x" / "a.svg")], ["--svg", "fine.py"]),
        "answers under a file": ([*data, "--answers", str(root / "fine.py" / "a.jsonl")], ["--answers", "fine.py"]),
        "answers is a folder": ([*data, "--answers", str(root / "folder")], ["--answers", "is a folder"]),
        "resume is a folder": ([*data, "--resume", str(root / "folder")], ["--resume", "is a folder"]),
        "resume and answers": ([*data, "--resume", str(root / "fine.py"), "--answers", str(root / "new.jsonl")],
                               ["--answers", "--resume", "not both"]),
        "json under a file, before POPE is read": (["--limit", "3", "--json", str(root / "fine.py" / "f.json")],
                                                   ["--json", "fine.py"]),
        "resume missing, before POPE is read": (["--resume", str(root / "nope.jsonl")], ["--resume", "no such file"]),
        "no new tokens": ([*data, "--max-new-tokens", "0"], ["--max-new-tokens", "at least 1"]),
        "new tokens past the context": ([*data, "--max-new-tokens", str(2**64)], ["--max-new-tokens", "context"]),
        "seed negative": ([*data, "--seed", "-1"], ["--seed", "[0, 2**64)", "-1"]),
        "seed too large": ([*data, "--seed", str(2**64)], ["--seed", "[0, 2**64)"]),
        "pyarrow missing": (["--limit", "3"], ["pip install pyarrow"]),
        "hub unreachable": (["--limit", "3"], ["POPE could not be downloaded", "--data"]),
    }


BAD_CASES = ["unknown task", "task and data", "limit zero", "limit negative", "batch size zero", "missing data folder",
             "data folder without questions", "empty questions file", "broken line", "line without answers",
             "repeated id", "missing image", "unreadable image", "unknown setting", "another unknown setting",
             "r out of range", "k zero", "k too large for the model", "unknown rule", "rule file missing",
             "rule file that does not import", "rule function missing", "resume file missing",
             "resume file of something else", "answers file exists", "json under a file", "svg is a folder",
             "svg under a file", "answers under a file", "answers is a folder", "resume is a folder",
             "resume and answers", "json under a file, before POPE is read", "resume missing, before POPE is read",
             "no new tokens", "new tokens past the context", "seed negative", "seed too large",
             "pyarrow missing", "hub unreachable"]


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda case: case.replace(" ", "-").replace(",", ""))
def test_bad_input_is_one_sentence_and_exit_code_2(case, local_set, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    args, words = bad_cases(tmp_path, local_set)[case]
    if case == "unreadable image":
        (tmp_path / "text_image" / "cat.png").write_text("not a picture")
    if case == "hub unreachable":
        pytest.importorskip("pyarrow")  # without it, the missing pyarrow is said first
    if case == "pyarrow missing":
        monkeypatch.setitem(sys.modules, "pyarrow", None)
        monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network: fail at once
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(cli, "load_model", too_late)
    monkeypatch.chdir(tmp_path)  # a default answers file would land here
    assert evaluation.command(["--model", "tiny", "--device", "cpu", *args]) == 2
    error = one_error_line(capsys.readouterr().err)
    for word in words:
        assert word in error, error
    assert not list(tmp_path.glob("eval-*.jsonl"))  # no answers file for a run that never started


def test_a_rule_failing_mid_run_is_one_sentence_and_keeps_the_answers(local_set, tmp_path, capsys):
    (tmp_path / "bad_rule.py").write_text("def keep_one(inputs):\n    return inputs.image_positions[:, :1]\n")
    answers_file = tmp_path / "answers.jsonl"
    args = ["--model", "tiny", "--device", "cpu", "--data", str(local_set), "--max-new-tokens", str(NEW_TOKENS),
            "--rule", f"{tmp_path}/bad_rule.py:keep_one", "--answers", str(answers_file)]
    assert evaluation.command(args) == 2
    assert "pruning rule must return" in one_error_line(capsys.readouterr().err)
    header, answers = read_jsonl(answers_file)  # what was answered before the rule ran is kept
    assert header["rules"] == [f"{tmp_path}/bad_rule.py:keep_one"]
    assert len(answers) == 1 and next(iter(answers))[0] == "none"  # the first batch's answer without FastV


def test_help_states_the_protocol(capsys):
    with pytest.raises(SystemExit):
        evaluation.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("greedy", "A chat between a curious user", "Answer the question using a single word or phrase.",
                  "Wilson score interval", "eval_pope", "pip install pyarrow", "--resume"):
        assert words in text, words
    assert "--system" in text and "vicuna_v1" in text and "records which" in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        evaluation.main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f"minifastv {minifastv.__version__}"


def test_system_prompt_changes_the_ids(local_set, tiny, tmp_path, monkeypatch):
    """--system vicuna_v1 (the default), none, llava_v1: the prompt the model reads, token for token."""
    model, tokenizer, _ = tiny

    class Stop(Exception):
        pass

    seen = []

    def first_batch(model, tokenizer, prompts, *args):  # the prompts are all we want: stop there
        seen.append(prompts[0])
        raise Stop

    monkeypatch.setattr(evaluation, "answer_batch", first_batch)
    question = evaluation.sample(evaluation.read_local_set(local_set), 1, seed=0)[0].question  # the one asked
    for number, system in enumerate((None, "vicuna_v1", "none", "llava_v1")):
        args = ["--model", "tiny", "--device", "cpu", "--data", str(local_set), "--limit", "1", "--settings", "none",
                "--answers", str(tmp_path / f"{number}.jsonl")] + ["--system", system] * bool(system)
        with pytest.raises(Stop):
            evaluation.main(args, out=io.StringIO())
        text = format_prompt(question + "\nAnswer the question using a single word or phrase.",
                             system=SYSTEM_PROMPTS.get(system or "vicuna_v1"))
        assert torch.equal(seen[-1], encode_prompt(tokenizer, text, model.config.image_tokens_per_image)), system
        assert read_jsonl(tmp_path / f"{number}.jsonl")[0]["system"] == (system or "vicuna_v1")
    assert torch.equal(seen[0], seen[1])  # vicuna_v1 is the default
    assert len({tuple(ids[0].tolist()) for ids in seen}) == 3


def test_ctrl_c_keeps_the_answers_and_exits_130(reference, local_set, tmp_path, capsys, monkeypatch):
    """Ctrl-C in the second batch: exit code 130, one line, and the first batch's answers kept for --resume."""
    answers_file = tmp_path / "answers.jsonl"
    real, calls = evaluation.answer_batch, []

    def ctrl_c_in_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:  # none, K2R0.5 fastv, K2R0.5 random: one batch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "answer_batch", ctrl_c_in_the_second_batch)
    code = evaluation.command(REFERENCE_ARGS + ["--data", str(local_set), "--answers", str(answers_file)])
    err = capsys.readouterr().err
    assert code == 130 and err.rstrip("\n").endswith("\ninterrupted (Ctrl-C)") and "Traceback" not in err, err
    assert f"--resume {answers_file}" in err  # said before the answers began
    header, answers = read_jsonl(answers_file)
    _, everything = read_jsonl(reference[0]["answers.jsonl"])
    assert header["system"] == "vicuna_v1" and len(answers) == 3 and len({i for _, i in answers}) == 1
    assert all(everything[key] == answer for key, answer in answers.items())
