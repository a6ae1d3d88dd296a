"""The four commands end to end: python -m minifastv (ask), .analyze, .bench and .flops.

Answers with and without FastV and --compare on a tiny checkpoint written by transformers (with a small
Llama-style tokenizer); --model tiny offline; and for every command every bad input we know of: one
sentence on one line, exit code 2, no traceback, before any slow work. A real bug keeps its traceback.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import minifastv
import minifastv.checkpoint as checkpoint
import minifastv.model as M
from minifastv import __main__ as ask
from minifastv import analyze, bench, cli
from minifastv.generation import generate
from minifastv.flops import __main__ as flops
from minifastv.image import ImageProcessorConfig, load_image, preprocess
from minifastv.prompt import Tokenizer, encode_prompt, format_prompt

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {"ask": ask.command, "analyze": analyze.command, "bench": bench.command, "flops": flops.command}
MODULES = {"ask": "minifastv", "analyze": "minifastv.analyze", "bench": "minifastv.bench", "flops": "minifastv.flops"}


@pytest.fixture(scope="module")
def checkpoint_folder(cli_checkpoint):
    return cli_checkpoint


def run_module(module, *args, env=None):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          env=environment, timeout=300)


def expected_answer(folder, fastv, prompt="Describe this image.", images=(cli.DEFAULT_IMAGE,)):
    """The answer the CLI should print, computed here with the library calls it is made of."""
    model = minifastv.load(folder, device="cpu", dtype=torch.float32, progress=False)
    tokenizer = Tokenizer.from_folder(folder)
    pixels = preprocess([load_image(image) for image in images], ImageProcessorConfig.from_folder(folder))
    ids = encode_prompt(tokenizer, format_prompt(prompt, num_images=len(images)), model.config.image_tokens_per_image)
    return tokenizer.decode(generate(model, ids, pixels, max_new_tokens=6, fastv=fastv)[0].tolist()).strip()


# ----------------------------------------------------------------------------------------------------
# Answers


def test_default_run_prunes_and_prints_stats(checkpoint_folder):
    result = run_module("minifastv", "--model", str(checkpoint_folder), "--device", "cpu", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    answer, _, stats = result.stdout.partition("\n---\n")
    assert answer.strip() == expected_answer(checkpoint_folder, M.FastV(2, 0.5))
    assert "FastV K=2, R=0.5: image tokens 36 -> 18 kept" in stats
    for word in ("prefill", "MFLOPs (", "tokens/s", "KV cache"):  # this tiny model's prefill: 22 MFLOPs
        assert word in stats
    assert "loaded" in result.stderr  # loading reports its progress


def test_no_fastv(checkpoint_folder, tmp_path):
    image = tmp_path / "wide.png"
    load_image(cli.DEFAULT_IMAGE).resize((300, 120)).save(image)
    result = run_module("minifastv", "--model", str(checkpoint_folder), "--device", "cpu", "--max-new-tokens", "6",
                        "--no-fastv", "--image", str(image), "--prompt", "What is this?")
    assert result.returncode == 0, result.stderr
    answer = result.stdout.partition("\n---\n")[0]
    assert answer.strip() == expected_answer(checkpoint_folder, None, "What is this?", [image])
    assert "no FastV: image tokens 36 -> 36 kept" in result.stdout


def test_compare_prints_both(checkpoint_folder):
    result = run_module("minifastv", "--model", str(checkpoint_folder), "--device", "cpu", "--max-new-tokens", "6",
                        "--compare", "--r", "0.75")
    assert result.returncode == 0, result.stderr
    assert "--- without FastV ---" in result.stdout and "--- with FastV (K=2, R=0.75) ---" in result.stdout
    assert "without FastV" in result.stdout and "| FastV K=2, R=0.75: image tokens 36 -> 9 kept" in result.stdout
    plain, fast = expected_answer(checkpoint_folder, None), expected_answer(checkpoint_folder, M.FastV(2, 0.75))
    assert plain in result.stdout and fast in result.stdout
    assert "with FastV (median of 3 interleaved runs each, after a warm-up; " in result.stdout
    assert "decode steps of " in result.stdout  # and says how decode speed was measured
    assert "timing the prefill: 3 interleaved runs per setting" in result.stderr  # nothing silent


def test_compare_times_interleaved_runs_and_headlines_medians_with_their_spread(checkpoint_folder, monkeypatch,
                                                                                capsys):
    """--runs 4: after the warm-up, 4 prefills per setting alternate (plain, FastV, plain, ...); the table shows
    each setting's median, and the headline the ratio of the medians with the range of the runs' ratios."""
    timed = []
    times = {None: iter([1.0, 3.0, 1.2, 1.1]), "fastv": iter([0.5, 0.6, 0.8, 0.4])}

    def scripted_prefill(model, question, fastv):
        timed.append(fastv)
        return next(times[None if fastv is None else "fastv"])

    monkeypatch.setattr(ask, "prefill_seconds", scripted_prefill)
    assert ask.command(["--model", str(checkpoint_folder), "--device", "cpu", "--max-new-tokens", "3", "--compare",
                        "--runs", "4"]) == 0
    captured = capsys.readouterr()
    assert [fastv is None for fastv in timed] == [True, False] * 4
    assert "timing the prefill: 4 interleaved runs per setting" in captured.err
    # medians 1.15 and 0.55; per run 2.0, 5.0, 1.5, 2.75
    assert "prefill 1.15 s, " in captured.out and "| prefill 0.55 s, " in captured.out
    assert ("prefill 2.09x faster with FastV (median of 4 interleaved runs each, after a warm-up; 1.50x-5.00x faster run by run)\n"
            in captured.out)


def test_prefill_sentence_says_slower_and_a_spread_across_one():
    assert ask.prefill_sentence([1.0, 1.0, 1.0], [0.5, 0.625, 0.8]) == (
        "prefill 1.60x faster with FastV (median of 3 interleaved runs each, after a warm-up; 1.25x-2.00x faster run by run)")
    assert ask.prefill_sentence([1.0, 1.0, 1.0], [1.25, 2.0, 1.47]) == (
        "prefill 1.47x slower with FastV (median of 3 interleaved runs each, after a warm-up; 1.25x-2.00x slower run by run)")
    assert ask.prefill_sentence([1.0, 1.0, 1.0], [0.5, 1.0, 2.0]) == (
        "prefill 1.00x faster with FastV (median of 3 interleaved runs each, after a warm-up; from 2.00x slower to 2.00x faster "
        "run by run)")


def test_compile_compare_gives_the_eager_answers(checkpoint_folder, capsys, monkeypatch, fresh_compiler):
    """--compile: the same answers, and the compile time said once (captured with aot_eager here; inductor's code
    generation takes minutes on a CPU, tests/test_compiled.py runs it once)."""
    import functools

    from minifastv import compiled

    monkeypatch.setattr(cli, "compile_model", functools.partial(compiled.compile_model, backend="aot_eager"))
    assert ask.command(["--model", str(checkpoint_folder), "--device", "cpu", "--max-new-tokens", "6", "--compare",
                        "--compile"]) in (0, None)
    captured = capsys.readouterr()
    assert expected_answer(checkpoint_folder, None) in captured.out
    assert expected_answer(checkpoint_folder, M.FastV(2, 0.5)) in captured.out
    assert captured.err.count("compiled in") == 1


@pytest.mark.parametrize("command", ["ask", "bench"])
def test_compile_without_a_compiler_is_one_sentence(command, checkpoint_folder, monkeypatch, capsys):
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)
    model = ["--model", str(checkpoint_folder)] if command == "ask" else ["--layers", "2", "--width", "64"]
    assert COMMANDS[command](model + ["--device", "cpu", "--compile"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --compile on the CPU needs a C++ compiler (g++ or clang++), which torch.compile uses to build its "
                   "kernels: install one, or leave --compile out.")


def test_two_images_with_placeholders(checkpoint_folder, tmp_path):
    second = tmp_path / "gray.png"
    load_image(cli.DEFAULT_IMAGE).convert("L").save(second)
    prompt = "First <image> and then <image>: same animal?"
    result = run_module("minifastv", "--model", str(checkpoint_folder), "--device", "cpu", "--max-new-tokens", "6",
                        "--image", str(cli.DEFAULT_IMAGE), str(second), "--prompt", prompt)
    assert result.returncode == 0, result.stderr
    assert "image tokens 72 -> 36 kept" in result.stdout
    assert result.stdout.partition("\n---\n")[0].strip() == expected_answer(
        checkpoint_folder, M.FastV(2, 0.5), prompt, [cli.DEFAULT_IMAGE, second])


def test_help_teaches():
    result = run_module("minifastv", "--help")
    assert result.returncode == 0
    for flag in ("--model", "--image", "--prompt", "--k", "--r", "--no-fastv", "--compare", "--max-new-tokens",
                 "--device", "--dtype", "--seed", "--pad", "--temperature", "--top-p", "tiny"):
        assert flag in result.stdout
    assert "FastV" in result.stdout and "examples:" in result.stdout


def test_sampling_flags_reach_generation(checkpoint_folder, capsys):
    """--temperature/--top-p/--seed sample; the same seed gives the same answer, a nucleus of ~0 is greedy."""
    common = ["--model", str(checkpoint_folder), "--device", "cpu", "--max-new-tokens", "8", "--no-fastv"]

    def answer(*flags):
        assert ask.command(common + list(flags)) == 0
        return capsys.readouterr().out.partition("\n---\n")[0]

    greedy = answer()
    sampled = answer("--temperature", "1.5", "--seed", "3")
    assert sampled == answer("--temperature", "1.5", "--seed", "3")
    assert answer("--temperature", "1.5", "--top-p", "0.000001") == greedy
    assert sampled != greedy  # the tiny model is flat enough that sampling at 1.5 wanders off


@pytest.mark.parametrize("command", ["ask", "flops"])
def test_version(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        COMMANDS[command](["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"minifastv {cli.VERSION}\n"


# ----------------------------------------------------------------------------------------------------
# --model tiny: every command, offline


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return tmp_path_factory.mktemp("weights")


@pytest.mark.parametrize("command", ["ask", "analyze", "bench"])
def test_model_tiny_runs_offline(command, tiny_weights, tmp_path):
    extra = {"ask": ["--max-new-tokens", "4"], "analyze": ["--max-new-tokens", "3", "--out", str(tmp_path)],
             "bench": ["--repeats", "1", "--no-transformers"]}[command]
    result = run_module(MODULES[command], "--model", "tiny", "--device", "cpu", *extra,
                        env={"MINIFASTV_WEIGHTS": str(tiny_weights)})
    assert result.returncode == 0, result.stderr
    assert "random text" in result.stderr and len([line for line in result.stderr.splitlines() if "random" in line]) == 1
    assert (tiny_weights / "tiny" / "model.safetensors").is_file()
    expected = {"ask": "image tokens 576 -> 288 kept", "analyze": "wrote", "bench": "R=0.50"}[command]
    assert expected in result.stdout


def test_system_prompt_comes_first(tiny_weights, monkeypatch):
    """--system vicuna_v1: the prompt starts with Vicuna's system text (after <s>); none, the default, without it."""
    from minifastv.prompt import SYSTEM_PROMPTS

    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tiny_weights)

    def prompt_ids(*flags):
        return ask.prepare(ask.parse_args(["--model", "tiny", "--device", "cpu", *flags])).input_ids[0]

    plain, vicuna = prompt_ids(), prompt_ids("--system", "vicuna_v1")
    tokenizer = Tokenizer.from_folder(tiny_weights / "tiny")
    assert vicuna[0] == plain[0] == 1  # <s>
    assert tokenizer.decode(vicuna.tolist()) == SYSTEM_PROMPTS["vicuna_v1"] + " " + tokenizer.decode(plain.tolist())
    assert tokenizer.decode(plain.tolist()).startswith("USER:")
    assert torch.equal(prompt_ids("--system", "none"), plain)


def test_ctrl_c_is_one_line_and_exit_code_130(tiny_weights):
    """SIGINT while the answer streams: exit code 130, what was printed stays, and stderr ends in one line."""
    import signal
    import threading

    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "MINIFASTV_WEIGHTS": str(tiny_weights)}
    process = subprocess.Popen(
        [sys.executable, "-m", "minifastv", "--model", "tiny", "--device", "cpu", "--max-new-tokens", "3000"],
        cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # a shell without job control starts background jobs with SIGINT ignored; Python would then never raise
        # KeyboardInterrupt, so give the child the default handler back
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    answering = threading.Event()
    first_bytes = []
    # the tiny model never says </s> early: 3000 tokens take far longer than the moment until the signal
    reader = threading.Thread(target=lambda: (first_bytes.append(process.stdout.read(1)), answering.set()))
    reader.start()
    try:
        assert answering.wait(timeout=240) and first_bytes[0], "no answer started"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        reader.join()
    err = err.decode()
    assert process.returncode == 130, err
    assert "Traceback" not in err and err.count("interrupted") == 1, err
    assert err.rstrip("\n").splitlines()[-1] == "interrupted (Ctrl-C)", err
    assert (first_bytes[0] + out).strip(), "the answer printed before the interrupt is kept"


def test_tiny_checkpoint_is_a_real_llava_hf_folder(tmp_path, monkeypatch):
    """The files `--model tiny` builds load in transformers too, and give minifastv's logits."""
    from transformers import LlavaForConditionalGeneration

    from minifastv.tiny import tiny_checkpoint

    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path)
    folder = tiny_checkpoint()
    assert folder == tmp_path / "tiny" and tiny_checkpoint() == folder  # built once, then reused
    ours = minifastv.load(folder, device="cpu", dtype=torch.float32, progress=False)
    theirs = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_folder(folder)
    ids = encode_prompt(tokenizer, format_prompt("What is this?"), ours.config.image_tokens_per_image)
    pixels = preprocess(cli.DEFAULT_IMAGE, ImageProcessorConfig.from_folder(folder))
    with torch.no_grad():
        difference = (ours(ids, pixels) - theirs(input_ids=ids, pixel_values=pixels).logits).abs().max().item()
    assert difference < 1e-4
    assert ids.eq(ours.config.image_token_id).sum() == 576


# ----------------------------------------------------------------------------------------------------
# Bad input, for every command: exit code 2 and one sentence, checked before any slow work


def broken_copies(folder, root):
    """Copies of a good checkpoint folder, each with one thing wrong: {name: folder}."""
    def copy_without(name, *skip):
        target = root / name
        target.mkdir()
        for file in folder.iterdir():
            if file.name not in skip:
                (target / file.name).symlink_to(file)
        return target

    broken = {missing: copy_without(f"no-{missing}", missing)
              for missing in ("config.json", "model.safetensors", "tokenizer.json")}
    for name, text in (("config.json", '{"text_config": {"hidden_size": 64,}'),  # a stray comma
                       ("tokenizer.json", '{"version": "1.0", "model": '),  # cut short
                       ("preprocessor_config.json", "not json at all")):
        broken[f"broken {name}"] = copy_without(f"broken-{name}", name)
        (broken[f"broken {name}"] / name).write_text(text)
    values = json.loads((folder / "config.json").read_text())
    values["text_config"]["num_hidden_layers"] = "four"
    broken["foreign config.json"] = copy_without("foreign-config", "config.json")
    (broken["foreign config.json"] / "config.json").write_text(json.dumps(values))
    broken["truncated"] = copy_without("truncated", "model.safetensors")
    data = (folder / "model.safetensors").read_bytes()
    (broken["truncated"] / "model.safetensors").write_bytes(data[: len(data) // 2])
    return broken


@pytest.fixture(scope="module")
def bad_cases(checkpoint_folder, tmp_path_factory):
    """{(command, case): (arguments, words the one error line must hold)}."""
    root = tmp_path_factory.mktemp("bad")
    broken = broken_copies(checkpoint_folder, root)
    not_an_image = root / "notes.png"
    not_an_image.write_text("these are not pixels")
    a_file = root / "a-file.txt"
    a_file.write_text("not a folder")
    model = ["--model", str(checkpoint_folder), "--device", "cpu"]
    image = str(cli.DEFAULT_IMAGE)
    cases = {}
    for command in ("ask", "analyze"):
        cases.update({(command, name): (args, words) for name, (args, words) in {
            "missing image": ([*model, "--image", str(root / "nowhere.jpg")], ["nowhere.jpg"]),
            "not an image": ([*model, "--image", str(not_an_image)], ["notes.png"]),
            "more placeholders": ([*model, "--prompt", "<image> and <image>?"], ["2 <image>", "1 image"]),
            "fewer placeholders": ([*model, "--image", image, image, "--prompt", "<image> what?"], ["1 <image>", "2 image"]),
            "k too small": ([*model, "--k", "0"], ["--k", "at least 1"]),
            "k too large": ([*model, "--k", "4"], ["--k", "between 1 and 3"]),
            "k far too large": ([*model, "--k", "99"], ["--k", "between 1 and 3"]),
            "r too large": ([*model, "--r", "1.0"], ["--r", "[0, 1)"]),
            "r negative": ([*model, "--r", "-0.5"], ["--r", "[0, 1)"]),
            "r keeps no image token": ([*model, "--r", "0.99"], ["--r 0.99", "none of", "36 image tokens"]),
            "no new tokens": ([*model, "--max-new-tokens", "0"], ["--max-new-tokens", "at least 1"]),
            "too long": ([*model, "--max-new-tokens", "600"], ["context is 512 tokens"]),
            "unknown device": (["--model", str(checkpoint_folder), "--device", "tpu:0"], ["Unknown device"]),
            "nonsense device": (["--model", str(checkpoint_folder), "--device", "nonsense"], ["Unknown device"]),
            "missing folder": (["--model", str(root / "nope"), "--device", "cpu"], ["no model folder", "nope"]),
            "missing relative folder": (["--model", "./tiny-llava", "--device", "cpu"], ["no model folder ./tiny-llava"]),
            "a file": (["--model", str(a_file), "--device", "cpu"], ["a-file.txt", "is a file"]),
            "hub unreachable": (["--model", "someone/not-here", "--device", "cpu"], ["someone/not-here", "hub"]),
            "no config": (["--model", str(broken["config.json"]), "--device", "cpu"], ["No config.json"]),
            "no weights": (["--model", str(broken["model.safetensors"]), "--device", "cpu"], ["No .safetensors"]),
            "no tokenizer": (["--model", str(broken["tokenizer.json"]), "--device", "cpu"], ["No tokenizer.json"]),
            "broken config": (["--model", str(broken["broken config.json"]), "--device", "cpu"], ["config.json", "not valid JSON"]),
            "foreign config": (["--model", str(broken["foreign config.json"]), "--device", "cpu"], ["config.json", "num_hidden_layers"]),
            "broken tokenizer": (["--model", str(broken["broken tokenizer.json"]), "--device", "cpu"], ["tokenizer.json", "damaged"]),
            "broken preprocessor": (["--model", str(broken["broken preprocessor_config.json"]), "--device", "cpu"],
                                    ["preprocessor_config.json", "not valid JSON"]),
            "truncated weights": (["--model", str(broken["truncated"]), "--device", "cpu"], ["model.safetensors", "truncated"]),
        }.items()})
    cases.update({
        ("ask", "negative temperature"): ([*model, "--temperature", "-1"], ["temperature", "0 (greedy) or a finite"]),
        ("ask", "infinite temperature"): ([*model, "--temperature", "inf"], ["temperature", "finite", "got inf"]),
        ("ask", "nan temperature"): ([*model, "--temperature", "nan"], ["temperature", "got nan"]),
        ("ask", "seed too large"): ([*model, "--temperature", "1", "--seed", "100000000000000000000000"],
                                    ["seed", "[0, 2**64)", "100000000000000000000000"]),
        ("ask", "negative seed"): ([*model, "--temperature", "1", "--seed", "-1"], ["seed", "[0, 2**64)"]),
        ("ask", "seed without sampling"): ([*model, "--seed", "100000000000000000000000"], ["--seed", "--temperature"]),
        ("ask", "no-fastv and compare"): ([*model, "--no-fastv", "--compare"], ["--no-fastv", "--compare"]),
        ("ask", "no-fastv and k"): ([*model, "--no-fastv", "--k", "3"], ["--no-fastv", "--k would"]),
        ("ask", "no-fastv and r"): ([*model, "--no-fastv", "--r", "0.5"], ["--no-fastv", "--r would"]),
        ("ask", "no-fastv and k and r"): ([*model, "--no-fastv", "--k", "2", "--r", "0.5"], ["--no-fastv", "--k and --r"]),
        ("ask", "runs without compare"): ([*model, "--runs", "5"], ["--runs", "--compare"]),
        ("ask", "too few runs"): ([*model, "--compare", "--runs", "1"], ["--runs", "at least 3", "got 1"]),
        ("ask", "top-p zero"): ([*model, "--temperature", "1", "--top-p", "0"], ["top-p", "(0, 1]"]),
        ("ask", "top-p above one"): ([*model, "--temperature", "1", "--top-p", "1.5"], ["top-p", "(0, 1]"]),
        ("ask", "top-p without sampling"): ([*model, "--top-p", "0.9"], ["top-p", "only when sampling"]),
        ("analyze", "bad heatmap layers"): ([*model, "--heatmap-layers", "one,two"], ["--heatmap-layers"]),
        ("analyze", "out is a file"): ([*model, "--out", str(a_file)], ["--out", "a-file.txt"]),
        ("bench", "k too large"): (["--device", "cpu", "--k", "99", "--layers", "3", "--width", "64"], ["--k", "between 1 and 2"]),
        ("bench", "k too large for the model"): (["--model", str(checkpoint_folder), "--device", "cpu", "--k", "4"],
                                                 ["--k", "between 1 and 3"]),
        ("bench", "nonsense device"): (["--device", "nonsense"], ["Unknown device"]),
        ("bench", "zero repeats"): (["--device", "cpu", "--repeats", "0"], ["--repeats", "at least 1"]),
        ("bench", "negative text tokens"): (["--device", "cpu", "--text-tokens", "-3"], ["--text-tokens", "at least 1"]),
        ("bench", "too many text tokens"): (["--device", "cpu", "--text-tokens", "5000", "--layers", "3", "--width", "64"],
                                            ["--text-tokens 5000", "context"]),
        ("bench", "one layer"): (["--device", "cpu", "--layers", "1"], ["--layers", "at least 2"]),
        ("bench", "odd width"): (["--device", "cpu", "--width", "100"], ["--width", "multiple of 64"]),
        ("bench", "missing folder"): (["--device", "cpu", "--model", "/nope"], ["no model folder /nope"]),
        ("bench", "truncated weights"): (["--device", "cpu", "--model", str(broken["truncated"])], ["model.safetensors", "truncated"]),
        ("bench", "negative batch"): (["--device", "cpu", "--batch", "-1"], ["--batch", "at least 0"]),
        ("bench", "json is a folder"): (["--device", "cpu", "--json", str(root)], ["--json", "is a folder"]),
        ("bench", "random video model without --video"): (["--device", "cpu", "--model", "random-video-7b"],
                                                          ["random-video-7b", "--video"]),
        ("bench", "random image model with --video"): (["--device", "cpu", "--model", "random-7b", "--video"],
                                                       ["random-7b", "random-video-7b"]),
        ("flops", "unknown config"): (["--config", "70b"], ["--config 70b", "llava-1.5-7b"]),
        ("flops", "missing config"): (["--config", str(root / "nope.json")], ["--config", "nope.json"]),
        ("flops", "broken config"): (["--config", str(broken["broken config.json"])], ["config.json", "not valid JSON"]),
        ("flops", "k too large"): (["--k", "99"], ["--k", "between 1 and 39"]),
        ("flops", "r one"): (["--r", "1"], ["--r", "[0, 1)"]),
        ("flops", "r negative"): (["--r", "-1"], ["--r", "[0, 1)"]),
        ("flops", "negative text tokens"): (["--text-tokens", "-5"], ["--text-tokens", "at least 0"]),
        ("flops", "no images"): (["--images", "-1"], ["--images", "at least 0"]),
        ("flops", "r keeps no image token"): (["--r", "0.9999"], ["none of", "576 image tokens"]),
        ("flops", "videos for llava"): (["--config", "llava-1.5-7b", "--videos", "1"], ["--videos", "Video-LLaVA"]),
        ("flops", "nothing to prune"): (["--config", "video-llava-7b", "--videos", "0"], ["at least one image or video"]),
        ("flops", "negative videos"): (["--config", "video-llava-7b", "--videos", "-1"], ["--videos", "at least 0"]),
        ("flops", "prompt past the context"): (["--text-tokens", "100000"], ["--text-tokens 100000", "100576-token",
                                                                             "context of 4096"]),
        ("flops", "images past the context"): (["--config", "llava-1.5-7b", "--images", "8"], ["--images", "4644-token"]),
        ("flops", "videos past the context"): (["--config", "video-llava-7b", "--videos", "2"], ["--videos", "4148-token"]),
        ("flops", "r nan"): (["--r", "nan"], ["--r", "[0, 1)"]),
    })
    if not torch.cuda.is_available():
        for command in ("ask", "analyze", "bench"):
            extra = model[:2] if command != "bench" else []
            cases[(command, "cuda without a GPU")] = ([*extra, "--device", "cuda"], ["no CUDA GPU"])
    return cases


def bad_case_ids():
    names = ["missing image", "not an image", "more placeholders", "fewer placeholders", "k too small", "k too large",
             "k far too large", "r too large", "r negative", "r keeps no image token", "no new tokens", "too long",
             "unknown device", "nonsense device", "missing folder", "missing relative folder", "a file", "hub unreachable",
             "no config", "no weights", "no tokenizer", "broken config", "foreign config", "broken tokenizer",
             "broken preprocessor", "truncated weights"]
    ids = [(command, name) for command in ("ask", "analyze") for name in names]
    ids += [("ask", name) for name in ("negative temperature", "top-p zero", "top-p above one", "top-p without sampling",
                                       "infinite temperature", "nan temperature", "seed too large", "negative seed",
                                       "seed without sampling", "no-fastv and compare", "no-fastv and k",
                                       "no-fastv and r", "no-fastv and k and r", "runs without compare", "too few runs")]
    ids += [("analyze", "bad heatmap layers"), ("analyze", "out is a file")]
    ids += [("bench", name) for name in ("k too large", "k too large for the model", "nonsense device", "zero repeats",
                                         "negative text tokens", "too many text tokens", "one layer", "odd width",
                                         "missing folder", "truncated weights", "negative batch", "json is a folder",
                                         "random video model without --video", "random image model with --video")]
    ids += [("flops", name) for name in ("unknown config", "missing config", "broken config", "k too large", "r one",
                                         "r negative", "negative text tokens", "no images", "r keeps no image token",
                                         "videos for llava", "nothing to prune", "negative videos",
                                         "prompt past the context", "images past the context",
                                         "videos past the context", "r nan")]
    if not torch.cuda.is_available():
        ids += [(command, "cuda without a GPU") for command in ("ask", "analyze", "bench")]
    return ids


@pytest.mark.parametrize("command, case", bad_case_ids(), ids=lambda value: value.replace(" ", "-"))
def test_bad_input_is_one_sentence_and_exit_code_2(bad_cases, command, case, capsys, monkeypatch, tmp_path):
    import huggingface_hub.constants

    args, words = bad_cases[(command, case)]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network: fail at once
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path)  # a hub miss must not find an earlier download
    monkeypatch.chdir(ROOT)
    if case not in ("no weights", "truncated weights"):  # argument checks come before the (slow) load; the weights are load's to check

        def too_late(*args):
            raise AssertionError(f"the model was loaded before the bad input ({case}) was noticed")

        monkeypatch.setattr(cli, "load_model", too_late)
    assert COMMANDS[command](args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]), err
    for word in words:
        assert word in errors[0], errors[0]


def test_bad_input_exit_code_in_a_real_process(bad_cases, checkpoint_folder):
    """The same reporter at the process level: `python -m ...` exits with 2 and prints no traceback."""
    chosen = [("ask", "truncated weights"), ("ask", "seed too large"), ("analyze", "k too large"), ("bench", "zero repeats"),
              ("flops", "r one"), ("flops", "prompt past the context")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda key: run_module(MODULES[key[0]], *bad_cases[key][0]), chosen))
    for key, result in zip(chosen, results):
        assert result.returncode == 2, (key, result.stderr)
        assert "Traceback" not in result.stderr and result.stderr.count("error: ") == 1, (key, result.stderr)


def test_a_bug_keeps_its_traceback(checkpoint_folder, monkeypatch):
    """Only minifastv's own errors become one sentence: a ValueError from a broken layer is not one of them."""
    def broken_mlp(self, x):
        raise ValueError("a bug in a student's layer")

    monkeypatch.setattr(M.LlamaMLP, "forward", broken_mlp)
    with pytest.raises(ValueError, match="a bug in a student's layer"):
        ask.command(["--model", str(checkpoint_folder), "--device", "cpu", "--max-new-tokens", "2"])
    script = ("import sys, minifastv.model as M\n"
              "M.LlamaMLP.forward = lambda self, x: 1 / 0\n"
              "from minifastv.__main__ import command\n"
              f"sys.exit(command(['--model', {str(checkpoint_folder)!r}, '--device', 'cpu', '--max-new-tokens', '2']))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr


def test_an_error_during_loading_starts_on_a_fresh_line(checkpoint_folder, monkeypatch, capsys):
    """The progress bar is ended before the message, even when stderr is a pipe (no terminal to redraw on)."""
    calls = []

    def fails_on_the_third(*args):
        calls.append(args)
        if len(calls) == 3:
            raise minifastv.CheckpointError("the disk went away")
        return real_read_tensor(*args)

    real_read_tensor = checkpoint.read_tensor
    monkeypatch.setattr(checkpoint, "read_tensor", fails_on_the_third)
    assert ask.command(["--model", str(checkpoint_folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "loading" in err and "\nerror: the disk went away\n" in err, err


def test_out_of_memory_gives_advice(checkpoint_folder, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(M.Llava, "forward", out_of_memory)
    assert ask.command(["--model", str(checkpoint_folder), "--device", "cpu", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "ran out of memory" in err and "--dtype float16" in err and "Traceback" not in err


def test_dtype_auto(monkeypatch):
    """auto: float32 on the CPU; on a GPU, bfloat16 only with native support (compute capability 8+):
    a T4 (7.5) gets float16, although torch.cuda.is_bf16_supported() answers yes there (emulation)."""
    from types import SimpleNamespace

    assert cli.pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert cli.pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    for major, expected in ((7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, major=major: SimpleNamespace(major=major))
        assert cli.pick_dtype("auto", torch.device("cuda")) == expected
