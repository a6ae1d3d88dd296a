"""A small Llama-style tokenizer written with the `tokenizers` library alone, for tests that cannot read
the real Llama-2 tokenizer.json.

It has the layout and the pipeline of llava-hf's file: `<unk>` 0, `<s>` 1, `</s>` 2, the 256 byte tokens
`<0x00>`..`<0xFF>`, a few hundred BPE tokens learned from the English text below, then the added special
tokens `<image>` and `<pad>` as the last ids. The pipeline is the old Llama one: a normalizer that puts
`▁` in front and turns spaces into `▁`, no pre-tokenizer, BPE with byte fallback, and the
Replace/ByteFallback/Fuse/Strip decoder.
"""

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

TRAINING_TEXT = """\
USER: What is shown in this image? ASSISTANT: The image shows a cat sitting on a red chair next to a window.
USER: Describe the picture in detail. ASSISTANT: There is a dog playing with a ball in the green park.
A man is riding a bicycle down the street while the sun sets behind the tall buildings of the city.
Two children are reading books at a wooden table in the library; the room is quiet and bright.
The photo shows a plate of food: rice, vegetables and a piece of fish, served at a small café.
What color is the car? The car is blue. How many people are there? There are three people here.
Is this a kitchen or a bedroom? It is a kitchen with a white stove, a sink and a large fridge.
"""

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{byte:02X}>" for byte in range(256)]
ADDED_TOKENS = ["<image>", "<pad>"]


def learned_vocab_and_merges(vocab_size=300):
    """BPE tokens and merges learned from TRAINING_TEXT, words marked with a leading ▁ as in Llama."""
    trainer_tokenizer = Tokenizer(BPE())
    # Split on words only while training, so that no learned token straddles two words.
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = BpeTrainer(vocab_size=vocab_size, show_progress=False)
    trainer_tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
    model = json.loads(trainer_tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    return tokens, [tuple(merge) for merge in model["merges"]]


def write_small_llama_tokenizer(folder):
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder`.

    Returns the ids a tiny model needs: image_token_id, pad_token_id, and vocab_size (every id, added tokens
    included; a model's vocabulary must be at least this large).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    learned_tokens, merges = learned_vocab_and_merges()
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + BYTE_TOKENS + learned_tokens)}

    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(content=" ", left=1, right=0)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s>:1 $B:1",
                                                             special_tokens=[("<s>", 1)])
    # <unk> <s> </s> keep their ids 0 1 2; <image> and <pad> are new, so they get the last two ids.
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True)
                                  for token in SPECIAL_TOKENS + ADDED_TOKENS])
    tokenizer.save(str(folder / "tokenizer.json"))

    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS + ADDED_TOKENS}
    added_tokens_decoder = {str(ids[token]): dict(content=token, lstrip=False, normalized=False, rstrip=False,
                                                  single_word=False, special=True) for token in ids}
    special_tokens = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    config = dict(tokenizer_class="LlamaTokenizer", legacy=False, add_bos_token=True, add_eos_token=False,
                  add_prefix_space=None, clean_up_tokenization_spaces=False, padding_side="left",
                  image_token="<image>", extra_special_tokens={"image_token": "<image>"},
                  added_tokens_decoder=added_tokens_decoder, **special_tokens)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_tokens_map = {name: dict(content=token, lstrip=False, normalized=False, rstrip=False, single_word=False)
                          for name, token in special_tokens.items()}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens_map, indent=2))
    return dict(image_token_id=ids["<image>"], pad_token_id=ids["<pad>"], vocab_size=tokenizer.get_vocab_size())
