"""The docs say what the code does: tutorial excerpts are copied from minifastv/ (model.py and the
example rules), and README's commands and example run as written."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ILLUSTRATION = "# illustration, not from the source"
README_REPO_ID = "llava-hf/llava-1.5-7b-hf"


def fenced_blocks(path, *languages):
    """The bodies of the ``` blocks in a markdown file whose language tag is one of `languages`."""
    text = (ROOT / path).read_text()
    blocks = re.findall(r"^```([\w-]*)[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    return [body for language, body in blocks if language in languages]


def commands(script_text):
    """Command lines of a shell snippet: comments and blank lines dropped, `\\` continuations joined."""
    lines, pending = [], ""
    for line in script_text.splitlines():
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def is_pytest_command(command):
    return "pytest" in shlex.split(command)[:3]


# ------------------------------------------------------------------------------------------------
# tutorial.md


def tutorial_blocks():
    return fenced_blocks("tutorial.md", "python")


def test_tutorial_has_code():
    assert len(tutorial_blocks()) >= 5


@pytest.mark.parametrize("index", range(len(tutorial_blocks())))
def test_tutorial_excerpt_is_copied_verbatim_from_the_source(index):
    block = tutorial_blocks()[index]
    lines = [line.rstrip() for line in block.rstrip("\n").splitlines()]
    if lines[0] == ILLUSTRATION:
        compile(block, f"tutorial.md python block {index + 1}", "exec")
        return
    n = len(lines)
    found = []
    for path in sorted((ROOT / "minifastv").rglob("*.py")):
        source = [line.rstrip() for line in path.read_text().splitlines()]
        if any(source[start : start + n] == lines for start in range(len(source) - n + 1)):
            found.append(path.name)
    assert found, (
        f"tutorial.md python block {index + 1} (starting {lines[0].strip()!r}) is no longer a run of lines "
        f"of a file in minifastv/: copy it again from the source, or mark it with {ILLUSTRATION!r} as its first line."
    )


# ------------------------------------------------------------------------------------------------
# README.md, requirements.txt, .ci/run


def readme_commands():
    return [command for block in fenced_blocks("README.md", "bash", "sh", "shell") for command in commands(block)]


def test_readme_test_command_is_what_ci_runs():
    readme_tests = [command for command in readme_commands() if is_pytest_command(command)]
    assert len(readme_tests) == 1, f"README.md should give one test command, found {readme_tests}"
    ci_tests = [command for command in commands((ROOT / ".ci" / "run").read_text()) if is_pytest_command(command)]
    assert ci_tests, ".ci/run runs no pytest command"
    assert readme_tests[0] == ci_tests[-1]


def pip_installs(lines):
    """The `pip install ...` commands among command lines, written the way README writes them."""
    return [line.removeprefix("python -m ") for line in lines if line.removeprefix("python -m ").startswith("pip install")]


def test_readme_install_commands_are_what_ci_runs():
    """README's install commands run in CI as written (CI adds the pinned CPU torch before them)."""
    readme = pip_installs(readme_commands())
    assert "pip install -r requirements.txt" in readme and "pip install -r requirements-test.txt" in readme
    ci = pip_installs(commands((ROOT / ".ci" / "run").read_text()))
    assert set(readme) <= set(ci), f"README installs {readme}, CI runs {ci}"
    assert ci[0].startswith("pip install torch=="), "CI installs its pinned CPU torch first"


def requirements(name):
    packaging = pytest.importorskip("packaging.requirements")
    lines = [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()]
    return {requirement.name.lower(): requirement for requirement in map(packaging.Requirement, filter(None, lines))}


def test_runtime_requirements_hold_the_runtime_packages_only():
    runtime, tests = requirements("requirements.txt"), requirements("requirements-test.txt")
    assert set(runtime) == {"torch", "safetensors", "tokenizers", "huggingface-hub", "pillow", "tqdm"}
    assert {"pytest", "transformers"} <= set(tests) and not set(tests) & set(runtime)
    ci_torch = re.search(r"pip install torch==(\S+)", (ROOT / ".ci" / "run").read_text())
    assert ci_torch, ".ci/run should install a pinned torch before requirements.txt"
    # The pinned release must satisfy the range, or pip would replace it with a (CUDA) download.
    assert runtime["torch"].specifier.contains(ci_torch.group(1), prereleases=True)


def test_the_runtime_imports_no_test_package():
    """Nothing in minifastv/ imports pytest or transformers at import time: Colab installs requirements.txt only."""
    for path in (ROOT / "minifastv").rglob("*.py"):
        for line in path.read_text().splitlines():
            if line.startswith(("import ", "from ")):
                assert not re.match(r"(import|from) (pytest|transformers)\b", line), f"{path.name}: {line}"


def test_readme_python_example_runs(cli_checkpoint, capsys, monkeypatch):
    """The README example, run on a tiny checkpoint with a tokenizer in place of the 7B download."""
    blocks = fenced_blocks("README.md", "python")
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(ROOT)  # the example's image path is relative to the repository
    for block in blocks:
        assert README_REPO_ID in block
        code = compile(block.replace(README_REPO_ID, str(cli_checkpoint)), "README.md", "exec")
        exec(code, {"__name__": "readme_example"})
    assert "36 -> 18 image tokens" in capsys.readouterr().out


def doc_commands(path):
    return [command for block in fenced_blocks(path, "bash", "sh", "shell") for command in commands(block)]


@pytest.mark.parametrize("path", ["README.md", "tutorial.md"])
def test_doc_commands_run(path, cli_checkpoint, tmp_path, capsys, monkeypatch):
    """Each `python -m minifastv...` command in the docs runs as written, with a tiny model with a tokenizer
    in place of the 7B download (and the shipped photo in place of the reader's), a small random model for
    the benchmark. Later flags win in argparse: only the model, the sizes and the files change."""
    import importlib

    from minifastv.cli import DEFAULT_IMAGE

    from minifastv.tiny import write_tiny_checkpoint

    tiny_video = write_tiny_checkpoint(tmp_path / "tiny-video", video=True)
    small = {
        "minifastv": [],
        "minifastv.analyze": ["--out", str(tmp_path / "analysis")],
        "minifastv.bench": ["--layers", "3", "--width", "64", "--repeats", "1", "--device", "cpu"],
        "minifastv.flops": [],
    }
    monkeypatch.chdir(ROOT)  # paths in the docs are relative to the repository
    module_commands = [shlex.split(c, comments=True) for c in doc_commands(path) if c.startswith("python -m minifastv")]
    assert module_commands and all(words[2] in small for words in module_commands), module_commands
    for words in module_commands:
        module = importlib.import_module(words[2] + (".__main__" if words[2] in ("minifastv", "minifastv.flops") else ""))
        model = tiny_video if "--video" in words else cli_checkpoint  # a Video-LLaVA for a video, else a LLaVA
        tiny = ["--model", str(model), "--device", "cpu", "--max-new-tokens", "4"] * (words[2] in ("minifastv", "minifastv.analyze"))
        image = ["--image", str(DEFAULT_IMAGE)] * (words[2] == "minifastv.analyze" and "--video" not in words)
        module.main(words[3:] + small[words[2]] + tiny + image)
        assert capsys.readouterr().out


def test_readme_shows_the_cli_and_the_bench():
    shown = {shlex.split(c)[2] for c in doc_commands("README.md") if c.startswith("python -m")}
    assert {"minifastv", "minifastv.bench"} <= shown


def test_readme_colab_commands_fit_together():
    """The Colab block: clone into a folder, cd into that folder, install, run (the run is tested above)."""
    colab = [block for block in fenced_blocks("README.md", "bash") if "git clone" in block]
    assert len(colab) == 1
    lines = commands(colab[0])
    clone, cd = shlex.split(lines[0]), shlex.split(lines[1])
    assert clone[:2] == ["git", "clone"] and cd == ["cd", clone[-1]]
    assert lines[2] == "pip install -r requirements.txt" and lines[3].startswith("python -m minifastv")


def test_one_repository_url():
    """minifastv.REPOSITORY_URL is the one place; README's badge and clone command and the notebook repeat it."""
    import json

    from minifastv import REPOSITORY_URL

    owner_and_name = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+)", REPOSITORY_URL).group(1)
    readme = (ROOT / "README.md").read_text()
    badge = f"https://colab.research.google.com/github/{owner_and_name}/blob/main/tutorial.ipynb"
    assert f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({badge})" in readme
    clones = [line for line in readme_commands() if line.startswith("git clone")]
    assert clones and all(shlex.split(line)[2] == REPOSITORY_URL for line in clones), clones
    notebook = json.loads((ROOT / "tutorial.ipynb").read_text())
    setup = "".join(next(cell["source"] for cell in notebook["cells"] if cell["cell_type"] == "code"))
    assert re.search(r'^REPO_URL = "([^"]+)"', setup, flags=re.MULTILINE).group(1) == REPOSITORY_URL
    assert ("OWNER" in REPOSITORY_URL) == ('"OWNER" in REPO_URL' in setup), "the notebook must know the placeholder"


def test_bench_numbers_say_how_they_were_made():
    """Wherever the docs quote the bench's medians, they say the bench's default number of repeats."""
    from minifastv import bench

    repeats = bench.parse_args([]).repeats
    for path in ("README.md", "tutorial.md"):
        claims = re.findall(r"median of (\d+)", (ROOT / path).read_text())
        assert claims, f"{path} quotes no bench numbers"
        assert all(int(claim) == repeats for claim in claims), f"{path} says median of {claims}, the bench runs {repeats}"


def test_tutorial_video_numbers_are_what_flops_prints(capsys):
    """Chapter 6 quotes python -m minifastv.flops --config video-llava-7b: the numbers are the command's."""
    from minifastv.flops.__main__ import main

    text = " ".join((ROOT / "tutorial.md").read_text().split())
    for r in ("0.5", "0.75"):
        main(["--config", "video-llava-7b", "--r", r])
        out = capsys.readouterr().out
        paper, exact = re.search(r"(\d+\.\d)% fewer\)\n.*\((\d+\.\d)% fewer\)", out).groups()
        assert f"{paper}%" in text and f"{exact}%" in text, (paper, exact)
        if r == "0.5":
            numbers = re.findall(r"\d+\.\d+ -> \d+\.\d+", out)
            assert all(number in text for number in numbers[:2]), numbers
            both, video_only, cache, pruned_cache = re.search(
                r"weights (\S+) GiB \((\S+) GiB with the video tower only\); the prompt's KV cache (\S+) -> (\S+) GiB", out).groups()
            assert f"{both} GiB with both towers, {video_only} GiB with the video tower alone" in text
            assert f"from {cache} GiB to {pruned_cache} GiB" in text
            readme = " ".join((ROOT / "README.md").read_text().split())  # README quotes the R=0.5 figures too
            assert f"{paper}% fewer FLOPs per layer" in readme
            assert f"{video_only} GiB of weights and {pruned_cache} GiB of cache" in readme
