"""From words to ids and back: the LLaVA-1.5 and Video-LLaVA prompt, Llama-2's tokenizer,
and streaming decode.

Needs only the `tokenizers` library (and torch for the prompt tensor). tests/test_prompt.py checks
every id against transformers' LlavaProcessor and VideoLlavaProcessor, and every template against
llava-hf's chat template.
"""

from pathlib import Path

import tokenizers
import torch

from .errors import CheckpointError

# one per image in the prompt text; encode_prompt expands it to one id per feature
IMAGE_PLACEHOLDER = "<image>"
# Video-LLaVA: one per video, expanded to one id per frame feature (8 x 257)
VIDEO_PLACEHOLDER = "<video>"
# System prompts of the original LLaVA code (llava/conversation.py), by its template names.
# LLaVA-1.5 was trained with "v1" = conv_vicuna_v1, and its authors' evaluation scripts pass
# --conv-mode vicuna_v1; FastV's scripts and many re-runs use llava_v1, which differs only in
# "human" for "user". llava-hf's chat template has none: format_prompt(system=None).
SYSTEM_PROMPTS = {
    "vicuna_v1": "A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.",
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's "
                "questions.",
}


def count_images(text):
    """How many image placeholders the text holds."""
    return text.count(IMAGE_PLACEHOLDER)


def count_videos(text):
    """How many video placeholders the text holds."""
    return text.count(VIDEO_PLACEHOLDER)


def format_prompt(question, num_images=1, history=(), num_videos=0, system=None):
    """The conversation in LLaVA-1.5's template (Video-LLaVA's is the same), as llava-hf's
    chat template writes it.

    history: earlier turns as [(question, answer), ...]. The images go at the start of the first
    user turn, one "<image>\\n" each, then the videos, one "<video>\\n" each, unless the text
    already holds placeholders of that kind: then they stay where the user put them.
    system: a system prompt to put first, then one space, as the original LLaVA's template does
    (SYSTEM_PROMPTS; its evaluation uses one). None, the default: llava-hf's template, none.
    For one turn the text is then the original's exactly; in later turns the original also ends
    each answer with </s>, which this does not add.
    """
    questions = [asked for asked, _ in history] + [question]
    answers = [answer for _, answer in history]
    # images end first
    for placeholder, count in ((VIDEO_PLACEHOLDER, num_videos), (IMAGE_PLACEHOLDER, num_images)):
        if not any(placeholder in asked for asked in questions):
            questions[0] = (placeholder + "\n") * count + questions[0]
    # Every message ends with one space; the prompt ends on "ASSISTANT:", the model's cue.
    earlier_turns = "".join(
        f"USER: {asked} ASSISTANT: {answer} " for asked, answer in zip(questions, answers)
    )
    start = "" if system is None else system + " "
    return start + earlier_turns + f"USER: {questions[-1]} ASSISTANT:"


class Tokenizer:
    """Llama-2's tokenizer: BPE over words marked with "▁", with byte fallback for rare characters.

    We use the checkpoint's tokenizer.json exactly as written. Its normalizer puts a "▁" in front of
    every stretch of text, the stretch after each <image> included: "<image>\\n" becomes
    <image> ▁ <0x0A>. That is what LLaVA saw in training (its code tokenized the text between images
    piece by piece, each with sentencepiece's leading ▁), and what transformers 5 gives for a
    llava-hf checkpoint (AutoProcessor loads this file as is). Beware transformers' LlamaTokenizer
    class: it rebuilds the pipeline (Metaspace, "▁" at the very start only) and drops that ▁;
    AutoTokenizer picks it for a folder without a llava config.json.
    """

    def __init__(self, backend):
        self.backend = backend  # the tokenizers.Tokenizer that does the work
        self.bos_token_id = backend.token_to_id("<s>")
        self.eos_token_id = backend.token_to_id("</s>")
        self.image_token_id = backend.token_to_id(IMAGE_PLACEHOLDER)
        # None in LLaVA-1.5's tokenizer
        self.video_token_id = backend.token_to_id(VIDEO_PLACEHOLDER)
        self.pad_token_id = backend.token_to_id("<pad>")
        # added tokens included: 32002 for Llama-2 + <image> + <pad>
        self.vocab_size = backend.get_vocab_size()

    @classmethod
    def from_folder(cls, folder):
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(
                f"No tokenizer.json in {folder}: "
                "it comes with the checkpoint, beside config.json."
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        # the Rust library raises a bare Exception for any file it cannot parse
        except Exception as error:
            reason = " ".join(str(error).split())
            raise CheckpointError(
                f"{path} is not a tokenizer the tokenizers library can read ({reason}): "
                "the file is damaged; download it again."
            ) from None
        return cls(backend)

    def encode(self, text, add_bos=True):
        # the file's post-processor adds <s>
        return self.backend.encode(text, add_special_tokens=add_bos).ids

    def decode(self, ids):
        # The decoder turns ▁ back into spaces, joins byte tokens into characters, and strips
        # one leading space.
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def stream_decoder(self):
        return StreamDecoder(self)

    def is_byte_token(self, token_id):
        """Whether the id is one of the 256 byte-fallback tokens <0x00> .. <0xFF>."""
        token = self.backend.id_to_token(token_id) or ""
        return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


class StreamDecoder:
    """Turns generated ids into text as they arrive, so an answer can be printed word by word.

    Decoding each id on its own breaks the text: "▁is" alone decodes to "is" (the decoder strips a
    leading space), and an emoji is four byte tokens (<0xF0> <0x9F> <0x98> <0x80>) that mean nothing
    one by one. So we decode all the ids so far and hand out only the new characters, holding them
    back while a run of byte tokens may still go on: the run is decoded as a whole, and one bad byte
    turns every byte of it into U+FFFD, even those that looked complete. Decoding everything again
    costs time that grows with the answer.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids = []
        self.printed = 0  # how many characters of the decoded text were already handed out

    def push(self, token_id):
        """The text to print now for one more id: maybe several characters, maybe ""."""
        self.ids.append(token_id)
        if self.tokenizer.is_byte_token(token_id):  # wait until the byte run ends
            return ""
        return self._new_text(self.tokenizer.decode(self.ids))

    def flush(self):
        """Whatever is still held back (bytes of a character that never completed), at the
        end of generation."""
        return self._new_text(self.tokenizer.decode(self.ids))

    def _new_text(self, text):
        new_text, self.printed = text[self.printed :], len(text)
        return new_text


def encode_prompt(tokenizer, text, image_tokens_per_image, tokens_per_video=0):
    """The prompt as a (1, T) tensor of ids: <s>, then the text, each <image> repeated once per
    image feature and each <video> once per video feature.

    LLaVA-1.5 sees a 336 px image as (336 / 14)^2 = 576 patches; CLIP adds a CLS token and the
    "default" feature strategy drops it again, so 576 features, and the prompt keeps 576 <image> ids
    where the model will put them. Video-LLaVA's video is 8 frames of (224 / 14)^2 = 256 patches and
    their CLS tokens: 2,056 <video> ids. This is what LlavaProcessor and VideoLlavaProcessor do
    (they repeat the placeholder in the text, then tokenize).
    """
    copies = {
        tokenizer.image_token_id: image_tokens_per_image,
        tokenizer.video_token_id: tokens_per_video,
    }
    ids = []
    for token_id in tokenizer.encode(text):
        ids += [token_id] * copies.get(token_id, 1)
    return torch.tensor([ids], dtype=torch.long)


def left_pad(prompts, pad_token_id):
    """Prompts (1, T_i) as one batch: input_ids (B, T) padded on the left with pad_token_id, and
    an attention_mask (B, T) of 1 for the real tokens, 0 for the padding."""
    length = max(ids.shape[1] for ids in prompts)
    input_ids = torch.full((len(prompts), length), pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, length - ids.shape[1]:] = ids[0]
        attention_mask[row, length - ids.shape[1]:] = 1
    return input_ids, attention_mask
