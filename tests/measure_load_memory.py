"""Measure the host memory that minifastv.load takes: `python tests/measure_load_memory.py`.

Writes a random llava-shaped float16 checkpoint of about 650 MB to a temporary folder, then loads it
in a fresh process per case and prints the peak resident-memory increase (VmHWM) next to the
bytes the loaded model holds in host memory.
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_probe import largest_tensor_bytes, measure_load, write_checkpoint  # noqa: E402

CASES = [  # (device, dtype, what it stands for)
    ("cpu", "float16", "CPU, checkpoint's dtype"),
    ("cpu", "float32", "CPU, cast to float32"),
    ("meta", "float16", "read as for a GPU (pread, one tensor at a time) and dropped: the host cost"),
]

MB = 1e6


def main():
    with tempfile.TemporaryDirectory() as folder:
        checkpoint_bytes = write_checkpoint(folder)
        print(f"checkpoint: {checkpoint_bytes / MB:.0f} MB (one float16 safetensors file)")
        print(f"{'device':>6} {'dtype':>8} {'model in RAM':>13} {'peak RSS increase':>18} {'peak - model':>13}")
        for device, dtype, meaning in CASES:
            result = measure_load(folder, device, dtype)
            extra = result["peak_increase"] - result["model_bytes"]
            print(f"{device:>6} {dtype:>8} {result['model_bytes'] / MB:>10.0f} MB {result['peak_increase'] / MB:>15.0f} MB "
                  f"{extra / MB:>10.0f} MB   {meaning}")
        print(f"largest tensor in the checkpoint: {largest_tensor_bytes(folder) / MB:.0f} MB")
        print(f"(not counted above: torch's one-time setup on the first meta build, {result['setup'] / MB:.0f} MB)")


if __name__ == "__main__":
    main()
