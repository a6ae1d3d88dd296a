"""Reading llava-hf checkpoints: config.json, tensor names, the hub download, and load().

`load` builds the model on the meta device (shapes only, no memory), opens every .safetensors file
with the safetensors library, which checks that each header describes exactly the bytes after it,
and checks every tensor's name, shape and dtype against the model before a single weight is read.
Then it reads the tensors one at a time onto the target device in the target dtype. A damaged,
truncated or foreign file is refused with one sentence that names it; nothing is ever loaded from
a pickle.
"""

import json
import math
import os
import re
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError, SettingsError
from .model import Llava, LlavaConfig, TextConfig, VisionConfig

DEFAULT_REPO = "llava-hf/llava-1.5-7b-hf"
# Downloads and the tiny models: $MINIFASTV_WEIGHTS; else a clone's weights/ folder; else, for an
# installed package, ~/.cache/minifastv.
CLONE_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
WEIGHTS_DIR = Path(os.environ.get("MINIFASTV_WEIGHTS") or (
    CLONE_WEIGHTS if CLONE_WEIGHTS.is_dir() else Path.home() / ".cache" / "minifastv"))
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "preprocessor_config.json", "processor_config.json",
             "chat_template.json"]

# ------------------------------------------------------------------------------------------------
# config.json, and the real models' configs by name

CLIP_VIT_L_14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, patch_size=14)
VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, vocab_size=32064, max_position_embeddings=4096,
                 rms_norm_eps=1e-5)
PRESETS = {  # as the checkpoints' config.json describe them (tests compare the LLaVA ones)
    "llava-1.5-7b": dict(vision_config=dict(CLIP_VIT_L_14, image_size=336), text_config=VICUNA_7B),
    "llava-1.5-13b": dict(vision_config=dict(CLIP_VIT_L_14, image_size=336), text_config=dict(
        VICUNA_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40)),
    "video-llava-7b": dict(model_type="video_llava", image_token_index=32000,
                           video_token_index=32001, video_seq_length=2056,
                           vision_config=dict(CLIP_VIT_L_14, image_size=224),
                           text_config=VICUNA_7B),
}


def known_fields(cls, values):
    """The dataclass `cls` from the keys of `values` it knows (config.json carries many more)."""
    names = {field.name for field in fields(cls)}
    return cls(**{key: value for key, value in values.items() if key in names})


def refuse_unsupported(values, **supported):
    """A CheckpointError when the config asks for a variant model.py does not implement."""
    for key, expected in supported.items():
        if values.get(key, expected) != expected:
            raise CheckpointError(f"minifastv supports only {key}={expected!r}, "
                                  f"but the config has {values[key]!r}.")


def config_from_dict(values):
    """A LlavaConfig from config.json's values (read_config also checks their types and ranges)."""
    text, vision = dict(values.get("text_config", {})), values.get("vision_config", {})
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"minifastv supports only plain RoPE, but the config asks for "
                              f"{rope}.")
    text.setdefault("rope_theta", rope.get("rope_theta", TextConfig.rope_theta))
    refuse_unsupported(text, hidden_act="silu", attention_bias=False, mlp_bias=False,
                       tie_word_embeddings=False)
    refuse_unsupported(vision, hidden_act="quick_gelu")
    refuse_unsupported(values, projector_hidden_act="gelu", multimodal_projector_bias=True,
                       tie_word_embeddings=False)
    values = {"image_token_id": values.get("image_token_index", LlavaConfig.image_token_id),
              **values, "text": known_fields(TextConfig, text),
              "vision": known_fields(VisionConfig, vision), "video_token_id": None}
    config = known_fields(LlavaConfig, values)
    if values.get("model_type") == "video_llava":  # a second tower, for video frames
        config.video_token_id = values.get("video_token_index", 32001)
        frame_tokens = config.vision.grid_size**2 + 1
        config.num_frames = values.get("video_seq_length", 2056) // frame_tokens
    return config


def config_by_name(name):
    """A real model's config by name, e.g. config_by_name("llava-1.5-7b"): no download needed."""
    if name not in PRESETS:
        raise CheckpointError(f"There is no built-in config {name!r}: choose one of "
                              f"{', '.join(PRESETS)}.")
    return config_from_dict(PRESETS[name])


def read_json(path):
    """The contents of a checkpoint's JSON file; a broken one is a CheckpointError that names it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}): the file is damaged; download "
                              "it again.") from None


def read_config(folder_or_file):
    """The LlavaConfig of a checkpoint folder (or a config.json file), checked: CheckpointError for
    a missing, broken or foreign config.json."""
    path = Path(folder_or_file)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise CheckpointError(f"No config.json in {path.parent}: a llava-hf model folder holds "
                              "config.json, *.safetensors and tokenizer.json.")
    values = read_json(path)
    try:
        config = config_from_dict(values)
        check_config(config)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    except (TypeError, AttributeError, ZeroDivisionError, ValueError) as error:  # wrong JSON types
        raise CheckpointError(f"{path} does not describe a LLaVA model "
                              f"({type(error).__name__}: {error}).") from None
    return config


def _is_integer(value):
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is a Python int too


def check_config(config):
    """Every size a positive integer, every id an integer inside the vocabulary, shapes that fit."""
    for part in (config.text, config.vision):
        for field in fields(part):
            value = getattr(part, field.name)
            is_number = _is_integer(value) or (field.type is float and isinstance(value, float))
            if not is_number or not math.isfinite(value):
                kind = "a number" if field.type is float else "an integer"
                raise CheckpointError(f"{field.name} must be {kind}, got {value!r}.")
            if field.name != "eos_token_id" and not value > 0:
                raise CheckpointError(f"{field.name} must be positive, got {value!r}.")
    text, vision = config.text, config.vision
    for name in ("image_token_id", "pad_token_id", "video_token_id"):
        value = getattr(config, name)
        if name == "video_token_id" and value is None:  # LLaVA: no video
            continue
        if not _is_integer(value) or not 0 <= value < text.vocab_size:
            raise CheckpointError(f"{name} must be a token id below the vocabulary size "
                                  f"{text.vocab_size}, got {value!r}.")
    if not _is_integer(config.num_frames) or config.num_frames < 1:
        raise CheckpointError("video_seq_length must hold at least one frame, got "
                              f"{config.num_frames!r} frames.")
    if text.num_attention_heads % text.num_key_value_heads:
        raise CheckpointError(f"num_attention_heads {text.num_attention_heads} is not a multiple "
                              f"of num_key_value_heads {text.num_key_value_heads}.")
    if vision.hidden_size % vision.num_attention_heads:
        raise CheckpointError(f"the vision tower's hidden_size {vision.hidden_size} does not split "
                              f"into {vision.num_attention_heads} heads.")
    if vision.image_size < vision.patch_size:
        raise CheckpointError(f"image_size {vision.image_size} is smaller than one patch "
                              f"({vision.patch_size}).")
    if config.vision_feature_select_strategy not in ("default", "full"):
        raise CheckpointError("vision_feature_select_strategy must be 'default' or 'full', got "
                              f"{config.vision_feature_select_strategy!r}.")
    if not _is_integer(config.vision_feature_layer):
        raise CheckpointError("minifastv reads one vision_feature_layer, not "
                              f"{config.vision_feature_layer!r}.")
    if not -vision.num_hidden_layers - 1 <= config.vision_feature_layer <= vision.num_hidden_layers:
        raise CheckpointError(f"vision_feature_layer {config.vision_feature_layer} is not a layer "
                              "of the vision tower.")


# ------------------------------------------------------------------------------------------------
# Tensor names: three schemes in the wild, one in model.py


def tower_prefixes(in_file):
    """(model.py prefix, file prefix) for every CLIP tower; `in_file` spells the tower's prefix in
    the file."""
    return [pair for tower in Llava.TOWERS
            for pair in ((f"{tower}.layers.", f"{in_file.format(tower)}encoder.layers."),
                         (f"{tower}.", in_file.format(tower)))]


# (prefix in model.py, prefix in the file), checked in this order.
NAME_SCHEMES = {
    "hub": [  # what llava-hf's and LanguageBind's downloads use
        ("language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
        ("multi_modal_projector.", "multi_modal_projector."), *tower_prefixes("{}.vision_model.")],
    "transformers-save": [  # what transformers 5's save_pretrained writes for a model from a config
        ("language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
        ("multi_modal_projector.", "multi_modal_projector."), *tower_prefixes("{}.")],
    "transformers": [  # transformers 5's own names (save_pretrained(save_original_format=False))
        ("language_model.", "model.language_model."), ("lm_head.", "lm_head."),
        ("multi_modal_projector.", "model.multi_modal_projector."), *tower_prefixes("model.{}.")],
}
# File prefix -> model.py prefix, longest first: "vision_tower.vision_model." beats "vision_tower.".
FILE_PREFIXES = sorted({(theirs, ours) for scheme in NAME_SCHEMES.values()
                        for ours, theirs in scheme}, key=lambda pair: -len(pair[0]))


def file_name(name, scheme="hub"):
    """model.py's parameter name -> the name a checkpoint of `scheme` gives that tensor."""
    for ours, theirs in NAME_SCHEMES[scheme]:
        if name.startswith(ours):
            return theirs + name.removeprefix(ours)
    raise KeyError(f"{name} is not a parameter name of model.py")


def model_name(name_in_file):
    """A tensor's name in any of the three schemes -> model.py's parameter name (unknown names pass
    as they are)."""
    for theirs, ours in FILE_PREFIXES:
        if name_in_file.startswith(theirs):
            return ours + name_in_file.removeprefix(theirs)
    return name_in_file


def expected_tensors(config: LlavaConfig):
    """{hub tensor name: shape} that a checkpoint for `config` must hold (built on meta only)."""
    with torch.device("meta"):
        model = Llava(config)
    return {file_name(name): tuple(p.shape) for name, p in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# The .safetensors files, read by the safetensors library. The format: 8 bytes giving the header's
# length, a JSON header {name: {"dtype", "shape", "data_offsets"}}, then the tensors' bytes, back to
# back. Opening a file, the library checks that its header describes exactly the bytes that follow;
# we check that they are the tensors the model expects.

READABLE_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
EXPORTED_BUFFERS = ("rotary_emb.inv_freq", "position_ids")  # some exporters save them: no weights


def safetensors_files(folder):
    """The checkpoint's .safetensors files, from the shard index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        index_values = read_json(index)
        weight_map = index_values.get("weight_map") if isinstance(index_values, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str)
                                                       for shard in weight_map.values()):
            raise CheckpointError(f"{index} has no weight_map of tensor names to shard files: the "
                                  "file is damaged.")
        files = sorted({folder / shard for shard in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = (f" It has {', '.join(pickles)}: pickle files can run code, so minifastv never "
                "loads them." if pickles else "")
        raise CheckpointError(f"No .safetensors weights in {folder}.{hint}")
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"The shard index names {file.name}, which is not in {folder}.")
    return files


def damaged(file, error):
    reason = " ".join(str(error).split())  # one line, whatever the library says
    return CheckpointError(f"{file} is damaged or not a safetensors file ({reason}); download it "
                           "again.")


def open_safetensors(file, device=torch.device("cpu")):
    """The library's handle on a .safetensors file, or a CheckpointError that names the file.

    For the CPU the library maps the file into memory: a tensor is a view of the page cache, which
    torch copies from on all cores. For anywhere else it reads each tensor with pread(2) into a
    buffer of the tensor's own (pinned for a GPU, which copies from it at the bus's full speed),
    freed once the tensor is on the device: host memory holds about one tensor, never the
    checkpoint (a Colab has 12.7 GB of RAM for a 14 GB checkpoint)."""
    on_cpu, on_gpu = device.type == "cpu", device.type == "cuda"
    try:
        return safe_open(file, framework="pt", device=str(device) if on_gpu else "cpu",
                         backend="mmap" if on_cpu else "pread")
    except (SafetensorError, OSError, RuntimeError) as error:  # RuntimeError: torch maps it too
        raise damaged(file, error) from None


def check_tensors(folder, expected, skip=()):
    """{file: {tensor name in the file: bytes}} to read, once every file opens and its tensors are
    the model's `expected` {name: shape}: none unknown, missing, twice or of another shape or dtype.
    Names starting with a prefix in `skip` are left out. All before a single weight is read: a bad
    last shard is found before minutes of loading."""
    plan, seen = {}, {}
    for file in safetensors_files(folder):
        plan[file] = {}
        with open_safetensors(file) as f:
            for name_in_file in f.keys():
                name = model_name(name_in_file)
                if name_in_file.endswith(EXPORTED_BUFFERS) or name.startswith(skip):
                    continue
                tensor = f.get_slice(name_in_file)
                shape, dtype = tuple(tensor.get_shape()), tensor.get_dtype()
                where = f"Tensor {name_in_file} in {file}"
                if name not in expected:
                    raise CheckpointError(f"Unexpected tensor {name_in_file} in {file}: the model "
                                          "has no such weight.")
                if shape != expected[name]:
                    raise CheckpointError(f"{where} has shape {shape}, but the model expects "
                                          f"{expected[name]}.")
                if name in seen:
                    raise CheckpointError(f"Tensor {name_in_file} appears twice in the checkpoint "
                                          f"({seen[name]}, {file}).")
                if dtype not in READABLE_DTYPES:
                    raise CheckpointError(f"{where} is {dtype}; minifastv reads F16, BF16 and F32.")
                seen[name] = file
                plan[file][name_in_file] = math.prod(shape) * READABLE_DTYPES[dtype].itemsize
    missing = [file_name(name) for name in expected if name not in seen]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"The checkpoint in {folder} lacks tensor "
                              f"{', '.join(missing[:3])}{more}.")
    return plan


def read_tensor(file, name, device, dtype):
    """Tensor `name` of a checked .safetensors file, onto `device` in `dtype`, in memory of its own.

    The file is opened again for each tensor: the pages a memory map has read count as this
    process's memory until it is closed, so one map per file would add a whole shard to the host's
    peak. A file that lost its end since it was checked fails to open (the library compares its
    header with its size again) or, with pread, to read: an error that names it. Only a file cut
    while the CPU copies from its map would stop the process (SIGBUS), as any mapped read does."""
    with open_safetensors(file, device) as f:
        try:
            tensor = f.get_tensor(name)  # for the CPU: a view of the map; for a GPU: on the GPU
        except SafetensorError as error:  # pread found fewer bytes than the header promises
            raise damaged(file, error) from None
    # A view of the map becomes memory of its own (one copy, cast on the way); a GPU casts its copy.
    return tensor.to(device, dtype, copy=device.type == "cpu")


# ------------------------------------------------------------------------------------------------
# load(): check everything, then read the tensors one by one onto the device


def load(path_or_repo_id=DEFAULT_REPO, device=None, dtype=None, progress=True,
         towers=("image", "video")):
    """A ready-to-run Llava from a local llava-hf folder or a hub repo id (downloaded to weights/).

    device: default "cuda" when available, else "cpu". dtype: default bfloat16 on GPUs that support
    it, float16 on other GPUs (the T4), float32 on the CPU. towers: Video-LLaVA's CLIP towers to
    load; towers=("video",) saves the image tower's memory when no prompt will hold an image.
    """
    folder = resolve_folder(path_or_repo_id)
    config = read_config(folder)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    if not towers or not set(towers) <= {"image", "video"}:
        raise SettingsError(f"towers must name 'image', 'video' or both, got {towers!r}.")
    with torch.device("meta"):  # no memory yet: every parameter is a shape only
        model = Llava(config)
    unwanted = {"image", "video"} - set(towers)  # Video-LLaVA's towers; LLaVA's one always loads
    left_out = [tower for tower in Llava.TOWERS
                if hasattr(model, tower) and tower.removesuffix("_tower") in unwanted]
    for tower in left_out:
        setattr(model, tower, None)  # its weights are skipped; asking for its features says so
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    plan = check_tensors(folder, expected, skip=tuple(f"{tower}." for tower in left_out))

    from tqdm.auto import tqdm  # the progress bar huggingface-hub uses for downloads

    state, total = {}, sum(sum(sizes.values()) for sizes in plan.values())
    # The `with` closes the bar, ending its line, even when an error stops the loading.
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not progress,
              file=sys.stderr) as bar:
        for file, sizes in plan.items():
            bar.set_postfix_str(file.name, refresh=False)
            for name_in_file, size in sizes.items():
                state[model_name(name_in_file)] = read_tensor(file, name_in_file, device, dtype)
                bar.update(size)
    model.load_state_dict(state, strict=True, assign=True)  # the tensors become the parameters
    model.init_rope()
    return model.eval().requires_grad_(False)


def default_dtype(device):
    """bfloat16 on GPUs with native bf16 (compute capability 8.0+, Ampere on), float16 on older ones
    such as Colab's T4 (torch.cuda.is_bf16_supported() says yes there too, but only through slow
    emulation), float32 on the CPU."""
    if device.type == "cuda":
        has_bf16 = torch.cuda.get_device_properties(device).major >= 8
        return torch.bfloat16 if has_bf16 else torch.float16
    return torch.float32


# ------------------------------------------------------------------------------------------------
# Local folder or hub download

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, as the hub spells them


def weights_folder():
    """WEIGHTS_DIR, created if missing and checked to take files: downloads land there."""
    try:
        WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=WEIGHTS_DIR).close()
    except OSError as error:
        raise CheckpointError(f"The weights folder {WEIGHTS_DIR} cannot be written "
                              f"({error.strerror or error}): set MINIFASTV_WEIGHTS to a folder "
                              "that can.") from None
    return WEIGHTS_DIR


def resolve_folder(path_or_repo_id):
    """A local folder as is; a hub repo id downloaded (once) into weights/<owner>--<name>."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file: give the model folder that holds config.json and "
                              "the .safetensors files.")
    name = str(path_or_repo_id)
    if name in ("tiny", "tiny-video"):
        raise CheckpointError(f"There is no model folder {name}: the tiny random model is "
                              f"minifastv.load(minifastv.tiny_checkpoint(video={name != 'tiny'})).")
    if not REPO_ID.fullmatch(name) or name.startswith(".") or Path(name.split("/")[0]).is_dir():
        raise CheckpointError(f"There is no model folder {name} (looked in "
                              f"{path.resolve().parent}), and it is not a hub repo id like "
                              f"{DEFAULT_REPO}.")
    from huggingface_hub import snapshot_download

    target = weights_folder() / name.replace("/", "--")
    try:
        snapshot_download(repo_id=name, local_dir=target, allow_patterns=HUB_FILES)
    except Exception as error:  # the hub's errors vary by version and network; all mean the same
        if (target / "config.json").exists() and any(target.glob("*.safetensors")):
            print(f"Could not reach the hub ({type(error).__name__}); using the copy in {target}.",
                  file=sys.stderr, flush=True)
            return target
        reason = " ".join(str(error).split())  # the hub's messages span lines; ours is one sentence
        raise CheckpointError(
            f"There is no folder {name}, and it could not be downloaded from the Hugging Face hub "
            f"({type(error).__name__}: {reason}). Check the network and the repo id, pass a local "
            "model folder, or, offline, try a tiny random model: --model tiny on the commands, "
            "minifastv.tiny_checkpoint() in Python."
        ) from error
    return target
