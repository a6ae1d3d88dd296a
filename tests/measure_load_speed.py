"""Time minifastv.load from a warm page cache: `python tests/measure_load_speed.py`.

Writes a random float16 checkpoint in the real 7B widths with fewer layers (4 decoder layers, 6 CLIP
layers: about 2.3 GB) to a temporary folder, reads it once to warm the page cache, then loads it
`--runs` times per case, each in a fresh process, and prints the fastest run (and all of them), the
speed and the peak host-memory increase. Loading onto a GPU is timed by tests/gpu_check.py: its host
side (pread into pinned buffers that torch reuses) cannot run here, and device="meta", which reads the
same way into fresh unpinned buffers, would time the buffers' first touch rather than the reading, so
it is not timed here; tests/measure_load_memory.py shows its host memory.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_probe import measure_load, write_checkpoint  # noqa: E402

CASES = [  # (device, dtype, transformers, what it stands for)
    ("cpu", "float16", False, "CPU, checkpoint's dtype"),
    ("cpu", "float32", False, "CPU, cast to float32"),
    ("cpu", "float16", True, "transformers' from_pretrained (maps the file, reads on first use)"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="loads per case, each in a fresh process (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        size = write_checkpoint(folder, text={"num_hidden_layers": 4}, vision={"num_hidden_layers": 6})
        (Path(folder) / "model.safetensors").read_bytes()  # into the page cache, as a second load finds it
        print(f"checkpoint: {size / 1e9:.2f} GB (one float16 safetensors file, warm page cache)")
        for device, dtype, transformers, meaning in CASES:
            runs = [measure_load(folder, device, dtype, transformers) for _ in range(args.runs)]
            best = min(runs, key=lambda run: run["seconds"])
            times = ", ".join(f"{run['seconds']:.2f}" for run in runs)
            print(f"{'transformers' if transformers else 'minifastv':>12} {device:>4} {dtype:>7}: {best['seconds']:.2f} s "
                  f"({size / best['seconds'] / 1e9:.2f} GB/s; runs {times} s), host peak +{best['peak_increase'] / 1e6:.0f} MB"
                  f"  {meaning}")


if __name__ == "__main__":
    main()
