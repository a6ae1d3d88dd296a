"""minifastv/prompt.py against transformers: the same ids as LlavaProcessor, the same text as llava-hf's chat
template, and the same decoded text as the transformers tokenizer, for a small Llama-style tokenizer (always)
and the real Llama-2 tokenizer.json of llava-hf (when ../shared/reference/ is there)."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from minifastv.errors import CheckpointError
from minifastv.prompt import SYSTEM_PROMPTS, Tokenizer, count_images, encode_prompt, format_prompt
from minifastv.tiny import write_small_llama_tokenizer

REFERENCE = Path(__file__).resolve().parent.parent.parent / "shared" / "reference"
REAL_FOLDER = REFERENCE / "llava-1.5-7b-hf"
FACTS_PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
TOKENS_PER_IMAGE = 576  # a 336 px image: (336 / 14)^2 patches, + CLS, - CLS ("default" strategy)

CONVERSATIONS = {
    "single image": dict(question="What is shown in this image?"),
    "two images": dict(question="What differs between these two pictures?", num_images=2),
    "multi-turn": dict(question="And what colour is it?",
                       history=[("What is it?", "A cat on a chair."), ("Where is the chair?", "In a kitchen.")]),
    "unicode": dict(question="Qu'est-ce que c'est ? Un café ☕, un chat 😀, 日本語の猫, naïve ∑."),
    "leading and trailing spaces": dict(question="   spaces around   "),
    "newlines": dict(question="Line one.\nLine two.\n\n  Indented line.\n"),
    "no image": dict(question="Hello there!", num_images=0),
}
INLINE_PLACEHOLDERS = dict(question="Compare <image> with\n<image>, please.", num_images=2)
DECODE_TEXTS = ["Hello world", "The cat sits on the chair.", "   leading spaces and trailing ones  ",
                "line one\nline two\n\n\tindented", "café, naïve, 日本語, emoji 😀🎉 and ∑ (sum)", "\n", "a"]


# ------------------------------------------------------------------------------------------------
# Tokenizer folders: ours, transformers' tokenizer and LlavaProcessor for each


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    from transformers import LlavaConfig

    folder = tmp_path_factory.mktemp("small_tokenizer")
    ids = write_small_llama_tokenizer(folder)
    # A llava config.json beside it, as in a real checkpoint folder: transformers picks its tokenizer class by it.
    LlavaConfig(image_token_index=ids["image_token_id"], pad_token_id=ids["pad_token_id"]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def real_folder():
    if not (REAL_FOLDER / "tokenizer.json").is_file():
        pytest.skip(f"the real llava-hf tokenizer is not in {REAL_FOLDER}")
    return REAL_FOLDER


@pytest.fixture(scope="module")
def chat_template():
    path = REAL_FOLDER / "chat_template.json"
    if not path.is_file():
        pytest.skip(f"llava-hf's chat_template.json is not in {REAL_FOLDER}")
    return json.loads(path.read_text())["chat_template"]


@pytest.fixture(scope="module", params=["small", "real"])
def tokenizers_pair(request):
    """(folder, minifastv Tokenizer, transformers LlavaProcessor) for one tokenizer.json."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    folder = request.getfixturevalue(f"{request.param}_folder")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(folder),
                               patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return folder, Tokenizer.from_folder(folder), processor


def processor_ids(processor, text):
    images = [Image.new("RGB", (500, 375), (120, 80, 40))] * count_images(text) or None  # any size: cropped to 336
    return processor(text=text, images=images, return_tensors="pt")["input_ids"]


# ------------------------------------------------------------------------------------------------
# Prompt ids = LlavaProcessor's


@pytest.mark.parametrize("name", list(CONVERSATIONS) + ["inline placeholders"])
def test_prompt_ids_equal_llava_processor(tokenizers_pair, name):
    _, tokenizer, processor = tokenizers_pair
    text = format_prompt(**CONVERSATIONS.get(name, INLINE_PLACEHOLDERS))
    ids = encode_prompt(tokenizer, text, TOKENS_PER_IMAGE)
    expected = processor_ids(processor, text)
    assert ids.dtype == torch.long and ids.shape == expected.shape
    assert torch.equal(ids, expected)
    assert (ids == tokenizer.image_token_id).sum() == TOKENS_PER_IMAGE * count_images(text)
    assert ids[0, 0] == tokenizer.bos_token_id


def test_plain_text_ids_equal_transformers(tokenizers_pair):
    _, tokenizer, processor = tokenizers_pair
    for text in DECODE_TEXTS + ["", " ", "<image>", "a<image>b <image> c", "<s>hi</s>"]:
        assert tokenizer.encode(text) == processor.tokenizer.encode(text), text
        assert tokenizer.encode(text, add_bos=False) == processor.tokenizer.encode(text, add_special_tokens=False)


def test_ids_follow_llava_training_rule(tokenizers_pair):
    """The original LLaVA code tokenizes the text between images chunk by chunk with sentencepiece, each chunk
    with a leading ▁ and its own <s> (dropped). transformers' LlamaTokenizer class tokenizes one chunk that way."""
    from transformers import LlamaTokenizer

    folder, tokenizer, _ = tokenizers_pair
    chunk_tokenizer = LlamaTokenizer.from_pretrained(folder)
    for conversation in CONVERSATIONS.values():
        text = format_prompt(**conversation)
        llava_ids = [tokenizer.bos_token_id]
        for index, chunk in enumerate(text.split("<image>")):
            llava_ids += ([tokenizer.image_token_id] if index else []) + chunk_tokenizer.encode(chunk)[1:]
        assert tokenizer.encode(text) == llava_ids


def test_real_tokenizer_ids_of_the_facts_prompt(real_folder):
    """FACTS.md's "transformers" sequence comes from the LlamaTokenizer class (also what AutoTokenizer picks for a
    folder with no llava config.json). llava-hf checkpoints load tokenizer.json as is: one more ▁ after <image>."""
    from transformers import AutoProcessor, LlamaTokenizer

    ours = Tokenizer.from_folder(real_folder).encode(FACTS_PROMPT)
    assert ours[:9] == [1, 3148, 1001, 29901, 29871, 32000, 29871, 13, 5618]
    assert AutoProcessor.from_pretrained(real_folder).tokenizer.encode(FACTS_PROMPT) == ours
    llama_class_ids = LlamaTokenizer.from_pretrained(real_folder).encode(FACTS_PROMPT)
    assert llama_class_ids[:8] == [1, 3148, 1001, 29901, 29871, 32000, 13, 5618]
    assert llama_class_ids == ours[:6] + ours[7:]


def test_special_ids_of_the_real_tokenizer(real_folder):
    real = Tokenizer.from_folder(real_folder)
    assert (real.bos_token_id, real.eos_token_id, real.image_token_id, real.pad_token_id) == (1, 2, 32000, 32001)
    assert real.vocab_size == 32002  # Llama-2's 32000 + <image> + <pad>; the model pads its embedding to 32064


def test_special_ids_of_the_small_tokenizer(small_folder):
    small = Tokenizer.from_folder(small_folder)
    ids = json.loads((small_folder / "config.json").read_text())
    assert (small.bos_token_id, small.eos_token_id) == (1, 2)
    assert (small.image_token_id, small.pad_token_id) == (ids["image_token_index"], ids["pad_token_id"])
    assert small.vocab_size == small.pad_token_id + 1


def test_missing_tokenizer_json_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="No tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


# ------------------------------------------------------------------------------------------------
# Prompt text = llava-hf's chat template


def as_messages(question, num_images=1, history=()):
    """The conversation in the chat-template format: images at the start of the first user message."""
    messages = []
    for index, (asked, answer) in enumerate([*history, (question, None)]):
        images = [{"type": "image"}] * (num_images if index == 0 else 0)
        messages.append({"role": "user", "content": images + [{"type": "text", "text": asked}]})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_format_prompt_equals_chat_template(small_folder, chat_template, name):
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    tokenizer = AutoTokenizer.from_pretrained(small_folder)
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer, chat_template=chat_template)
    expected = processor.apply_chat_template(as_messages(**CONVERSATIONS[name]), add_generation_prompt=True,
                                             tokenize=False)
    assert format_prompt(**CONVERSATIONS[name]) == expected


def test_format_prompt_layout():
    assert format_prompt("What is this?") == "USER: <image>\nWhat is this? ASSISTANT:"
    assert format_prompt("Q", num_images=2) == "USER: <image>\n<image>\nQ ASSISTANT:"
    assert format_prompt("Q2", history=[("Q1", "A1")]) == "USER: <image>\nQ1 ASSISTANT: A1 USER: Q2 ASSISTANT:"
    # Placeholders the user wrote stay where they are, in any turn, and none are added.
    assert format_prompt("Is <image> a cat?", num_images=1) == "USER: Is <image> a cat? ASSISTANT:"
    assert format_prompt("Q2", history=[("See <image>", "A1")]) == "USER: See <image> ASSISTANT: A1 USER: Q2 ASSISTANT:"
    assert count_images(format_prompt("Q", num_images=3)) == 3


# LLaVA-1.5's own template (llava/conversation.py, conv_vicuna_v1: what its training and its eval scripts use),
# written out by hand: system prompt, one space, then the turns.
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions.")
# conv_llava_v1, which FastV's scripts pass (--conv-mode llava_v1): "human" where vicuna_v1 says "user".
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")


def test_format_prompt_with_the_system_prompt():
    assert SYSTEM_PROMPTS == {"vicuna_v1": VICUNA_V1_SYSTEM, "llava_v1": LLAVA_V1_SYSTEM}
    question = "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    assert format_prompt(question, system=SYSTEM_PROMPTS["vicuna_v1"]) == (
        VICUNA_V1_SYSTEM + " USER: <image>\nIs there a dog in the image?\n"
        "Answer the question using a single word or phrase. ASSISTANT:")
    assert format_prompt("Q2", history=[("Q1", "A1")], system="S") == "S USER: <image>\nQ1 ASSISTANT: A1 USER: Q2 ASSISTANT:"
    assert format_prompt("Q") == format_prompt("Q", system=None) == "USER: <image>\nQ ASSISTANT:"  # default: none


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_v1"])
def test_system_prompt_ids_of_the_real_tokenizer(real_folder, name):
    """With a system prompt, the ids are those LLaVA's own tokenizer_image_token makes: the text split at <image>,
    each piece tokenized by sentencepiece's rule (transformers' LlamaTokenizer class), <s> once."""
    from transformers import LlamaTokenizer

    tokenizer = Tokenizer.from_folder(real_folder)
    text = format_prompt("Is there a dog in the image?\nAnswer the question using a single word or phrase.",
                         system=SYSTEM_PROMPTS[name])
    ids = encode_prompt(tokenizer, text, TOKENS_PER_IMAGE)[0].tolist()
    # Vicuna v1.1's system sentence as every Vicuna/LLaVA-1.5 prompt starts: <s> ▁A ▁chat ▁between ▁a ▁curious ▁user
    # ▁and ▁an ▁artificial ▁intelligence ▁assistant .
    if name == "vicuna_v1":
        assert ids[:13] == [1, 319, 13563, 1546, 263, 12758, 1404, 322, 385, 23116, 21082, 20255, 29889]
    chunk_tokenizer = LlamaTokenizer.from_pretrained(real_folder)
    before, after = text.split("<image>")
    expected = [1] + chunk_tokenizer.encode(before)[1:] + [32000] * TOKENS_PER_IMAGE + chunk_tokenizer.encode(after)[1:]
    assert ids == expected


# ------------------------------------------------------------------------------------------------
# Decoding, all at once and streamed


def stream(tokenizer, ids):
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(token_id) for token_id in ids]
    return pieces + [decoder.flush()]


@pytest.mark.parametrize("text", DECODE_TEXTS)
def test_decode_and_stream_equal_transformers(tokenizers_pair, text):
    _, tokenizer, processor = tokenizers_pair
    # As generated: the answer's ids, then </s>; special ids (<s>, <image>, </s>) decode to nothing.
    answer = tokenizer.encode(text, add_bos=False)
    ids = [tokenizer.bos_token_id, tokenizer.image_token_id] + answer + [tokenizer.eos_token_id]
    expected = processor.tokenizer.decode(ids, skip_special_tokens=True)
    assert tokenizer.decode(ids) == expected == text  # Llama's decoder strips the ▁ that encoding put in front
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == expected
    assert not any("\ufffd" in piece for piece in pieces)  # never half a character


def test_stream_holds_back_byte_tokens_until_the_character_is_complete(tokenizers_pair):
    _, tokenizer, _ = tokenizers_pair
    ids = tokenizer.encode("I like 😀", add_bos=False)
    emoji_bytes = [tokenizer.backend.token_to_id(f"<0x{byte:02X}>") for byte in "😀".encode()]
    assert ids[-4:] == emoji_bytes  # neither vocabulary has the emoji: four byte-fallback tokens
    pieces = stream(tokenizer, ids)
    assert pieces[-6:] == [" ", "", "", "", "", "😀"]  # the run of byte tokens comes out when it is over
    assert "".join(pieces) == "I like 😀"


def test_stream_never_takes_back_text_after_a_bad_byte(tokenizers_pair):
    """A valid byte followed by a broken one: the whole run decodes to U+FFFD marks, so nothing of it may be
    printed early (a random model produced exactly this: <0x1D> <0xCE> <0x1D> <0xCE> ...)."""
    _, tokenizer, _ = tokenizers_pair
    byte = lambda value: tokenizer.backend.token_to_id(f"<0x{value:02X}>")
    ids = tokenizer.encode("the", add_bos=False) + [byte(0x1D), byte(0xCE), byte(0x1D), byte(0xCE)]
    ids += tokenizer.encode("cat", add_bos=False)
    for end in range(1, len(ids) + 1):
        pieces = stream(tokenizer, ids[:end])
        assert "".join(pieces) == tokenizer.decode(ids[:end])


def test_stream_flushes_an_unfinished_character(tokenizers_pair):
    _, tokenizer, _ = tokenizers_pair
    ids = tokenizer.encode("ok 😀", add_bos=False)[:-1]  # generation stopped inside the emoji
    pieces = stream(tokenizer, ids)
    assert "".join(pieces[:-1]) == "ok "
    assert "".join(pieces) == tokenizer.decode(ids)  # the flush hands out what decode shows (U+FFFD marks)


def test_left_pad_puts_the_padding_on_the_left_and_masks_it():
    from minifastv.prompt import left_pad

    input_ids, attention_mask = left_pad([torch.tensor([[5, 6]]), torch.tensor([[7, 8, 9]])], 0)
    assert input_ids.tolist() == [[0, 5, 6], [7, 8, 9]]
    assert attention_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
