"""What every command shares at its door (cli.py, checkpoint.py's weights folder, the package): an
output that cannot be written, a weights folder that cannot be written, Ctrl-C, a device that is not
there, and the package installed into a fresh folder and run from another one.

Each command's own flags are tested beside it (test_cli.py, test_bench.py, test_analyze.py,
test_eval.py); here is what they all get from cli.py.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import minifastv
import minifastv.checkpoint as checkpoint
from minifastv import __main__ as ask
from minifastv import cli
from minifastv.errors import CheckpointError, UsageError

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------
# Outputs: refused in one sentence before any slow work


def test_an_output_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UsageError, match=r"^--json .*a_file/out.json cannot be written: a file stands"):
        cli.check_output(blocker / "out.json", "--json")
    with pytest.raises(UsageError, match=r"^--out .*a_file/charts cannot be written"):
        cli.check_output(blocker / "charts", "--out", folder=True)


def test_a_folder_given_for_a_file_is_refused(tmp_path):
    with pytest.raises(UsageError, match=r"^--json .* cannot be written \(.*\): choose another place"):
        cli.check_output(tmp_path, "--json")


def test_the_check_makes_nothing_and_the_writer_makes_the_folders(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    assert cli.check_output(target, "--json") == target
    assert list(tmp_path.iterdir()) == []  # a refused run later on leaves nothing behind
    cli.write_output(target, "{}")
    assert target.read_text() == "{}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(UsageError, match="Permission denied"):
            cli.check_output(tmp_path / "out.json", "--json")
    finally:
        tmp_path.chmod(0o700)


# ------------------------------------------------------------------------------------------------
# The weights folder, and the tiny model from Python


def test_an_unwritable_weights_folder_is_one_sentence(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", blocker / "weights")
    monkeypatch.setattr(cli, "load_model", lambda *args: pytest.fail("loaded a model"))
    assert cli.report_errors(ask.main, ["--model", "tiny"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: The weights folder {blocker / 'weights'} cannot be written")
    assert "MINIFASTV_WEIGHTS" in error


def test_the_tiny_model_from_python(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path)
    model = minifastv.load(minifastv.tiny_checkpoint(), progress=False)
    assert model.config.image_tokens_per_image == 576  # the real model's shape, at a tiny width
    assert (tmp_path / "tiny" / "model.safetensors").is_file()
    with pytest.raises(CheckpointError, match=r"minifastv\.load\(minifastv\.tiny_checkpoint"):
        minifastv.load("tiny")  # the name the commands take is not a folder: the error says what is


def test_an_installed_package_keeps_its_weights_out_of_site_packages(tmp_path):
    """A clone downloads into its weights/ folder; a package installed without one, into
    ~/.cache/minifastv (MINIFASTV_WEIGHTS overrides both)."""
    assert checkpoint.CLONE_WEIGHTS == ROOT / "weights"
    code = "from minifastv.checkpoint import WEIGHTS_DIR; print(WEIGHTS_DIR)"
    environment = {**os.environ, "HOME": str(tmp_path)}
    environment.pop("MINIFASTV_WEIGHTS", None)
    printed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment, text=True,
                             capture_output=True, check=True).stdout.strip()
    assert printed == str(ROOT / "weights")
    environment["MINIFASTV_WEIGHTS"] = str(tmp_path / "mine")
    printed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment, text=True,
                             capture_output=True, check=True).stdout.strip()
    assert printed == str(tmp_path / "mine")


# ------------------------------------------------------------------------------------------------
# Ctrl-C, devices


def interrupted_main(argv):
    print("half an answer", end="")
    raise KeyboardInterrupt


def wrapped_interrupt_main(argv):
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as interrupt:
        raise RuntimeError("a compiler worker died") from interrupt


@pytest.mark.parametrize("main", [interrupted_main, wrapped_interrupt_main])
def test_ctrl_c_is_one_line_and_exit_code_130(main, capsys):
    assert cli.report_errors(main, []) == 130
    printed = capsys.readouterr()
    assert printed.err.strip() == "interrupted (Ctrl-C)"
    assert "Traceback" not in printed.err


def test_a_bug_that_is_not_an_interrupt_keeps_its_traceback():
    def buggy(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        cli.report_errors(buggy, [])


@pytest.mark.parametrize("name, message", [
    ("cpu:1", "the CPU is one device, write --device cpu"),
    ("meta", "is not supported"),
    ("gpu", "Unknown device"),
])
def test_devices_that_cannot_be_used(name, message):
    with pytest.raises(UsageError, match=message):
        cli.pick_device(name)


# ------------------------------------------------------------------------------------------------
# The package, installed


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install .` into a fresh folder (no dependencies: they are installed already), from a
    copy of the sources: setuptools builds in the source folder."""
    source, target = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("site")
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copytree(ROOT / "minifastv", source / "minifastv",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(source)],
                   check=True, capture_output=True)
    return target


def run_installed(installed, cwd, *args, **env):
    environment = {**os.environ, "PYTHONPATH": str(installed), "HF_HUB_OFFLINE": "1", **env}
    environment.pop("MINIFASTV_WEIGHTS", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=environment, text=True,
                          capture_output=True, timeout=300)


def test_the_installed_package_carries_its_data(installed):
    package = installed / "minifastv"
    assert (package / "assets" / "chelsea.png").is_file()
    assert (package / "assets" / "chelsea_pan.webp").is_file()
    assert (package / "assets" / "figures" / "bench-cpu.json").is_file()
    assert not (installed / "weights").exists()


def test_the_installed_package_runs_from_another_folder(installed, tmp_path):
    home = tmp_path / "home"
    result = run_installed(installed, tmp_path, "-m", "minifastv", "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"minifastv {minifastv.__version__}"
    result = run_installed(installed, tmp_path, "-c",
                           "import minifastv; print(minifastv.__file__)", HOME=str(home))
    assert result.stdout.strip().startswith(str(installed))  # not the clone's copy
    result = run_installed(installed, tmp_path, "-m", "minifastv", "--model", "tiny",
                           "--max-new-tokens", "3", "--device", "cpu", HOME=str(home))
    assert result.returncode == 0, result.stderr
    assert "576 -> 288" in result.stdout  # the cat shipped in the package
    assert (home / ".cache" / "minifastv" / "tiny" / "model.safetensors").is_file()


@pytest.mark.parametrize("module", ["minifastv.__main__", "minifastv.analyze", "minifastv.bench",
                                    "minifastv.eval", "minifastv.flops.__main__",
                                    "minifastv.figures"])
def test_every_command_says_its_version(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"minifastv {minifastv.__version__}"


def test_offline_the_download_error_points_to_the_tiny_model(tmp_path, monkeypatch):
    import huggingface_hub

    def unreachable(**options):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(CheckpointError, match=r"could not be downloaded .* --model tiny on the "
                                              r"commands, minifastv\.tiny_checkpoint\(\) in Python"):
        checkpoint.resolve_folder("llava-hf/llava-1.5-7b-hf")


def test_flops_takes_the_tiny_models_by_name(tmp_path, monkeypatch, capsys):
    from minifastv.flops import __main__ as flops

    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path)
    assert cli.report_errors(flops.main, ["--config", "tiny"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny: 36 text + 576 image tokens") and "MFLOPs" in out
