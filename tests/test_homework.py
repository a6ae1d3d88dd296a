"""The homework (homework/) ships unsolved, and its checks work: they skip on the starters, fail on wrong answers.

Each exercise is a starter the student fills in plus a check_*.py the student runs with pytest. The checks
take the exercise functions from the file named by MINIFASTV_HOMEWORK_FROM when it is set (see
homework/checking.py); here that file holds plausible wrong answers, never a solution: no solution is in
the repository, the tests included.
"""

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
HOMEWORK = ROOT / "homework"

EXERCISES = {  # check file: (starter, function, arguments that reach the student's code)
    "check_1_text_attention": ("text_attention_rule.py", "all_text_tokens_rule", (None,)),
    "check_2_pyramid": ("pyramid.py", "pyramid_forward", (None, None, None, [(1, 0.5), (2, 0.5)])),
    "check_3_cls_rule": ("cls_rule.py", "make_cls_rule", (None, None)),
    "check_4_agreement": ("agreement.py", "agreement", (["a cat"], ["a dog"])),
    "check_5_spread_rule": ("spread_rule.py", "row_balanced_rule", (None,)),
}

WRONG_ANSWERS = '''\
"""Plausible wrong answers, one per exercise: each check must fail on them."""
import torch

from minifastv.model import FastV, fastv_rule

all_text_tokens_rule = fastv_rule  # 1: the last token's attention alone, FastV's own rule
row_balanced_rule = fastv_rule  # 5: FastV's top-k, not spread over the rows


def pyramid_forward(model, input_ids, pixel_values, schedule):
    return model(input_ids, pixel_values, fastv=FastV(*schedule[0]))[:, -1]  # 2: the first stage only


def make_cls_rule(model, pixel_values):  # 3: never looks at CLIP: the first num_keep image tokens
    return lambda inputs: torch.arange(inputs.num_keep).expand(inputs.image_positions.shape[0], -1)


def agreement(answers_plain, answers_pruned):  # 4: always full agreement
    return {"exact_match": 1.0, "token_f1": 1.0}
'''

MUST_FAIL = {  # tests that the wrong answers above must fail, in at least one of their cases (more may fail)
    "check_1_text_attention": ["test_matches_transformers_attention_matrix", "test_differs_from_the_last_token_rule"],
    "check_2_pyramid": ["test_two_stages_match_reference", "test_image_tokens_left_after_each_stage"],
    "check_3_cls_rule": ["test_matches_transformers_clip_attention"],
    "check_4_agreement": ["test_answers_without_a_common_word_do_not_agree", "test_hand_made_case"],
    "check_5_spread_rule": ["test_every_row_keeps_its_share", "test_spreads_more_than_fastv"],
}
MUST_PASS = {  # ... and the parts they do get right must still pass: the checks test what they claim
    "check_2_pyramid": ["test_one_stage_is_fastv"],
    "check_4_agreement": ["test_script_runs_on_a_folder"],
}


def load_starter(starter):
    spec = importlib.util.spec_from_file_location("homework_" + Path(starter).stem, HOMEWORK / starter)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_check_has_its_exercise():
    assert sorted(path.stem for path in HOMEWORK.glob("check_*.py")) == sorted(EXERCISES)
    assert (HOMEWORK / "README.md").is_file()


@pytest.mark.parametrize("check", sorted(EXERCISES))
def test_starter_is_unsolved(check):
    starter, function, arguments = EXERCISES[check]
    with pytest.raises(NotImplementedError, match=rf"^fill in {function}\(\) in homework/{starter} first"):
        getattr(load_starter(starter), function)(*arguments)


def run_checks(folder, substitute=None):
    """Run `python -m pytest homework` in a subprocess: (exit code, output, {check: [(test, outcome, message)]})."""
    env = {key: value for key, value in os.environ.items() if key != "MINIFASTV_HOMEWORK_FROM"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")  # tiny models: one thread each, two runs side by side
    if substitute is not None:
        env["MINIFASTV_HOMEWORK_FROM"] = str(substitute)
    report = folder / "report.xml"
    result = subprocess.run([sys.executable, "-m", "pytest", "homework", "-q", "-p", "no:cacheprovider",
                             f"--junitxml={report}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("skipped", "failure", "error"):
            element = case.find(tag)
            if element is not None:
                outcome, message = tag, element.get("message", "")
        outcomes.setdefault(case.get("classname").rsplit(".", 1)[-1], []).append((case.get("name"), outcome, message))
    return result.returncode, result.stdout + result.stderr, outcomes


@pytest.fixture(scope="module")
def check_runs(tmp_path_factory):
    """The checks run on the starters as shipped, and on the wrong answers; both at once."""
    starters, wrong = tmp_path_factory.mktemp("starters"), tmp_path_factory.mktemp("wrong")
    (wrong / "wrong_answers.py").write_text(WRONG_ANSWERS)
    with ThreadPoolExecutor(2) as pool:
        runs = pool.submit(run_checks, starters), pool.submit(run_checks, wrong, wrong / "wrong_answers.py")
        return {"starters": runs[0].result(), "wrong": runs[1].result()}


def test_checks_skip_on_the_starters(check_runs):
    returncode, output, outcomes = check_runs["starters"]
    assert returncode == 0, output
    assert sorted(outcomes) == sorted(EXERCISES), output
    for check, cases in outcomes.items():
        starter, function, _ = EXERCISES[check]
        for name, outcome, message in cases:
            assert outcome == "skipped", f"{check}::{name} {outcome} on the unfilled starter:\n{output}"
            assert message.startswith(f"fill in {function}() in homework/{starter} first"), message
        # what the student sees with the README's plain command, no extra flags: the sentence, not just "skipped"
        assert f"fill in {function}() in homework/{starter} first" in output, output


def test_checks_fail_on_wrong_answers(check_runs):
    returncode, output, outcomes = check_runs["wrong"]
    assert returncode == 1, output
    assert sorted(outcomes) == sorted(EXERCISES), output
    for check, cases in outcomes.items():
        assert not [name for name, outcome, _ in cases if outcome in ("error", "skipped")], f"{check}:\n{output}"
        for prefix in MUST_FAIL[check]:
            matching = [outcome for name, outcome, _ in cases if name.startswith(prefix)]
            assert "failure" in matching, f"{check}::{prefix}: {matching}\n{output}"
        for prefix in MUST_PASS.get(check, []):
            matching = [outcome for name, outcome, _ in cases if name.startswith(prefix)]
            assert matching and all(outcome == "passed" for outcome in matching), f"{check}::{prefix}: {matching}\n{output}"


def test_agreement_script_runs_on_a_folder(cli_checkpoint, tmp_path, capsys):
    """The given part of exercise 4 (load, loop, print), with a stand-in for the student's `agreement`."""
    script = load_starter("agreement.py")
    calls = []

    def stand_in(answers_plain, answers_pruned):  # valid output, not a solution
        calls.append((answers_plain, answers_pruned))
        return {"exact_match": 0.5, "token_f1": 0.25}

    script.agreement = stand_in
    images = tmp_path / "images"
    images.mkdir()
    for name, color in (("b.png", (0, 0, 255)), ("a.jpg", (255, 0, 0)), ("c.bmp", (0, 255, 0))):
        Image.new("RGB", (100, 80), color).save(images / name)
    (images / "readme.txt").write_text("not an image")
    metrics = script.main(["--model", str(cli_checkpoint), "--images", str(images), "--max-new-tokens", "3",
                           "--device", "cpu"])
    out = capsys.readouterr().out
    assert metrics == {"exact_match": 0.5, "token_f1": 0.25}
    assert len(calls) == 1 and len(calls[0][0]) == len(calls[0][1]) == 3
    assert [line.split(":")[0] for line in out.splitlines() if not line.startswith((" ", "-"))][:3] == ["a.jpg", "b.png", "c.bmp"]
    assert "exact_match: 0.500" in out and "token_f1: 0.250" in out


def test_agreement_script_starts_as_a_script(tmp_path):
    result = subprocess.run([sys.executable, str(HOMEWORK / "agreement.py"), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--images" in result.stdout
