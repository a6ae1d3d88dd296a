"""A tiny random LLaVA-1.5 checkpoint, built offline in a second: try every command
without the 14 GB download.

`--model tiny` on python -m minifastv, .analyze and .bench builds it once into weights/tiny and
reuses it; `--model tiny-video` builds a tiny Video-LLaVA the same way (224 px, 8 frames of 257
tokens) into weights/tiny-video. It is a complete llava-hf model folder, as a download looks:
config.json, model.safetensors (hub tensor names), tokenizer.json and preprocessor_config.json. The
shapes are LLaVA-1.5's where they teach something (336 px images, 14 px patches, so 576 image
tokens; CLIP with a CLS token and feature layer -2) and tiny elsewhere (a 128-wide, 4-layer
decoder). The weights are random, so its answers are random text.

The tokenizer is a small Llama-style one, written with the `tokenizers` library alone: `<unk>` 0,
`<s>` 1, `</s>` 2, the 256 byte tokens `<0x00>`..`<0xFF>`, a few hundred BPE tokens learned from the
English text below, then `<image>` (and Video-LLaVA's `<video>`) and `<pad>` as the last ids. Its
pipeline is the old Llama one of llava-hf's file: a normalizer that puts `▁` in front and turns
spaces into `▁`, BPE with byte fallback, and the Replace/ByteFallback/Fuse/Strip decoder.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from . import checkpoint
from .model import Llava

TINY_NOTE = (
    "note: --model {} is a tiny {} with random weights, built offline for trying minifastv: "
    "its answers are random text."
)

TRAINING_TEXT = """\
USER: What is shown in this image? ASSISTANT: The image shows a cat sitting on a red chair \
next to a window.
USER: Describe the picture in detail. ASSISTANT: There is a dog playing with a ball in the \
green park.
A man is riding a bicycle down the street while the sun sets behind the tall buildings of the city.
Two children are reading books at a wooden table in the library; the room is quiet and bright.
The photo shows a plate of food: rice, vegetables and a piece of fish, served at a small café.
What color is the car? The car is blue. How many people are there? There are three people here.
Is this a kitchen or a bedroom? It is a kitchen with a white stove, a sink and a large fridge.
"""

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{byte:02X}>" for byte in range(256)]
ADDED_TOKENS = ["<image>", "<pad>"]

# llava-hf's preprocessor_config.json (CLIP's processor at 336 px).
PREPROCESSOR_CONFIG = {
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336},
}


def learned_vocab_and_merges(vocab_size=300):
    """BPE tokens and merges learned from TRAINING_TEXT, words marked with a leading ▁ as
    in Llama."""
    trainer_tokenizer = Tokenizer(BPE())
    # Split on words only while training, so that no learned token straddles two words.
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always", split=True
    )
    trainer = BpeTrainer(vocab_size=vocab_size, show_progress=False)
    trainer_tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
    model = json.loads(trainer_tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    return tokens, [tuple(merge) for merge in model["merges"]]


def write_small_llama_tokenizer(folder, video=False):
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder`.

    Returns the ids a tiny model needs: image_token_id, pad_token_id, video_token_id (None
    without video), and vocab_size (every id, added tokens included; a model's vocabulary must be
    at least this large).
    """
    added_tokens = ["<image>", "<video>", "<pad>"] if video else ADDED_TOKENS
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    learned_tokens, merges = learned_vocab_and_merges()
    vocab = {
        token: index for index, token in enumerate(SPECIAL_TOKENS + BYTE_TOKENS + learned_tokens)
    }

    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(content=" ", left=1, right=0),
    ])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    # <unk> <s> </s> keep their ids 0 1 2; <image> and <pad> are new, so they get the last two ids.
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True)
                                  for token in SPECIAL_TOKENS + added_tokens])
    tokenizer.save(str(folder / "tokenizer.json"))

    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS + added_tokens}
    added_tokens_decoder = {
        str(ids[token]): dict(content=token, lstrip=False, normalized=False, rstrip=False,
                              single_word=False, special=True)
        for token in ids
    }
    special_tokens = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    extra = {"image_token": "<image>", **({"video_token": "<video>"} if video else {})}
    config = dict(tokenizer_class="LlamaTokenizer", legacy=False, add_bos_token=True,
                  add_eos_token=False, add_prefix_space=None, clean_up_tokenization_spaces=False,
                  padding_side="left", **extra, extra_special_tokens=extra,
                  added_tokens_decoder=added_tokens_decoder, **special_tokens)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_tokens_map = {
        name: dict(content=token, lstrip=False, normalized=False, rstrip=False, single_word=False)
        for name, token in special_tokens.items()
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens_map, indent=2))
    return dict(image_token_id=ids["<image>"], pad_token_id=ids["<pad>"],
                video_token_id=ids.get("<video>"), vocab_size=tokenizer.get_vocab_size())


def tiny_config_values(image_token_id, pad_token_id, vocab_size, video_token_id=None):
    """config.json of the tiny model, in llava-hf's layout (transformers reads it too);
    Video-LLaVA's with a video id."""
    image_size = 336 if video_token_id is None else 224
    video = {} if video_token_id is None else {
        "architectures": ["VideoLlavaForConditionalGeneration"], "model_type": "video_llava",
        "video_token_index": video_token_id, "image_seq_length": 256, "video_seq_length": 8 * 257}
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", **video,
        "image_token_index": image_token_id,
        "pad_token_id": pad_token_id, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default", "tie_word_embeddings": False,
        "text_config": {
            "model_type": "llama",
            "vocab_size": -(-vocab_size // 64) * 64,  # padded to 64, as llava-hf's 32064
            "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4,
            "num_attention_heads": 4, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "bos_token_id": 1, "eos_token_id": 2,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 256,
            "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": image_size,
            "patch_size": 14, "projection_dim": 64, "hidden_act": "quick_gelu",
        },
    }


def write_tiny_checkpoint(folder, seed=0, video=False):
    """Write the tiny model folder; returns it. The weights are random (normal, std 0.08:
    peaked logits)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    ids = write_small_llama_tokenizer(folder, video)
    values = tiny_config_values(**ids)
    (folder / "config.json").write_text(json.dumps(values, indent=2))
    size = values["vision_config"]["image_size"]
    preprocessor = dict(PREPROCESSOR_CONFIG, crop_size={"height": size, "width": size},
                        size={"shortest_edge": size})
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    torch.manual_seed(seed)
    model = Llava(checkpoint.config_from_dict(values))
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.ndim >= 2 and "embedding" not in name:
            tensor = torch.randn(tensor.shape) * 0.08
        # stored as float16, like the real files
        state[checkpoint.file_name(name)] = tensor.to(torch.float16).contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def tiny_checkpoint(video=False):
    """weights/tiny, or weights/tiny-video (MINIFASTV_WEIGHTS moves weights/), built on first use in
    about a second, reused after."""
    target = checkpoint.WEIGHTS_DIR / ("tiny-video" if video else "tiny")
    if (target / "model.safetensors").is_file():
        return target
    target = checkpoint.weights_folder() / target.name  # refused in one sentence if read-only
    # built aside, then moved in one step
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    write_tiny_checkpoint(partial, video=video)
    try:
        partial.rename(target)
    except OSError:  # a folder is in the way: another process's finished copy, or a broken one
        if not (target / "model.safetensors").is_file():
            shutil.rmtree(target)
            partial.rename(target)
        shutil.rmtree(partial, ignore_errors=True)
    return target
