"""The homework (homework/) ships unsolved, and its checks work: they skip on the starters, fail on
wrong answers, and say what differs in words.

Each exercise is a starter the student fills in plus a check_*.py the student runs with pytest. The
checks take the exercise functions from the file named by MINIFASTV_HOMEWORK_FROM when it is set
(homework/checking.py). Here that file hands them the plausible wrong answers written below: every
check must fail on each of them, in the test aimed at that mistake, with a message that names the
mistake in words, and pass the tests about what the answer gets right.

No right answer is written out here, and none can be put together from what is here. The wrong
answers of exercises 1 and 3 are each check's own reference, with one thing changed: transformers'
layer runs with a wrong mask or without RoPE, the scores come from the wrong layer or are divided
by a wrong count, CLIP's attention is read one column off. They work only on the check's own
prompts and its own tiny model, which they look up (LookupError anywhere else): put back together
unchanged, they give the check's answer key for its own prompts, and each check also tests on
prompts or a model of its own (test_generates_end_to_end of check 1, test_reads_the_layer_... of
check 3), which no such composition passes. Exercise 2's are minifastv's FastV with one stage
changed, exercises 4 and 5's are unrelated functions (always 1, difflib's ratio, FastV's rule, a
uniform grid).

That a right answer passes is shown in three ways that need none here: the checks' references are
tested against minifastv where an independent answer exists (the test_reference_* tests); every
test a wrong answer should pass, passes; and a teacher's solutions, kept outside the repository, run
through the same variable with
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

from minifastv.model import FastV, fastv_rule, visible_keys  # noqa: F401  (fastv_rule: wrong)
from minifastv.rules import grid_rule  # noqa: F401  (a wrong answer to exercise 5)

ROOT = Path(__file__).resolve().parent.parent
HOMEWORK = ROOT / "homework"
SOLUTIONS_VARIABLE = "MINIFASTV_HOMEWORK_SOLUTIONS"

EXERCISES = {  # check file: (starter, {function: arguments that reach the student's code})
    "check_1_text_attention": ("text_attention_rule.py",
                               {"all_text_tokens_rule": (None,), "all_tokens_rule": (None,)}),
    "check_2_pyramid": ("pyramid.py",
                        {"pyramid_forward": (None, None, None, [(1, 0.5), (2, 0.5)])}),
    "check_3_cls_rule": ("cls_rule.py", {"make_cls_rule": (None, None)}),
    "check_4_agreement": ("agreement.py", {"agreement": (["a cat"], ["a dog"])}),
    "check_5_spread_rule": ("spread_rule.py", {"row_balanced_rule": (None,)}),
}
CHECK_OF = {function: check for check, (_, functions) in EXERCISES.items()
            for function in functions}
# check 1 tests both rules: its test ids say which
RULE_IDS = {"all_text_tokens_rule": "1a", "all_tokens_rule": "1b"}


# ------------------------------------------------------------------------------------------------
# Plausible wrong answers. They run inside a check's pytest session, where homework/checking.py and
# the check module are imported: `session(name)` finds them there.


def session(name):
    """A module of the check run that calls this wrong answer: "checking", "check_1_...", ..."""
    return sys.modules[name]


def keep_top(scores, inputs):
    """A rule's answer: each prompt's top num_keep of `scores` (B, N)."""
    return scores.reshape(inputs.image_positions.shape[0], -1).topk(inputs.num_keep, dim=-1).indices


# Exercise 1: check 1's reference_scores (transformers' attention weights of layer K-1, the voting
# rows read column by column), changed in one place.


def check_1_case(inputs):
    """The case of check 1 (its prompt batch, K and reference) whose PruningInputs these are."""
    for key, cases in session("checking")._built.items():
        for case in cases if isinstance(key, tuple) and key[0] == "check 1" else ():
            if (case.inputs.queries.shape == inputs.queries.shape
                    and torch.equal(case.inputs.queries, inputs.queries)):
                return case
    raise LookupError("exercise 1's wrong answers know only the prompts of check 1's match test")


_changed_scores = {}


def changed_reference(inputs, voters, change, layers_late=0):
    """Check 1's reference scores (B, N) for the prompts `inputs` come from, with transformers'
    scored layer run on the keyword arguments change(case, kwargs) returns in place of its own,
    and `layers_late` layers after K-1."""
    case = check_1_case(inputs)
    key = (id(case), change, layers_late)
    if key not in _changed_scores:
        tiny, layer = session("checking")._built["tiny"], case.k - 1 + layers_late
        hook = tiny.hf.model.language_model.layers[layer].register_forward_pre_hook(
            lambda module, args, kwargs: (args, {**kwargs, **change(case, kwargs)}),
            with_kwargs=True)
        try:
            _changed_scores[key] = session("check_1_text_attention").reference_scores(
                tiny.hf, case.ids, case.mask, case.pixels, layer, tiny.image_token_id)
        finally:
            hook.remove()
    return _changed_scores[key][voters]


def image_mask(case):  # (B, T) booleans: the image tokens
    return torch.zeros_like(case.mask, dtype=torch.bool).scatter(1, case.inputs.image_positions,
                                                                 True)


def shown(visible):  # (B, T, T) booleans: the additive mask of transformers' eager attention
    return {"attention_mask": torch.zeros(visible.shape)
            .masked_fill(~visible, torch.finfo(torch.float32).min)[:, None]}


def nothing(case, kwargs):  # the layer as it is: for the mistakes in the voting
    return {}


def strict_causal(case, kwargs):  # a query may not look at itself: tril(-1) where tril() is right
    causal = torch.ones(case.ids.shape[1], case.ids.shape[1], dtype=torch.bool).tril(-1)
    return shown(causal & case.mask.bool()[:, None, :])


def no_key_padding(case, kwargs):  # causal only: real queries look at the left padding too
    causal = torch.ones(case.ids.shape[1], case.ids.shape[1], dtype=torch.bool).tril()
    return shown(causal.expand(len(case.ids), -1, -1))


def image_keys_only(case, kwargs):  # the softmax over the image keys only, the text keys left out
    causal = torch.ones(case.ids.shape[1], case.ids.shape[1], dtype=torch.bool).tril()
    return shown(causal & (case.mask.bool() & image_mask(case))[:, None, :])


def no_rope(case, kwargs):  # queries and keys not turned by their positions
    cos, sin = kwargs["position_embeddings"]
    return {"position_embeddings": (torch.ones_like(cos), torch.zeros_like(sin))}


def with_both_votes(change, layers_late=0):
    """1a's and 1b's wrong answers: each way of voting, on a changed reference."""
    return (lambda inputs: keep_top(changed_reference(inputs, "text", change, layers_late), inputs),
            lambda inputs: keep_top(changed_reference(inputs, "all", change, layers_late), inputs))


strict_causal_1a, strict_causal_1b = with_both_votes(strict_causal)
no_key_padding_1a, no_key_padding_1b = with_both_votes(no_key_padding)
image_keys_only_1a, image_keys_only_1b = with_both_votes(image_keys_only)
no_rope_1a, no_rope_1b = with_both_votes(no_rope)
one_layer_late_1a, one_layer_late_1b = with_both_votes(nothing, layers_late=1)  # layer K's rows
text_votes_1b, every_token_votes_1a = with_both_votes(nothing)  # each the other's way of voting


def rows_at_or_after(rows, inputs):  # (B, N): how many of `rows` (B, T) sit at or after each token
    return rows.flip(-1).cumsum(-1).flip(-1).gather(1, inputs.image_positions)


def text_rows_that_see_it_1a(inputs):  # 1a divided by the text rows AFTER the token only
    is_text = inputs.attention_mask.bool() & ~image_mask(check_1_case(inputs))
    text_total = changed_reference(inputs, "text", nothing)  # the total over the text, / a constant
    return keep_top(text_total / rows_at_or_after(is_text.long(), inputs), inputs)


def every_row_counts_1b(inputs):  # 1b divided by every real row: those that cannot see it count 0
    mean_over_seers = changed_reference(inputs, "all", nothing)
    return keep_top(mean_over_seers * rows_at_or_after(inputs.attention_mask, inputs), inputs)


# Exercise 2. No pyramid loop is written out here (that would be a solution): each mistake is shown
# on the first stage alone, through minifastv's own forward, made to do what the student's loop
# gets wrong.


def first_stage_only(model, input_ids, pixel_values, schedule):  # the later stages forgotten
    return model(input_ids, pixel_values, fastv=FastV(*schedule[0]), last_logits_only=True)[:, -1]


def renumbered_positions(model, input_ids, pixel_values, schedule):  # kept tokens: 0 .. T_kept - 1
    own_rope = model.rope  # forward turns each token by rope(positions): feed it renumbered ones

    def renumbered(positions, dtype):
        return own_rope(torch.arange(positions.shape[1]).expand_as(positions), dtype)

    model.rope = renumbered
    try:
        return first_stage_only(model, input_ids, pixel_values, schedule)
    finally:
        del model.rope


def prunes_one_layer_late(model, input_ids, pixel_values, schedule):  # ranked by layer k, not k-1
    k, r = schedule[0]
    # after the last layer: no effect
    late = FastV(k + 1, r) if k + 1 < len(model.language_model.layers) else None
    return model(input_ids, pixel_values, fastv=late, last_logits_only=True)[:, -1]


def heads_first_rule(inputs):  # FastV's score with the heads averaged before the softmax
    queries, keys = inputs.queries[:, :, -1:], inputs.keys
    scores = queries @ keys.transpose(-1, -2) * queries.shape[-1] ** -0.5  # (B, H, 1, T)
    hidden = ~visible_keys(inputs.attention_mask, 1)  # (B, 1, 1, T)
    scores = scores.mean(dim=1, keepdim=True).masked_fill(hidden, float("-inf"))
    return keep_top(scores.softmax(dim=-1)[:, 0, 0].gather(1, inputs.image_positions), inputs)


def heads_averaged_first_pyramid(model, input_ids, pixel_values, schedule):
    fastv = FastV(*schedule[0], rule=heads_first_rule)
    return model(input_ids, pixel_values, fastv=fastv, last_logits_only=True)[:, -1]


# Exercise 3: check 3's reference_scores (transformers' CLIP attention weights), changed in one
# place: the layer read, or the weights CLIP reports (a hook changes them on their way out).


def changed_clip_reference(model, pixel_values, change, layers_back=1):
    """Check 3's reference scores (images, P) of these images, with every CLIP layer of the
    check's tiny model reporting change(weights) as its attention weights."""
    tiny = session("checking")._built["tiny"]
    if model is not tiny.ours:
        raise LookupError("exercise 3's wrong answers know only check 3's own tiny model")
    hooks = [layer.self_attn.register_forward_hook(
        lambda module, args, output: (output[0], change(output[1])), prepend=True)
        for layer in tiny.hf.model.vision_tower.encoder.layers]
    try:
        with torch.no_grad():
            return session("check_3_cls_rule").reference_scores(tiny.hf, pixel_values, layers_back)
    finally:
        for hook in hooks:
            hook.remove()


def unchanged(weights):  # the weights as they are: for the mistakes in the layer
    return weights


def with_change(change, layers_back=1):
    """A wrong make_cls_rule: keep the top of the changed reference."""
    def make_rule(model, pixel_values):
        scores = changed_clip_reference(model, pixel_values, change, layers_back)
        return lambda inputs: keep_top(scores, inputs)
    return make_rule


def first_tokens(model, pixel_values):  # never looks at CLIP: the first num_keep image tokens
    return lambda inputs: torch.arange(inputs.num_keep).expand(inputs.image_positions.shape[0], -1)


# keys 0 .. P-1: CLS itself in, the last patch out (every column read one to the left)
cls_column_off_by_one = with_change(lambda weights: weights.roll(1, dims=-1))
clip_layer_one_early = with_change(unchanged, layers_back=2)  # the layer before LLaVA's
clip_layer_one_late = with_change(unchanged, layers_back=0)  # the layer after it, never run
# each head's weights renormalized over the patches, the CLS key left out
softmax_over_patches_only = with_change(
    lambda weights: weights[..., 1:].sum(-1, keepdim=True).reciprocal()
    * weights.index_fill(-1, torch.tensor([0]), 0.0))
# the CLS column (what each patch pays CLS), not CLS's row
patches_attending_to_cls = with_change(lambda weights: weights.transpose(-1, -2))


# Exercises 4 and 5.


def always_agree(answers_plain, answers_pruned):  # full agreement, whatever the answers
    return {"exact_match": 1.0, "token_f1": 1.0}


def character_similarity(answers_plain, answers_pruned):  # difflib's ratio of characters, not F1
    pairs = list(zip(answers_plain, answers_pruned))
    ratios = [difflib.SequenceMatcher(None, plain, pruned).ratio() for plain, pruned in pairs]
    return {"exact_match": sum(plain == pruned for plain, pruned in pairs) / len(pairs),
            "token_f1": sum(ratios) / len(pairs)}


@dataclass
class WrongAnswer:
    function: str  # the exercise function it stands in for
    answer: str  # its name in this file
    fails: list  # tests (name prefixes) of its check that must fail, in at least one case each
    passes: list = field(default_factory=list)  # tests (name prefixes) that must pass in all cases
    says: str = ""  # words that the message of one of its failures must hold: the mistake named


MATCH_1, MATCH_3 = "test_matches_transformers_attention_matrix", "test_matches_transformers_clip"
KEEPS_3, SAME_3 = "test_keeps_the_requested_number", "test_choice_does_not_depend"
STAGES_2 = ["test_two_stages_match_reference", "test_image_tokens_left_after_each_stage",
            "test_pruning_twice"]
ONE_IMAGE_1 = [f"{MATCH_1}[same-length-1", f"{MATCH_1}[left-padded-1"]
TWO_IMAGES_1 = [f"{MATCH_1}[same-length-2", f"{MATCH_1}[left-padded-2"]
WRONG_ANSWERS = [
    WrongAnswer("all_text_tokens_rule", "fastv_rule",
                [MATCH_1, "test_differs_from_the_last_token_rule", "test_generates"],
                ["test_keeps_the_requested"], says="the last token alone"),
    WrongAnswer("all_text_tokens_rule", "strict_causal_1a", [MATCH_1], ["test_differs"]),
    WrongAnswer("all_text_tokens_rule", "no_key_padding_1a", [f"{MATCH_1}[left-padded"],
                [f"{MATCH_1}[same-length"], says="Only prompts with left padding go wrong"),
    WrongAnswer("all_text_tokens_rule", "image_keys_only_1a", [MATCH_1], ["test_differs"]),
    WrongAnswer("all_text_tokens_rule", "no_rope_1a", [MATCH_1], ["test_differs"]),
    WrongAnswer("all_text_tokens_rule", "one_layer_late_1a", [MATCH_1], ["test_differs"]),
    WrongAnswer("all_text_tokens_rule", "every_token_votes_1a", [MATCH_1], ["test_differs"],
                says="every row that can see the token"),
    # one image: the same text rows see every image token
    WrongAnswer("all_text_tokens_rule", "text_rows_that_see_it_1a", TWO_IMAGES_1, ONE_IMAGE_1),
    WrongAnswer("all_tokens_rule", "fastv_rule",
                [MATCH_1, "test_differs_from_the_last_token_rule", "test_generates"],
                ["test_keeps_the_requested"], says="the last token alone"),
    WrongAnswer("all_tokens_rule", "strict_causal_1b", [MATCH_1], ["test_differs"]),
    WrongAnswer("all_tokens_rule", "no_key_padding_1b", [f"{MATCH_1}[left-padded"],
                [f"{MATCH_1}[same-length"], says="Only prompts with left padding go wrong"),
    WrongAnswer("all_tokens_rule", "image_keys_only_1b", [MATCH_1], ["test_differs"]),
    WrongAnswer("all_tokens_rule", "no_rope_1b", [MATCH_1], ["test_differs"]),
    WrongAnswer("all_tokens_rule", "one_layer_late_1b", [MATCH_1], ["test_differs"]),
    WrongAnswer("all_tokens_rule", "text_votes_1b", [MATCH_1], ["test_differs"],
                says="every text row"),
    WrongAnswer("all_tokens_rule", "every_row_counts_1b", [MATCH_1], ["test_differs"]),
    WrongAnswer("pyramid_forward", "first_stage_only", STAGES_2, ["test_one_stage_is_fastv"],
                says="the first stage's alone"),
    WrongAnswer("pyramid_forward", "renumbered_positions", ["test_one_stage_is_fastv"],
                says="original positions"),
    WrongAnswer("pyramid_forward", "prunes_one_layer_late", ["test_one_stage_is_fastv"],
                says="one layer late"),
    WrongAnswer("pyramid_forward", "heads_averaged_first_pyramid", ["test_one_stage_is_fastv"],
                says="mean over heads after the softmax"),
    WrongAnswer("make_cls_rule", "first_tokens", [MATCH_3, "test_generates"], [KEEPS_3, SAME_3]),
    WrongAnswer("make_cls_rule", "cls_column_off_by_one", [MATCH_3, "test_generates"],
                [KEEPS_3, SAME_3], says="the columns are off by one"),
    WrongAnswer("make_cls_rule", "clip_layer_one_early", [MATCH_3, "test_reads_the_layer"],
                [KEEPS_3, SAME_3], says="the CLIP layer before the one LLaVA reads"),
    WrongAnswer("make_cls_rule", "clip_layer_one_late", [MATCH_3], [KEEPS_3, SAME_3],
                says="the CLIP layer after the one LLaVA reads"),
    WrongAnswer("make_cls_rule", "softmax_over_patches_only", [MATCH_3], [KEEPS_3, SAME_3]),
    WrongAnswer("make_cls_rule", "patches_attending_to_cls", [MATCH_3], [KEEPS_3, SAME_3],
                says="not CLS's row"),
    WrongAnswer("agreement", "always_agree",
                ["test_answers_without_a_common_word", "test_hand_made_case"],
                ["test_identical_answers", "test_script_runs_on_a_folder"],
                says="for answers that share no word, exact_match should be 0.000"),
    WrongAnswer("agreement", "character_similarity",
                ["test_hand_made_case", "test_uneven_lengths", "test_bad_lists"],
                ["test_identical_answers", "test_script_runs_on_a_folder"],
                says="should raise ValueError"),
    WrongAnswer("row_balanced_rule", "fastv_rule",
                ["test_every_row_keeps_its_share", "test_spreads_more_than_fastv"],
                ["test_each_row_keeps_its_best_patches"], says="every row should keep at least"),
    WrongAnswer("row_balanced_rule", "grid_rule", ["test_each_row_keeps_its_best_patches"],
                says="drops a better-scored one of the same row"),
]


def wrong_answer_id(wrong):
    return f"{RULE_IDS.get(wrong.function, CHECK_OF[wrong.function].split('_')[1])}-{wrong.answer}"


def rounds():
    """The wrong answers in rounds: round i gives every exercise function its i-th wrong answer (one
    file, one run)."""
    by_function = {}
    for wrong in WRONG_ANSWERS:
        by_function.setdefault(wrong.function, []).append(wrong)
    return [[answers[i] for answers in by_function.values() if i < len(answers)]
            for i in range(max(len(answers) for answers in by_function.values()))]


def substitute_file(path, wrong_answers):
    """A MINIFASTV_HOMEWORK_FROM file that hands the checks these wrong answers, taken from this
    test file."""
    lines = ['"""Plausible wrong answers from tests/test_homework.py: each check must fail."""',
             "import importlib.util", "",
             f"spec = importlib.util.spec_from_file_location('homework_wrong_answers', "
             f"{str(Path(__file__))!r})",
             "wrong = importlib.util.module_from_spec(spec)", "spec.loader.exec_module(wrong)", ""]
    lines += [f"{wrong.function} = wrong.{wrong.answer}" for wrong in wrong_answers]
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# Running the checks: each run is one pytest session over some check files, with or without a
# substitute file. A run costs a second or two, but starting Python with torch and transformers and
# building the tiny models costs more, so one process (the driver) runs many sessions one after the
# other, re-importing the check files each time: they read MINIFASTV_HOMEWORK_FROM when imported.
# homework/checking.py keeps the models between sessions.

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
    pytest.main([*run["checks"], "-q", "--tb=short", "-p", "no:cacheprovider",
                 "-p", "no:unraisableexception", "--basetemp", run["basetemp"],
                 "--junitxml", run["report"]])
    sys.stdout.flush()
"""


def drive(runs):
    """Run `runs` in one driver process: {name: (output, {check: [(test, outcome, message)]})}."""
    env = {key: value for key, value in os.environ.items() if key != "MINIFASTV_HOMEWORK_FROM"}
    # tiny models: one thread each, two drivers side by side
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    outputs = dict(re.findall(r"^=== run (\S+)\n(.*?)(?=^=== run |\Z)", result.stdout,
                              flags=re.S | re.M))
    found = {}
    for run in runs:
        report = Path(run["report"])
        assert report.is_file(), (
            f"run {run['name']} left no report:\n{result.stdout}\n{result.stderr}"
        )
        outcomes = {}
        for case in ET.parse(report).iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("skipped", "failure", "error"):
                element = case.find(tag)
                if element is not None:
                    outcome, message = tag, element.get("message", "")
            outcomes.setdefault(case.get("classname").rsplit(".", 1)[-1], []).append(
                (case.get("name"), outcome, message))
        found[run["name"]] = (outputs.get(run["name"], "") + result.stderr, outcomes)
    return found


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models of this file run faster on one thread than on two that wait for each other
    (and the checks run in two processes beside these tests, one thread each)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def check_runs(tmp_path_factory):
    """The checks on the starters as shipped, on every round of wrong answers, and on a teacher's
    solutions when MINIFASTV_HOMEWORK_SOLUTIONS names them: split over two driver processes that run
    side by side."""
    folder = tmp_path_factory.mktemp("check_runs")

    def run(name, checks, substitute=None):
        return {"name": name, "checks": [f"homework/{check}.py" for check in checks],
                "report": str(folder / f"{name}.xml"), "basetemp": str(folder / f"tmp-{name}"),
                "substitute": str(substitute) if substitute else None}

    runs = [run("starters", sorted(EXERCISES))]
    for index, wrong_answers in enumerate(rounds()):
        checks = sorted({CHECK_OF[wrong.function] for wrong in wrong_answers})
        runs.append(run(f"wrong-{index}", checks,
                        substitute_file(folder / f"wrong_{index}.py", wrong_answers)))
    solutions = os.environ.get(SOLUTIONS_VARIABLE)
    if solutions:
        runs.append(run("solutions", sorted(EXERCISES), Path(solutions).expanduser().resolve()))
    with ThreadPoolExecutor(2) as pool:
        halves = [pool.submit(drive, runs[0::2]), pool.submit(drive, runs[1::2])]
        return {name: found for half in halves for name, found in half.result().items()}


def test_every_check_has_its_exercise():
    assert sorted(path.stem for path in HOMEWORK.glob("check_*.py")) == sorted(EXERCISES)
    assert (HOMEWORK / "README.md").is_file()
    assert {wrong.function for wrong in WRONG_ANSWERS} == set(CHECK_OF), (
        "every exercise function has wrong answers"
    )


def test_readme_names_every_exercise_with_a_time_and_a_question():
    readme = (HOMEWORK / "README.md").read_text()
    for check, (starter, functions) in EXERCISES.items():
        assert f"python -m pytest homework/{check}.py" in readme and f"(`{starter}`)" in readme
        assert all(f"`{function}" in readme for function in functions), functions
    table = [line.split("|")[1:-1] for line in readme.splitlines()
             if re.match(r"\| \d \| \[", line)]
    assert [int(order) for order, *_ in table] == list(range(1, len(EXERCISES) + 1)), (
        "one row per exercise, in order"
    )
    assert sorted(re.search(r"\[(\d)\.", name).group(1) for _, name, *_ in table) == [
        "1", "2", "3", "4", "5"]
    assert all(re.search(r"\d+(\.\d+)? h|\d+ min", time) and "?" in question
               for _, _, time, question in table), table


def test_readme_names_the_published_method_of_each_exercise():
    """Exercise 2 is PyramidDrop's idea, 3 FasterVLM's score, 5 FEATHER's coverage: each named with
    its arXiv number in the exercise's line of the README's list, and in its starter."""
    readme = (HOMEWORK / "README.md").read_text()
    lines = dict(re.findall(r"^- \*\*(\d)\. (.*?)(?=^- |^#)", readme, flags=re.S | re.M))
    assert sorted(lines) == ["1", "2", "3", "4", "5"], "one line per exercise"
    for number, method, arxiv, starter in (("2", "PyramidDrop", "2410.17247", "pyramid.py"),
                                           ("3", "FasterVLM", "2412.01818", "cls_rule.py"),
                                           ("5", "FEATHER", "2412.13180", "spread_rule.py")):
        assert method in lines[number] and arxiv in lines[number], (number, method)
        assert method in (HOMEWORK / starter).read_text(), (starter, method)


def load_starter(starter):
    spec = importlib.util.spec_from_file_location("homework_" + Path(starter).stem,
                                                  HOMEWORK / starter)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("function", sorted(CHECK_OF))
def test_starter_is_unsolved(function):
    starter, functions = EXERCISES[CHECK_OF[function]]
    with pytest.raises(NotImplementedError,
                       match=rf"^fill in {function}\(\) in homework/{starter} first"):
        getattr(load_starter(starter), function)(*functions[function])


def test_checks_skip_on_the_starters(check_runs):
    output, outcomes = check_runs["starters"]
    assert sorted(outcomes) == sorted(EXERCISES), output
    for check, cases in outcomes.items():
        starter, functions = EXERCISES[check]
        sentences = [f"fill in {function}() in homework/{starter} first" for function in functions]
        for name, outcome, message in cases:
            assert outcome == "skipped", (
                f"{check}::{name} {outcome} on the unfilled starter:\n{output}"
            )
            assert message.startswith(tuple(sentences)), message
        for sentence in sentences:  # what the student sees: the sentence, not just "skipped"
            assert sentence in output, output


def cases_of(check_runs, wrong):
    """The outcomes of the tests of `wrong`'s check that concern its function, in the run that tried
    it."""
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
        assert "failure" in matching, (
            f"{wrong.answer}: {prefix} did not fail ({matching})\n{output}"
        )
    for prefix in wrong.passes:
        matching = [(name, outcome, message) for name, outcome, message in cases
                    if name.startswith(prefix)]
        assert matching and all(outcome == "passed" for _, outcome, _ in matching), (
            f"{wrong.answer}: {matching}"
        )
    messages = [message for _, outcome, message in cases if outcome == "failure"]
    assert any(wrong.says in message for message in messages), (
        f"{wrong.answer}: no failure message says {wrong.says!r}:\n" + "\n".join(messages)
    )


@pytest.mark.parametrize("wrong", WRONG_ANSWERS, ids=wrong_answer_id)
def test_failure_messages_are_a_few_sentences(check_runs, wrong):
    """A check fails with a few sentences that say what differs in words and a few numbers: no
    traceback, no failed expression, no list of indices. (An exception the answer itself raises,
    such as the LookupError of exercises 1 and 3's wrong answers elsewhere, keeps its own.)"""
    cases, _ = cases_of(check_runs, wrong)
    for name, outcome, message in cases:
        if outcome != "failure" or not message.startswith(("Failed: ", "AssertionError")):
            continue
        assert message.startswith("Failed: "), f"{wrong.answer}, {name}: a bare assert:\n{message}"
        said = message.removeprefix("Failed: ")
        numbers = re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", said)
        assert len(said) <= 700 and said.count("\n") <= 4 and len(numbers) <= 16, (
            f"{wrong.answer}, {name}: {len(said)} characters, {len(numbers)} numbers:\n{said}"
        )
        assert not re.search(r"\[-?\d+(?:\.\d+)?(?:, -?\d+(?:\.\d+)?){3,}", said), (
            f"{wrong.answer}, {name}: a list of numbers:\n{said}"
        )


def test_right_answers_pass(check_runs):
    """A teacher's solutions, kept outside the repository (MINIFASTV_HOMEWORK_SOLUTIONS), pass every
    check."""
    if "solutions" not in check_runs:
        pytest.skip(f"set {SOLUTIONS_VARIABLE} to a file of solutions kept outside the repository "
                    f"to run this test")
    output, outcomes = check_runs["solutions"]
    assert sorted(outcomes) == sorted(EXERCISES), output
    not_passed = [(check, name, outcome) for check, cases in outcomes.items()
                  for name, outcome, _ in cases if outcome != "passed"]
    assert not not_passed, f"{not_passed}\n{output}"


# ------------------------------------------------------------------------------------------------
# The checks' references, tested against minifastv where an independent answer exists.


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    """The check modules, imported here (homework/ on sys.path while they import), and the tiny
    models."""
    sys.path.insert(0, str(HOMEWORK))
    try:
        import checking

        modules = {name: checking.load_file(HOMEWORK / f"{name}.py", f"homework_{name}")
                   for name in EXERCISES}
    finally:
        sys.path.remove(str(HOMEWORK))
    modules["tiny"] = checking.build_tiny(tmp_path_factory.mktemp("tiny-llava"))
    modules["other_tiny"] = checking.build_tiny(tmp_path_factory.mktemp("other-tiny-llava"),
                                                seed=1, vision_feature_layer=-1)
    modules["checking"] = checking
    return modules


def test_reference_1_of_the_last_row_is_fastvs_score(checks):
    """check 1's reference, asked for the last token's row alone, gives FastV's own scores: the
    same layer, columns and padding handling as minifastv's fastv_rule, on left-padded prompts with
    two images."""
    check, checking, tiny = checks["check_1_text_attention"], checks["checking"], checks["tiny"]
    ids, mask, pixels = tiny.batch(seed=3, num_images=2, pad=True)
    for k in (1, 2, 3):
        inputs = checking.pruning_inputs(tiny.ours, ids, mask, pixels, k)
        # (B, N)
        fastv_scores = inputs.last_token_attention.mean(dim=1).gather(1, inputs.image_positions)
        scores = check.reference_scores(tiny.hf, ids, mask, pixels, k - 1, tiny.image_token_id)
        torch.testing.assert_close(scores["last"], fastv_scores, atol=1e-6, rtol=1e-5,
                                   msg=f"K={k}")


def test_reference_2_with_one_stage_is_fastv(checks):
    """check 2's reference (tokens hidden by masks, never removed) equals minifastv's FastV (tokens
    removed): with one stage, and with two where one of them drops nothing (R=0)."""
    check, tiny = checks["check_2_pyramid"], checks["tiny"]
    ids, pixels = check.prompts(tiny, num_images=2, batch_size=2, seed=7)
    for schedule, fastv in (([(1, 0.75)], FastV(1, 0.75)), ([(1, 0.0), (3, 0.5)], FastV(3, 0.5)),
                            ([(2, 0.25), (3, 0.0)], FastV(2, 0.25))):
        with torch.no_grad():
            expected = tiny.ours(ids, pixels, fastv=fastv, last_logits_only=True)[:, -1]
        difference = (check.reference_pyramid(tiny, ids, pixels, schedule)
                      - expected).abs().max().item()
        # transformers' layers and minifastv's round differently
        assert difference < 1e-4, f"{schedule}: {difference}"


def test_reference_3_reads_the_layer_llava_reads(checks):
    """check 3's reference reads the attention of the CLIP layer whose output is the hidden state
    LLaVA feeds the projector, and that hidden state is what minifastv's vision tower returns; for
    the second to last layer (the tiny model) and for the last (check 3's other model)."""
    pixels = checks["checking"].test_helpers.random_pixels(2)
    for tiny in (checks["tiny"], checks["other_tiny"]):
        vision, captured = tiny.hf.model.vision_tower, {}
        with torch.no_grad():
            out = vision(pixels, output_attentions=True, output_hidden_states=True)
            # as the reference computes it
            layers_run = tiny.hf.config.vision_feature_layer % (len(out.attentions) + 1)
            layer = vision.encoder.layers[layers_run - 1]
            hook = layer.register_forward_hook(lambda m, a, output: captured.update(out=output))
            vision(pixels)
            hook.remove()
            ours = tiny.ours.vision_tower(pixels, tiny.ours.config.vision_feature_layer)
        output = captured["out"][0] if isinstance(captured["out"], tuple) else captured["out"]
        torch.testing.assert_close(output, out.hidden_states[tiny.hf.config.vision_feature_layer])
        torch.testing.assert_close(ours, output, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# The given part of exercise 4.


def write_three_images(folder):
    folder.mkdir()
    for name, color in (("b.png", (0, 0, 255)), ("a.jpg", (255, 0, 0)), ("c.bmp", (0, 255, 0))):
        Image.new("RGB", (100, 80), color).save(folder / name)
    (folder / "readme.txt").write_text("not an image")
    return folder


def test_agreement_script_runs_on_a_folder(cli_checkpoint, tmp_path, capsys):
    """The given part of exercise 4 (load, loop, print), with a stand-in for the student's
    `agreement`."""
    script = load_starter("agreement.py")
    calls = []

    def stand_in(answers_plain, answers_pruned):  # valid output, not a solution
        calls.append((answers_plain, answers_pruned))
        return {"exact_match": 0.5, "token_f1": 0.25}

    script.agreement = stand_in
    images = write_three_images(tmp_path / "images")
    metrics = script.main(["--model", str(cli_checkpoint), "--images", str(images),
                           "--max-new-tokens", "3", "--device", "cpu"])
    out = capsys.readouterr().out
    assert metrics == {"exact_match": 0.5, "token_f1": 0.25}
    # a probe before the slow part, then the answers: three pairs
    assert [len(plain) for plain, _ in calls] == [1, 3] and len(calls[1][1]) == 3
    names = [line.split(":")[0] for line in out.splitlines() if not line.startswith((" ", "-"))]
    assert names[:3] == ["a.jpg", "b.png", "c.bmp"]
    assert "exact_match: 0.500" in out and "token_f1: 0.250" in out


@pytest.mark.parametrize("system", [None, "llava_v1"])
def test_agreement_reuses_a_loaded_model(cli_checkpoint, tmp_path, system):
    """compare_on_folder answers with the model it is given (a notebook's 7B, already on the GPU):
    it loads none of its own, and its answers are those of minifastv.generate with and without
    FastV, on the prompt with the system prompt it is given (the notebook's), or none."""
    import minifastv
    from minifastv.image import ImageProcessorConfig, load_image, preprocess
    from minifastv.prompt import SYSTEM_PROMPTS, Tokenizer, encode_prompt, format_prompt

    system = system and SYSTEM_PROMPTS[system]
    script = load_starter("agreement.py")
    calls, prompts = [], []
    generate = script.generate

    def recording_generate(model, input_ids, *args, **kwargs):
        prompts.append(input_ids)
        return generate(model, input_ids, *args, **kwargs)

    script.generate = recording_generate

    def stand_in(answers_plain, answers_pruned):
        calls.append((answers_plain, answers_pruned))
        return {"exact_match": 0.0, "token_f1": 0.0}

    script.agreement = stand_in
    script.load = None  # loading a second model would fail here
    model = minifastv.load(cli_checkpoint, device="cpu", progress=False)
    images = write_three_images(tmp_path / "images")
    printed = tmp_path / "printed.txt"
    with printed.open("w") as out:
        metrics = script.compare_on_folder(model, cli_checkpoint, images, prompt="What is it?",
                                           k=1, r=0.75, max_new_tokens=3, out=out, system=system)
    assert metrics == {"exact_match": 0.0, "token_f1": 0.0}
    tokenizer = Tokenizer.from_folder(cli_checkpoint)
    prompt = format_prompt("What is it?", system=system)
    assert prompt.startswith("USER: ") == (system is None)
    ids = encode_prompt(tokenizer, prompt, model.config.image_tokens_per_image)
    processor = ImageProcessorConfig.from_folder(cli_checkpoint)
    plain, pruned = [], []
    for name in ("a.jpg", "b.png", "c.bmp"):
        pixels = preprocess([load_image(images / name)], processor)
        for answers, fastv in ((plain, None), (pruned, FastV(1, 0.75))):
            tokens = minifastv.generate(model, ids, pixels, max_new_tokens=3, fastv=fastv)
            answers.append(tokenizer.decode(tokens[0].tolist()).strip())
    assert calls[-1] == (plain, pruned)
    assert len(prompts) == 6 and all(torch.equal(used, ids) for used in prompts)
    assert "FastV K=1, R=0.75" in printed.read_text()


def test_the_readme_names_tutorial_sections_that_exist():
    """'tutorial chapter N, "Heading"' (and '... and "Heading"') points at a section of chapter N
    that begins with that heading: exercise 5's RoPE bias is in chapter 6's "What the rule favours"."""
    parts = re.split(r"^# (\d+)\. ", (ROOT / "tutorial.md").read_text(), flags=re.M)
    chapters = {int(number): body for number, body in zip(parts[1::2], parts[2::2])}
    readme = " ".join((HOMEWORK / "README.md").read_text().split())
    pointers = re.findall(r'tutorial chapter (\d+), ("[^"]+"(?: and "[^"]+")*)', readme)
    assert len(pointers) >= 4
    for number, headings in pointers:
        for heading in re.findall(r'"([^"]+)"', headings):
            assert re.search(rf"^## {re.escape(heading)}", chapters[int(number)], flags=re.M), \
                (number, heading)
    assert 'chapter 6, "What the rule favours: the bottom of the image"' in readme


def test_agreement_script_starts_as_a_script(tmp_path):
    result = subprocess.run([sys.executable, str(HOMEWORK / "agreement.py"), "--help"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--images" in result.stdout
