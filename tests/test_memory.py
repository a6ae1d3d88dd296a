"""Loading streams the checkpoint: host memory grows by the model it keeps, not by the checkpoint.

A random llava-shaped float16 checkpoint of about 650 MB is loaded in fresh processes
(tests/memory_probe.py; `python tests/measure_load_memory.py` prints all the numbers).
"""

import sys

import pytest

from memory_probe import largest_tensor_bytes, measure_load, write_checkpoint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak memory from /proc")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("memory_checkpoint")
    size = write_checkpoint(folder)
    assert size >= 500e6
    return folder, size


def test_loading_for_a_gpu_never_holds_the_checkpoint_in_host_memory(checkpoint):
    """device="meta" reads every tensor as for a GPU (pread, one tensor at a time) and drops it: the host-side
    cost of loading onto a GPU. At most about two of the largest tensors at once, a small part of the whole."""
    folder, size = checkpoint
    result = measure_load(folder, "meta", "float16")
    assert result["model_bytes"] == 0
    largest = largest_tensor_bytes(folder)
    assert largest < 0.15 * size  # else the bound below would say little
    assert result["peak_increase"] < 2 * largest + 20e6, (
        f"loading peaked {result['peak_increase'] / 1e6:.0f} MB above the start for a {size / 1e6:.0f} MB "
        f"checkpoint whose largest tensor is {largest / 1e6:.0f} MB"
    )


def test_loading_onto_the_cpu_makes_no_second_copy(checkpoint):
    """The CPU copies each tensor out of a memory map of the file: the map's pages count as this process's
    memory while it is open, so it must close after each tensor, not hold the whole file beside the model."""
    folder, size = checkpoint
    result = measure_load(folder, "cpu", "float16")
    assert result["model_bytes"] >= size * 0.99  # the weights (and the RoPE tables) now live in RAM
    largest = largest_tensor_bytes(folder)
    assert result["peak_increase"] < result["model_bytes"] + 2 * largest + 20e6, (
        f"loading peaked {result['peak_increase'] / 1e6:.0f} MB above the start for a model of "
        f"{result['model_bytes'] / 1e6:.0f} MB whose largest tensor is {largest / 1e6:.0f} MB"
    )


def test_the_speed_script_times_transformers_on_the_same_weights(checkpoint):
    """tests/measure_load_speed.py's comparison row: transformers loads the same checkpoint (its parameters hold the
    same bytes as ours, RoPE tables aside), and both loads are timed."""
    folder, size = checkpoint
    ours, theirs = measure_load(folder, "cpu", "float16"), measure_load(folder, "cpu", "float16", transformers=True)
    assert size * 0.99 <= theirs["model_bytes"] <= ours["model_bytes"] <= size * 1.01
    assert ours["seconds"] > 0 and theirs["seconds"] > 0
