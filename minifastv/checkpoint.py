"""Reading llava-hf checkpoints: config.json, the safetensors format, tensor names, the hub download, load().

`load` builds the model on the meta device (shapes only, no memory), checks every header and every
tensor's name and shape against it before a single weight is read, then streams the tensors onto the
target device in the target dtype, a few at a time on reader threads. To a GPU they go through small
staging buffers: host memory holds a few chunks of tensors, never the checkpoint (a Colab has 12.7 GB
of RAM for a 14 GB checkpoint). A damaged, truncated or foreign file is refused with one sentence that
names it; nothing is ever loaded from a pickle.
"""

import json
import math
import os
import queue
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .errors import CheckpointError, SettingsError
from .model import Llava, LlavaConfig

DEFAULT_REPO = "llava-hf/llava-1.5-7b-hf"
WEIGHTS_DIR = Path(os.environ.get("MINIFASTV_WEIGHTS", Path(__file__).resolve().parent.parent / "weights"))
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
             "processor_config.json", "chat_template.json"]

# ----------------------------------------------------------------------------------------------------
# config.json, and the real models' configs by name

CLIP_VIT_L_14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14)
VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
PRESETS = {  # as the checkpoints' config.json describe them (tests compare the LLaVA ones with the real files)
    "llava-1.5-7b": dict(vision_config=dict(CLIP_VIT_L_14, image_size=336), text_config=VICUNA_7B),
    "llava-1.5-13b": dict(vision_config=dict(CLIP_VIT_L_14, image_size=336), text_config=dict(
        VICUNA_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40)),
    "video-llava-7b": dict(model_type="video_llava", image_token_index=32000, video_token_index=32001,
                           video_seq_length=2056, vision_config=dict(CLIP_VIT_L_14, image_size=224), text_config=VICUNA_7B),
}


def config_by_name(name):
    """A real model's config by name, e.g. config_by_name("llava-1.5-7b"): no download needed."""
    if name not in PRESETS:
        raise CheckpointError(f"There is no built-in config {name!r}: choose one of {', '.join(PRESETS)}.")
    return LlavaConfig.from_dict(PRESETS[name])



def read_json(path):
    """The contents of a checkpoint's JSON file; a broken one is a CheckpointError that names it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}): the file is damaged; download it again.") from None


def read_config(folder_or_file):
    """The LlavaConfig of a checkpoint folder (or a config.json file), checked: CheckpointError for a missing,
    broken or foreign config.json."""
    path = Path(folder_or_file)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise CheckpointError(f"No config.json in {path.parent}: a llava-hf model folder holds config.json, "
                              "*.safetensors and tokenizer.json.")
    values = read_json(path)
    try:
        config = LlavaConfig.from_dict(values)
        check_config(config)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    except (TypeError, AttributeError, ZeroDivisionError, ValueError) as error:  # wrong types inside the JSON
        raise CheckpointError(f"{path} does not describe a LLaVA model ({type(error).__name__}: {error}).") from None
    return config


def _is_integer(value):
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is a Python int too


def check_config(config):
    """Every size a positive integer, every id an integer inside the vocabulary, shapes that fit together."""
    for part in (config.text, config.vision):
        for field in fields(part):
            value = getattr(part, field.name)
            is_number = _is_integer(value) or (field.type is float and isinstance(value, float))
            if not is_number or not math.isfinite(value):
                raise CheckpointError(f"{field.name} must be {'a number' if field.type is float else 'an integer'}, got {value!r}.")
            if field.name != "eos_token_id" and not value > 0:
                raise CheckpointError(f"{field.name} must be positive, got {value!r}.")
    text, vision = config.text, config.vision
    for name in ("image_token_id", "pad_token_id", "video_token_id"):
        value = getattr(config, name)
        if name == "video_token_id" and value is None:  # LLaVA: no video
            continue
        if not _is_integer(value) or not 0 <= value < text.vocab_size:
            raise CheckpointError(f"{name} must be a token id below the vocabulary size {text.vocab_size}, got {value!r}.")
    if not _is_integer(config.num_frames) or config.num_frames < 1:
        raise CheckpointError(f"video_seq_length must hold at least one frame, got {config.num_frames!r} frames.")
    if text.num_attention_heads % text.num_key_value_heads:
        raise CheckpointError(f"num_attention_heads {text.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {text.num_key_value_heads}.")
    if vision.hidden_size % vision.num_attention_heads:
        raise CheckpointError(f"the vision tower's hidden_size {vision.hidden_size} does not split into "
                              f"{vision.num_attention_heads} heads.")
    if vision.image_size < vision.patch_size:
        raise CheckpointError(f"image_size {vision.image_size} is smaller than one patch ({vision.patch_size}).")
    if config.vision_feature_select_strategy not in ("default", "full"):
        raise CheckpointError(f"vision_feature_select_strategy must be 'default' or 'full', got {config.vision_feature_select_strategy!r}.")
    if not _is_integer(config.vision_feature_layer):
        raise CheckpointError(f"minifastv reads one vision_feature_layer, not {config.vision_feature_layer!r}.")
    if not -vision.num_hidden_layers - 1 <= config.vision_feature_layer <= vision.num_hidden_layers:
        raise CheckpointError(f"vision_feature_layer {config.vision_feature_layer} is not a layer of the vision tower.")


# ----------------------------------------------------------------------------------------------------
# Tensor names: three schemes in the wild, one in model.py


TOWERS = ("vision_tower", "image_tower", "video_tower")  # LLaVA's one CLIP tower; Video-LLaVA's two


def tower_prefixes(in_file):
    """(model.py prefix, file prefix) for every CLIP tower; `in_file` spells the tower's prefix in the file."""
    return [pair for tower in TOWERS for pair in ((f"{tower}.layers.", f"{in_file.format(tower)}encoder.layers."),
                                                  (f"{tower}.", in_file.format(tower)))]


# (prefix in model.py, prefix in the file), checked in this order.
NAME_SCHEMES = {
    "hub": [  # what llava-hf's and LanguageBind's downloads use
        ("language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
        ("multi_modal_projector.", "multi_modal_projector."), *tower_prefixes("{}.vision_model.")],
    "transformers-save": [  # what transformers 5's save_pretrained writes for a model built from a config
        ("language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
        ("multi_modal_projector.", "multi_modal_projector."), *tower_prefixes("{}.")],
    "transformers": [  # transformers 5's own parameter names (save_pretrained(save_original_format=False))
        ("language_model.", "model.language_model."), ("lm_head.", "lm_head."),
        ("multi_modal_projector.", "model.multi_modal_projector."), *tower_prefixes("model.{}.")],
}
# File prefix -> model.py prefix, longest first, so that "vision_tower.vision_model." wins over "vision_tower.".
FILE_PREFIXES = sorted({(theirs, ours) for scheme in NAME_SCHEMES.values() for ours, theirs in scheme},
                       key=lambda pair: -len(pair[0]))


def file_name(name, scheme="hub"):
    """model.py's parameter name -> the name a checkpoint of `scheme` gives that tensor."""
    for ours, theirs in NAME_SCHEMES[scheme]:
        if name.startswith(ours):
            return theirs + name.removeprefix(ours)
    raise KeyError(f"{name} is not a parameter name of model.py")


def model_name(name_in_file):
    """A tensor's name in any of the three schemes -> model.py's parameter name (unknown names pass as they are)."""
    for theirs, ours in FILE_PREFIXES:
        if name_in_file.startswith(theirs):
            return ours + name_in_file.removeprefix(theirs)
    return name_in_file


def expected_tensors(config: LlavaConfig):
    """{hub tensor name: shape} that a checkpoint for `config` must hold; builds nothing but meta tensors."""
    with torch.device("meta"):
        model = Llava(config)
    return {file_name(name): tuple(p.shape) for name, p in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------
# The safetensors format, read and checked by hand: 8 bytes giving the header's length, a JSON header
# {name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the tensors' bytes, back to back.

ELEMENT_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                 "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
READABLE_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


@dataclass
class TensorEntry:
    name: str
    dtype: str  # the format's name: F16, BF16, F32, ...
    shape: tuple
    begin: int  # where its bytes start and end in the file
    end: int


def _unique_keys(pairs):
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"the key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def _is_count(value):
    return _is_integer(value) and value >= 0


def read_header(file):
    """The tensors of a .safetensors file, in file order, once its header is known to describe exactly the
    bytes that follow it: a truncated, padded, overlapping or garbled file is a CheckpointError naming it."""

    def damaged(reason):
        return CheckpointError(f"{file} is damaged or not a safetensors file: {reason}; download it again.")

    size = file.stat().st_size
    if size < 8:
        raise damaged(f"it has {size} bytes, fewer than the 8 that give the header's length")
    with open(file, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        if header_size > size - 8:
            raise damaged(f"its first 8 bytes announce a {header_size:,}-byte header, but the file has {size:,} bytes")
        raw = f.read(header_size)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as error:  # JSONDecodeError is a ValueError
        raise damaged(f"its header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + header_size, size - 8 - header_size
    entries = []
    for name, entry in header.items():
        dtype, shape, offsets = (entry.get(key) for key in ("dtype", "shape", "data_offsets")) if isinstance(entry, dict) else (None,) * 3
        if (dtype not in ELEMENT_SIZES or not isinstance(shape, list) or not all(map(_is_count, shape))
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets))):
            raise damaged(f"the header entry of tensor {name} is malformed: {entry!r}")
        nbytes = math.prod(shape) * ELEMENT_SIZES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise damaged(f"tensor {name} is {dtype} {shape}, {nbytes:,} bytes, but its offsets {offsets} span "
                          f"{offsets[1] - offsets[0]:,}")
        entries.append(TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1]))
    entries.sort(key=lambda entry: entry.begin)
    position = data_start
    for entry in entries:  # the format leaves no gap and no overlap between tensors
        if entry.begin != position:
            raise damaged(f"tensor {entry.name} starts at byte {entry.begin - data_start:,} of the data, where byte "
                          f"{position - data_start:,} was expected (tensors overlap or leave a gap)")
        position = entry.end
    if position != size:
        if position > size:
            raise damaged(f"its header describes {position - data_start:,} bytes of tensors, but only {data_size:,} "
                          "follow (the file is truncated, or its offsets point past its end)")
        raise damaged(f"{size - position:,} bytes follow its last tensor")
    return entries


# Reading the tensors. Reading a file, even from the page cache, is a memory copy that one core does at a few
# GB/s, so several reader threads read tensors side by side, each tensor through a file handle of its own
# (threads never share a file position; a read lets the other threads run while it waits). Each thread has
# its own lane: a staging buffer and, on a GPU, a CUDA stream, so that one thread's copy to the GPU runs
# while another reads.

READERS = min(4, os.cpu_count() or 1)  # a 2-core AMD EPYC reads its page cache at 4.0 GB/s on 1 thread, 6.4 on 2
STAGING_BYTES = 32 * 2**20


@dataclass
class Lane:
    """What one reader thread reads through: nothing on the CPU (a tensor is read straight into its own memory);
    elsewhere a reusable host buffer, page-locked (pinned) for a GPU, and a CUDA stream."""

    staging: torch.Tensor | None = None  # (STAGING_BYTES,) uint8
    stream: "torch.cuda.Stream | None" = None


def new_lanes(device, count):
    if device.type == "cpu":
        return [Lane() for _ in range(count)]
    cuda = device.type == "cuda"  # from pinned memory a GPU copies at its bus's full speed, without a bounce
    return [Lane(torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=cuda), torch.cuda.Stream(device) if cuda else None)
            for _ in range(count)]


def read_bytes(f, host, entry, file):
    """Fill the host memory `host` (a memoryview) from the open file's position on. A read may return less than
    asked, and nothing at the end of the file: then the file shrank since its header was read."""
    done = 0
    while done < len(host):
        count = f.readinto(host[done:])
        if not count:
            raise CheckpointError(f"{file} ended inside tensor {entry.name}: the file is truncated; download it again.")
        done += count


def read_tensor(entry, file, device, dtype, lane):
    """One tensor of a .safetensors file, onto `device` in `dtype`. Through a staging buffer (a GPU), chunk by
    chunk: host memory never holds the tensor, whose bytes go to the GPU as they are and are cast there."""
    size = entry.end - entry.begin
    with open(file, "rb", buffering=0) as f:
        f.seek(entry.begin)
        if lane.staging is None:  # the CPU: read into the tensor's own memory
            raw = torch.empty(size, dtype=torch.uint8)
            read_bytes(f, memoryview(raw.numpy()), entry, file)
        else:
            raw = torch.empty(size, dtype=torch.uint8, device=device)
            host = memoryview(lane.staging.numpy())
            with torch.cuda.stream(lane.stream):  # this thread's copies go on its own stream (None: no stream, not a GPU)
                if lane.stream:  # raw may reuse memory that work queued on the default stream still reads: wait for it
                    lane.stream.wait_stream(torch.cuda.default_stream(device))
                for start in range(0, size, len(host)):
                    chunk = min(len(host), size - start)
                    read_bytes(f, host[:chunk], entry, file)
                    raw[start : start + chunk].copy_(lane.staging[:chunk])  # waits for the copy: the buffer can be refilled
    return raw.view(READABLE_DTYPES[entry.dtype]).view(entry.shape).to(dtype)


def safetensors_files(folder):
    """The checkpoint's .safetensors files, from the shard index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        index_values = read_json(index)
        weight_map = index_values.get("weight_map") if isinstance(index_values, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
            raise CheckpointError(f"{index} has no weight_map of tensor names to shard files: the file is damaged.")
        files = sorted({folder / shard for shard in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" It has {', '.join(pickles)}: pickle files can run code, so minifastv never loads them." if pickles else ""
        raise CheckpointError(f"No .safetensors weights in {folder}.{hint}")
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"The shard index names {file.name}, which is not in {folder}.")
    return files


# ----------------------------------------------------------------------------------------------------
# load(): check everything, then stream the tensors onto the device


def load(path_or_repo_id=DEFAULT_REPO, device=None, dtype=None, progress=True, towers=("image", "video")):
    """A ready-to-run Llava from a local llava-hf folder or a hub repo id (downloaded into weights/).

    device: default "cuda" when available, else "cpu". dtype: default bfloat16 on GPUs that support
    it, float16 on other GPUs (the T4), float32 on the CPU. towers: Video-LLaVA's CLIP towers to load;
    towers=("video",) saves the image tower's memory when no prompt will hold an image.
    """
    folder = resolve_folder(path_or_repo_id)
    config = read_config(folder)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    if not towers or not set(towers) <= {"image", "video"}:
        raise SettingsError(f"towers must name 'image', 'video' or both, got {towers!r}.")
    with torch.device("meta"):  # no memory yet: every parameter is a shape only
        model = Llava(config)
    left_out = [f"{kind}_tower" for kind in ("image", "video") if kind not in towers and hasattr(model, f"{kind}_tower")]
    for tower in left_out:
        setattr(model, tower, None)  # its weights are skipped below; asking for its features says so
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}

    # Every header and every name and shape first: a bad shard is found before minutes of loading.
    plan, seen = {}, {}  # plan: {file: the entries to read, in file order}
    for file in safetensors_files(folder):
        plan[file] = []
        for entry in read_header(file):
            if entry.name.endswith(("rotary_emb.inv_freq", "position_ids")):
                continue  # buffers some exporters save; they carry no weights
            name = model_name(entry.name)
            if name.startswith(tuple(f"{tower}." for tower in left_out)):
                continue
            if name not in expected:
                raise CheckpointError(f"Unexpected tensor {entry.name} in {file}: the model has no such weight.")
            if entry.shape != expected[name]:
                raise CheckpointError(f"Tensor {entry.name} in {file} has shape {entry.shape}, but the model expects {expected[name]}.")
            if name in seen:
                raise CheckpointError(f"Tensor {entry.name} appears twice in the checkpoint ({seen[name]}, {file}).")
            if entry.dtype not in READABLE_DTYPES:
                raise CheckpointError(f"Tensor {entry.name} in {file} is {entry.dtype}; minifastv reads F16, BF16 and F32.")
            seen[name] = file
            plan[file].append(entry)
    missing = [file_name(name) for name in expected if name not in seen]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"The checkpoint in {folder} lacks tensor {', '.join(missing[:3])}{more}.")

    from tqdm.auto import tqdm  # the progress bar huggingface-hub uses for downloads

    jobs = [(file, entry) for file, entries in plan.items() for entry in entries]
    free_lanes = queue.SimpleQueue()  # a reader thread takes a lane for each tensor and gives it back
    for lane in new_lanes(device, READERS):
        free_lanes.put(lane)
    failed = threading.Event()

    def read(job):  # on a reader thread
        file, entry = job
        if failed.is_set():  # another tensor failed: its error is on its way, read nothing more
            return None
        lane = free_lanes.get()
        try:
            return read_tensor(entry, file, device, dtype, lane)
        except BaseException:
            failed.set()
            raise
        finally:
            free_lanes.put(lane)

    state, readers = {}, ThreadPoolExecutor(READERS, thread_name_prefix="minifastv-load")
    total = sum(entry.end - entry.begin for _, entry in jobs)
    try:  # the `with` closes the bar, ending its line, even when an error stops the loading
        with tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not progress, file=sys.stderr) as bar:
            for (file, entry), tensor in zip(jobs, readers.map(read, jobs)):  # read side by side, taken in order
                bar.set_postfix_str(file.name, refresh=False)
                state[model_name(entry.name)] = tensor
                bar.update(entry.end - entry.begin)
    finally:
        readers.shutdown(cancel_futures=True)  # after an error, no other tensor is started
    model.load_state_dict(state, strict=True, assign=True)  # the loaded tensors become the parameters
    model.init_rope()
    return model.eval().requires_grad_(False)


def default_dtype(device):
    """bfloat16 on GPUs with native bf16 (compute capability 8.0+, Ampere on), float16 on older ones such
    as Colab's T4 (torch.cuda.is_bf16_supported() says yes there too, but only through slow emulation),
    float32 on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_properties(device).major >= 8 else torch.float16
    return torch.float32


# ----------------------------------------------------------------------------------------------------
# Local folder or hub download

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, as the hub spells them


def resolve_folder(path_or_repo_id):
    """A local folder as is; a hub repo id downloaded (once) into weights/<owner>--<name>."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file: give the model folder that holds config.json and the .safetensors files.")
    if not REPO_ID.fullmatch(str(path_or_repo_id)) or str(path_or_repo_id).startswith(".") or Path(str(path_or_repo_id).split("/")[0]).is_dir():
        raise CheckpointError(f"There is no model folder {path_or_repo_id} (looked in {path.resolve().parent}), and it "
                              f"is not a hub repo id like {DEFAULT_REPO}.")
    from huggingface_hub import snapshot_download

    target = WEIGHTS_DIR / str(path_or_repo_id).replace("/", "--")
    try:
        snapshot_download(repo_id=str(path_or_repo_id), local_dir=target, allow_patterns=HUB_FILES)
    except Exception as error:  # the hub's errors vary by version and network; all mean the same to a user
        if (target / "config.json").exists() and any(target.glob("*.safetensors")):
            print(f"Could not reach the hub ({type(error).__name__}); using the copy in {target}.", file=sys.stderr, flush=True)
            return target
        reason = " ".join(str(error).split())  # the hub's messages span lines; ours is one sentence
        raise CheckpointError(
            f"There is no folder {path_or_repo_id}, and it could not be downloaded from the Hugging Face hub "
            f"({type(error).__name__}: {reason}). Check the network and the repo id, or pass a local model folder."
        ) from error
    return target
