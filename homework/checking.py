"""What the homework checks share (not an exercise: nothing to fill in here).

- `exercise(starter, name)`: the function you write, taken from the starter file. While the starter still
  raises NotImplementedError("fill in ... first"), calling it SKIPS the check with that sentence instead of
  failing it. Any other error fails the check as usual.
- MINIFASTV_HOMEWORK_FROM=path/to/file.py: every exercise function that file defines is taken from it
  instead of the starters. A teacher checks their own solutions, kept outside the repository, with
      MINIFASTV_HOMEWORK_FROM=~/solutions.py python -m pytest homework/
  and tests/test_homework.py uses it to show that each check fails on a wrong answer.
- The fixtures `tiny` and `tiny_checkpoint`: tiny random models, built in a second or two with the helpers
  of tests/conftest.py. transformers' LlavaForConditionalGeneration with eager attention gives the reference
  attention weights; minifastv's Llava is loaded from the same weights.
"""

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


test_helpers = load_file(TESTS / "conftest.py", "minifastv_test_helpers")  # tiny_hf_model, image_prompt, ...


def exercise(starter, function_name):
    """The function `function_name` of homework/`starter` (or of the MINIFASTV_HOMEWORK_FROM file), made to
    skip the calling check while it is unfilled."""
    substitute = os.environ.get(SUBSTITUTE_VARIABLE)
    module = load_file(Path(substitute).expanduser().resolve(), "minifastv_homework_substitute") if substitute else None
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
_built = {}  # each check module imports the fixtures below: build the models once per pytest run


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny models and prompts every check uses.

    tiny.ours: minifastv's Llava (4 decoder layers, 4 heads, 3 CLIP layers) in float32.
    tiny.hf: transformers' model with the same weights and eager attention (it can return attention weights).
    tiny.case(num_images, batch_size, pad=True): (input_ids, attention_mask, pixel_values) of random prompts;
      with pad=True the prompts have different lengths and are left-padded, with pad=False they have one length.
    """
    if "tiny" not in _built:
        hf = test_helpers.tiny_hf_model(seed=0)
        hf.set_attn_implementation("eager")
        folder = test_helpers.save_hub_style(hf, tmp_path_factory.mktemp("tiny-llava"))
        ours = minifastv.load(folder, device="cpu", dtype=torch.float32, progress=False)

        def case(num_images=1, batch_size=1, pad=True, seed=0):
            prompts = [test_helpers.image_prompt(num_images, TOKENS_PER_IMAGE, text_before=4 + 3 * row * pad,
                                                 text_after=6 + row * pad, seed=seed + row) for row in range(batch_size)]
            ids, mask = test_helpers.left_pad(prompts)
            return ids, mask, test_helpers.random_pixels(num_images * batch_size, seed=seed + num_images)

        _built["tiny"] = SimpleNamespace(ours=ours, hf=hf, case=case, image_token_id=test_helpers.IMAGE_TOKEN,
                                         tokens_per_image=TOKENS_PER_IMAGE, grid_size=6)
    return _built["tiny"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A complete tiny model folder (config, safetensors, a small Llama-style tokenizer, preprocessor config)."""
    if "checkpoint" not in _built:
        _built["checkpoint"] = test_helpers.write_cli_checkpoint(tmp_path_factory.mktemp("agreement") / "tiny-llava")
    return _built["checkpoint"]
