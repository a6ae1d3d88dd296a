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
    for path in sorted((ROOT / "minifastv").glob("*.py")):
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


def test_readme_install_command_and_ci_install_the_requirements():
    assert "pip install -r requirements.txt" in readme_commands()
    ci = commands((ROOT / ".ci" / "run").read_text())
    assert any(command.endswith("pip install -r requirements.txt") for command in ci)


def requirements():
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    return [line for line in lines if line]


def test_requirements_parse_and_admit_the_torch_that_ci_installs_first():
    packaging = pytest.importorskip("packaging.requirements")
    parsed = {}
    for line in requirements():
        requirement = packaging.Requirement(line)  # raises on a malformed line
        parsed[requirement.name.lower()] = requirement
    assert {"torch", "safetensors", "tokenizers", "huggingface-hub", "pillow", "pytest", "transformers"} <= set(parsed)
    ci_torch = re.search(r"pip install torch==(\S+)", (ROOT / ".ci" / "run").read_text())
    assert ci_torch, ".ci/run should install a pinned torch before requirements.txt"
    # The pinned release must satisfy the range, or pip would replace it with a (CUDA) download.
    assert parsed["torch"].specifier.contains(ci_torch.group(1), prereleases=True)
    assert parsed["torch"].specifier.contains("2.13.0")


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

    from minifastv.__main__ import DEFAULT_IMAGE

    tiny = ["--model", str(cli_checkpoint), "--device", "cpu", "--max-new-tokens", "4"]
    small = {
        "minifastv": tiny,
        "minifastv.analyze": tiny + ["--image", str(DEFAULT_IMAGE), "--out", str(tmp_path / "analysis")],
        "minifastv.bench": ["--layers", "3", "--width", "64", "--repeats", "1", "--device", "cpu"],
        "minifastv.flops": [],
    }
    monkeypatch.chdir(ROOT)  # paths in the docs are relative to the repository
    module_commands = [shlex.split(c, comments=True) for c in doc_commands(path) if c.startswith("python -m minifastv")]
    assert module_commands and all(words[2] in small for words in module_commands), module_commands
    for words in module_commands:
        module = importlib.import_module(words[2] + (".__main__" if words[2] == "minifastv" else ""))
        module.main(words[3:] + small[words[2]])
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
