"""tutorial.ipynb is a lesson: a markdown cell before every code cell says what to expect, one after it asks a
question; its code cells run, in order, on the tiny offline model (the Colab setup does nothing outside Colab,
the GPU cells print one sentence); the outputs saved in it are what that run prints; the numbers its markdown
states are the ones the code computes; and its setup cell on Colab stops with one sentence when the URL or the
GPU is missing.

The saved outputs come from this file too:

    python tests/test_notebook.py --save    # run the code cells on the tiny model, write their outputs into the notebook
"""

import contextlib
import io
import json
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "tutorial.ipynb"
REFERENCE_TOKENIZER = ROOT.parent / "shared" / "reference" / "llava-1.5-7b-hf" / "tokenizer.json"
# How the saved outputs were made, and how the test runs the cells: the tiny random models, on the CPU, no download.
OFFLINE_SETTINGS = {"MINIFASTV_MODEL": "tiny", "MINIFASTV_VIDEO_MODEL": "tiny-video", "MINIFASTV_DEVICE": "cpu",
                    "MINIFASTV_MAX_NEW_TOKENS": "8"}
TIME = re.compile(r"\d+(\.\d+)? (s|ms|tokens/s)\b")  # a duration or a speed: this machine's, never compared
SWEEP_ROW = re.compile(r"^ *(\d\.\d\d) +(\d+) +(\d+%) ")  # R, kept, FLOPs of a row of the R sweep's table


def read_notebook():
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["nbformat"] == 4 and notebook["cells"]
    for cell in notebook["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
    return notebook


def text(lines):
    return "".join(lines)


def code_cells(notebook=None):
    notebook = notebook or read_notebook()
    return [text(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def code_cell_index(needle):
    """The index (among the code cells) of the one code cell whose source contains `needle`."""
    found = [index for index, source in enumerate(code_cells()) if needle in source]
    assert len(found) == 1, f"{len(found)} code cells contain {needle!r}"
    return found[0]


def markdown_around(code_index):
    """The markdown cells just before and just after code cell number `code_index`, their line breaks made spaces."""
    cells = read_notebook()["cells"]
    position = [index for index, cell in enumerate(cells) if cell["cell_type"] == "code"][code_index]
    return tuple(" ".join(text(cells[position + step]["source"]).split()) for step in (-1, 1))


# ----------------------------------------------------------------------------------------------------
# Running the cells as a notebook would, recording what each prints


class StreamRecorder(io.TextIOBase):
    """Stands in for sys.stdout or sys.stderr: appends what is written to `outputs` as notebook stream outputs,
    one per run of writes to the same stream, in the order they came."""

    def __init__(self, name, outputs):
        self.name, self.outputs = name, outputs

    def write(self, piece):
        if self.outputs and self.outputs[-1]["name"] == self.name:
            self.outputs[-1]["text"] += piece
        elif piece:
            self.outputs.append({"name": self.name, "output_type": "stream", "text": piece})
        return len(piece)


def run_cells(sources):
    """Execute the code cells in order in one namespace; returns each cell's stream outputs and the namespace."""
    namespace = {"__name__": "__main__"}
    all_outputs = []
    for index, source in enumerate(sources):
        outputs = []
        with contextlib.redirect_stdout(StreamRecorder("stdout", outputs)), \
                contextlib.redirect_stderr(StreamRecorder("stderr", outputs)):
            exec(compile(source, f"tutorial.ipynb code cell {index}", "exec"), namespace)
        all_outputs.append(outputs)
    return all_outputs, namespace


def with_outputs(notebook, outputs):
    """A copy of the notebook with each code cell's outputs, as Jupyter saves them, and its execution count."""
    notebook = json.loads(json.dumps(notebook))
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert len(code) == len(outputs)
    for number, (cell, cell_outputs) in enumerate(zip(code, outputs), start=1):
        cell["execution_count"] = number
        cell["outputs"] = [dict(output, text=output["text"].splitlines(keepends=True)) for output in cell_outputs]
    return notebook


def printed(outputs):
    return "".join(output["text"] if isinstance(output["text"], str) else text(output["text"]) for output in outputs)


def stable_lines(printed_text):
    """The lines of a cell's output that do not depend on the machine: token counts, FLOPs, the GPU sentences;
    times masked, answers left out."""
    lines = []
    for line in printed_text.splitlines():
        row = SWEEP_ROW.match(line)
        if row:
            lines.append(" ".join(row.groups()))
        elif any(word in line for word in ("kept", "FLOPs", "prompt:", "No GPU here", "import minifastv")):
            line = re.sub(r"\d+ of them also kept", "<n> of them also kept", line)  # a ranking of random weights' values
            lines.append(TIME.sub("<time>", line))
    return lines


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """The code cells run once as the saved outputs were made (tiny models built into a temporary weights/)."""
    import minifastv.checkpoint

    with pytest.MonkeyPatch.context() as patch:
        for name, value in OFFLINE_SETTINGS.items():
            patch.setenv(name, value)
        patch.chdir(ROOT)
        patch.setattr(sys, "path", list(sys.path))  # the setup cell puts the clone on the path
        patch.setattr(minifastv.checkpoint, "WEIGHTS_DIR", tmp_path_factory.mktemp("weights"))
        return run_cells(code_cells())


# ----------------------------------------------------------------------------------------------------
# The notebook as a lesson


def test_notebook_is_valid_and_plain_python():
    cells = code_cells()
    assert len(cells) >= 9
    for index, source in enumerate(cells):
        assert not any(line.lstrip().startswith(("!", "%")) for line in source.splitlines()), "no shell magics"
        compile(source, f"tutorial.ipynb cell {index}", "exec")


def test_every_code_cell_says_what_to_expect_and_asks_a_question():
    cells = read_notebook()["cells"]
    assert cells[0]["cell_type"] == "markdown" and "tiny" in text(cells[0]["source"])  # where the saved outputs come from
    for position, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        before, after = cells[position - 1], cells[position + 1]
        assert before["cell_type"] == "markdown" and "**Expect" in text(before["source"]), f"cell {position}: no expectation before it"
        question = text(after["source"])
        assert after["cell_type"] == "markdown" and "**Predict, then check.**" in question and "?" in question, \
            f"cell {position}: no question after it"
        assert "<details><summary>Answer</summary>" in question and "</details>" in question


def test_the_lesson_has_its_cells():
    for needle in ("git\", \"clone", "flops_command(", "bench.main(", "minifastv.load(question.folder", "answer_fast, stats_fast = run(",
                   "R_VALUES = [0.0, 0.25, 0.5, 0.75, 0.9]", "attention_allocation(", "def my_rule(", "evaluation.main(", "VIDEO_MODEL,"):
        code_cell_index(needle)
    setup = code_cells()[0]
    assert 'CLONE = "minifastv-course"' in setup and "sys.path.insert(0, os.getcwd())" in setup  # the clone never shadows
    assert "max_memory_allocated" in code_cells()[code_cell_index("answer_fast, stats_fast = run(")]


# ----------------------------------------------------------------------------------------------------
# The cells run offline, and the saved outputs are that run's


def test_notebook_runs_on_the_tiny_models(offline_run):
    outputs, namespace = offline_run
    out = "".join(printed(cell) for cell in outputs)
    assert "import minifastv -> minifastv/__init__.py" in out
    assert "No GPU here: the bench times a GPU, so this cell is skipped" in out
    assert "prompt: " in out and "576 of them the image's" in out
    assert "--- with FastV (K=2, R=0.5) ---" in out and "image tokens 576 -> 288 kept" in out
    assert "No GPU here, so no peak GPU memory to report." in out
    assert [row["kept"] for row in namespace["sweep"]] == [576, 432, 288, 144, 58]
    assert namespace["sweep"][0]["agreement"] == 1.0 and "(no plot: matplotlib" in out
    assert "system" in out and "image" in out  # the allocation table
    assert namespace["answer_mine"] is not None and namespace["stats_mine"].image_tokens_kept == 288
    assert "cat-questions: 2 questions, LLaVA-1.5's protocol" in out and "K2R0.75 fastv is not distinguishable" in out
    assert "video tokens 2056 -> 1028 kept" in out and namespace["video_model"].image_tower is None
    text_config = namespace["question"].config.text  # the first markdown cell describes the tiny model
    assert f"a {text_config.hidden_size}-wide, {text_config.num_hidden_layers}-layer decoder" in " ".join(
        text(read_notebook()["cells"][0]["source"]).split())


def test_saved_outputs_are_those_of_the_offline_run(offline_run):
    saved_notebook = read_notebook()
    fresh_notebook = with_outputs(saved_notebook, offline_run[0])  # what --save would write now
    cells = [cell for cell in saved_notebook["cells"] if cell["cell_type"] == "code"]
    fresh_cells = [cell for cell in fresh_notebook["cells"] if cell["cell_type"] == "code"]
    flops_cell = code_cell_index("flops_command(")
    for index, (cell, fresh) in enumerate(zip(cells, fresh_cells)):
        saved = printed(cell["outputs"])
        assert saved.strip() and all(output["output_type"] == "stream" for output in cell["outputs"]), f"cell {index}: no saved output"
        assert cell["execution_count"] == fresh["execution_count"] == index + 1
        assert [output["name"] for output in cell["outputs"]] == [output["name"] for output in fresh["outputs"]]
        assert stable_lines(saved) == stable_lines(printed(fresh["outputs"])), f"cell {index}: the saved output differs from a fresh run"
        if index == flops_cell:
            assert saved == printed(fresh["outputs"])  # arithmetic only: the same on every machine
        assert not re.search(r"(?<![\w.])/(tmp|work|home|root|content|Users|private|var)/|\bat 0x", saved), \
            f"cell {index}: a machine's path or address in the saved output"
        if TIME.search(saved):
            assert "measured on this CPU" in saved, f"cell {index}: a time that does not say where it was measured"
    assert "576" in "".join(printed(cell["outputs"]) for cell in cells)


# ----------------------------------------------------------------------------------------------------
# The numbers the markdown states are the code's


def test_the_flops_cell_prints_what_its_markdown_expects(capsys):
    from minifastv.flops.__main__ import main as flops_command

    cells = read_notebook()["cells"]
    before = text(cells[cells.index(next(cell for cell in cells if "flops_command(" in text(cell["source"]))) - 1]["source"])
    flops_command(["--config", "llava-1.5-7b"])
    expected = capsys.readouterr().out
    assert f"```text\n{expected}```" in before  # the whole output, line for line
    _, after = markdown_around(code_cell_index("flops_command("))
    flops_command(["--config", "llava-1.5-7b", "--r", "0.75"])
    at_075 = capsys.readouterr().out
    fewer_05 = float(re.search(r"TFLOPs \(([\d.]+)% fewer\)", expected).group(1))
    base, fast, fewer = re.search(r"([\d.]+) -> ([\d.]+) TFLOPs \(([\d.]+)% fewer\)", at_075).groups()
    assert f"1.5 x {fewer_05}% = {1.5 * fewer_05:.1f}%" in after
    assert f"{base} -> {fast} TFLOPs, {fewer}% fewer" in after and float(fewer) < 1.5 * fewer_05


def test_the_bench_cell_states_the_predicted_speed_ups(monkeypatch):
    from minifastv import bench
    from minifastv.flops import exact_prefill_flops

    monkeypatch.setattr(bench, "random_model", lambda config, device, dtype: config)  # the shape, no weights
    config = bench.random_llava(torch.device("cpu"), torch.float32)
    input_ids, _ = bench.benchmark_prompt(config, 40)
    num_tokens, num_image = input_ids.shape[1], config.image_tokens_per_image
    before, _ = markdown_around(code_cell_index("bench.main("))
    assert f"{num_image} image tokens and 40 text tokens (a {num_tokens}-token prompt)" in before
    unpruned = exact_prefill_flops(config, num_tokens, num_image)
    predicted = [f"{unpruned / exact_prefill_flops(config, num_tokens, num_image, 2, r):.2f}x at R={r}" for r in (0.25, 0.5, 0.75)]
    assert ", ".join(predicted) in before
    code = code_cells()[code_cell_index("bench.main(")]
    assert '["--device", DEVICE, "--no-transformers", "--repeats", "3"]' in code
    assert "--device cuda --no-transformers --repeats 3" in before  # the same in a terminal


def test_the_numbers_the_configs_give():
    from minifastv.checkpoint import config_by_name
    from minifastv.flops import kv_cache_bytes, parameter_count

    llava, video = config_by_name("llava-1.5-7b"), config_by_name("video-llava-7b")
    weights = f"{parameter_count(llava) * 2 / 2**30:.2f} GiB"
    before, after = markdown_around(code_cell_index("minifastv.load(question.folder"))
    assert f"weights: {weights}." in before and f"The weights take {weights}." in after
    assert f"{kv_cache_bytes(llava, 1, 0) / 2**20:.1f} MiB a token" in after
    assert f"the KV cache of a {36 + 576}-token prompt" in after  # what the FLOPs cell prints, for 36 text tokens
    before, _ = markdown_around(code_cell_index("attention_allocation("))
    assert f"one row per decoder layer ({llava.text.num_hidden_layers} on the 7B)" in before
    assert f"keeps {round(576 * 0.5)} of the 576 patches" in before
    before, after = markdown_around(code_cell_index("def my_rule("))
    kept = round(576 * 0.5)  # a random rule's expected overlap with FastV's: each kept token is in a random half with p = 1/2
    assert f"{kept // 2}: each of FastV's {kept} tokens is in a random half with probability one half" in after
    before, _ = markdown_around(code_cell_index("evaluation.main("))
    floor = re.search(r"a floor of \d+ s", " ".join((ROOT / "tutorial.md").read_text().split())).group()
    assert f"{floor} for the 600 answers" in before  # tutorial chapter 10 computes it (tests/test_tutorial_numbers.py)
    before, _ = markdown_around(code_cell_index("VIDEO_MODEL,"))
    video_weights = parameter_count(video, ("video",)) * 2 / 2**30
    video_cache = kv_cache_bytes(video, 36 + video.tokens_per_video, video.tokens_per_video, 2, 0.5) / 2**30
    assert f"computes {video_weights:.2f} GiB of weights (the video tower only) and {video_cache:.2f} GiB of KV cache " \
           f"for one video and 36 text tokens" in before
    kept = round(video.tokens_per_video * 0.5)
    assert f"video tokens {video.tokens_per_video} -> {kept} kept" in before
    assert f"{video.num_frames} frames of {video.vision.grid_size**2 + 1} tokens: {video.tokens_per_video:,} tokens" in before


@pytest.mark.skipif(not REFERENCE_TOKENIZER.is_file(), reason="the real tokenizer is in ../shared/reference, which is not present")
def test_the_7b_prompt_numbers():
    """The load, compare and sweep cells state the 7B's prompt length, kept tokens and FLOPs: computed here with
    the real tokenizer and the exact count."""
    from minifastv.checkpoint import config_by_name
    from minifastv.flops import kv_cache_bytes, prefill_flops_report
    from minifastv.model import FastV
    from minifastv.prompt import Tokenizer, encode_prompt, format_prompt

    config = config_by_name("llava-1.5-7b")
    tokenizer = Tokenizer.from_folder(REFERENCE_TOKENIZER.parent)
    num_tokens = encode_prompt(tokenizer, format_prompt("Describe this image."), 576).shape[1]
    before, after = markdown_around(code_cell_index("minifastv.load(question.folder"))
    assert f"prompt: {num_tokens} tokens, 576 of them the image's" in before
    answer_tokens = 64
    assert f'"MINIFASTV_MAX_NEW_TOKENS", "{answer_tokens}"' in code_cells()[0]  # the setup cell's MAX_NEW_TOKENS
    cache = kv_cache_bytes(config, num_tokens + answer_tokens, 576) / 2**30
    assert f"so {cache:.2f} GiB for {num_tokens} + {answer_tokens} tokens" in after

    report = prefill_flops_report(config, num_tokens, 576, FastV(2, 0.5))
    before, _ = markdown_around(code_cell_index("answer_fast, stats_fast = run("))
    assert (f"prefill FLOPs {report['exact_unpruned'] / 1e12:.2f} TFLOPs without FastV and {report['exact'] / 1e12:.2f} "
            f"TFLOPs with it ({report['exact_ratio']:.0%} of unpruned; paper formula {report['paper_ratio']:.0%})") in before
    assert "`576 -> 288 kept`" in before

    before, _ = markdown_around(code_cell_index("R_VALUES ="))
    rs = (0.0, 0.25, 0.5, 0.75, 0.9)
    kept = ", ".join(str(round(576 * (1 - r))) for r in rs)
    ratios = ", ".join(f"{prefill_flops_report(config, num_tokens, 576, FastV(2, r))['exact_ratio']:.0%}" for r in rs)
    assert f"kept {kept} (576 x (1 - R), rounded) and prefill FLOPs {ratios} of unpruned" in before


# ----------------------------------------------------------------------------------------------------
# The setup cell on Colab


def run_setup_cell_on_colab(monkeypatch, repo_url=None, gpu=False):
    """The first code cell as Colab runs it (google.colab imported, no clone yet), with git and pip never run."""
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    calls = []
    monkeypatch.setattr("subprocess.run", lambda *args, **kwargs: calls.append(args))
    source = code_cells()[0]
    if repo_url is not None:
        source = source.replace("https://github.com/OWNER/minifastv", repo_url)
    with pytest.raises(SystemExit) as stop:
        exec(compile(source, "tutorial.ipynb cell 0", "exec"), {"__name__": "__main__"})
    assert calls == [], "the cell stopped too late: it already cloned or installed"
    return str(stop.value)


def test_setup_cell_stops_on_the_placeholder_url(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a fresh Colab: no clone here yet
    message = run_setup_cell_on_colab(monkeypatch)
    assert "REPO_URL" in message and "placeholder" in message and "\n" not in message


def test_setup_cell_stops_without_a_gpu(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    message = run_setup_cell_on_colab(monkeypatch, repo_url="https://github.com/someone/minifastv")
    assert "Runtime > Change runtime type > T4 GPU" in message and "\n" not in message


def test_setup_cell_clones_beside_the_package_name_and_imports_the_clone(monkeypatch, tmp_path):
    """With a GPU, the cell clones into minifastv-course (git and pip stubbed: the 'clone' is a copy of this
    package), enters it and imports minifastv from it, even with a folder named minifastv beside it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "minifastv").mkdir()  # what `git clone URL minifastv` would leave: a namespace package in waiting
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT])
    calls = []

    def fake_run(command, check):
        calls.append(command[:2])
        if command[:2] == ["git", "clone"]:
            clone = tmp_path / command[-1]
            clone.mkdir()
            (clone / "minifastv").symlink_to(ROOT / "minifastv")

    monkeypatch.setattr("subprocess.run", fake_run)
    source = code_cells()[0].replace("https://github.com/OWNER/minifastv", "https://github.com/someone/minifastv")
    namespace = {"__name__": "__main__"}
    out = io.StringIO()
    package = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "minifastv"}
    try:
        for name in package:
            del sys.modules[name]  # so that the cell imports minifastv afresh, from the clone
        with contextlib.redirect_stdout(out):
            exec(compile(source, "tutorial.ipynb cell 0", "exec"), namespace)
    finally:  # the other tests go on with the package as it was
        for name in [name for name in sys.modules if name.split(".")[0] == "minifastv"]:
            del sys.modules[name]
        sys.modules.update(package)
    assert namespace["minifastv"].__file__ == str(tmp_path / "minifastv-course" / "minifastv" / "__init__.py")
    assert calls == [["git", "clone"], [sys.executable, "-m"]]
    assert Path.cwd() == tmp_path / "minifastv-course"
    assert hasattr(namespace["minifastv"], "load") and "import minifastv -> minifastv/__init__.py" in out.getvalue()


# ----------------------------------------------------------------------------------------------------
# python tests/test_notebook.py --save


def save_outputs():
    """Run the code cells on the tiny models, in a temporary weights/, and write their outputs into the notebook."""
    import os

    sys.path.insert(0, str(ROOT))
    import minifastv.checkpoint

    os.environ.update(OFFLINE_SETTINGS)
    os.chdir(ROOT)
    notebook = read_notebook()
    with tempfile.TemporaryDirectory() as weights:
        minifastv.checkpoint.WEIGHTS_DIR = Path(weights)
        outputs, _ = run_cells(code_cells(notebook))
    NOTEBOOK.write_text(json.dumps(with_outputs(notebook, outputs), indent=1, ensure_ascii=False) + "\n")
    print(f"saved the outputs of {len(outputs)} code cells into {NOTEBOOK.name}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--save"]:
        sys.exit("usage: python tests/test_notebook.py --save")
    save_outputs()
