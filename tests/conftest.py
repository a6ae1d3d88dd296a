"""Tiny random LLaVA-1.5 checkpoints written by transformers: the reference every test compares against.

The configs keep the real token ids (<image> 32000, <pad> 32001, vocab 32064) and the real structure
(CLIP with a CLS token and pre_layrnorm, feature layer -2, two-layer projector, Llama decoder) at sizes
that run in milliseconds on a CPU.
"""

import json
from pathlib import Path

import pytest
import torch

REFERENCE = Path(__file__).resolve().parent.parent.parent / "shared" / "reference"
IMAGE_TOKEN = 32000
PAD_TOKEN = 32001


def tiny_hf_config(image_size=84, layers=4, image_token_id=IMAGE_TOKEN, pad_token_id=PAD_TOKEN, **text_overrides):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = dict(vocab_size=32064, hidden_size=64, intermediate_size=172, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5)
    text.update(text_overrides)
    vision = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                              image_size=image_size, patch_size=14, projection_dim=32)
    return LlavaConfig(text_config=LlamaConfig(**text), vision_config=vision, image_token_index=image_token_id,
                       pad_token_id=pad_token_id)


def tiny_hf_model(seed=0, **config_kwargs):
    """A random transformers LlavaForConditionalGeneration with weights large enough to give peaked logits."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_hf_config(**config_kwargs)).eval()
    with torch.no_grad():  # transformers' init (std 0.02) gives near-uniform logits; widen it
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embedding" not in name:
                p.normal_(0.0, 0.08)
    return model


# transformers' parameter name prefixes -> the hub's, as the llava-hf and LanguageBind downloads spell them
HUB_PREFIXES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                ("model.vision_tower.", "vision_tower.vision_model."), ("model.image_tower.", "image_tower.vision_model."),
                ("model.video_tower.", "video_tower.vision_model."), ("model.multi_modal_projector.", "multi_modal_projector."))


def save_hub_style(hf_model, folder):
    """Write the checkpoint with the names of the hub files (vision_tower.vision_model.*, language_model.model.*)."""
    from safetensors.torch import save_file

    hf_model.save_pretrained(folder)  # config.json and transformers' own tensor names
    state = {}
    for name, tensor in hf_model.state_dict().items():
        old, new = next(((old, new) for old, new in HUB_PREFIXES if name.startswith(old)), ("", ""))
        state[new + name.removeprefix(old)] = tensor.contiguous()
    for old in Path(folder).glob("*.safetensors*"):
        old.unlink()
    save_file(state, Path(folder) / "model.safetensors", metadata={"format": "pt"})
    return Path(folder)


@pytest.fixture(scope="session")
def hf_model():
    return tiny_hf_model()


@pytest.fixture(scope="session")
def hub_checkpoint(hf_model, tmp_path_factory):
    return save_hub_style(hf_model, tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="session")
def saved_checkpoint(hf_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("save_pretrained")
    hf_model.save_pretrained(folder)
    return folder


def image_prompt(num_images, tokens_per_image, text_before=5, text_after=7, seed=0):
    """A prompt of random text ids with `num_images` runs of <image> ids, as LlavaProcessor lays them out."""
    generator = torch.Generator().manual_seed(seed)
    ids = [1]
    for _ in range(num_images):
        ids += torch.randint(3, 31000, (text_before,), generator=generator).tolist()
        ids += [IMAGE_TOKEN] * tokens_per_image
    ids += torch.randint(3, 31000, (text_after,), generator=generator).tolist()
    return torch.tensor([ids])


def random_pixels(num_images, image_size=84, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_images, 3, image_size, image_size, generator=generator)


def left_pad(prompts, pad_id=PAD_TOKEN):
    """Stack (1, T_i) prompts into a left-padded (B, T) batch and its attention mask."""
    length = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - prompt.shape[1] :] = prompt[0]
        mask[row, length - prompt.shape[1] :] = 1
    return ids, mask


def write_cli_checkpoint(folder, image_size=84):
    """A complete tiny model folder, as a hub download looks: config + safetensors, the tokenizer files of a
    small Llama-style tokenizer (minifastv/tiny.py), and a preprocessor config for its image size."""
    from minifastv.tiny import write_small_llama_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    ids = write_small_llama_tokenizer(folder / "tok")
    vocab_size = -(-ids["vocab_size"] // 64) * 64  # padded to 64, like llava-hf's 32064
    tiny_hf_model(image_size=image_size, image_token_id=ids["image_token_id"], pad_token_id=ids["pad_token_id"],
                  vocab_size=vocab_size).save_pretrained(folder)
    for file in (folder / "tok").iterdir():
        file.rename(folder / file.name)
    (folder / "tok").rmdir()
    preprocessor = json.loads((Path(__file__).parent / "data" / "llava-1.5-7b-hf" / "preprocessor_config.json").read_text())
    preprocessor["crop_size"] = {"height": image_size, "width": image_size}
    preprocessor["size"] = {"shortest_edge": image_size}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


@pytest.fixture(scope="session")
def cli_checkpoint(tmp_path_factory):
    return write_cli_checkpoint(tmp_path_factory.mktemp("cli") / "tiny-llava")


@pytest.fixture
def fresh_compiler():
    """torch.compile's caches emptied before the test: its compiled code is its own, and earlier tests' versions
    do not count towards torch._dynamo's recompile limit (past it, code runs uncompiled)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
