"""Loading llava-hf checkpoints: config parsing, tensor names and shapes of the real models, and errors."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from conftest import REFERENCE, image_prompt, random_pixels

import minifastv.checkpoint as checkpoint
from minifastv.checkpoint import CheckpointError, expected_tensors, load, read_config
from minifastv.checkpoint import config_from_dict

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
    config = config_from_dict(values)
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
        config_from_dict(values)


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
# Damaged and foreign files: the safetensors library finds the damage when it opens the file; the message
# is one sentence that names the file and carries the library's reason, and nothing is read before it


def safetensors_parts(file):
    """(header dict, data bytes) of a .safetensors file."""
    raw = Path(file).read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def safetensors_bytes(header, data, header_text=None):
    text = (header_text if header_text is not None else json.dumps(header)).encode()
    return len(text).to_bytes(8, "little") + text + data


def in_file_order(header):
    return sorted((key for key in header if key != "__metadata__"), key=lambda key: header[key]["data_offsets"][0])


def damaged_versions(good):
    """{case: bytes of a damaged model.safetensors}."""
    raw = good.read_bytes()
    header, data = safetensors_parts(good)
    header_end = 8 + int.from_bytes(raw[:8], "little")
    name, second, *_, last = in_file_order(header)
    begin, end = header[name]["data_offsets"]

    def edited(change):
        copy = json.loads(json.dumps(header))
        change(copy)
        return safetensors_bytes(copy, data)

    def grow_first(copy):  # its bytes reach into the next tensor's; its shape is unchanged
        copy[name]["data_offsets"] = [begin, end + 2]

    def past_the_end(copy):  # the last tensor claims 64 more bytes than the file holds, its shape agrees
        entry = copy[last]
        entry["shape"] = [int(torch.tensor(entry["shape"]).prod()) + 32]
        entry["data_offsets"][1] += 64 if entry["dtype"] == "F16" else 128

    def overlap(copy):  # two tensors share bytes
        start, stop = copy[second]["data_offsets"]
        copy[second]["data_offsets"] = [start - 4, stop - 4]

    # The first tensor named a second time, there with the second tensor's entry: the JSON object keeps one
    # of the two, and the bytes of the other belong to no tensor. (Named twice with the same entry, a tensor
    # has one set of bytes: the library reads that file, and so do we.)
    twice = json.dumps(header)[:-1] + f", {json.dumps(name)}: {json.dumps(header[second])}}}"
    return {
        "zero-length shard": b"",
        "cut inside the length": raw[:5],
        "cut inside the header": raw[: header_end // 2],
        "cut just after the header": raw[:header_end],
        "cut in the middle of the data": raw[: header_end + len(data) // 2],
        "last byte missing": raw[:-1],
        "trailing bytes": raw + b"\0" * 16,
        "garbage": bytes(range(256)) * 64,
        "huge header length": (10**12).to_bytes(8, "little") + raw[8:],
        "header not JSON": safetensors_bytes(None, data, header_text="{not json" + " " * 40),
        "header not an object": safetensors_bytes(None, data, header_text="[1, 2, 3]"),
        "tensor named twice in header": safetensors_bytes(None, data, header_text=twice),
        "size disagrees with dtype x shape": edited(grow_first),
        "offsets past the end": edited(past_the_end),
        "overlapping tensors": edited(overlap),
        "unknown dtype": edited(lambda copy: copy[name].update(dtype="F17")),
        "negative offset": edited(lambda copy: copy[name].update(data_offsets=[-2, end])),
        "shape not a list": edited(lambda copy: copy[name].update(shape="big")),
    }


DAMAGED_CASES = ["zero-length shard", "cut inside the length", "cut inside the header", "cut just after the header",
                 "cut in the middle of the data", "last byte missing", "trailing bytes", "garbage",
                 "huge header length", "header not JSON", "header not an object", "tensor named twice in header",
                 "size disagrees with dtype x shape", "offsets past the end", "overlapping tensors", "unknown dtype",
                 "negative offset", "shape not a list"]


def library_reason(file):
    """What the safetensors library itself says when it opens `file`: the oracle for our message's reason."""
    try:
        with safe_open(file, framework="pt"):
            return None
    except SafetensorError as error:
        return str(error)


def counted_reads(monkeypatch):
    """The (file, name, ...) of every tensor read from now on; the reads still happen."""
    reads, real_read_tensor = [], checkpoint.read_tensor

    def counting(*args):
        reads.append(args)
        return real_read_tensor(*args)

    monkeypatch.setattr(checkpoint, "read_tensor", counting)
    return reads


def assert_one_sentence_naming(message, file):
    assert str(file) in message and "damaged" in message, message
    assert "\n" not in message and message.endswith("."), message


@pytest.mark.parametrize("case", DAMAGED_CASES)
def test_a_damaged_safetensors_file_never_loads(hub_checkpoint, tmp_path, monkeypatch, case):
    file = copy_checkpoint(hub_checkpoint, tmp_path / "ckpt") / "model.safetensors"
    file.write_bytes(damaged_versions(hub_checkpoint / "model.safetensors")[case])
    reads = counted_reads(monkeypatch)
    with pytest.raises(CheckpointError) as error:
        load(str(file.parent), device="cpu", progress=False)
    reason = library_reason(file)
    assert reason is not None, "the library opens this file"
    assert_one_sentence_naming(str(error.value), file)
    # The reason up to the tensor it names, if any: which tensor the library finds first may differ by run.
    assert reason.split("`")[0] in str(error.value), str(error.value)
    assert reads == [], "a tensor was read before the file was known to be whole"


def test_a_tensor_named_twice_with_one_entry_loads_as_it_reads(hub_checkpoint, tmp_path):
    """The other way of naming a tensor twice: both entries the same bytes. Nothing is ambiguous, the library
    reads the file, and the model gets the tensor's values."""
    file = copy_checkpoint(hub_checkpoint, tmp_path / "ckpt") / "model.safetensors"
    header, data = safetensors_parts(file)
    name = in_file_order(header)[0]
    file.write_bytes(safetensors_bytes(None, data, json.dumps(header)[:-1] + f", {json.dumps(name)}: "
                                       f"{json.dumps(header[name])}}}"))
    model = load(str(file.parent), device="cpu", dtype=torch.float32, progress=False)
    expected = load_file(hub_checkpoint / "model.safetensors")[name]
    assert torch.equal(model.state_dict()[checkpoint.model_name(name)], expected)


def test_a_damaged_second_shard_is_found_before_the_first_is_loaded(hf_model, tmp_path, monkeypatch):
    folder = tmp_path / "sharded"
    hf_model.save_pretrained(folder, max_shard_size="5MB")
    last = sorted(folder.glob("*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-10])
    reads = counted_reads(monkeypatch)
    with pytest.raises(CheckpointError) as error:
        load(str(folder), device="cpu", progress=False)
    assert_one_sentence_naming(str(error.value), last)
    assert reads == []


def open_files():
    return len(os.listdir("/proc/self/fd"))


def mapped(file):
    """Whether this process maps `file` into its memory."""
    return str(file) in Path("/proc/self/maps").read_text()


def cut_after_the_check(monkeypatch, file, keep_bytes):
    """Cut `file` to its first `keep_bytes` bytes right after load() has checked it."""
    real_check_tensors = checkpoint.check_tensors

    def check_then_cut(*args, **kwargs):
        plan = real_check_tensors(*args, **kwargs)
        with open(file, "r+b") as f:
            f.truncate(keep_bytes)
        return plan

    monkeypatch.setattr(checkpoint, "check_tensors", check_then_cut)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads open files and maps from /proc")
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_file_that_shrinks_after_the_check_is_refused(hub_checkpoint, tmp_path, monkeypatch, device):
    """Whole when checked, then cut (a second process writing it): the read refuses it, names it, and leaves no
    file open. The CPU maps the file, and meta reads it with pread as a GPU does."""
    file = copy_checkpoint(hub_checkpoint, tmp_path / "ckpt") / "model.safetensors"
    cut_after_the_check(monkeypatch, file, file.stat().st_size - 100)
    reads = counted_reads(monkeypatch)
    files_before = open_files()
    with pytest.raises(CheckpointError) as error:
        load(str(file.parent), device=device, progress=False)
    assert_one_sentence_naming(str(error.value), file)
    assert len(reads) == 1, "the first tensor read found the file cut"
    assert open_files() == files_before and not mapped(file)


def test_a_file_cut_while_open_for_pread_is_refused(hub_checkpoint, tmp_path, monkeypatch):
    """Off the CPU, tensors are read with pread from a file opened and checked a moment before: a file cut in
    between yields fewer bytes than its header promises, which is refused, not read as zeros or garbage."""
    file = copy_checkpoint(hub_checkpoint, tmp_path / "ckpt") / "model.safetensors"
    header_end = 8 + int.from_bytes(file.read_bytes()[:8], "little")
    real_safe_open = checkpoint.safe_open

    def open_then_cut(path, *args, **kwargs):
        opened = real_safe_open(path, *args, **kwargs)
        if kwargs.get("backend") == "pread":
            with open(path, "r+b") as f:
                f.truncate(header_end)
        return opened

    monkeypatch.setattr(checkpoint, "safe_open", open_then_cut)
    with pytest.raises(CheckpointError) as error:
        load(str(file.parent), device="meta", progress=False)
    assert_one_sentence_naming(str(error.value), file)


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
# How the tensors are read: one at a time, each into memory of its own, only those asked for


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads open files and maps from /proc")
def test_loaded_weights_are_the_models_own_memory(hub_checkpoint, tmp_path):
    """On the CPU the library maps the file and hands out views of it, even in the file's own dtype: the model
    must hold copies, so that rewriting the file afterwards changes nothing, and no map of it stays."""
    file = copy_checkpoint(hub_checkpoint, tmp_path / "ckpt") / "model.safetensors"
    assert {tensor.dtype for tensor in load_file(file).values()} == {torch.float32}
    files_before = open_files()
    model = load(str(file.parent), device="cpu", dtype=torch.float32, progress=False)
    loaded = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    header_end = 8 + int.from_bytes(file.read_bytes()[:8], "little")
    with open(file, "r+b") as f:  # zeros over every tensor, in place
        f.seek(header_end)
        f.write(bytes(file.stat().st_size - header_end))
    assert all(torch.equal(tensor, loaded[name]) for name, tensor in model.state_dict().items())
    assert open_files() == files_before and not mapped(file)


def test_loading_onto_the_meta_device_reads_every_tensor_and_keeps_none(hub_checkpoint, monkeypatch):
    """The meta device: read as for a GPU (pread, one tensor at a time), every weight a shape only after."""
    reads = counted_reads(monkeypatch)
    model = load(str(hub_checkpoint), device="meta", dtype=torch.float16, progress=False)
    assert len(reads) == len(load_file(hub_checkpoint / "model.safetensors"))
    assert all(p.is_meta and p.dtype == torch.float16 for p in model.parameters())
    assert model.rope_cos.is_meta and not model.training


def test_a_tower_left_out_is_never_read(tmp_path, monkeypatch):
    """Video-LLaVA with towers=("video",): the image tower's tensors are skipped, not read and dropped."""
    from minifastv.tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / "tiny-video", video=True)
    reads = counted_reads(monkeypatch)
    model = load(str(folder), device="cpu", progress=False, towers=("video",))
    assert model.image_tower is None and model.video_tower is not None
    in_file = load_file(folder / "model.safetensors")
    image_tower = [name for name in in_file if name.startswith("image_tower.")]
    assert image_tower and sorted(name for _, name, *_ in reads) == sorted(set(in_file) - set(image_tower))
    assert all(torch.equal(model.state_dict()[checkpoint.model_name(name)], in_file[name].float())
               for name in in_file if name not in image_tower)


def test_loading_in_the_files_dtype_and_cast_gives_the_same_values(hub_checkpoint, tiny_prompt, reference_logits):
    """float32 weights loaded as they are give transformers' logits; cast to float16 on the way, each tensor
    equals the float32 one cast afterwards."""
    model = load(str(hub_checkpoint), device="cpu", dtype=torch.float32, progress=False)
    assert (logits_of(model, *tiny_prompt) - reference_logits).abs().max().item() <= 1e-5
    half = load(str(hub_checkpoint), device="cpu", dtype=torch.float16, progress=False)
    assert half.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(tensor, model.state_dict()[name].half()) for name, tensor in half.state_dict().items())
