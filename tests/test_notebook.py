"""tutorial.ipynb is a valid notebook whose code cells run, in order, on a tiny CPU checkpoint (the Colab
setup cell does nothing outside Colab; the model comes from MINIFASTV_MODEL instead of the 7B download)."""

import json
from pathlib import Path

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


def test_notebook_runs_on_a_tiny_checkpoint(cli_checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MINIFASTV_MODEL", str(cli_checkpoint))
    monkeypatch.setenv("MINIFASTV_MAX_NEW_TOKENS", "4")
    namespace = {"__name__": "__main__"}
    for index, source in enumerate(code_cells()):
        exec(compile(source, f"tutorial.ipynb cell {index}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "--- with FastV ---" in out and "image tokens 36 -> 18 kept" in out
    assert "system" in out and "image" in out  # the allocation table
    assert namespace["answer_mine"] is not None and namespace["stats_mine"].image_tokens_kept == 18
