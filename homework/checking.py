"""What the homework checks share (not an exercise: nothing to fill in here).

- `exercise(starter, name)`: the function you write, taken from the starter file. While the starter
  still raises NotImplementedError("fill in ... first"), calling it SKIPS the check with that
  sentence instead of failing it. Any other error fails the check as usual.
- MINIFASTV_HOMEWORK_FROM=path/to/file.py: every exercise function that file defines is taken
  from it instead of the starters. A teacher checks their own solutions, kept outside the
  repository, with
      MINIFASTV_HOMEWORK_FROM=~/solutions.py python -m pytest homework/
  and tests/test_homework.py uses it to show that each check fails on plausible wrong answers.
- The fixtures `tiny` and `tiny_checkpoint`: tiny random models, built in a second or two with the
  helpers of tests/conftest.py. transformers' LlavaForConditionalGeneration with eager attention
  gives the reference attention weights; minifastv's Llava is loaded from the same weights.
- `other_tiny`: a second tiny model with other weights, whose LLaVA reads CLIP's last layer.
- `pruning_inputs` (what FastV hands a rule at layer K), `ask_rule` and `choice_mistake` (is a
  choice a top-k of some scores? If not, how does it differ, in words), for the checks of the
  pruning rules; `once`, to compute a check's reference cases once; `require`, to fail a check
  with a sentence alone.
"""

import dataclasses
import functools
import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import minifastv  # found through pytest.ini's pythonpath: the repository root, and tests/
import minifastv.model as M

HOMEWORK = Path(__file__).resolve().parent
TESTS = HOMEWORK.parent / "tests"
# the tiny models' matrices are too small to share out: one thread is fastest
torch.set_num_threads(1)

SUBSTITUTE_VARIABLE = "MINIFASTV_HOMEWORK_FROM"


def load_file(path, module_name):
    """Import a Python file by its path, under a name no other module uses."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_starter(starter):
    """A fresh import of a starter file of this folder, e.g. load_starter("agreement.py")."""
    return load_file(HOMEWORK / starter, "minifastv_homework_" + Path(starter).stem)


# tiny_hf_model, image_prompt, ...
test_helpers = load_file(TESTS / "conftest.py", "minifastv_test_helpers")


def exercise(starter, function_name):
    """The function `function_name` of homework/`starter` (or of the MINIFASTV_HOMEWORK_FROM file),
    made to skip the calling check while it is unfilled."""
    substitute = os.environ.get(SUBSTITUTE_VARIABLE)
    module = (load_file(Path(substitute).expanduser().resolve(), "minifastv_homework_substitute")
              if substitute else None)
    if module is None or not hasattr(module, function_name):
        module = load_starter(starter)
    function = getattr(module, function_name)

    @functools.wraps(function)
    def skip_while_unfilled(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except NotImplementedError as error:
            if str(error).startswith("fill in"):  # the starter's own sentence: nothing to check yet
                pytest.skip(str(error))
            raise

    return skip_while_unfilled


TOKENS_PER_IMAGE = 36  # the tiny models see 84 px images: a 6 x 6 grid of 14 px patches
_built = {}  # each check module imports the fixtures below: build the models once per process


class TinyModels(SimpleNamespace):
    def __repr__(self):  # a failing check prints its arguments: one line, not the models' layers
        return "<the tiny models and prompts of homework/checking.py>"


def build_tiny(folder, seed=0, vision_feature_layer=None):
    """The tiny models and prompts every check uses (the `tiny` fixture; its folder receives the
    weights). seed: the weights'; vision_feature_layer: the CLIP hidden state LLaVA reads
    (default -2, the second to last).

    tiny.ours: minifastv's Llava (4 decoder layers, 4 heads, 3 CLIP layers) in float32.
    tiny.hf: transformers' model with the same weights and eager attention (it can return attention
      weights).
    tiny.case(num_images, batch_size, pad=True, seed=0): (input_ids, attention_mask, pixel_values)
      of random prompts; with pad=True the prompts have different lengths and are left-padded, with
      pad=False one length.
    tiny.batch(seed, num_images, pad, batch_size=3): the same, with text of random lengths before
      each image and after the last one (all prompts of one length when pad=False): the many cases
      a check loops over.
    """
    hf = test_helpers.tiny_hf_model(seed=seed)
    hf.set_attn_implementation("eager")
    if vision_feature_layer is not None:
        hf.config.vision_feature_layer = vision_feature_layer
    ours = minifastv.load(test_helpers.save_hub_style(hf, folder), device="cpu",
                          dtype=torch.float32, progress=False)

    def case(num_images=1, batch_size=1, pad=True, seed=0):
        prompts = [test_helpers.image_prompt(num_images, TOKENS_PER_IMAGE,
                                             text_before=4 + 3 * row * pad,
                                             text_after=6 + row * pad, seed=seed + row)
                   for row in range(batch_size)]
        ids, mask = test_helpers.left_pad(prompts)
        return ids, mask, test_helpers.random_pixels(
            num_images * batch_size, seed=seed + num_images
        )

    def batch(seed, num_images, pad, batch_size=3):
        generator = torch.Generator().manual_seed(seed)
        # (text before each image, after)
        lengths = torch.randint(2, 11, (batch_size, 2), generator=generator)
        if not pad:
            lengths[:] = lengths[0]
        prompts = [test_helpers.image_prompt(num_images, TOKENS_PER_IMAGE, int(before), int(after),
                                             seed=100 * seed + row)
                   for row, (before, after) in enumerate(lengths.tolist())]
        ids, mask = test_helpers.left_pad(prompts)
        return ids, mask, test_helpers.random_pixels(num_images * batch_size, seed=seed)

    return TinyModels(ours=ours, hf=hf, case=case, batch=batch,
                      image_token_id=test_helpers.IMAGE_TOKEN,
                      tokens_per_image=TOKENS_PER_IMAGE, grid_size=6)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny models and prompts every check uses: see build_tiny."""
    if "tiny" not in _built:
        _built["tiny"] = build_tiny(tmp_path_factory.mktemp("tiny-llava"))
    return _built["tiny"]


@pytest.fixture(scope="session")
def other_tiny(tmp_path_factory):
    """A second tiny model, built like `tiny` but with other weights and a LLaVA that reads CLIP's
    LAST layer (vision_feature_layer -1): code that assumes the second to last fails on it."""
    if "other tiny" not in _built:
        _built["other tiny"] = build_tiny(tmp_path_factory.mktemp("other-tiny-llava"), seed=1,
                                          vision_feature_layer=-1)
    return _built["other tiny"]


def once(key, build):
    """build() the first time `key` is asked for in this process, the same value after: what a check
    computes from the tiny models alone (no code of yours), shared by its tests."""
    if key not in _built:
        _built[key] = build()
    return _built[key]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A complete tiny model folder (config, safetensors, a small Llama-style tokenizer,
    preprocessor config)."""
    if "checkpoint" not in _built or not _built["checkpoint"].is_dir():
        _built["checkpoint"] = test_helpers.write_cli_checkpoint(
            tmp_path_factory.mktemp("agreement") / "tiny-llava"
        )
    return _built["checkpoint"]


@torch.no_grad()
def pruning_inputs(model, input_ids, attention_mask, pixel_values, k):
    """The PruningInputs that FastV hands a rule at layer k of this prompt batch (FastV's
    own rule chooses)."""
    captured = {}

    def spy(inputs):
        captured["inputs"] = inputs
        return M.fastv_rule(inputs)

    model(input_ids, pixel_values, attention_mask=attention_mask, fastv=M.FastV(k, 0.5, rule=spy),
          last_logits_only=True)
    return captured["inputs"]


def ask_rule(rule, inputs, num_keep):
    """`rule`'s choice for a copy of `inputs` that asks for num_keep tokens: (B, num_keep), each
    row sorted.

    The copy's tensors are new, so a rule that writes into them cannot change the next question.
    FastV's own test of a rule's answer (shape, distinct indices, in range) raises a ValueError
    that says what is wrong.
    """
    copy = dataclasses.replace(inputs, num_keep=num_keep, **{
        field.name: getattr(inputs, field.name).clone()
        for field in dataclasses.fields(inputs)
        if isinstance(getattr(inputs, field.name), torch.Tensor)
    })
    batch_size, num_image_tokens = inputs.image_positions.shape
    return M.check_kept(rule(copy), batch_size, num_image_tokens, num_keep).sort(dim=-1).values


def require(condition, message):
    """Fail the calling check with `message` alone unless `condition` holds: the sentence says what
    differs, so pytest's traceback and the failed expression are left out."""
    if not condition:
        pytest.fail(message, pytrace=False)


def rows_and_images(indices, tokens_per_image, grid_size):
    """(how many of `indices` sit in the top half of their image, how many in the first image)."""
    within = indices % tokens_per_image
    top = within // grid_size < (tokens_per_image // grid_size) / 2
    return int(top.sum()), int((indices < tokens_per_image).sum())


def is_top_k(kept, scores, tolerance=1e-7):
    """Is `kept` (indices) a top-len(kept) of `scores` (N,)? Scores within `tolerance` tie."""
    is_kept = torch.zeros(len(scores), dtype=torch.bool)
    is_kept[kept] = True
    if is_kept.all() or not is_kept.any():
        return True
    return bool(scores[is_kept].min() >= scores[~is_kept].max() - tolerance)


def choice_mistake(kept, scores, tokens_per_image, grid_size, tolerance=1e-7):
    """None when `kept` (indices into the image tokens) is a top-len(kept) of `scores` (N,), else a
    short sentence that says in words how the choice differs from the reference's top len(kept).

    Two scores closer than `tolerance` count as a tie: either may be kept (your arithmetic and the
    reference's differ in the last bits of a float32).
    """
    if is_top_k(kept, scores, tolerance):
        return None
    is_kept = torch.zeros(len(scores), dtype=torch.bool)
    is_kept[kept] = True
    best_dropped = scores[~is_kept].max()
    reference = scores.topk(len(kept)).indices
    wrongly_kept = int((scores[kept] < best_dropped - tolerance).sum())
    sentence = (f"{wrongly_kept} of the {len(kept)} tokens you keep are ones the reference drops "
                f"for better-scored ones")
    (top, first), (reference_top, reference_first) = (
        rows_and_images(indices, tokens_per_image, grid_size) for indices in (kept, reference))
    if len(scores) > tokens_per_image and abs(first - reference_first) > abs(top - reference_top):
        return (f"{sentence}; you keep {first} in the first image, the reference "
                f"{reference_first}")
    if top != reference_top:
        where = "more" if top > reference_top else "fewer"
        halves = "halves of the images" if len(scores) > tokens_per_image else "half of the image"
        return (f"{sentence}; you keep {where} in the top {halves} ({top}, the reference "
                f"{reference_top})")
    return sentence
