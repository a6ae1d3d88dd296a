"""tutorial.ipynb is a valid notebook whose code cells run, in order, on a tiny CPU checkpoint (the Colab
setup cell does nothing outside Colab; the model comes from MINIFASTV_MODEL instead of the 7B download),
and whose setup cell on Colab stops with one sentence when the URL or the GPU is missing."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "tutorial.ipynb"


def code_cells():
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["nbformat"] == 4 and notebook["cells"]
    for cell in notebook["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None  # committed without outputs
    return ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_notebook_is_valid_and_plain_python():
    cells = code_cells()
    assert len(cells) >= 5
    for index, source in enumerate(cells):
        assert not any(line.lstrip().startswith(("!", "%")) for line in source.splitlines()), "no shell magics"
        compile(source, f"tutorial.ipynb cell {index}", "exec")


def test_notebook_runs_on_a_tiny_checkpoint(cli_checkpoint, monkeypatch, capsys, tmp_path):
    from minifastv.tiny import write_tiny_checkpoint

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MINIFASTV_MODEL", str(cli_checkpoint))
    monkeypatch.setenv("MINIFASTV_VIDEO_MODEL", str(write_tiny_checkpoint(tmp_path / "tiny-video", video=True)))
    monkeypatch.setenv("MINIFASTV_DEVICE", "cpu")
    monkeypatch.setenv("MINIFASTV_MAX_NEW_TOKENS", "4")
    namespace = {"__name__": "__main__"}
    for index, source in enumerate(code_cells()):
        exec(compile(source, f"tutorial.ipynb cell {index}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "--- with FastV ---" in out and "image tokens 36 -> 18 kept" in out
    assert "system" in out and "image" in out  # the allocation table
    assert namespace["answer_mine"] is not None and namespace["stats_mine"].image_tokens_kept == 18
    assert "video tokens 2056 -> 1028 kept" in out and namespace["video_model"].image_tower is None


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
