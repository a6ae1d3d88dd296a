"""How much host memory `minifastv.load` takes: a random llava-shaped checkpoint, loaded in a fresh process.

Shared by tests/test_memory.py, tests/measure_load_memory.py, tests/measure_load_speed.py and tests/gpu_check.py. Each load runs in a
process of its own, which reads its peak resident memory (VmHWM) from /proc: Linux only.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REAL_7B_CONFIG = {  # llava-hf/llava-1.5-7b-hf's config.json, the fields the model reads
    "model_type": "llava", "image_token_index": 32000, "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "tie_word_embeddings": False, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
    "text_config": {"model_type": "llama", "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "vocab_size": 32064},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336,
                      "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14},
}
# Real widths where they set the size of the largest tensors (embedding, lm_head, CLIP), fewer and
# narrower decoder layers so that the checkpoint is about 650 MB instead of 14 GB.
SHRINK_TEXT = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16, "num_attention_heads": 8,
               "num_key_value_heads": 8}
SHRINK_VISION = {"num_hidden_layers": 4}


def real_7b_config():
    """The real 7B config.json from tests/data when a copy is there, else the fields above."""
    path = ROOT / "tests" / "data" / "llava-1.5-7b-hf" / "config.json"
    return json.loads(path.read_text()) if path.exists() else json.loads(json.dumps(REAL_7B_CONFIG))


def write_checkpoint(folder, seed=0, text=SHRINK_TEXT, vision=SHRINK_VISION):
    """Write config.json and one float16 model.safetensors of random weights; returns its size in bytes. `text` and
    `vision` change the real 7B config's text_config and vision_config."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from minifastv.checkpoint import expected_tensors
    from minifastv.checkpoint import config_from_dict

    values = real_7b_config()
    values["text_config"].update(text)
    values["vision_config"].update(vision)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(values, indent=2))
    generator = torch.Generator().manual_seed(seed)
    state = {name: torch.empty(shape, dtype=torch.float16).normal_(0.0, 0.02, generator=generator)
             for name, shape in expected_tensors(config_from_dict(values)).items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return (folder / "model.safetensors").stat().st_size


def largest_tensor_bytes(folder):
    """Bytes of the largest tensor in folder/model.safetensors, from the file's JSON header."""
    with open(Path(folder) / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    return max(end - begin for begin, end in (entry["data_offsets"] for entry in header.values()))


# Runs in the fresh process. Linux only: /proc/self/status gives VmRSS (resident now) and VmHWM (the
# most resident so far) of this process's own memory. getrusage's ru_maxrss would not do: Linux carries
# it over from the parent across fork and exec, so a large parent (pytest holding the checkpoint a
# moment ago) hides the child's peak. Writing 5 to /proc/self/clear_refs resets VmHWM to VmRSS, so
# the peak is measured from just before the load. Before that, a model is built on the meta device
# once: the first such build costs torch some tens of MB of one-time setup (lazy imports), whatever
# the checkpoint's size, and it is reported apart as "setup".
CHILD = """
import json, sys, time, torch
sys.path.insert(0, {root!r})
import minifastv
from minifastv.checkpoint import expected_tensors, read_config

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB

started = status("VmRSS")
expected_tensors(read_config({folder!r}))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
clock = time.perf_counter()
if {transformers!r}:
    from transformers import LlavaForConditionalGeneration
    on_gpu = dict(device_map="cuda") if {device!r} == "cuda" else {{}}  # device_map needs accelerate
    model = LlavaForConditionalGeneration.from_pretrained({folder!r}, dtype=torch.{dtype}, **on_gpu)
else:
    model = minifastv.load({folder!r}, device={device!r}, dtype=torch.{dtype}, progress=False)
if {device!r} == "cuda":
    torch.cuda.synchronize()  # the copies are asynchronous: the load ends when they do
seconds = time.perf_counter() - clock
peak = status("VmHWM")
tensors = list(model.parameters()) + list(model.buffers())
model_bytes = sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cpu")
print(json.dumps({{"peak_increase": peak - before, "model_bytes": model_bytes, "setup": before - started, "seconds": seconds}}))
"""


def measure_load(folder, device, dtype, transformers=False):
    """Load the checkpoint in `folder` in a fresh process: {"peak_increase", "model_bytes", "setup"} in bytes, and
    "seconds" the load took.

    dtype is a torch attribute name ("float16"). device "meta" reads every tensor as for a GPU (with
    pread, one at a time, into a buffer of its own) and drops it: what loading onto a GPU costs the host,
    except that a GPU's buffers are pinned; "cuda" loads onto the GPU (model_bytes counts host memory
    only). transformers=True: transformers' from_pretrained instead, for comparison (on the CPU it maps
    the files into memory and reads a tensor when it is first used; onto a GPU with device_map="cuda").
    """
    code = CHILD.format(root=str(ROOT), folder=str(folder), device=device, dtype=dtype, transformers=transformers)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"Loading in a subprocess failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])
