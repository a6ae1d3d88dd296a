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


def commands_with_output(path):
    """(command, shown output) for each ```bash block of one command followed directly by a ```text block: the docs'
    promise of what the command prints (tests/test_tutorial_numbers.py runs them and compares)."""
    text = (ROOT / path).read_text()
    blocks = list(re.finditer(r"^```([\w-]*)[^\n]*\n(.*?)^```\n", text, flags=re.MULTILINE | re.DOTALL))
    pairs = [(first.group(2), second.group(2)) for first, second in zip(blocks, blocks[1:])
             if (first.group(1), second.group(1)) == ("bash", "text") and not text[first.end() : second.start()].strip()]
    shown = [(commands(command), output) for command, output in pairs]
    assert all(len(lines) == 1 for lines, _ in shown), f"{path}: a block with an output holds one command: {shown}"
    return [(lines[0], output) for lines, output in shown]


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


CPU_TORCH = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def test_readme_install_commands_are_what_ci_runs():
    """README's install commands run in CI as written, but for lmms-eval's, which CI leaves out
    (tests/test_lmms_eval.py says why), and the CPU torch, for which CI installs a pinned CPU wheel."""
    readme = [line for line in pip_installs(readme_commands()) if "lmms-eval" not in line]
    assert readme[:3] == [CPU_TORCH, "pip install -e .", "pip install -r requirements-test.txt"]
    readme.remove(CPU_TORCH)
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
    the benchmark, two questions about the shipped photo in place of POPE for the evaluation. Later flags win
    in argparse: only the model, the sizes and the files change."""
    import importlib
    import json

    from minifastv.cli import DEFAULT_IMAGE

    from minifastv.tiny import write_tiny_checkpoint

    tiny_video = write_tiny_checkpoint(tmp_path / "tiny-video", video=True)
    questions = tmp_path / "eval-data"  # a local set: python -m minifastv.eval --data
    questions.mkdir()
    (questions / "questions.jsonl").write_text("".join(
        json.dumps({"id": str(n), "image": str(DEFAULT_IMAGE), "question": question, "answers": [answer]}) + "\n"
        for n, (question, answer) in enumerate([("What animal is this?", "cat"), ("Is it a dog?", "no")])))
    small = {
        "minifastv": [],
        "minifastv.analyze": ["--out", str(tmp_path / "analysis")],
        "minifastv.bench": ["--layers", "3", "--width", "64", "--repeats", "1", "--device", "cpu"],
        "minifastv.eval": ["--data", str(questions), "--max-new-tokens", "2", "--model", str(cli_checkpoint),
                           "--device", "cpu"],
        "minifastv.flops": [],
    }
    monkeypatch.chdir(ROOT)  # paths in the docs are relative to the repository
    with_output = {command for command, _ in commands_with_output(path)}  # run as written by test_tutorial_numbers.py
    module_commands = [shlex.split(c, comments=True) for c in doc_commands(path)
                       if c.startswith("python -m minifastv") and c not in with_output]
    assert module_commands or with_output, f"{path} shows no command"
    assert all(words[2] in small for words in module_commands), module_commands
    for number, words in enumerate(module_commands):
        answers = ["--answers", str(tmp_path / f"answers-{number}.jsonl")] * (words[2] == "minifastv.eval")
        module = importlib.import_module(words[2] + (".__main__" if words[2] in ("minifastv", "minifastv.flops") else ""))
        model = tiny_video if "--video" in words else cli_checkpoint  # a Video-LLaVA for a video, else a LLaVA
        tiny = ["--model", str(model), "--device", "cpu", "--max-new-tokens", "4"] * (words[2] in ("minifastv", "minifastv.analyze"))
        image = ["--image", str(DEFAULT_IMAGE)] * (words[2] == "minifastv.analyze" and "--video" not in words)
        module.main(words[3:] + small[words[2]] + tiny + image + answers)
        assert capsys.readouterr().out


def test_readme_shows_the_cli_and_the_bench():
    shown = {shlex.split(c)[2] for c in doc_commands("README.md") if c.startswith("python -m")}
    assert {"minifastv", "minifastv.bench"} <= shown


def test_readme_colab_commands_fit_together():
    """The install block, which Colab runs too: clone into a folder, cd into that folder, (CPU torch,)
    install, run (the run is tested above)."""
    colab = [block for block in fenced_blocks("README.md", "bash") if "git clone" in block]
    assert len(colab) == 1
    lines = commands(colab[0])
    clone, cd = shlex.split(lines[0]), shlex.split(lines[1])
    assert clone[:2] == ["git", "clone"] and cd == ["cd", clone[-1]]
    assert lines[2:4] == [CPU_TORCH, "pip install -e ."] and lines[4].startswith("python -m minifastv")


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


# ------------------------------------------------------------------------------------------------
# tutorial.md: figures, proportions, questions

FIGURES = ROOT / "minifastv" / "assets" / "figures"  # the course's figures, made by python -m minifastv.figures


def image_links(path):
    """(alt text, target) of every markdown image in a file."""
    return re.findall(r"!\[([^\]]*)\]\(([^)\s]+)\)", (ROOT / path).read_text())


def test_tutorial_images_exist():
    links = image_links("tutorial.md")
    assert links, "tutorial.md shows no figure"
    missing = [target for _, target in links if not (ROOT / target).is_file()]
    assert not missing, f"tutorial.md links to images that are not there: {missing}"


def test_tutorial_shows_every_figure_with_a_caption():
    """Each SVG of minifastv/assets/figures is shown once, with alt text, and right below it its caption,
    *Figure N (`name.svg`). ...*, numbered 1, 2, ... in the order they appear."""
    text = (ROOT / "tutorial.md").read_text()
    names = sorted(path.name for path in FIGURES.glob("*.svg"))
    assert len(names) >= 5, f"the figures are missing from {FIGURES}"
    for name in names:
        shown = [alt for alt, target in image_links("tutorial.md") if target == f"minifastv/assets/figures/{name}"]
        assert len(shown) == 1 and len(shown[0].split()) >= 5, f"{name}: shown {len(shown)} times, or without alt text"
    captions = re.findall(r"\]\(minifastv/assets/figures/([\w.]+)\)\n\n\*Figure (\d+) \(`([\w.]+)`\)\. ", text)
    assert [(shown, caption) for shown, _, caption in captions] == [(name, name) for name, _, _ in captions]
    assert sorted(name for name, _, _ in captions) == names, "every figure needs its caption right below it"
    assert [int(number) for _, number, _ in captions] == list(range(1, len(names) + 1))


def chapters(path="tutorial.md"):
    """[(title, words)] of the level-1 sections of a markdown file, in order (headings inside code blocks ignored)."""
    sections, in_code = [["", 0]], False
    for line in (ROOT / path).read_text().splitlines():
        in_code ^= line.startswith("```")
        if not in_code and line.startswith("# "):
            sections.append([line[2:], 0])
        sections[-1][1] += len(line.split())
    return [(title, words) for title, words in sections if title or words]


def test_tutorial_reaches_fastv_early_and_gives_it_room():
    """Issue 12: the FastV chapter starts before 35% of the words and holds at least a quarter of them; the
    limits chapter is a chapter; the image and tokenizer edge cases sit in the appendices."""
    sections = chapters()
    total = sum(words for _, words in sections)
    titles = [title for title, _ in sections]
    fastv = next(i for i, title in enumerate(titles) if title.split(". ", 1)[-1].startswith("FastV"))
    before = sum(words for _, words in sections[:fastv])
    assert before / total < 0.35, f"FastV starts {before / total:.0%} into tutorial.md"
    assert sections[fastv][1] / total >= 0.25, f"the FastV chapter is {sections[fastv][1] / total:.0%} of tutorial.md"
    limits = next(words for title, words in sections if "Limits" in title)
    assert limits >= 300, f"the limits chapter has {limits} words"
    appendix = next(i for i, title in enumerate(titles) if title.startswith("Appendix"))
    main_text = "\n".join((ROOT / "tutorial.md").read_text().split("\n# Appendix")[:1])
    for detail in ("EXIF", "Metaspace", "alpha_composite", "is_byte_token"):
        assert detail not in main_text, f"{detail} belongs in an appendix of tutorial.md"
    assert all(title.startswith("Appendix") for title in titles[appendix:])


def test_tutorial_asks_before_it_tells():
    """At least four 'Predict, then check' questions, each followed by its answer folded in <details>."""
    text = (ROOT / "tutorial.md").read_text()
    questions = re.findall(r"\*\*Predict, then check\.\*\*(.*?)(<details><summary>Answer</summary>.*?</details>)", text,
                           flags=re.DOTALL)
    assert len(questions) >= 4, f"{len(questions)} questions with folded answers"
    assert text.count("**Predict, then check.**") == len(questions) == text.count("<details>")
