"""tutorial.ipynb is a lesson in the course's order (setup, where the attention goes, FastV, speed, accuracy,
video, your rule): a markdown cell before every code cell says what to expect on the real model, one after it
asks a question; its code cells use minifastv's public Python API and run, in order, on the tiny offline model
(the Colab setup does nothing outside Colab, the GPU lines print one sentence); it is saved without outputs, so
that nothing a random model printed reads as a result; every number its markdown states is one that README.md
or tutorial.md states; and its setup cell on Colab stops with one sentence when the URL or the GPU is missing.
"""

import ast
import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "tutorial.ipynb"
REFERENCE_TOKENIZER = ROOT.parent / "shared" / "reference" / "llava-1.5-7b-hf" / "tokenizer.json"
# How the test swaps in the tiny random models: the setup cell reads these settings from the environment.
OFFLINE_SETTINGS = {"MINIFASTV_MODEL": "tiny", "MINIFASTV_VIDEO_MODEL": "tiny-video", "MINIFASTV_DEVICE": "cpu",
                    "MINIFASTV_MAX_NEW_TOKENS": "8"}
SECTIONS = ["1. Setup", "2. Where the attention goes", "3. FastV", "4. Speed", "5. Accuracy", "6. Video",
            "7. Your rule (homework)"]
# What the code cells may import: the standard library's few, torch, the pictures, and minifastv's public API
# (README.md, "Use it from Python"; the video and rules modules it names; the eval command's Python use), and
# the homework's exercise 4.
ALLOWED_IMPORTS = {
    "contextlib": None, "importlib": None, "io": None, "json": None, "os": None, "shlex": None, "subprocess": None,
    "sys": None, "tempfile": None,
    "torch": None, "matplotlib.pyplot": None, "IPython": {"get_ipython"}, "IPython.display": {"SVG", "display"},
    "minifastv": {"eval"},
    "minifastv.checkpoint": {"resolve_folder"},
    "minifastv.image": {"ImageProcessorConfig", "preprocess"},
    "minifastv.prompt": {"SYSTEM_PROMPTS", "Tokenizer", "encode_prompt", "format_prompt"},
    "minifastv.video": {"load_video", "preprocess_video"},
    "minifastv.rules": {"grid_rule", "no_rope_rule", "random_rule"},
    "homework.agreement": None,  # exercise 4, on the notebook's model
}
NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*")


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


def section_of_each_code_cell():
    """The section heading ("## ...") each code cell sits under, in order."""
    section, sections = None, []
    for cell in read_notebook()["cells"]:
        if cell["cell_type"] == "markdown":
            section = next((line[3:].strip() for line in cell["source"] if line.startswith("## ")), section)
        else:
            sections.append(section)
    return sections


# ----------------------------------------------------------------------------------------------------
# Running the cells as a notebook would, recording what each prints


class StreamRecorder(io.TextIOBase):
    """Stands in for sys.stdout or sys.stderr: appends what is written to `outputs`, one entry per run of
    writes to the same stream, in the order they came."""

    def __init__(self, name, outputs):
        self.name, self.outputs = name, outputs

    def write(self, piece):
        if self.outputs and self.outputs[-1]["name"] == self.name:
            self.outputs[-1]["text"] += piece
        elif piece:
            self.outputs.append({"name": self.name, "text": piece})
        return len(piece)


def run_cells(sources):
    """Execute the code cells in order in one namespace; returns what each cell printed, and the namespace as
    each cell left it (a shallow copy: the names, not copies of the models)."""
    namespace = {"__name__": "__main__"}
    printed, after = [], []
    for index, source in enumerate(sources):
        outputs = []
        with contextlib.redirect_stdout(StreamRecorder("stdout", outputs)), \
                contextlib.redirect_stderr(StreamRecorder("stderr", outputs)):
            exec(compile(source, f"tutorial.ipynb code cell {index}", "exec"), namespace)
        printed.append("".join(output["text"] for output in outputs if output["name"] == "stdout"))
        after.append(dict(namespace))
    return printed, after


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """The code cells run once, in order, on the tiny models (built into a temporary weights/)."""
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


def test_the_notebook_is_saved_without_outputs():
    """A saved output would be the tiny random model's ("this this this", the image taking nearly all of the
    attention in every layer), read on GitHub as if it were the lesson's result: the notebook keeps none."""
    for index, cell in enumerate(cell for cell in read_notebook()["cells"] if cell["cell_type"] == "code"):
        assert cell["outputs"] == [] and cell["execution_count"] is None, f"code cell {index} holds a saved output"


def test_the_sections_come_in_the_course_order():
    headings = [line[3:].strip() for cell in read_notebook()["cells"] if cell["cell_type"] == "markdown"
                for line in cell["source"] if line.startswith("## ")]
    assert headings == SECTIONS
    sections = section_of_each_code_cell()
    for needle, section in (("git\", \"clone", "1. Setup"), ("model = load_llava()\ntokenizer", "1. Setup"),
                            ("observe=observe", "2. Where the attention goes"),
                            ("fastv=fastv, stats=stats_fast", "3. FastV"), ("def kept_by(", "3. FastV"),
                            ("stats_plain), (", "4. Speed"), ("R_VALUES = [0.0, 0.25, 0.5, 0.75, 0.9]", "4. Speed"),
                            ("evaluation.main(", "5. Accuracy"), ("video_model = minifastv.load(", "6. Video"),
                            ("def my_rule(", "7. Your rule (homework)"),
                            ("exercise_4.compare_on_folder(model, folder", "7. Your rule (homework)")):
        assert sections[code_cell_index(needle)] == section, needle


def test_every_code_cell_says_what_to_expect_and_asks_a_question():
    cells = read_notebook()["cells"]
    assert cells[0]["cell_type"] == "markdown" and "tiny" in text(cells[0]["source"])  # what runs offline
    for position, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        before, after = cells[position - 1], cells[position + 1]
        assert before["cell_type"] == "markdown" and "**Expect" in text(before["source"]), f"cell {position}: no expectation before it"
        question = text(after["source"])
        assert after["cell_type"] == "markdown" and "**Predict, then check.**" in question and "?" in question, \
            f"cell {position}: no question after it"
        assert "<details><summary>Answer</summary>" in question and "</details>" in question


def test_the_cells_use_the_public_api():
    """README.md's "Use it from Python", not the commands' insides (minifastv.__main__, cli, analyze)."""
    import minifastv

    for index, source in enumerate(code_cells()):
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name in ALLOWED_IMPORTS, f"code cell {index} imports {alias.name}"
            elif isinstance(node, ast.ImportFrom):
                allowed = ALLOWED_IMPORTS.get(node.module, set())
                names = {alias.name for alias in node.names}
                assert allowed is not None and names <= allowed, f"code cell {index}: from {node.module} import {names}"
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "minifastv":
                assert node.attr in minifastv.__all__ or node.attr.startswith("__"), \
                    f"code cell {index} uses minifastv.{node.attr}"
    setup, load = code_cells()[0], code_cells()[1]
    assert 'CLONE = "minifastv-course"' in setup and "sys.path.insert(0, os.getcwd())" in setup  # the clone never shadows
    assert "minifastv.tiny_checkpoint() if MODEL == \"tiny\" else resolve_folder(MODEL)" in load
    assert 'system=SYSTEM_PROMPTS["llava_v1"]' in load  # the FastV paper's setting, for its attention numbers
    evaluation = code_cells()[code_cell_index("evaluation.main(")]
    assert "--system" not in evaluation  # the eval's default: vicuna_v1
    before, _ = markdown_around(code_cell_index("evaluation.main("))
    assert "runs the command `python -m minifastv.eval`" in before  # the entry point, said plainly
    flags = re.search(r"with the flags `([^`]+)`", before).group(1).split()
    assert all(flag in evaluation for flag in flags) and 'print("python -m minifastv.eval", shlex.join(flags))' in evaluation
    attention = code_cells()[code_cell_index("observe=observe")]
    assert "minifastv.attention_rows(view.queries, view.keys, view.attention_mask" in attention


def test_the_homework_reuses_the_loaded_model(offline_run, monkeypatch):
    """With LLaVA loaded, the homework cells load nothing (a second 7B does not fit a T4): the rule runs on
    `model`, and so does exercise 4, once agreement() is written. After sections 5 and 6 let go of LLaVA, the
    first homework cell loads it back, once."""
    import importlib

    import minifastv

    printed, after = offline_run
    rule_cell, exercise_cell = code_cell_index("def my_rule("), code_cell_index("exercise_4.compare_on_folder(")
    assert exercise_cell == rule_cell + 1
    assert after[rule_cell - 1]["model"] is None and after[rule_cell]["model"] is not None  # loaded back
    assert after[rule_cell]["video_model"] is None
    assert "fill in agreement() in homework/agreement.py first (exercise 4)" in printed[exercise_cell]
    namespace = dict(after[exercise_cell])

    def no_second_load(*args, **kwargs):
        raise AssertionError("a homework cell loaded a model although one was loaded")

    namespace["load_llava"] = no_second_load
    monkeypatch.setattr(minifastv, "load", no_second_load)
    exercise_4 = namespace["exercise_4"]
    monkeypatch.setattr(exercise_4, "load", no_second_load)
    monkeypatch.setattr(exercise_4, "agreement", lambda plain, pruned: {"exact_match": 1.0, "token_f1": 1.0})
    systems, format_prompt = [], exercise_4.format_prompt
    monkeypatch.setattr(exercise_4, "format_prompt",
                        lambda *args, **kwargs: systems.append(kwargs.get("system")) or format_prompt(*args, **kwargs))
    monkeypatch.setattr(importlib, "reload", lambda module: module)  # keeps the filled-in agreement
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for cell in (rule_cell, exercise_cell):
            exec(compile(code_cells()[cell], f"code cell {cell}", "exec"), namespace)
    assert namespace["model"] is after[rule_cell]["model"] and namespace["stats_mine"].image_tokens_kept == 288
    assert "chelsea.png: " in out.getvalue() and "exact_match: 1.000" in out.getvalue()
    assert systems == [namespace["SYSTEM_PROMPTS"]["llava_v1"]]  # the system prompt of the notebook's other cells


def test_the_homework_readme_calls_exercise_4_with_the_notebook_s_names(offline_run):
    """homework/README.md's exercise 4 shows the call to make in the notebook: every name it uses and does not
    define itself is one the notebook defines by then, and its arguments fit compare_on_folder."""
    import builtins
    import inspect
    import textwrap

    readme = (ROOT / "homework" / "README.md").read_text()
    block = next(block for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
                 if "compare_on_folder(model" in block)
    tree = ast.parse(textwrap.dedent(block))
    defined = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               for alias in node.names}
    defined |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    _, after = offline_run
    namespace = after[code_cell_index("exercise_4.compare_on_folder(")]
    assert not {name for name in used - defined if not hasattr(builtins, name)} - set(namespace)
    call = next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "compare_on_folder")
    inspect.signature(namespace["exercise_4"].compare_on_folder).bind(
        *call.args, **{keyword.arg: keyword.value for keyword in call.keywords})
    assert 'system=SYSTEM_PROMPTS["llava_v1"]' in block


# ----------------------------------------------------------------------------------------------------
# The cells run offline, on the tiny models


def test_notebook_runs_on_the_tiny_models(offline_run):
    printed, after = offline_run
    out = "".join(printed)
    namespace = after[-1]
    assert "import minifastv -> minifastv/__init__.py" in out
    assert "prompt: " in out and "576 of them the image's" in out
    model = after[code_cell_index("observe=observe")]["model"]
    shares = namespace["shares"]  # where the attention goes: one row per layer, four shares summing to 1
    assert len(shares) == model.config.text.num_hidden_layers
    assert all(abs(sum(row) - 1) < 1e-4 for row in shares) and "the image's share: " in out
    assert "tokens: system " in out and ", image 576, " in out
    assert "image tokens 576 -> 288 kept" in out and ("the same answer" in out or "different answers" in out)
    kept = namespace["kept"]  # the patches each rule keeps
    assert list(kept) == ["fastv_rule", "no_rope_rule", "random_rule", "grid_rule"]
    assert all(len(tokens) == 288 for tokens in kept.values()) and "per row, top to bottom: [12, 12, 12, " in out
    assert torch.equal(kept["fastv_rule"], namespace["stats_fast"].kept_image_indices[0])
    assert "No GPU here, so no peak GPU memory to report." in out
    assert [row["kept"] for row in namespace["sweep"]] == [576, 432, 288, 144, 58]
    assert namespace["sweep"][0]["predicted"] == pytest.approx(1, abs=0.01) and "measured on this CPU" in out
    assert "python -m minifastv.eval --data cat-questions --max-new-tokens 8 --answers eval-200.jsonl" in out
    assert "cat-questions: 2 questions, LLaVA-1.5's protocol" in out and "K2R0.75 fastv is not distinguishable" in out
    video = code_cell_index("video_model = minifastv.load(")
    assert "video tokens 2056 -> 1028 kept" in out and after[video]["video_model"].image_tower is None
    assert namespace["answer_mine"] is not None and "my_rule: image tokens 576 -> 288 kept" in out
    text_config = model.config.text  # the first markdown cell describes the tiny model
    assert f"a {text_config.hidden_size}-wide, {text_config.num_hidden_layers}-layer decoder" in " ".join(
        text(read_notebook()["cells"][0]["source"]).split())


def test_the_timing_cell_warms_up_every_setting_and_measures_against_r0(offline_run, monkeypatch):
    """The speed section times every setting once untimed, then in turns (every other round reversed); its
    speed-ups are over FastV at R=0, as tutorial chapter 7's, and it warns, as minifastv.bench does, when every
    no-FastV run was slower than every R=0 run. The prefill times are made up here, the runs are real."""
    import minifastv

    _, after = offline_run
    cell = code_cell_index("R_VALUES = [0.0, 0.25, 0.5, 0.75, 0.9]")
    before, _ = markdown_around(cell)
    assert "against FastV at R=0" in before and "warning" in before
    generate = minifastv.generate
    for plain_ms, warns in ((30.0, True), (19.0, False)):
        taken = []

        def timed_generate(*args, fastv=None, stats=None, **kwargs):
            ids = generate(*args, fastv=fastv, stats=stats, **kwargs)
            taken.append(None if fastv is None else fastv.r)
            stats.prefill_seconds = (plain_ms if fastv is None else 20.0 * (1 - fastv.r / 2)) / 1e3
            return ids

        monkeypatch.setattr(minifastv, "generate", timed_generate)
        namespace, out = dict(after[cell - 1]), io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code_cells()[cell], f"code cell {cell}", "exec"), namespace)
        settings = [None, 0.0, 0.25, 0.5, 0.75, 0.9]
        assert taken == settings + settings + settings[::-1] + settings  # the warm-up, then three rounds
        sweep = namespace["sweep"]
        assert [row["measured"] for row in sweep] == pytest.approx([1 / (1 - r / 2) for r in (0, 0.25, 0.5, 0.75, 0.9)])
        assert sweep[0]["predicted"] == 1 and sweep[2]["predicted"] > 1
        assert f"without FastV {plain_ms:.1f} ms, FastV at R=0 20.0 ms" in out.getvalue()
        assert ("warning: no FastV measured slower than FastV at R=0" in out.getvalue()) == warns


# ----------------------------------------------------------------------------------------------------
# The numbers the markdown states


def test_every_number_in_the_markdown_is_one_the_docs_state():
    """The markdown quotes README.md and tutorial.md as they stand, never a number from memory or an older
    draft: each number in a markdown cell occurs in one of them."""
    docs = (ROOT / "README.md").read_text() + (ROOT / "tutorial.md").read_text()
    stated = {number.rstrip(".,") for number in NUMBER.findall(docs)}
    for position, cell in enumerate(read_notebook()["cells"]):
        if cell["cell_type"] == "markdown":
            unsourced = sorted({n.rstrip(".,") for n in NUMBER.findall(text(cell["source"]))} - stated)
            assert not unsourced, f"markdown cell {position} states {unsourced}, which README.md and tutorial.md do not"


def tutorial_chapters():
    """{chapter number: its text} of tutorial.md, cut at its "# N. Title" headings."""
    parts = re.split(r"^# (\d+)\. ", (ROOT / "tutorial.md").read_text(), flags=re.M)
    return {int(number): body for number, body in zip(parts[1::2], parts[2::2])}


def test_the_tutorial_sections_the_markdown_names_are_in_their_chapters():
    """'tutorial chapter N, "Heading"' points at a section of chapter N that begins with that heading."""
    chapters = tutorial_chapters()
    markdown = " ".join(text(cell["source"]) for cell in read_notebook()["cells"] if cell["cell_type"] == "markdown")
    pointers = re.findall(r'tutorial chapter (\d+), "([^"]+)"', " ".join(markdown.split()))
    assert len(pointers) >= 2
    for number, heading in pointers:
        assert re.search(rf"^## {re.escape(heading)}", chapters[int(number)], flags=re.M), (number, heading)


def test_the_decode_cost_points_to_the_chapter_that_explains_it():
    """The 13.2 GB a decode step reads: the chapter cited is the first to state it (chapter 4's KV cache)."""
    _, answer = markdown_around(code_cell_index("stats_plain), ("))
    cited = int(re.search(r"13\.2 GB of decoder and `lm_head` \(tutorial chapter (\d+)\)", answer).group(1))
    assert cited == min(number for number, body in tutorial_chapters().items() if "13.2 GB" in body)


def test_the_numbers_the_configs_give():
    from minifastv.checkpoint import config_by_name
    from minifastv.flops import kv_cache_bytes, parameter_count

    llava, video = config_by_name("llava-1.5-7b"), config_by_name("video-llava-7b")
    weights = f"{parameter_count(llava) * 2 / 2**30:.2f} GiB"
    before, after = markdown_around(code_cell_index("model = load_llava()\ntokenizer"))
    assert f"computes {weights} of weights" in before and f"The weights take {weights}." in after
    assert f"{kv_cache_bytes(llava, 1, 0) / 2**20:.1f} MiB per token" in after
    assert f"in each of the {llava.text.num_hidden_layers} layers" in after
    assert f'"MINIFASTV_MAX_NEW_TOKENS", "64"' in code_cells()[0] and "answering with 64 new tokens" in after
    before, _ = markdown_around(code_cell_index("def kept_by("))
    assert f"each of the {llava.vision.grid_size} rows" in before
    kept = round(576 * 0.5)  # a random rule's expected overlap with FastV's: each kept token is in a random half with p = 1/2
    before, after = markdown_around(code_cell_index("def my_rule("))
    assert f"keeps {kept} of the 576 image tokens" in before
    assert f"Half of them, on average: each of FastV's {kept} tokens is in a random half with probability one half" in after
    before, _ = markdown_around(code_cell_index("evaluation.main("))
    floor = re.search(r"a floor of \d+ s", " ".join((ROOT / "tutorial.md").read_text().split())).group()
    assert f"{floor} for the 600 answers" in before  # tutorial chapter 10 computes it (tests/test_tutorial_numbers.py)
    before, _ = markdown_around(code_cell_index("video_model = minifastv.load("))
    video_weights = parameter_count(video, ("video",)) * 2 / 2**30
    video_cache = kv_cache_bytes(video, 36 + video.tokens_per_video, video.tokens_per_video, 2, 0.5) / 2**30
    assert f"computes {video_weights:.2f} GiB of weights (the video tower only) and {video_cache:.2f} GiB of KV cache " \
           f"for one video and 36 text tokens" in before
    assert f"video tokens {video.tokens_per_video} -> {round(video.tokens_per_video * 0.5)} kept" in before
    assert f"{video.num_frames} frames of {video.vision.grid_size**2 + 1} tokens: {video.tokens_per_video:,} tokens" in before


@pytest.mark.skipif(not REFERENCE_TOKENIZER.is_file(), reason="the real tokenizer is in ../shared/reference, which is not present")
def test_the_7b_prompt_is_about_as_long_as_the_one_the_speed_section_quotes():
    """The speed section expects the FLOPs of tutorial chapter 6's 616-token prompt: the notebook's prompt, with
    the real tokenizer, is within a few tokens of it, and its FLOPs within 2% of those."""
    from minifastv.checkpoint import config_by_name
    from minifastv.flops import prefill_flops_report
    from minifastv.model import FastV
    from minifastv.prompt import SYSTEM_PROMPTS, Tokenizer, encode_prompt, format_prompt

    tokenizer = Tokenizer.from_folder(REFERENCE_TOKENIZER.parent)
    prompt = format_prompt("Describe this image.", system=SYSTEM_PROMPTS["llava_v1"])
    input_ids = encode_prompt(tokenizer, prompt, 576)
    assert 'IMAGE, QUESTION = "minifastv/assets/chelsea.png", "Describe this image."' in code_cells()[1]
    assert int((input_ids[0] == tokenizer.image_token_id).nonzero()[0]) == 35  # the system tokens, as chapter 5 counts
    assert abs(input_ids.shape[1] - 616) <= 10
    report = prefill_flops_report(config_by_name("llava-1.5-7b"), input_ids.shape[1], 576, FastV(2, 0.5))
    before, _ = markdown_around(code_cell_index("stats_plain), ("))
    assert "616-token prompt" in before and "from 8.57 to 4.94 TFLOPs at R=0.5" in before
    assert report["exact_unpruned"] / 1e12 == pytest.approx(8.57, rel=0.02)
    assert report["exact"] / 1e12 == pytest.approx(4.94, rel=0.02)


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
