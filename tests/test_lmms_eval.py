"""minifastv as an lmms-eval model (minifastv/lmms_eval_model.py), where lmms-eval is installed.

lmms-eval stays out of requirements*.txt and CI: it brings a CUDA build of torch and several GB of
packages. Where it is missing these tests skip. To run them, make a separate virtual environment
(lmms-eval 0.7.3 imports filelock._api, which filelock 4 no longer has):
  python -m venv ../lmms-venv && ../lmms-venv/bin/pip install lmms-eval==0.7.3 "filelock<4" pytest
  PYTHONPATH=. ../lmms-venv/bin/python -m pytest -q tests/test_lmms_eval.py

The model answers a tiny local POPE (lmms-eval's own pope task, its prompt, settings and scorer,
on 4 questions about pictures made here) on the tiny random checkpoint, and its answers are those of
minifastv's `generate` one question at a time. minifastv.eval's POPE scoring (LLaVA's eval_pope)
agrees with lmms-eval's on the answers both read alike, and the differences are pinned down.
"""

from pathlib import Path

import pytest
import torch
from PIL import Image

lmms_eval = pytest.importorskip("lmms_eval")

import minifastv  # noqa: E402
from minifastv import eval as evaluation  # noqa: E402
from minifastv.errors import UsageError  # noqa: E402
from minifastv.generation import generate  # noqa: E402
from minifastv.image import ImageProcessorConfig, preprocess  # noqa: E402
from minifastv.model import FastV  # noqa: E402
from minifastv.prompt import SYSTEM_PROMPTS, Tokenizer, encode_prompt, format_prompt  # noqa: E402
from minifastv.tiny import tiny_checkpoint  # noqa: E402

TASK = "minifastv_tiny_pope"
NEW_TOKENS = 4  # the tiny model never says EOS: every answer is this long
# (question, answer, image size, colour): questions of different lengths, so that a batch is left-padded
QUESTIONS = [
    ("Is there a cat in the image?", "yes", (60, 40), (200, 120, 40)),
    ("Is there a red square in the middle of this picture, next to a white one?", "no", (50, 90), (220, 20, 20)),
    ("Is there a dog?", "no", (80, 80), (20, 20, 220)),
    ("Is there a person in the image?", "yes", (90, 30), (30, 160, 60)),
]
# lmms-eval's pope task with a local dataset in POPE's columns and shorter answers; the rest (prompt,
# greedy decoding, scorer) is lmms-eval's own pope.yaml, included.
TASK_YAML = """\
include: {pope_yaml}
task: {task}
dataset_path: {dataset}
dataset_kwargs:
  load_from_disk: true
test_split: test
generation_kwargs:
  max_new_tokens: {new_tokens}
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
"""


def picture(size, colour):
    image = Image.new("RGB", size, colour)
    image.paste((255, 255, 255), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return image


def write_tiny_pope(folder):
    """A folder lmms-eval reads with --include_path: the task's YAML and its dataset (POPE's columns,
    saved with datasets' save_to_disk). Returns the folder."""
    import datasets

    folder = Path(folder)
    rows = {"id": [], "question_id": [], "question": [], "answer": [], "image_source": [], "image": [],
            "category": []}
    for number, (question, answer, size, colour) in enumerate(QUESTIONS):
        for key, value in zip(rows, (str(number), str(number), question, answer, f"{number}.png",
                                     picture(size, colour), "adversarial")):
            rows[key].append(value)
    features = datasets.Features({key: datasets.Value("string") for key in rows} | {"image": datasets.Image()})
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
        folder / "dataset")
    pope_yaml = Path(lmms_eval.__file__).parent / "tasks" / "pope" / "pope.yaml"
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(pope_yaml=pope_yaml, task=TASK, dataset=folder / "dataset",
                                                          new_tokens=NEW_TOKENS))
    return folder


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    return write_tiny_pope(tmp_path_factory.mktemp("lmms_eval_task"))


@pytest.fixture(scope="module")
def tiny():
    folder = tiny_checkpoint()
    model = minifastv.load(folder, device="cpu", dtype=torch.float32, progress=False)
    return model, Tokenizer.from_folder(folder), ImageProcessorConfig.from_folder(folder)


def one_at_a_time(tiny, question, image, fastv):
    """minifastv's answer to one question with lmms-eval's POPE prompt in LLaVA-1.5's conversation, the image
    padded to a square, greedy."""
    model, tokenizer, image_config = tiny
    text = format_prompt(question + "\nAnswer the question using a single word or phrase.", system=SYSTEM_PROMPTS["vicuna_v1"])
    ids = encode_prompt(tokenizer, text, model.config.image_tokens_per_image)
    tokens = generate(model, ids, preprocess(image, image_config, pad=True), max_new_tokens=NEW_TOKENS,
                      fastv=fastv)[0].tolist()
    eos = model.config.text.eos_token_id
    return tokenizer.decode(tokens[:tokens.index(eos)] if eos in tokens else tokens).strip()


def evaluate(task_folder, model_args, batch_size):
    """lmms-eval's simple_evaluate on the tiny task, the model given by name as the command line gives it."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    register()
    return simple_evaluate(model="minifastv", model_args=model_args, tasks=[TASK], batch_size=batch_size,
                           device="cpu", task_manager=TaskManager(include_path=str(task_folder)), log_samples=True,
                           bootstrap_iters=0)


def register():
    """What the entry point does where minifastv is installed with its pyproject.toml: hand lmms-eval the
    manifest (this run may lack the package's metadata)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    from minifastv.lmms_eval_model import manifest

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)


# ------------------------------------------------------------------------------------------------------------
# The model in lmms-eval


def test_the_manifest_names_the_model_class():
    from lmms_eval.models import get_model

    from minifastv.lmms_eval_model import MinifastvLmms, manifest

    register()
    assert get_model("minifastv") is MinifastvLmms
    assert manifest().model_id == "minifastv"


def test_the_entry_point_where_the_package_declares_one():
    """Installed from a pyproject.toml with the entry point, lmms-eval finds the model without help."""
    from importlib.metadata import entry_points

    ours = [point for point in entry_points(group="lmms_eval.models") if point.name == "minifastv"]
    if not ours:
        pytest.skip("minifastv is not installed with its lmms_eval.models entry point here")
    assert ours[0].value == "minifastv.lmms_eval_model:manifest"
    assert ours[0].load()().simple_class_path == "minifastv.lmms_eval_model.MinifastvLmms"


@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_model_answers_a_tiny_local_lmms_eval_task(task_folder, tiny, batch_size):
    result = evaluate(task_folder, "pretrained=tiny,k=2,r=0.5,rule=fastv", batch_size)
    samples = sorted(result["samples"][TASK], key=lambda sample: sample["doc_id"])
    answers = [sample["resps"][0][0] for sample in samples]  # one response to one request per question
    assert len(answers) == len(QUESTIONS) and len(set(answers)) > 1 and all(answers)
    for answer, (question, _, size, colour) in zip(answers, QUESTIONS):
        assert answer == one_at_a_time(tiny, question, picture(size, colour), FastV(2, 0.5))
    figures = result["results"][TASK]
    assert {"pope_accuracy,none", "pope_f1_score,none"} <= set(figures)


def test_r_0_is_the_model_without_fastv(task_folder, tiny):
    result = evaluate(task_folder, "pretrained=tiny,r=0", 2)
    samples = sorted(result["samples"][TASK], key=lambda sample: sample["doc_id"])
    for sample, (question, _, size, colour) in zip(samples, QUESTIONS):
        assert sample["resps"][0][0] == one_at_a_time(tiny, question, picture(size, colour), None)


def requests_about(docs, settings):
    """lmms-eval's requests for docs {"text", "images"} of a task "t", as its evaluator builds them."""
    from lmms_eval.api.instance import Instance

    return [Instance("generate_until", (doc["text"], dict(settings), lambda doc: doc["images"], number, "t", "test"),
                     idx=0, metadata={"task": "t", "doc_id": number, "repeats": 1})
            for number, doc in enumerate(docs)]


def test_a_batch_mixes_image_counts_and_stop_strings_cut_the_answers():
    """A task such as MMMU asks about 0, 1 or several images: a batch answers as one question at a time."""
    from minifastv.lmms_eval_model import MinifastvLmms

    images = [picture(size, colour) for _, _, size, colour in QUESTIONS]
    docs = [{"text": "What is this?", "images": images[:1]}, {"text": "Which is larger?", "images": images[1:3]},
            {"text": "Say something.", "images": []}, {"text": "What colour is the square?", "images": images[3:]},
            {"text": "<image>\nCompare with this one. <image>", "images": images[:2]}]
    settings = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "until": ["ASSISTANT:"]}
    model = MinifastvLmms(pretrained="tiny", device="cpu", dtype="float32", batch_size=len(docs))
    model.task_dict = {"t": {"test": docs}}
    together = model.generate_until(requests_about(docs, settings))
    model.batch_size = 1
    assert together == model.generate_until(requests_about(docs, settings))
    assert all(together)
    stop = together[0][1]  # a character of the first answer
    cut = model.generate_until(requests_about(docs, {**settings, "until": [stop]}))
    assert cut == [answer.split(stop)[0].strip() for answer in together]


def test_settings_that_cannot_work_are_one_sentence():
    from minifastv.lmms_eval_model import MinifastvLmms

    with pytest.raises(UsageError, match="Unknown rule"):
        MinifastvLmms(pretrained="tiny", device="cpu", rule="fastest")
    with pytest.raises(UsageError, match="k must be below its 4 layers"):
        MinifastvLmms(pretrained="tiny", device="cpu", k=4)
    with pytest.raises(UsageError, match="batch_size"):
        MinifastvLmms(pretrained="tiny", device="cpu", batch_size="auto")
    model = MinifastvLmms(pretrained="tiny", device="cpu", dtype="float32")
    with pytest.raises(NotImplementedError, match="generation tasks only"):
        model.loglikelihood([])


# ------------------------------------------------------------------------------------------------------------
# POPE's scoring: minifastv.eval (LLaVA's eval_pope.py) against lmms-eval's pope task


def lmms_eval_pope(answers, truths):
    """lmms-eval's own figures: its pope task's process_results and aggregations."""
    from lmms_eval.tasks.pope import utils as pope

    docs = [{"question_id": str(n), "answer": truth} for n, truth in enumerate(truths)]
    results = [pope.pope_process_results(doc, [answer])["pope_accuracy"] for doc, answer in zip(docs, answers)]
    return {"accuracy": pope.pope_aggregate_accuracy(results), "precision": pope.pope_aggregate_precision(results),
            "recall": pope.pope_aggregate_recall(results), "f1": pope.pope_aggregate_f1_score(results),
            "yes_ratio": pope.pope_aggregate_yes_ratio(results)}


def minifastv_pope(answers, truths):
    questions = [evaluation.Question(str(n), "all", "", [truth], None) for n, truth in enumerate(truths)]
    return evaluation.figures("pope", [(q, a, evaluation.is_right("pope", q, a)) for q, a in zip(questions, answers)])


def test_pope_scorers_agree_on_one_word_answers():
    """A one-word yes or no, as LLaVA-1.5 answers POPE under "Answer the question using a single word or
    phrase.": the same accuracy, precision, recall and F1."""
    answers = ["Yes", "yes", "No", "no", "Yes", "No", "yes", "no"]
    truths = ["yes", "no", "no", "yes", "yes", "no", "no", "no"]
    ours, theirs = minifastv_pope(answers, truths), lmms_eval_pope(answers, truths)
    for name in ("accuracy", "precision", "recall", "f1"):
        assert ours[name] == pytest.approx(theirs[name]), name
    assert ours["accuracy"] == 5 / 8


def test_pope_scorers_differ_on_sentences_and_on_what_yes_ratio_counts():
    """lmms-eval's pope (0.7.3) scores the answer lower-cased and stripped, by exact match with yes or no;
    LLaVA's eval_pope (minifastv.eval) reads the first sentence and hears a no in "No", "no" or "not", a yes
    otherwise. A sentence is wrong in lmms-eval whatever it says, and an upper-case "NO" is a no there, a yes in
    LLaVA's rule. lmms-eval's precision and recall leave out answers that are neither yes nor no; its
    pope_yes_ratio is the share of yes among the right answers, not among the model's."""
    cases = [("Yes.", "yes", True, False), ("No, there is not.", "no", True, False),
             ("There is a dog.", "yes", True, False), ("NO", "no", False, True)]
    for answer, truth, right_in_minifastv, right_in_lmms_eval in cases:
        assert minifastv_pope([answer], [truth])["accuracy"] == right_in_minifastv, answer
        assert lmms_eval_pope([answer], [truth])["accuracy"] == right_in_lmms_eval, answer
    answers, truths = ["Yes", "Yes", "Yes", "No"], ["yes", "no", "no", "no"]
    assert minifastv_pope(answers, truths)["yes_share"] == 3 / 4  # the model said yes 3 times in 4
    assert lmms_eval_pope(answers, truths)["yes_ratio"] == 1 / 4  # 1 of the 4 right answers is yes
