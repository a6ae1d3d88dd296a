"""The homework (homework/) ships unsolved, and its checks work: they skip on the starters, fail on wrong answers.

Each exercise is a starter the student fills in plus a check_*.py the student runs with pytest. The checks take
the exercise functions from the file named by MINIFASTV_HOMEWORK_FROM when it is set (homework/checking.py).
Here that file hands them the plausible wrong answers written below, each one mistake away from a right answer:
every check must fail on each of them, in the test aimed at that mistake, and pass the tests about what the
answer gets right. No right answer is written out in the repository, but these come close (exercise 1's are
built from right pieces put together with one wrong mask or one wrong way of voting), so the homework README
asks students to read this file after they are done.

That a right answer passes is shown in three ways that need none here: the checks' references are tested
against minifastv where an independent answer exists (the test_reference_* tests); every test a wrong answer
should pass, passes; and a teacher's solutions, kept outside the repository, run through the same variable with
    MINIFASTV_HOMEWORK_SOLUTIONS=~/solutions.py python -m pytest -q tests/test_homework.py
(test_right_answers_pass; skipped without it).
"""

import difflib
import importlib.util
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image

from minifastv.model import FastV, attention_rows, fastv_rule, visible_keys  # noqa: F401  (fastv_rule: a wrong answer)
from minifastv.rules import grid_rule  # noqa: F401  (a wrong answer to exercise 5)

ROOT = Path(__file__).resolve().parent.parent
HOMEWORK = ROOT / "homework"
SOLUTIONS_VARIABLE = "MINIFASTV_HOMEWORK_SOLUTIONS"

EXERCISES = {  # check file: (starter, {function: arguments that reach the student's code})
    "check_1_text_attention": ("text_attention_rule.py", {"all_text_tokens_rule": (None,), "all_tokens_rule": (None,)}),
    "check_2_pyramid": ("pyramid.py", {"pyramid_forward": (None, None, None, [(1, 0.5), (2, 0.5)])}),
    "check_3_cls_rule": ("cls_rule.py", {"make_cls_rule": (None, None)}),
    "check_4_agreement": ("agreement.py", {"agreement": (["a cat"], ["a dog"])}),
    "check_5_spread_rule": ("spread_rule.py", {"row_balanced_rule": (None,)}),
}
CHECK_OF = {function: check for check, (_, functions) in EXERCISES.items() for function in functions}
RULE_IDS = {"all_text_tokens_rule": "1a", "all_tokens_rule": "1b"}  # check 1 tests both rules: its test ids say which


# ----------------------------------------------------------------------------------------------------
# Plausible wrong answers. Exercise 1: the attention matrix built by hand (the mistakes are in its mask and
# softmax), and the two ways of voting of 1a and 1b.


def attention_by_hand(inputs, visible, heads_first=False):
    """Layer K-1's attention weights, mean over heads, (B, T, T), as a student writes them without attention_rows:
    softmax(q k^T / sqrt(D)) over the keys that `visible` (B, 1, T, T) allows; a row that sees nothing gets 0."""
    scores = inputs.queries @ inputs.keys.transpose(-1, -2) * inputs.queries.shape[-1] ** -0.5  # (B, H, T, T): H_kv = H
    if heads_first:
        scores = scores.mean(dim=1, keepdim=True)
    return scores.masked_fill(~visible, float("-inf")).softmax(dim=-1).nan_to_num(0.0).mean(dim=1)


def right_mask(inputs):  # what attention_rows uses: the real keys up to the query itself
    return visible_keys(inputs.attention_mask, inputs.queries.shape[2])


def is_image(inputs):  # (B, T)
    return torch.zeros_like(inputs.attention_mask, dtype=torch.bool).scatter(1, inputs.image_positions, True)


def top_image_tokens(received, inputs):  # received (B, T): what each key got; the top num_keep image tokens
    return received.gather(1, inputs.image_positions).topk(inputs.num_keep, dim=-1).indices


def text_votes(attention, inputs):  # 1a: the mean over every text row
    is_text = inputs.attention_mask.bool() & ~is_image(inputs)
    return top_image_tokens((attention * is_text[:, :, None]).sum(dim=1) / is_text.sum(dim=1, keepdim=True), inputs)


def visible_votes(attention, inputs):  # 1b: the mean over the rows that can see the token
    sees = right_mask(inputs)[:, 0] & inputs.attention_mask.bool()[:, :, None]  # (B, T, T): row i can see key j
    return top_image_tokens((attention * sees).sum(dim=1) / sees.sum(dim=1).clamp(min=1), inputs)


def strict_causal(inputs):  # a query may not look at itself: tril(-1) where tril() is right
    T = inputs.queries.shape[2]
    visible = torch.ones(T, T, dtype=torch.bool).tril(-1) & inputs.attention_mask.bool()[:, None, None, :]
    return attention_by_hand(inputs, visible)


def no_key_padding(inputs):  # causal only: real queries look at the left padding too
    T = inputs.queries.shape[2]
    return attention_by_hand(inputs, torch.ones(T, T, dtype=torch.bool).tril()[None, None])


def image_keys_only(inputs):  # the softmax over the image keys only, as if the text keys were not there
    return attention_by_hand(inputs, right_mask(inputs) & is_image(inputs)[:, None, None, :])


def heads_averaged_first(inputs):  # the scores averaged over the heads BEFORE the softmax, not the weights after it
    return attention_by_hand(inputs, right_mask(inputs), heads_first=True)


def votes_of_both_kinds(attention_of):
    """1a's and 1b's rule, voting on the attention matrix that `attention_of(inputs)` builds."""
    return (lambda inputs: text_votes(attention_of(inputs), inputs),
            lambda inputs: visible_votes(attention_of(inputs), inputs))


strict_causal_1a, strict_causal_1b = votes_of_both_kinds(strict_causal)
no_key_padding_1a, no_key_padding_1b = votes_of_both_kinds(no_key_padding)
image_keys_only_1a, image_keys_only_1b = votes_of_both_kinds(image_keys_only)
heads_averaged_first_1a, heads_averaged_first_1b = votes_of_both_kinds(heads_averaged_first)


def full_attention(inputs):  # the right matrix, from model.py: for the mistakes in the voting
    return attention_rows(inputs.queries, inputs.keys, inputs.attention_mask, num_rows=inputs.queries.shape[2]).mean(dim=1)


def text_rows_that_see_it_1a(inputs):  # 1a divided by the text rows AFTER the image token only, not by every text row
    sees = right_mask(inputs)[:, 0] & (inputs.attention_mask.bool() & ~is_image(inputs))[:, :, None]
    return top_image_tokens((full_attention(inputs) * sees).sum(dim=1) / sees.sum(dim=1).clamp(min=1), inputs)


def every_row_counts_1b(inputs):  # 1b divided by every real row, the rows that cannot see the token as zeros
    return top_image_tokens(full_attention(inputs).sum(dim=1) / inputs.attention_mask.sum(dim=1, keepdim=True), inputs)


def other_tokens_only_1b(inputs):  # 1b without the token's own row ("from all OTHER tokens")
    T = inputs.queries.shape[2]
    sees = right_mask(inputs)[:, 0] & inputs.attention_mask.bool()[:, :, None] & ~torch.eye(T, dtype=torch.bool)
    return top_image_tokens((full_attention(inputs) * sees).sum(dim=1) / sees.sum(dim=1).clamp(min=1), inputs)


# Exercise 2. No pyramid loop is written out here (that would be a solution): each mistake is shown on the first
# stage alone, through minifastv's own forward, made to do what the student's loop gets wrong.


def first_stage_only(model, input_ids, pixel_values, schedule):  # the later stages forgotten
    return model(input_ids, pixel_values, fastv=FastV(*schedule[0]), last_logits_only=True)[:, -1]


def renumbered_positions(model, input_ids, pixel_values, schedule):  # the kept tokens get positions 0 .. T_kept - 1
    own_rope = model.rope  # forward turns each token by rope(positions): feed it the renumbered ones instead
    model.rope = lambda positions, dtype: own_rope(torch.arange(positions.shape[1]).expand_as(positions), dtype)
    try:
        return first_stage_only(model, input_ids, pixel_values, schedule)
    finally:
        del model.rope


def prunes_one_layer_late(model, input_ids, pixel_values, schedule):  # pruned after layer k ran: ranked by layer k
    k, r = schedule[0]
    late = FastV(k + 1, r) if k + 1 < len(model.language_model.layers) else None  # after the last layer: no effect
    return model(input_ids, pixel_values, fastv=late, last_logits_only=True)[:, -1]


def heads_first_rule(inputs):  # FastV's score with the heads averaged before the softmax
    scores = inputs.queries[:, :, -1:] @ inputs.keys.transpose(-1, -2) * inputs.queries.shape[-1] ** -0.5
    scores = scores.mean(dim=1, keepdim=True).masked_fill(~visible_keys(inputs.attention_mask, 1), float("-inf"))
    return top_image_tokens(scores.softmax(dim=-1)[:, 0, 0], inputs)


def heads_averaged_first_pyramid(model, input_ids, pixel_values, schedule):
    return model(input_ids, pixel_values, fastv=FastV(*schedule[0], rule=heads_first_rule), last_logits_only=True)[:, -1]


# Exercise 3. The mistakes are in which layer, row and columns are read; they are shown on transformers' CLIP
# attention (the check's own reference path, for the check's tiny model), so no minifastv solution is written here.


@torch.no_grad()
def clip_attention(model, pixel_values, layers_back=1):
    """transformers' attention weights (images, H, 1 + P, 1 + P) of a CLIP layer: layers_back=1 the last layer that
    LLaVA runs (the right one), 2 the one before it, 0 the one after it."""
    import checking  # inside a check run: its tiny models, minifastv's and transformers' with the same weights

    tiny = checking._built["tiny"]
    assert model is tiny.ours
    attentions = tiny.hf.model.vision_tower(pixel_values, output_attentions=True).attentions
    layers_run = model.config.vision_feature_layer % (len(attentions) + 1)
    return attentions[layers_run - layers_back]


def keep_top(scores):  # (images, P) scores -> a rule that keeps each prompt's top num_keep
    return lambda inputs: scores.reshape(inputs.image_positions.shape[0], -1).topk(inputs.num_keep, dim=-1).indices


def first_tokens(model, pixel_values):  # never looks at CLIP: the first num_keep image tokens
    return lambda inputs: torch.arange(inputs.num_keep).expand(inputs.image_positions.shape[0], -1)


def cls_column_off_by_one(model, pixel_values):  # keys 0 .. P-1: CLS itself in, the last patch out
    return keep_top(clip_attention(model, pixel_values)[:, :, 0, :-1].mean(dim=1))


def clip_layer_one_early(model, pixel_values):  # the layer before the one whose output LLaVA reads
    return keep_top(clip_attention(model, pixel_values, layers_back=2)[:, :, 0, 1:].mean(dim=1))


def clip_layer_one_late(model, pixel_values):  # the layer after it, which LLaVA never runs
    return keep_top(clip_attention(model, pixel_values, layers_back=0)[:, :, 0, 1:].mean(dim=1))


def softmax_over_patches_only(model, pixel_values):  # each head's weights renormalized over the patches, CLS key left out
    patches = clip_attention(model, pixel_values)[:, :, 0, 1:]
    return keep_top((patches / patches.sum(dim=-1, keepdim=True)).mean(dim=1))


def patches_attending_to_cls(model, pixel_values):  # the CLS column (what each patch pays CLS), not CLS's row
    return keep_top(clip_attention(model, pixel_values)[:, :, 1:, 0].mean(dim=1))


# Exercises 4 and 5.


def always_agree(answers_plain, answers_pruned):  # full agreement, whatever the answers
    return {"exact_match": 1.0, "token_f1": 1.0}


def character_similarity(answers_plain, answers_pruned):  # difflib's ratio of characters in place of the F1 of words
    pairs = list(zip(answers_plain, answers_pruned))
    return {"exact_match": sum(plain == pruned for plain, pruned in pairs) / len(pairs),
            "token_f1": sum(difflib.SequenceMatcher(None, plain, pruned).ratio() for plain, pruned in pairs) / len(pairs)}


@dataclass
class WrongAnswer:
    function: str  # the exercise function it stands in for
    answer: str  # its name in this file
    fails: list  # tests (name prefixes) of its check that must fail, in at least one of their cases each
    passes: list = field(default_factory=list)  # tests (name prefixes) that must pass in all their cases


MATCH_1 = "test_matches_transformers_attention_matrix"
WRONG_ANSWERS = [
    WrongAnswer("all_text_tokens_rule", "fastv_rule", [MATCH_1, "test_differs_from_the_last_token_rule"],
                ["test_keeps_the_requested", "test_generates"]),
    WrongAnswer("all_text_tokens_rule", "strict_causal_1a", [MATCH_1], ["test_keeps_the_requested", "test_differs"]),
    WrongAnswer("all_text_tokens_rule", "no_key_padding_1a", [f"{MATCH_1}[left-padded"], [f"{MATCH_1}[same-length"]),
    WrongAnswer("all_text_tokens_rule", "image_keys_only_1a", [MATCH_1], ["test_keeps_the_requested", "test_generates"]),
    WrongAnswer("all_text_tokens_rule", "heads_averaged_first_1a", [MATCH_1], ["test_keeps_the_requested", "test_differs"]),
    WrongAnswer("all_text_tokens_rule", "text_rows_that_see_it_1a", [f"{MATCH_1}[same-length-2", f"{MATCH_1}[left-padded-2"],
                [f"{MATCH_1}[same-length-1", f"{MATCH_1}[left-padded-1"]),  # one image: the same text rows see every token
    WrongAnswer("all_tokens_rule", "fastv_rule", [MATCH_1, "test_differs_from_the_last_token_rule"],
                ["test_keeps_the_requested", "test_generates"]),
    WrongAnswer("all_tokens_rule", "strict_causal_1b", [MATCH_1], ["test_keeps_the_requested", "test_differs"]),
    WrongAnswer("all_tokens_rule", "no_key_padding_1b", [f"{MATCH_1}[left-padded"], [f"{MATCH_1}[same-length"]),
    WrongAnswer("all_tokens_rule", "image_keys_only_1b", [MATCH_1], ["test_keeps_the_requested", "test_generates"]),
    WrongAnswer("all_tokens_rule", "heads_averaged_first_1b", [MATCH_1], ["test_keeps_the_requested", "test_differs"]),
    WrongAnswer("all_tokens_rule", "every_row_counts_1b", [MATCH_1], ["test_keeps_the_requested", "test_differs"]),
    WrongAnswer("all_tokens_rule", "other_tokens_only_1b", [MATCH_1], ["test_keeps_the_requested", "test_differs"]),
    WrongAnswer("pyramid_forward", "first_stage_only",
                ["test_two_stages_match_reference", "test_image_tokens_left_after_each_stage", "test_pruning_twice"],
                ["test_one_stage_is_fastv"]),
    WrongAnswer("pyramid_forward", "renumbered_positions", ["test_one_stage_is_fastv"]),
    WrongAnswer("pyramid_forward", "prunes_one_layer_late", ["test_one_stage_is_fastv"]),
    WrongAnswer("pyramid_forward", "heads_averaged_first_pyramid", ["test_one_stage_is_fastv"]),
    WrongAnswer("make_cls_rule", "first_tokens", ["test_matches_transformers_clip_attention"],
                ["test_keeps_the_requested_number", "test_choice_does_not_depend"]),
    WrongAnswer("make_cls_rule", "cls_column_off_by_one", ["test_matches_transformers_clip_attention"],
                ["test_keeps_the_requested_number", "test_choice_does_not_depend"]),
    WrongAnswer("make_cls_rule", "clip_layer_one_early", ["test_matches_transformers_clip_attention"],
                ["test_keeps_the_requested_number", "test_choice_does_not_depend"]),
    WrongAnswer("make_cls_rule", "clip_layer_one_late", ["test_matches_transformers_clip_attention"],
                ["test_keeps_the_requested_number", "test_choice_does_not_depend"]),
    WrongAnswer("make_cls_rule", "softmax_over_patches_only", ["test_matches_transformers_clip_attention"],
                ["test_keeps_the_requested_number", "test_choice_does_not_depend"]),
    WrongAnswer("make_cls_rule", "patches_attending_to_cls", ["test_matches_transformers_clip_attention"],
                ["test_keeps_the_requested_number", "test_choice_does_not_depend"]),
    WrongAnswer("agreement", "always_agree", ["test_answers_without_a_common_word", "test_hand_made_case"],
                ["test_identical_answers", "test_script_runs_on_a_folder"]),
    WrongAnswer("agreement", "character_similarity", ["test_hand_made_case", "test_uneven_lengths", "test_bad_lists"],
                ["test_identical_answers", "test_script_runs_on_a_folder"]),
    WrongAnswer("row_balanced_rule", "fastv_rule", ["test_every_row_keeps_its_share", "test_spreads_more_than_fastv"],
                ["test_each_row_keeps_its_best_patches"]),
    WrongAnswer("row_balanced_rule", "grid_rule", ["test_each_row_keeps_its_best_patches"]),
]


def wrong_answer_id(wrong):
    return f"{RULE_IDS.get(wrong.function, CHECK_OF[wrong.function].split('_')[1])}-{wrong.answer}"


def rounds():
    """The wrong answers in rounds: round i gives every exercise function its i-th wrong answer (one file, one run)."""
    by_function = {}
    for wrong in WRONG_ANSWERS:
        by_function.setdefault(wrong.function, []).append(wrong)
    return [[answers[i] for answers in by_function.values() if i < len(answers)]
            for i in range(max(len(answers) for answers in by_function.values()))]


def substitute_file(path, wrong_answers):
    """A MINIFASTV_HOMEWORK_FROM file that hands the checks these wrong answers, taken from this test file."""
    lines = ['"""Plausible wrong answers from tests/test_homework.py: each check must fail on them."""',
             "import importlib.util", "",
             f"spec = importlib.util.spec_from_file_location('homework_wrong_answers', {str(Path(__file__))!r})",
             "wrong = importlib.util.module_from_spec(spec)", "spec.loader.exec_module(wrong)", ""]
    lines += [f"{wrong.function} = wrong.{wrong.answer}" for wrong in wrong_answers]
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------
# Running the checks: each run is one pytest session over some check files, with or without a substitute file.
# A run costs a second or two, but starting Python with torch and transformers and building the tiny models costs
# more, so one process (the driver) runs many sessions one after the other, re-importing the check files each
# time: they read MINIFASTV_HOMEWORK_FROM when imported. homework/checking.py keeps the models between sessions.

DRIVER = """
import json, os, sys
import pytest

for run in json.loads(sys.argv[1]):
    for name in [name for name in sys.modules if name.startswith("check_")]:
        del sys.modules[name]
    os.environ.pop("MINIFASTV_HOMEWORK_FROM", None)
    if run["substitute"]:
        os.environ["MINIFASTV_HOMEWORK_FROM"] = run["substitute"]
    print("=== run " + run["name"], flush=True)
    pytest.main([*run["checks"], "-q", "--tb=short", "-p", "no:cacheprovider", "-p", "no:unraisableexception",
                 "--basetemp", run["basetemp"], "--junitxml", run["report"]])
    sys.stdout.flush()
"""


def drive(runs):
    """Run `runs` in one driver process: {name: (output, {check: [(test, outcome, message)]})}."""
    env = {key: value for key, value in os.environ.items() if key != "MINIFASTV_HOMEWORK_FROM"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")  # tiny models: one thread each, two drivers side by side
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    outputs = dict(re.findall(r"^=== run (\S+)\n(.*?)(?=^=== run |\Z)", result.stdout, flags=re.S | re.M))
    found = {}
    for run in runs:
        report = Path(run["report"])
        assert report.is_file(), f"run {run['name']} left no report:\n{result.stdout}\n{result.stderr}"
        outcomes = {}
        for case in ET.parse(report).iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("skipped", "failure", "error"):
                element = case.find(tag)
                if element is not None:
                    outcome, message = tag, element.get("message", "")
            outcomes.setdefault(case.get("classname").rsplit(".", 1)[-1], []).append((case.get("name"), outcome, message))
        found[run["name"]] = (outputs.get(run["name"], "") + result.stderr, outcomes)
    return found


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models of this file run faster on one thread than on two that wait for each other (and the checks
    run in two processes beside these tests, one thread each)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def check_runs(tmp_path_factory):
    """The checks on the starters as shipped, on every round of wrong answers, and on a teacher's solutions when
    MINIFASTV_HOMEWORK_SOLUTIONS names them: split over two driver processes that run side by side."""
    folder = tmp_path_factory.mktemp("check_runs")

    def run(name, checks, substitute=None):
        return {"name": name, "checks": [f"homework/{check}.py" for check in checks], "report": str(folder / f"{name}.xml"),
                "basetemp": str(folder / f"tmp-{name}"), "substitute": str(substitute) if substitute else None}

    runs = [run("starters", sorted(EXERCISES))]
    for index, wrong_answers in enumerate(rounds()):
        checks = sorted({CHECK_OF[wrong.function] for wrong in wrong_answers})
        runs.append(run(f"wrong-{index}", checks, substitute_file(folder / f"wrong_{index}.py", wrong_answers)))
    solutions = os.environ.get(SOLUTIONS_VARIABLE)
    if solutions:
        runs.append(run("solutions", sorted(EXERCISES), Path(solutions).expanduser().resolve()))
    with ThreadPoolExecutor(2) as pool:
        halves = [pool.submit(drive, runs[0::2]), pool.submit(drive, runs[1::2])]
        return {name: found for half in halves for name, found in half.result().items()}


def test_every_check_has_its_exercise():
    assert sorted(path.stem for path in HOMEWORK.glob("check_*.py")) == sorted(EXERCISES)
    assert (HOMEWORK / "README.md").is_file()
    assert {wrong.function for wrong in WRONG_ANSWERS} == set(CHECK_OF), "every exercise function has wrong answers"


def test_readme_names_every_exercise_with_a_time_and_a_question():
    readme = (HOMEWORK / "README.md").read_text()
    for check, (starter, functions) in EXERCISES.items():
        assert f"python -m pytest homework/{check}.py" in readme and f"(`{starter}`)" in readme
        assert all(f"`{function}" in readme for function in functions), functions
    table = [line.split("|")[1:-1] for line in readme.splitlines() if re.match(r"\| \d \| \[", line)]
    assert [int(order) for order, *_ in table] == list(range(1, len(EXERCISES) + 1)), "one row per exercise, in order"
    assert sorted(re.search(r"\[(\d)\.", name).group(1) for _, name, *_ in table) == ["1", "2", "3", "4", "5"]
    assert all(re.search(r"\d+(\.\d+)? h|\d+ min", time) and "?" in question for _, _, time, question in table), table


def load_starter(starter):
    spec = importlib.util.spec_from_file_location("homework_" + Path(starter).stem, HOMEWORK / starter)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("function", sorted(CHECK_OF))
def test_starter_is_unsolved(function):
    starter, functions = EXERCISES[CHECK_OF[function]]
    with pytest.raises(NotImplementedError, match=rf"^fill in {function}\(\) in homework/{starter} first"):
        getattr(load_starter(starter), function)(*functions[function])


def test_checks_skip_on_the_starters(check_runs):
    output, outcomes = check_runs["starters"]
    assert sorted(outcomes) == sorted(EXERCISES), output
    for check, cases in outcomes.items():
        starter, functions = EXERCISES[check]
        sentences = [f"fill in {function}() in homework/{starter} first" for function in functions]
        for name, outcome, message in cases:
            assert outcome == "skipped", f"{check}::{name} {outcome} on the unfilled starter:\n{output}"
            assert message.startswith(tuple(sentences)), message
        for sentence in sentences:  # what the student sees: the sentence, not just "skipped"
            assert sentence in output, output


def cases_of(check_runs, wrong):
    """The outcomes of the tests of `wrong`'s check that concern its function, in the run that tried it."""
    index = next(i for i, wrong_answers in enumerate(rounds()) if wrong in wrong_answers)
    output, outcomes = check_runs[f"wrong-{index}"]
    rule_id = RULE_IDS.get(wrong.function)
    cases = [case for case in outcomes.get(CHECK_OF[wrong.function], [])
             if rule_id is None or re.search(rf"[\[-]{rule_id}[\]-]", case[0])]
    return cases, output


@pytest.mark.parametrize("wrong", WRONG_ANSWERS, ids=wrong_answer_id)
def test_wrong_answer_fails_its_check(check_runs, wrong):
    cases, output = cases_of(check_runs, wrong)
    assert cases, f"no test of {CHECK_OF[wrong.function]} ran for {wrong.answer}:\n{output}"
    assert not [name for name, outcome, _ in cases if outcome in ("error", "skipped")], output
    for prefix in wrong.fails:
        matching = [outcome for name, outcome, _ in cases if name.startswith(prefix)]
        assert "failure" in matching, f"{wrong.answer}: {prefix} did not fail ({matching})\n{output}"
    for prefix in wrong.passes:
        matching = [(name, outcome, message) for name, outcome, message in cases if name.startswith(prefix)]
        assert matching and all(outcome == "passed" for _, outcome, _ in matching), f"{wrong.answer}: {matching}"


def test_right_answers_pass(check_runs):
    """A teacher's solutions, kept outside the repository (MINIFASTV_HOMEWORK_SOLUTIONS), pass every check."""
    if "solutions" not in check_runs:
        pytest.skip(f"set {SOLUTIONS_VARIABLE} to a file of solutions kept outside the repository to run this test")
    output, outcomes = check_runs["solutions"]
    assert sorted(outcomes) == sorted(EXERCISES), output
    not_passed = [(check, name, outcome) for check, cases in outcomes.items() for name, outcome, _ in cases if outcome != "passed"]
    assert not not_passed, f"{not_passed}\n{output}"


# ----------------------------------------------------------------------------------------------------
# The checks' references, tested against minifastv where an independent answer exists.


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    """The check modules, imported here (homework/ on sys.path while they import), and the tiny models."""
    sys.path.insert(0, str(HOMEWORK))
    try:
        import checking

        modules = {name: checking.load_file(HOMEWORK / f"{name}.py", f"homework_{name}") for name in EXERCISES}
    finally:
        sys.path.remove(str(HOMEWORK))
    modules["tiny"] = checking.build_tiny(tmp_path_factory.mktemp("tiny-llava"))
    modules["checking"] = checking
    return modules


def test_reference_1_of_the_last_row_is_fastvs_score(checks):
    """check 1's reference, asked for the last token's row alone, gives FastV's own scores: the same layer, columns
    and padding handling as minifastv's fastv_rule, on left-padded prompts with two images."""
    check, checking, tiny = checks["check_1_text_attention"], checks["checking"], checks["tiny"]
    ids, mask, pixels = tiny.batch(seed=3, num_images=2, pad=True)
    with torch.no_grad():
        attentions = tiny.hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                             output_attentions=True, logits_to_keep=1, use_cache=False).attentions
    for k in (1, 2, 3):
        inputs = checking.pruning_inputs(tiny.ours, ids, mask, pixels, k)
        fastv_scores = inputs.last_token_attention.mean(dim=1).gather(1, inputs.image_positions)  # (B, N)
        for prompt in range(len(ids)):
            scores = check.reference_scores(attentions[k - 1][prompt].float().mean(dim=0), ids[prompt], mask[prompt],
                                            tiny.image_token_id, "last")
            torch.testing.assert_close(scores, fastv_scores[prompt], atol=1e-6, rtol=1e-5, msg=f"K={k}, prompt {prompt}")


def test_reference_2_with_one_stage_is_fastv(checks):
    """check 2's reference (tokens hidden by masks, never removed) equals minifastv's FastV (tokens removed): with one
    stage, and with two where one of them drops nothing (R=0)."""
    check, tiny = checks["check_2_pyramid"], checks["tiny"]
    ids, pixels = check.prompts(tiny, num_images=2, batch_size=2, seed=7)
    for schedule, fastv in (([(1, 0.75)], FastV(1, 0.75)), ([(1, 0.0), (3, 0.5)], FastV(3, 0.5)),
                            ([(2, 0.25), (3, 0.0)], FastV(2, 0.25))):
        with torch.no_grad():
            expected = tiny.ours(ids, pixels, fastv=fastv, last_logits_only=True)[:, -1]
        difference = (check.reference_pyramid(tiny, ids, pixels, schedule) - expected).abs().max().item()
        assert difference < 1e-4, f"{schedule}: {difference}"  # transformers' layers and minifastv's round differently


def test_reference_3_reads_the_layer_llava_reads(checks):
    """check 3's reference reads the attention of the CLIP layer whose output is the hidden state LLaVA feeds the
    projector, and that hidden state is what minifastv's vision tower returns."""
    tiny = checks["tiny"]
    vision, pixels = tiny.hf.model.vision_tower, checks["checking"].test_helpers.random_pixels(2)
    captured = {}
    with torch.no_grad():
        out = vision(pixels, output_attentions=True, output_hidden_states=True)
        layers_run = tiny.hf.config.vision_feature_layer % (len(out.attentions) + 1)  # as the reference computes it
        hook = vision.encoder.layers[layers_run - 1].register_forward_hook(lambda m, a, output: captured.update(out=output))
        vision(pixels)
        hook.remove()
        ours = tiny.ours.vision_tower(pixels, tiny.ours.config.vision_feature_layer)
    layer_output = captured["out"][0] if isinstance(captured["out"], tuple) else captured["out"]
    torch.testing.assert_close(layer_output, out.hidden_states[tiny.hf.config.vision_feature_layer])
    torch.testing.assert_close(ours, layer_output, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# The given part of exercise 4.


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
