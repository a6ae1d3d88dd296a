"""The command line end to end, in subprocesses, on a tiny checkpoint with a small Llama-style tokenizer:
answers with and without FastV, --compare, and one clear sentence with exit code 2 for each bad input."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import minifastv.model as M
from minifastv import __main__ as cli_module
from minifastv.image import ImageProcessorConfig, load_image, preprocess
from minifastv.prompt import Tokenizer, encode_prompt, format_prompt


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(cli_checkpoint):
    return cli_checkpoint


def run_cli(*args, env=None):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "minifastv", *args], cwd=ROOT, capture_output=True, text=True,
                          env=environment, timeout=300)


def expected_answer(checkpoint, fastv, prompt="Describe this image.", images=(cli_module.DEFAULT_IMAGE,)):
    """The answer the CLI should print, computed here with the library calls it is made of."""
    model = M.load(checkpoint, device="cpu", dtype=torch.float32, progress=False)
    tokenizer = Tokenizer.from_folder(checkpoint)
    pixels = preprocess([load_image(image) for image in images], ImageProcessorConfig.from_folder(checkpoint))
    ids = encode_prompt(tokenizer, format_prompt(prompt, num_images=len(images)), model.config.image_tokens_per_image)
    return tokenizer.decode(model.generate(ids, pixels, max_new_tokens=6, fastv=fastv)[0].tolist()).strip()


def test_default_run_prunes_and_prints_stats(checkpoint):
    result = run_cli("--model", str(checkpoint), "--device", "cpu", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    answer, _, stats = result.stdout.partition("\n---\n")
    assert answer.strip() == expected_answer(checkpoint, M.FastV(2, 0.5))
    assert "FastV K=2, R=0.5: image tokens 36 -> 18 kept" in stats
    for word in ("prefill", "TFLOPs", "tokens/s", "KV cache"):
        assert word in stats
    assert "loaded" in result.stderr  # loading reports its progress


def test_no_fastv(checkpoint, tmp_path):
    image = tmp_path / "wide.png"
    load_image(cli_module.DEFAULT_IMAGE).resize((300, 120)).save(image)
    result = run_cli("--model", str(checkpoint), "--device", "cpu", "--max-new-tokens", "6", "--no-fastv",
                     "--image", str(image), "--prompt", "What is this?")
    assert result.returncode == 0, result.stderr
    answer = result.stdout.partition("\n---\n")[0]
    assert answer.strip() == expected_answer(checkpoint, None, "What is this?", [image])
    assert "no FastV: image tokens 36 -> 36 kept" in result.stdout


def test_compare_prints_both(checkpoint):
    result = run_cli("--model", str(checkpoint), "--device", "cpu", "--max-new-tokens", "6", "--compare", "--r", "0.75")
    assert result.returncode == 0, result.stderr
    assert "--- without FastV ---" in result.stdout and "--- with FastV (K=2, R=0.75) ---" in result.stdout
    assert "without FastV" in result.stdout and "| FastV K=2, R=0.75: image tokens 36 -> 9 kept" in result.stdout
    plain, fast = expected_answer(checkpoint, None), expected_answer(checkpoint, M.FastV(2, 0.75))
    assert plain in result.stdout and fast in result.stdout
    assert "faster prefill with FastV" in result.stdout


def test_two_images_with_placeholders(checkpoint, tmp_path):
    second = tmp_path / "gray.png"
    load_image(cli_module.DEFAULT_IMAGE).convert("L").save(second)
    prompt = "First <image> and then <image>: same animal?"
    result = run_cli("--model", str(checkpoint), "--device", "cpu", "--max-new-tokens", "6",
                     "--image", str(cli_module.DEFAULT_IMAGE), str(second), "--prompt", prompt)
    assert result.returncode == 0, result.stderr
    assert "image tokens 72 -> 36 kept" in result.stdout
    assert result.stdout.partition("\n---\n")[0].strip() == expected_answer(
        checkpoint, M.FastV(2, 0.5), prompt, [cli_module.DEFAULT_IMAGE, second])


def test_help_teaches():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--model", "--image", "--prompt", "--k", "--r", "--no-fastv", "--compare", "--max-new-tokens",
                 "--device", "--dtype", "--seed", "--pad"):
        assert flag in result.stdout
    assert "FastV" in result.stdout and "examples:" in result.stdout


# ----------------------------------------------------------------------------------------------------
# Bad input: one sentence on stderr, exit code 2, no traceback. The subprocesses run two at a time.


def bad_inputs(checkpoint, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are not pixels")
    no_config, no_weights, no_tokenizer = (tmp_path / name for name in ("no-config", "no-weights", "no-tokenizer"))
    for folder, missing in ((no_config, "config.json"), (no_weights, "model.safetensors"), (no_tokenizer, "tokenizer.json")):
        folder.mkdir()
        for file in checkpoint.iterdir():
            if file.name != missing:
                (folder / file.name).symlink_to(file)
    model = ["--model", str(checkpoint), "--device", "cpu"]
    image = str(cli_module.DEFAULT_IMAGE)
    return {  # case: (arguments, words the message must hold, extra environment)
        "missing image": ([*model, "--image", str(tmp_path / "nowhere.jpg")], ["nowhere.jpg"], {}),
        "not an image": ([*model, "--image", str(not_an_image)], ["notes.png"], {}),
        "more placeholders": ([*model, "--prompt", "<image> and <image>?"], ["2 <image>", "1 image"], {}),
        "fewer placeholders": ([*model, "--image", image, image, "--prompt", "<image> what?"], ["1 <image>", "2 image"], {}),
        "k too small": ([*model, "--k", "0"], ["--k", "between 1 and 3"], {}),
        "k too large": ([*model, "--k", "4"], ["--k", "between 1 and 3"], {}),
        "r too large": ([*model, "--r", "1.0"], ["--r", "[0, 1)"], {}),
        "r negative": ([*model, "--r", "-0.5"], ["--r", "[0, 1)"], {}),
        "too long": ([*model, "--max-new-tokens", "600"], ["context is 512 tokens"], {}),
        "unknown device": (["--model", str(checkpoint), "--device", "tpu:0"], ["Unknown device"], {}),
        "no config": (["--model", str(no_config), "--device", "cpu"], ["config.json"], {}),
        "no weights": (["--model", str(no_weights), "--device", "cpu"], ["safetensors"], {}),
        "no tokenizer": (["--model", str(no_tokenizer), "--device", "cpu"], ["tokenizer.json"], {}),
        "hub unreachable": (["--model", "someone/not-here", "--device", "cpu"], ["someone/not-here", "hub"],
                            {"MINIFASTV_WEIGHTS": str(tmp_path / "weights")}),
    }


@pytest.fixture(scope="module")
def bad_results(checkpoint, tmp_path_factory):
    cases = bad_inputs(checkpoint, tmp_path_factory.mktemp("bad"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_cli, *args, env=env) for name, (args, _, env) in cases.items()}
    return {name: (futures[name].result(), cases[name][1]) for name in cases}


BAD_CASES = ["missing image", "not an image", "more placeholders", "fewer placeholders", "k too small", "k too large",
             "r too large", "r negative", "too long", "unknown device", "no config", "no weights", "no tokenizer",
             "hub unreachable"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_clear_sentence(bad_results, case):
    result, words = bad_results[case]
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(message) == 1, result.stderr
    for word in words:
        assert word in message[0], message[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_cuda_asked_without_gpu(checkpoint, capsys):
    assert cli_module.cli(["--model", str(checkpoint), "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_out_of_memory_gives_advice(checkpoint, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(M.Llava, "stream", out_of_memory)
    assert cli_module.cli(["--model", str(checkpoint), "--device", "cpu", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "ran out of memory" in err and "--dtype float16" in err and "Traceback" not in err


def test_dtype_auto(monkeypatch):
    """auto: float32 on the CPU; on a GPU, bfloat16 only with native support (compute capability 8+):
    a T4 (7.5) gets float16, although torch.cuda.is_bf16_supported() answers yes there (emulation)."""
    from types import SimpleNamespace

    assert cli_module.pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert cli_module.pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    for major, expected in ((7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, major=major: SimpleNamespace(major=major))
        assert cli_module.pick_dtype("auto", torch.device("cuda")) == expected
