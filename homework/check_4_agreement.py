"""Check exercise 4 (homework/agreement.py): python -m pytest homework/check_4_agreement.py

`agreement` on lists whose answer is known by hand, then the whole script on a tiny checkpoint and a
folder of three generated images.
"""

import pytest
from PIL import Image

import minifastv
import minifastv.model as M
from minifastv.image import ImageProcessorConfig, preprocess
from minifastv.prompt import Tokenizer, encode_prompt, format_prompt

# tiny_checkpoint: a pytest fixture
from checking import exercise, load_starter, require, tiny_checkpoint  # noqa: F401

agreement = exercise("agreement.py", "agreement")


def assert_metrics(metrics, exact_match, token_f1, what):
    """agreement's answer on `what` (a few words on the lists) must be these two numbers."""
    require(set(metrics) >= {"exact_match", "token_f1"},
            f"agreement should return a dict with the keys exact_match and token_f1; yours has "
            f"{sorted(metrics)}")
    for name, expected in (("exact_match", exact_match), ("token_f1", token_f1)):
        require(metrics[name] == pytest.approx(expected),
                f"for {what}, {name} should be {expected:.3f}; yours is {metrics[name]:.3f}")


def test_identical_answers_agree_fully():
    answers = ["A cat on a red chair.", "Two dogs.", "yes", ""]
    assert_metrics(agreement(answers, list(answers)), 1.0, 1.0,
                   "identical answers (an empty one included)")


def test_answers_without_a_common_word_do_not_agree():
    assert_metrics(
        agreement(["a cat", "red", "one two three"], ["the dog", "blue", "four"]), 0.0, 0.0,
        "answers that share no word"
    )


def test_hand_made_case():
    plain = ["a cat on a mat", "a dog", "yes", "a a b", "two red cars"]
    pruned = ["a cat on the mat", "a dog", "no", "a c a", "two cars red"]
    # F1 per pair: 4 words shared of 5 and 5 -> 0.8; 1.0; 0.0; 2 shared of 3 and 3 -> 2/3;
    # the same words in another order -> 1.0
    assert_metrics(agreement(plain, pruned), 1 / 5, (0.8 + 1.0 + 0.0 + 2 / 3 + 1.0) / 5,
                   "five pairs (repeated words count as often as both answers have them; the "
                   "order of the words does not count)")


def test_uneven_lengths_count():
    # "the cat" vs "the black cat": 2 shared, precision 2/3 (pruned), recall 2/2 (plain) -> F1 0.8
    assert_metrics(agreement(["the cat"], ["the black cat"]), 0.0, 0.8,
                   "'the cat' against 'the black cat'")
    assert_metrics(agreement(["the black cat"], ["the cat"]), 0.0, 0.8,
                   "'the black cat' against 'the cat'")


def test_case_and_punctuation_count():
    # "Cat," and "cat" are different words: only "a" is shared of 2 and 2 -> F1 0.5
    assert_metrics(agreement(["a Cat,"], ["a cat"]), 0.0, 0.5,
                   "'a Cat,' against 'a cat' ('Cat,' and 'cat' are different words)")


def test_empty_answers():
    # two empty answers agree
    assert_metrics(agreement(["", "a b"], ["", "a c"]), 0.5, (1.0 + 0.5) / 2,
                   "two empty answers and a half-shared pair")
    assert_metrics(agreement([""], ["something"]), 0.0, 0.0, "an empty answer against a word")


def refuses(answers_plain, answers_pruned):
    """Does agreement raise ValueError on these lists?"""
    try:
        agreement(answers_plain, answers_pruned)
    except ValueError:
        return True
    return False


def test_bad_lists_are_refused():
    require(refuses(["a", "b"], ["a"]),
            "agreement(['a', 'b'], ['a']) should raise ValueError: the lists differ in length")
    require(refuses([], []), "agreement([], []) should raise ValueError: there is nothing to score")


def write_images(folder):
    folder.mkdir()
    Image.new("RGB", (120, 90), (200, 30, 30)).save(folder / "red.png")
    Image.radial_gradient("L").convert("RGB").save(folder / "gradient.jpg")
    Image.effect_noise((100, 100), 60).convert("RGB").save(folder / "noise.png")
    (folder / "notes.txt").write_text("not an image: the script skips it")
    return sorted(["red.png", "gradient.jpg", "noise.png"])


def answers(checkpoint, images, prompt, fastv, max_new_tokens):
    """The answers the script should find, computed here from the library calls."""
    model = minifastv.load(checkpoint, device="cpu", progress=False)
    tokenizer = Tokenizer.from_folder(checkpoint)
    ids = encode_prompt(tokenizer, format_prompt(prompt), model.config.image_tokens_per_image)
    found = []
    for image in images:
        pixels = preprocess([image], ImageProcessorConfig.from_folder(checkpoint))
        found.append(tokenizer.decode(
            minifastv.generate(model, ids, pixels, max_new_tokens=max_new_tokens,
                               fastv=fastv)[0].tolist()
        ).strip())
    return found


def test_script_runs_on_a_folder(tiny_checkpoint, tmp_path, capsys):
    agreement(["a probe"], ["a probe"])  # an unfilled starter skips here, before the slow part
    script = load_starter("agreement.py")  # main() is what `python homework/agreement.py ...` runs
    # the function under test (yours, or the one MINIFASTV_HOMEWORK_FROM names)
    script.agreement = agreement
    names = write_images(tmp_path / "images")
    metrics = script.main(["--model", str(tiny_checkpoint), "--images", str(tmp_path / "images"),
                           "--prompt", "What is this?", "--k", "2", "--r", "0.75",
                           "--max-new-tokens", "5", "--device", "cpu"])
    out = capsys.readouterr().out
    missing = [name for name in names if f"{name}: " not in out]
    require(not missing, f"the script's output names no answer for {', '.join(missing)}")
    require("notes.txt" not in out, "the script answered about notes.txt, which is not an image")
    images = [tmp_path / "images" / name for name in names]
    plain = answers(tiny_checkpoint, images, "What is this?", None, 5)
    pruned = answers(tiny_checkpoint, images, "What is this?", M.FastV(2, 0.75), 5)
    require(metrics == agreement(plain, pruned),
            "the script's metrics are not agreement() of the answers generated here without and "
            "with FastV(2, 0.75)")
    require(f"exact_match: {metrics['exact_match']:.3f}" in out
            and f"token_f1: {metrics['token_f1']:.3f}" in out,
            "the script does not print the two metrics it returns")
