"""Loading llava-hf checkpoints: config parsing, tensor names and shapes of the real models, and errors."""

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REFERENCE, image_prompt, random_pixels

import minifastv.checkpoint as checkpoint
from minifastv.checkpoint import CheckpointError, expected_tensors, load, read_config
from minifastv.model import LlavaConfig

DATA = Path(__file__).resolve().parent / "data"
REAL_MODELS = ["llava-1.5-7b-hf", "llava-1.5-13b-hf"]


# ----------------------------------------------------------------------------------------------------
# Helpers


def copy_checkpoint(source, target):
    shutil.copytree(source, target)
    return Path(target)


def rewrite(folder, edit):
    """Apply `edit(state)` to the single-file checkpoint in `folder` and write it back."""
    file = Path(folder) / "model.safetensors"
    state = load_file(file)
    edit(state)
    save_file(state, file, metadata={"format": "pt"})
    return state


def logits_of(model, ids, px):
    with torch.no_grad():
        out = model(ids, px)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(scope="session")
def tiny_prompt():
    return image_prompt(1, 36), random_pixels(1)


@pytest.fixture(scope="session")
def reference_logits(hf_model, tiny_prompt):
    ids, px = tiny_prompt
    with torch.no_grad():
        return hf_model(input_ids=ids, pixel_values=px).logits


# ----------------------------------------------------------------------------------------------------
# The real 7B and 13B: names and shapes, built on the meta device only


@pytest.mark.parametrize("name", REAL_MODELS)
def test_expected_tensors_match_real_manifest(name):
    config = read_config(DATA / name)
    manifest = json.loads((DATA / name / "tensors.json").read_text())
    want = {tensor: tuple(shape) for tensor, shape in manifest["tensors"].items()}
    got = {tensor: tuple(shape) for tensor, shape in expected_tensors(config).items()}
    assert sorted(set(want) - set(got)) == [], "names the model lacks"
    assert sorted(set(got) - set(want)) == [], "names the checkpoint lacks"
    assert {k: v for k, v in got.items() if want[k] != v} == {}, "shapes that differ"
    assert len(got) == manifest["num_tensors"]
    assert sum(torch.Size(shape).numel() for shape in got.values()) == manifest["num_params"]


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared/reference is not present")
@pytest.mark.parametrize("name", REAL_MODELS)
@pytest.mark.parametrize("file", ["config.json", "tensors.json"])
def test_data_copies_equal_reference(name, file):
    assert (DATA / name / file).read_bytes() == (REFERENCE / name / file).read_bytes()


def test_config_7b_sparse_defaults():
    config = read_config(DATA / "llava-1.5-7b-hf")
    text, vision = config.text, config.vision
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (4096, 32, 32)
    assert text.intermediate_size == 11008
    assert text.num_key_value_heads == 32 and text.head_dim == 128
    assert text.rms_norm_eps == 1e-5  # from the file; Llama's default would be 1e-6
    assert text.rope_theta == 10000.0
    assert text.vocab_size == 32064 and text.max_position_embeddings == 4096
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (1024, 24, 336, 14)
    assert vision.intermediate_size == 4096 and vision.num_attention_heads == 16
    assert config.image_tokens_per_image == 576
    assert (config.image_token_id, config.pad_token_id) == (32000, 32001)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")


def test_config_13b():
    config = read_config(DATA / "llava-1.5-13b-hf")
    text = config.text
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size) == (
        5120, 40, 40, 13824)
    assert text.head_dim == 128 and text.rms_norm_eps == 1e-5
    assert (config.vision.hidden_size, config.vision.num_hidden_layers) == (1024, 24)
    assert config.image_tokens_per_image == 576


def hf_config_fields(values):
    """What transformers' own LlavaConfig makes of a config dict: the oracle for the sparse defaults."""
    from transformers import LlavaConfig as HFLlavaConfig

    hf = HFLlavaConfig.from_dict(values)
    text, vision = hf.text_config, hf.vision_config
    return dict(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, head_dim=text.head_dim, rms_norm_eps=text.rms_norm_eps,
        rope_theta=text.rope_parameters["rope_theta"], max_position_embeddings=text.max_position_embeddings,
        v_hidden_size=vision.hidden_size, v_intermediate_size=vision.intermediate_size,
        v_num_hidden_layers=vision.num_hidden_layers, v_num_attention_heads=vision.num_attention_heads,
        v_image_size=vision.image_size, v_patch_size=vision.patch_size, v_layer_norm_eps=vision.layer_norm_eps,
        image_token_id=hf.image_token_id, vision_feature_layer=hf.vision_feature_layer,
    )


def our_config_fields(values):
    config = LlavaConfig.from_dict(values)
    text, vision = config.text, config.vision
    fields = {name: getattr(text, name) for name in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings")}
    fields.update({f"v_{name}": getattr(vision, name) for name in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
        "layer_norm_eps")})
    fields.update(image_token_id=config.image_token_id, vision_feature_layer=config.vision_feature_layer)
    return fields


@pytest.mark.parametrize("name", REAL_MODELS)
def test_config_agrees_with_transformers(name):
    values = json.loads((DATA / name / "config.json").read_text())
    assert our_config_fields(values) == hf_config_fields(values)


def test_config_defaults_agree_with_transformers():
    """With empty text and vision sections every size falls back to the Llama / CLIP defaults."""
    values = json.loads((DATA / "llava-1.5-7b-hf" / "config.json").read_text())
    values["text_config"], values["vision_config"] = {}, {}
    ours, theirs = our_config_fields(values), hf_config_fields(values)
    assert ours["rms_norm_eps"] == 1e-6  # Llama's default, unlike the 1e-5 the llava-hf file sets
    assert ours == theirs


def test_config_written_by_transformers(saved_checkpoint):
    """transformers 5 writes rope_parameters and every field explicitly; the tiny sizes must come through."""
    config = read_config(saved_checkpoint)
    written = json.loads((saved_checkpoint / "config.json").read_text())
    text = written["text_config"]
    assert config.text.hidden_size == text["hidden_size"] == 64
    assert config.text.num_hidden_layers == text["num_hidden_layers"]
    assert config.text.max_position_embeddings == 512
    assert config.vision.image_size == 84 and config.image_tokens_per_image == 36


def test_config_refuses_unsupported_rope():
    values = json.loads((DATA / "llava-1.5-7b-hf" / "config.json").read_text())
    values["text_config"]["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ValueError, match="RoPE"):
        LlavaConfig.from_dict(values)


# ----------------------------------------------------------------------------------------------------
# Loading errors


def test_missing_tensor(hub_checkpoint, tmp_path):
    folder = copy_checkpoint(hub_checkpoint, tmp_path / "ckpt")
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    rewrite(folder, lambda state: state.pop(name))
    with pytest.raises(CheckpointError, match=f"lacks.*{name}"):
        load(str(folder), device="cpu", progress=False)


def test_unexpected_tensor(hub_checkpoint, tmp_path):
    folder = copy_checkpoint(hub_checkpoint, tmp_path / "ckpt")
    name = "language_model.model.layers.7.mlp.up_proj.weight"  # the tiny model has 4 layers

    def add(state):
        state[name] = state["language_model.model.layers.0.mlp.up_proj.weight"].clone()

    rewrite(folder, add)
    with pytest.raises(CheckpointError, match=f"(?i)unexpected.*{name}"):
        load(str(folder), device="cpu", progress=False)


def test_wrong_shape(hub_checkpoint, tmp_path):
    folder = copy_checkpoint(hub_checkpoint, tmp_path / "ckpt")
    name = "multi_modal_projector.linear_1.weight"

    def shrink(state):
        assert tuple(state[name].shape) == (64, 48)
        state[name] = state[name][:, :47].contiguous()

    rewrite(folder, shrink)
    with pytest.raises(CheckpointError, match=rf"(?s){name}.*\(64, 47\).*\(64, 48\)"):
        load(str(folder), device="cpu", progress=False)


def test_pickle_only_folder_is_refused(hf_model, hub_checkpoint, tmp_path):
    folder = tmp_path / "pickle"
    folder.mkdir()
    shutil.copy(hub_checkpoint / "config.json", folder / "config.json")
    torch.save(hf_model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"(?s)pytorch_model\.bin.*pickle"):
        load(str(folder), device="cpu", progress=False)


def test_missing_config(hub_checkpoint, tmp_path):
    folder = copy_checkpoint(hub_checkpoint, tmp_path / "ckpt")
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        load(str(folder), device="cpu", progress=False)


# ----------------------------------------------------------------------------------------------------
# Damaged and foreign files: one sentence naming the file (and the tensor), and nothing loaded


def safetensors_parts(file):
    """(header dict, data bytes) of a .safetensors file."""
    raw = Path(file).read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def safetensors_bytes(header, data, header_text=None):
    text = (header_text if header_text is not None else json.dumps(header)).encode()
    return len(text).to_bytes(8, "little") + text + data


def first_tensor(header):
    name = min((key for key in header if key != "__metadata__"), key=lambda key: header[key]["data_offsets"][0])
    return name, header[name]


def damaged_versions(good):
    """{case: (bytes of model.safetensors, words the message must hold besides the file's name)}."""
    raw = good.read_bytes()
    header, data = safetensors_parts(good)
    header_end = 8 + int.from_bytes(raw[:8], "little")
    name, entry = first_tensor(header)
    begin, end = entry["data_offsets"]

    def edited(change):
        copy = json.loads(json.dumps(header))
        change(copy)
        return safetensors_bytes(copy, data)

    def grow_first(copy):  # its bytes reach into the next tensor's
        copy[name]["data_offsets"] = [begin, end + 2]
        copy[name]["shape"] = list(copy[name]["shape"])  # unchanged: 2 more bytes than dtype x shape
    last = max((key for key in header if key != "__metadata__"), key=lambda key: header[key]["data_offsets"][1])

    def past_the_end(copy):  # the last tensor claims 64 more bytes than the file holds, its shape agrees
        entry = copy[last]
        entry["shape"] = [int(torch.tensor(entry["shape"]).prod()) + 32]
        entry["data_offsets"][1] += 64 if entry["dtype"] == "F16" else 128

    def overlap(copy):  # two tensors share bytes
        second = sorted((k for k in copy if k != "__metadata__"), key=lambda k: copy[k]["data_offsets"][0])[1]
        start, stop = copy[second]["data_offsets"]
        copy[second]["data_offsets"] = [start - 4, stop - 4]

    return {
        "zero-length shard": (b"", ["0 bytes"]),
        "cut inside the length": (raw[:5], ["5 bytes"]),
        "cut inside the header": (raw[: header_end // 2], ["header"]),
        "cut just after the header": (raw[:header_end], ["truncated"]),
        "cut in the middle of the data": (raw[: header_end + len(data) // 2], ["truncated"]),
        "last byte missing": (raw[:-1], ["truncated"]),
        "trailing bytes": (raw + b"\0" * 16, ["16 bytes follow"]),
        "garbage": (bytes(range(256)) * 64, ["header"]),
        "huge header length": ((10**12).to_bytes(8, "little") + raw[8:], ["header"]),
        "header not JSON": (safetensors_bytes(None, data, header_text="{not json" + " " * 40), ["not valid JSON"]),
        "header not an object": (safetensors_bytes(None, data, header_text="[1, 2, 3]"), ["not a JSON object"]),
        "duplicate tensor in header": (safetensors_bytes(None, data, header_text=json.dumps(header)[:-1] + ", "
                                       + json.dumps(name) + ": " + json.dumps(entry) + "}"), ["appears twice", name]),
        "size disagrees with dtype x shape": (edited(grow_first), [name, "span"]),
        "offsets past the end": (edited(past_the_end), ["truncated", "past its end"]),
        "overlapping tensors": (edited(overlap), ["overlap"]),
        "unknown dtype": (edited(lambda copy: copy[name].update(dtype="F17")), [name, "malformed"]),
        "negative offset": (edited(lambda copy: copy[name].update(data_offsets=[-2, end])), [name, "malformed"]),
        "shape not a list": (edited(lambda copy: copy[name].update(shape="big")), [name, "malformed"]),
    }


DAMAGED_CASES = ["zero-length shard", "cut inside the length", "cut inside the header", "cut just after the header",
                 "cut in the middle of the data", "last byte missing", "trailing bytes", "garbage",
                 "huge header length", "header not JSON", "header not an object", "duplicate tensor in header",
                 "size disagrees with dtype x shape", "offsets past the end", "overlapping tensors", "unknown dtype",
                 "negative offset", "shape not a list"]


@pytest.mark.parametrize("case", DAMAGED_CASES)
def test_a_damaged_safetensors_file_never_loads(hub_checkpoint, tmp_path, monkeypatch, case):
    content, words = damaged_versions(hub_checkpoint / "model.safetensors")[case]
    folder = copy_checkpoint(hub_checkpoint, tmp_path / "ckpt")
    (folder / "model.safetensors").write_bytes(content)
    reads = []
    monkeypatch.setattr(checkpoint, "read_tensor", lambda *args: reads.append(args))  # counts, reads nothing
    with pytest.raises(CheckpointError) as error:
        load(str(folder), device="cpu", progress=False)
    message = str(error.value)
    assert str(folder / "model.safetensors") in message and "\n" not in message, message
    for word in words:
        assert word in message, message
    assert reads == [], "a tensor was read before the file was known to be whole"


def test_a_damaged_second_shard_is_found_before_the_first_is_loaded(hf_model, tmp_path, monkeypatch):
    folder = tmp_path / "sharded"
    hf_model.save_pretrained(folder, max_shard_size="5MB")
    last = sorted(folder.glob("*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-10])
    reads = []
    monkeypatch.setattr(checkpoint, "read_tensor", lambda *args: reads.append(args))
    with pytest.raises(CheckpointError, match=f"{last.name}.*truncated"):
        load(str(folder), device="cpu", progress=False)
    assert reads == []


def test_a_file_that_shrinks_while_loading_is_caught(hub_checkpoint, tmp_path):
    """The header was whole, then the file lost its end (a second process writing it): the read's byte
    count is checked too."""
    file = copy_checkpoint(hub_checkpoint, tmp_path / "ckpt") / "model.safetensors"
    entries = checkpoint.read_header(file)
    with open(file, "r+b") as f:
        f.truncate(entries[-1].begin + 1)
    with pytest.raises(CheckpointError, match=rf"ended inside tensor {entries[-1].name}.*truncated"):
        read_one(file, entries[-1], checkpoint.Lane())


BROKEN_JSON = {  # file: text
    "config.json": '{"text_config": {"hidden_size": 64,}',
    "preprocessor_config.json": '{"crop_size": ',
    "tokenizer.json": '{"version": "1.0", "truncation": null, "model": {"type": "BPE", "vocab": {"a": 0',
    "model.safetensors.index.json": "weight_map",
}


@pytest.mark.parametrize("name", sorted(BROKEN_JSON))
def test_a_broken_json_file_is_named(hub_checkpoint, tmp_path, name):
    from minifastv.image import ImageProcessorConfig
    from minifastv.prompt import Tokenizer

    folder = copy_checkpoint(hub_checkpoint, tmp_path / "ckpt")
    (folder / name).write_text(BROKEN_JSON[name])
    read = {"preprocessor_config.json": ImageProcessorConfig.from_folder, "tokenizer.json": Tokenizer.from_folder}.get(
        name, lambda folder: load(str(folder), device="cpu", progress=False))
    with pytest.raises(CheckpointError) as error:
        read(folder)
    message = str(error.value)
    assert str(folder / name) in message and "\n" not in message, message
    assert "JSON" in message or "damaged" in message, message


@pytest.mark.parametrize("edit, words", [
    (lambda values: values["text_config"].update(num_hidden_layers="four"), ["num_hidden_layers", "integer", "'four'"]),
    (lambda values: values["text_config"].update(hidden_size=0), ["hidden_size", "positive"]),
    (lambda values: values["text_config"].update(num_attention_heads=0), ["num_attention_heads", "positive"]),
    (lambda values: values["text_config"].update(num_key_value_heads=3), ["not a multiple of num_key_value_heads 3"]),
    (lambda values: values["vision_config"].update(layer_norm_eps=float("nan")), ["layer_norm_eps"]),
    (lambda values: values.update(image_token_index=10**6), ["image_token_id", "vocabulary"]),
    (lambda values: values.update(vision_feature_layer=-9), ["vision_feature_layer"]),
    (lambda values: values.update(text_config=[1, 2]), ["config.json", "LLaVA"]),
    (lambda values: values.clear() or values.update(model_type="bert") or values.update(text_config=None), ["config.json"]),
], ids=["string size", "zero size", "no heads", "heads do not divide", "nan eps", "image id outside vocab",
        "feature layer outside", "text config a list", "not llava"])
def test_a_foreign_config_is_refused_with_the_reason(hub_checkpoint, tmp_path, edit, words):
    folder = copy_checkpoint(hub_checkpoint, tmp_path / "ckpt")
    values = json.loads((folder / "config.json").read_text())
    edit(values)
    (folder / "config.json").write_text(json.dumps(values))
    with pytest.raises(CheckpointError) as error:
        read_config(folder)
    message = str(error.value)
    assert str(folder / "config.json") in message and "\n" not in message, message
    for word in words:
        assert word in message, message


def test_sharded_checkpoint_loads(hf_model, tmp_path, tiny_prompt, reference_logits):
    folder = tmp_path / "sharded"
    hf_model.save_pretrained(folder, max_shard_size="5MB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and len(list(folder.glob("*.safetensors"))) == len(shards)
    model = load(str(folder), device="cpu", dtype=torch.float32, progress=False)
    diff = (logits_of(model, *tiny_prompt) - reference_logits).abs().max().item()
    print(f"\n[parity] float32 sharded checkpoint: max abs diff {diff:.3g}")
    assert diff <= 1e-5


def test_index_naming_a_missing_shard(hf_model, tmp_path):
    folder = tmp_path / "sharded"
    hf_model.save_pretrained(folder, max_shard_size="5MB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[-1]
    (folder / lost).unlink()
    with pytest.raises(CheckpointError, match=lost.replace(".", r"\.")):
        load(str(folder), device="cpu", progress=False)


def test_float16_checkpoint_loads_into_float32(hub_checkpoint, tmp_path, tiny_prompt):
    """The hub stores float16; loading converts each tensor exactly as transformers does."""
    from transformers import LlavaForConditionalGeneration

    folder = copy_checkpoint(hub_checkpoint, tmp_path / "fp16")

    def to_half(state):
        for name in state:
            state[name] = state[name].half()

    rewrite(folder, to_half)
    ours = load(str(folder), device="cpu", dtype=torch.float32, progress=False)
    assert ours.lm_head.weight.dtype == torch.float32
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    ids, px = tiny_prompt
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=px).logits
    assert (logits_of(ours, ids, px) - expected).abs().max().item() <= 1e-5


def test_progress_output(hub_checkpoint, capsys):
    load(str(hub_checkpoint), device="cpu", progress=False)
    assert capsys.readouterr() == ("", "")
    load(str(hub_checkpoint), device="cpu", progress=True)
    captured = capsys.readouterr()
    assert "model.safetensors" in captured.err and captured.out == ""  # progress goes to stderr, answers to stdout


# ----------------------------------------------------------------------------------------------------
# Hub ids and bad paths (no network)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """The hub unreachable: offline mode, and an empty weights folder."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MINIFASTV_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path / "weights")  # read once, at import
    return tmp_path / "weights"


def test_unreachable_hub_is_a_checkpoint_error(offline_hub):
    with pytest.raises(CheckpointError, match=r"(?s)someone/not-a-model.*(?i:hub)"):
        load("someone/not-a-model", device="cpu", progress=False)


def test_offline_uses_an_earlier_download(offline_hub, hub_checkpoint, tiny_prompt, reference_logits):
    copy_checkpoint(hub_checkpoint, offline_hub / "someone--tiny-llava")
    model = load("someone/tiny-llava", device="cpu", dtype=torch.float32, progress=False)
    assert (logits_of(model, *tiny_prompt) - reference_logits).abs().max().item() <= 1e-5


def test_neither_folder_nor_repo_id(tmp_path, hub_checkpoint, monkeypatch):
    with pytest.raises(CheckpointError, match="no model folder .*no/such/folder"):
        load(str(tmp_path / "no" / "such" / "folder"), device="cpu", progress=False)
    with pytest.raises(CheckpointError, match="no model folder not-a-folder-or-repo"):
        load("not-a-folder-or-repo", device="cpu", progress=False)
    with pytest.raises(CheckpointError, match="is a file"):
        load(str(hub_checkpoint / "config.json"), device="cpu", progress=False)  # a file, not a folder
    monkeypatch.chdir(tmp_path)  # relative paths that look like owner/name: a missing folder, not a hub problem
    (tmp_path / "weights").mkdir()
    for relative in ("./tiny", "weights/tiny", "../nowhere"):
        with pytest.raises(CheckpointError, match=f"no model folder {relative}"):
            load(relative, device="cpu", progress=False)


# ----------------------------------------------------------------------------------------------------
# What load() returns


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_loaded_parameters(hub_checkpoint, dtype):
    model = load(str(hub_checkpoint), device="cpu", dtype=dtype, progress=False)
    params = dict(model.named_parameters())
    assert len(params) == len(expected_tensors(model.config))
    for name, p in params.items():
        assert p.device == torch.device("cpu"), name
        assert p.dtype == dtype, name
        assert not p.requires_grad, name
    for name, b in model.named_buffers():
        assert not b.is_meta, name
    assert not model.training
    assert model.rope_cos.dtype == torch.float32 and model.rope_sin.dtype == torch.float32
    assert model.rope_cos.shape[0] == model.config.text.max_position_embeddings


def test_default_dtype_on_cpu(hub_checkpoint):
    model = load(str(hub_checkpoint), device="cpu", progress=False)
    assert model.lm_head.weight.dtype == torch.float32


def test_hub_failure_is_one_line_even_when_the_hub_says_more(tmp_path, monkeypatch):
    """huggingface-hub's errors span several lines; the user still gets one sentence on one line."""
    import huggingface_hub

    def unreachable(**kwargs):
        raise OSError("Got: ConnectError: Name or service not known\nAn error happened.\n  Please check your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(CheckpointError) as error:
        load("someone/some-model", device="cpu")
    message = str(error.value)
    assert "\n" not in message and "someone/some-model" in message and "Please check your connection" in message


# ----------------------------------------------------------------------------------------------------
# Reader threads, and the GPU path: tensors read chunk by chunk through a reusable staging buffer (pinned
# on a GPU). Off a GPU it runs with a small unpinned buffer, and a copy onto the CPU or the meta device.


def read_one(file, entry, lane):
    return checkpoint.read_tensor(entry, file, torch.device("cpu"), checkpoint.READABLE_DTYPES[entry.dtype], lane)


def small_lanes(device, count):
    return [checkpoint.Lane(staging=torch.empty(4096, dtype=torch.uint8)) for _ in range(count)]


def test_reading_through_a_small_staging_buffer_gives_the_same_tensors(hub_checkpoint):
    """A 1 KiB buffer: most tensors take several chunks, and the last chunk of each is partial."""
    file = hub_checkpoint / "model.safetensors"
    saved = load_file(file)
    for entry in checkpoint.read_header(file):
        direct = read_one(file, entry, checkpoint.Lane())
        staged = read_one(file, entry, checkpoint.Lane(staging=torch.empty(1024, dtype=torch.uint8)))
        assert staged.dtype == direct.dtype == saved[entry.name].dtype, entry.name
        assert torch.equal(staged, saved[entry.name]) and torch.equal(direct, saved[entry.name]), entry.name


def test_loading_through_the_staging_buffers_gives_the_same_model(hub_checkpoint, monkeypatch, tiny_prompt,
                                                                   reference_logits):
    """The whole load on the GPU path, run on the CPU with small unpinned buffers, and a dtype cast after it."""
    monkeypatch.setattr(checkpoint, "new_lanes", small_lanes)
    model = load(str(hub_checkpoint), device="cpu", dtype=torch.float32, progress=False)
    assert (logits_of(model, *tiny_prompt) - reference_logits).abs().max().item() <= 1e-5
    half = load(str(hub_checkpoint), device="cpu", dtype=torch.float16, progress=False)
    assert half.lm_head.weight.dtype == torch.float16
    assert torch.equal(half.lm_head.weight, model.lm_head.weight.half())


def test_a_file_that_shrinks_while_staging_is_caught(hub_checkpoint, tmp_path):
    file = copy_checkpoint(hub_checkpoint, tmp_path / "ckpt") / "model.safetensors"
    entries = checkpoint.read_header(file)
    with open(file, "r+b") as f:
        f.truncate(entries[-1].begin + 100)  # the first 64-byte chunk is whole, the second is cut
    with pytest.raises(CheckpointError, match=rf"ended inside tensor {entries[-1].name}"):
        read_one(file, entries[-1], checkpoint.Lane(staging=torch.empty(64, dtype=torch.uint8)))


def test_lanes_stage_off_the_cpu_only():
    """The CPU reads into each tensor's own memory; another device gets a buffer per lane (pinned on CUDA only)."""
    assert all(lane.staging is None and lane.stream is None for lane in checkpoint.new_lanes(torch.device("cpu"), 3))
    lanes = checkpoint.new_lanes(torch.device("meta"), count=2)
    assert len(lanes) == 2 and lanes[0].staging is not lanes[1].staging
    assert all(lane.staging.numel() == checkpoint.STAGING_BYTES and not lane.staging.is_pinned() for lane in lanes)


def test_tensors_are_read_side_by_side(hub_checkpoint, monkeypatch):
    """Two reads must be under way at once to pass the barrier: loading one tensor after the other would time out."""
    monkeypatch.setattr(checkpoint, "READERS", 2)
    barrier, real_read_tensor = threading.Barrier(2, timeout=20), checkpoint.read_tensor

    def meets_another_read(*args):
        barrier.wait()
        return real_read_tensor(*args)

    monkeypatch.setattr(checkpoint, "read_tensor", meets_another_read)
    one_by_one = load(str(hub_checkpoint), device="cpu", progress=False)
    monkeypatch.undo()
    expected = load(str(hub_checkpoint), device="cpu", progress=False)
    assert one_by_one.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(tensor, expected.state_dict()[name]) for name, tensor in one_by_one.state_dict().items())


def open_files():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files in /proc")
def test_an_error_stops_the_reading_and_closes_the_files(hub_checkpoint, monkeypatch):
    """The third tensor fails: the readers start no more than the ones already under way, and no file stays open."""
    monkeypatch.setattr(checkpoint, "READERS", 2)
    calls, real_read_tensor = [], checkpoint.read_tensor
    lock = threading.Lock()

    def fails_on_the_third(*args):
        with lock:
            calls.append(args[0].name)
            number = len(calls)
        if number == 3:
            raise CheckpointError("the disk went away")
        return real_read_tensor(*args)

    monkeypatch.setattr(checkpoint, "read_tensor", fails_on_the_third)
    files_before = open_files()
    with pytest.raises(CheckpointError, match="the disk went away"):
        load(str(hub_checkpoint), device="cpu", progress=False)
    assert len(calls) <= 3 + 1, f"{len(calls)} tensors were started"  # the failing one, and one more under way at most
    assert len(checkpoint.read_header(hub_checkpoint / "model.safetensors")) > 10
    assert open_files() == files_before
