"""Video-LLaVA against transformers' VideoLlavaForConditionalGeneration on tiny random checkpoints (CPU).

The tiny model keeps Video-LLaVA's structure (two CLIP towers of one shape, CLS kept on video frames, 8
frames, feature layer -2, <image> 32000 and <video> 32001) at 56 px: 4 x 4 patches, so an image is 16
tokens and a video 8 x 17 = 136. transformers is the oracle for every number here.
"""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

import minifastv
import minifastv.model as M
from minifastv import generate
from minifastv import __main__ as ask
from minifastv import analyze, cli
from minifastv.checkpoint import file_name, read_config
from minifastv.video import load_video, preprocess_video, sample_indices

from conftest import REFERENCE, left_pad, save_hub_style

IMAGE_TOKEN, VIDEO_TOKEN, PAD_TOKEN = 32000, 32001, 32002
IMAGE_SIZE, FRAMES = 56, 8
TOKENS_PER_IMAGE, TOKENS_PER_VIDEO = 16, 8 * 17
NO_EOS = 1_000_000
ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {"ask": ask.command, "analyze": analyze.command}


def tiny_video_llava(seed=0, attn="sdpa"):
    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=32064, hidden_size=64, intermediate_size=172, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5)
    vision = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=14, projection_dim=32)
    config = VideoLlavaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN,
                              video_token_index=VIDEO_TOKEN, pad_token_id=PAD_TOKEN, image_seq_length=TOKENS_PER_IMAGE,
                              video_seq_length=TOKENS_PER_VIDEO)
    torch.manual_seed(seed)
    model = VideoLlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers' init (std 0.02) gives near-uniform logits; widen it
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embedding" not in name:
                p.normal_(0.0, 0.08)
    model.set_attn_implementation(attn)
    return model


@pytest.fixture(scope="module")
def hf_video():
    return tiny_video_llava()


@pytest.fixture(scope="module")
def saved(hf_video, tmp_path_factory):
    folder = tmp_path_factory.mktemp("video-save")
    hf_video.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hub(hf_video, tmp_path_factory):
    return save_hub_style(hf_video, tmp_path_factory.mktemp("video-hub"))


@pytest.fixture(scope="module")
def ours(hub):
    return minifastv.load(hub, device="cpu", dtype=torch.float32, progress=False)


def image_keyword():
    """transformers renamed VideoLlava's image argument: pixel_values_images until 5.22, pixel_values from 5.23."""
    from transformers import VideoLlavaForConditionalGeneration

    parameters = inspect.signature(VideoLlavaForConditionalGeneration.forward).parameters
    return "pixel_values" if "pixel_values_images" not in parameters else "pixel_values_images"


def prompt(num_images=0, num_videos=1, text_before=5, text_after=7, seed=0):
    """Random text ids with the images' then the videos' placeholder runs, as VideoLlavaProcessor lays them out."""
    generator = torch.Generator().manual_seed(seed)
    ids = [1] + torch.randint(3, 31000, (text_before,), generator=generator).tolist()
    ids += [IMAGE_TOKEN] * (TOKENS_PER_IMAGE * num_images) + [VIDEO_TOKEN] * (TOKENS_PER_VIDEO * num_videos)
    return torch.tensor([ids + torch.randint(3, 31000, (text_after,), generator=generator).tolist()])


def pixels(num_images=0, num_videos=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) if num_images else None
    videos = torch.randn(num_videos, FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) if num_videos else None
    return images, videos


def hf_inputs(images, videos, mask=None):
    inputs = {}
    if images is not None:
        inputs[image_keyword()] = images
    if videos is not None:
        inputs["pixel_values_videos"] = videos
    if mask is not None:
        inputs.update(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).masked_fill(mask == 0, 0))
    return inputs


def assert_close(actual, expected, what, atol=1e-5):
    difference = (actual - expected).abs().max().item()
    print(f"\n[parity] {what}: max abs diff {difference:.3g}")
    assert actual.shape == expected.shape and difference <= atol, f"{what}: {difference}"


# ----------------------------------------------------------------------------------------------------
# The model: config, names, logits, generation


def test_config_reads_video_llava(saved):
    config = read_config(saved)
    assert (config.image_token_id, config.video_token_id, config.num_frames) == (IMAGE_TOKEN, VIDEO_TOKEN, FRAMES)
    assert (config.image_tokens_per_image, config.tokens_per_video) == (TOKENS_PER_IMAGE, TOKENS_PER_VIDEO)


@pytest.mark.parametrize("num_images, num_videos", [(0, 1), (1, 0), (1, 1), (2, 1)],
                         ids=["video only", "image only", "image and video", "two images and a video"])
def test_logits_equal_transformers(ours, hf_video, num_images, num_videos):
    ids, (images, videos) = prompt(num_images, num_videos), pixels(num_images, num_videos)
    with torch.no_grad():
        expected = hf_video(input_ids=ids, **hf_inputs(images, videos)).logits
        assert_close(ours(ids, images, videos), expected, f"{num_images} image(s), {num_videos} video(s)")


@pytest.mark.parametrize("scheme", ["hub", "saved"])
def test_both_naming_schemes_load(scheme, hub, saved, hf_video):
    model = minifastv.load(hub if scheme == "hub" else saved, device="cpu", dtype=torch.float32, progress=False)
    ids, (images, videos) = prompt(1, 1), pixels(1, 1)
    with torch.no_grad():
        assert_close(model(ids, images, videos), hf_video(input_ids=ids, **hf_inputs(images, videos)).logits, scheme)


def test_padded_batch_of_two(ours, hf_video):
    ids, mask = left_pad([prompt(0, 1, text_before=3), prompt(0, 1, text_before=9, seed=1)], pad_id=PAD_TOKEN)
    _, videos = pixels(0, 2)
    with torch.no_grad():
        expected = hf_video(input_ids=ids, **hf_inputs(None, videos, mask)).logits
        logits = ours(ids, pixel_values_videos=videos, attention_mask=mask)
    real = mask.bool()
    assert_close(logits[real], expected[real], "padded batch of 2 videos")


def test_greedy_generate_equals_transformers(ours, hf_video):
    ids, (images, videos) = prompt(1, 1), pixels(1, 1)
    with torch.no_grad():
        out = hf_video.generate(input_ids=ids, **hf_inputs(images, videos), do_sample=False, max_new_tokens=20,
                                eos_token_id=NO_EOS, pad_token_id=PAD_TOKEN)
    expected = out[:, ids.shape[1]:]
    assert torch.equal(generate(ours, ids, images, videos, max_new_tokens=20, eos_token_id=NO_EOS), expected)


def test_video_features_keep_every_frames_cls(ours, hf_video):
    _, videos = pixels(0, 1)
    with torch.no_grad():
        theirs = hf_video.model.get_video_features(pixel_values_videos=videos)
        theirs = getattr(theirs, "pooler_output", theirs)  # 5.x returns an output object; older, the tensor
        theirs = theirs[0] if isinstance(theirs, tuple) else theirs
        ours_features = ours.video_features(videos)
    assert ours_features.shape == (1, TOKENS_PER_VIDEO, 64)
    assert_close(ours_features.reshape(-1, 64), theirs.reshape(-1, 64), "video features")


def test_only_the_video_tower_when_asked(hub, ours):
    video_only = minifastv.load(hub, device="cpu", dtype=torch.float32, progress=False, towers=("video",))
    assert video_only.image_tower is None and video_only.video_tower is not None
    saved_bytes = sum(p.numel() for p in ours.image_tower.parameters()) * 4
    full_bytes = sum(p.numel() for p in ours.parameters()) * 4
    assert sum(p.numel() for p in video_only.parameters()) * 4 == full_bytes - saved_bytes
    ids, (_, videos) = prompt(0, 1), pixels(0, 1)
    with torch.no_grad():
        assert torch.equal(video_only(ids, pixel_values_videos=videos), ours(ids, pixel_values_videos=videos))
        with pytest.raises(minifastv.SettingsError, match="towers="):
            video_only(prompt(1, 0), pixels(1, 0)[0])


def test_llava_has_no_video_tower(hub_checkpoint):
    llava = minifastv.load(hub_checkpoint, device="cpu", dtype=torch.float32, progress=False)
    with pytest.raises(ValueError, match="no video tower"):
        llava(torch.tensor([[1, 5, 6]]), pixel_values_videos=torch.zeros(1, 8, 3, 84, 84))


# ----------------------------------------------------------------------------------------------------
# FastV on video tokens


@torch.no_grad()
def reference_fastv(hf_eager, hf_sdpa, ids, images, videos, mask, k, r):
    """Last-token logits and kept visual-token indices, the official way (eager attention of layer K-1, mean over
    heads, the last row, image and video tokens ranked together), then transformers' layers K.. on the survivors."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = hf_eager(input_ids=ids, **hf_inputs(images, videos, mask), output_attentions=True, output_hidden_states=True)
    last_row = out.attentions[k - 1].mean(dim=1)[:, -1, :]  # (B, T)
    hidden = out.hidden_states[k]
    is_visual = (ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)
    kept_positions, kept_visual = [], []
    for row in range(ids.shape[0]):
        visual_positions = is_visual[row].nonzero()[:, 0]
        top = last_row[row, visual_positions].topk(round(len(visual_positions) * (1 - r))).indices
        kept_visual.append(top.sort().values)
        kept_positions.append(torch.cat([(~is_visual[row]).nonzero()[:, 0], visual_positions[top]]).sort().values)
    kept_positions = torch.stack(kept_positions)
    hidden = hidden.gather(1, kept_positions[..., None].expand(-1, -1, hidden.shape[-1]))
    n = kept_positions.shape[1]
    attention_mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & mask.gather(1, kept_positions).bool()[:, None, None, :]
    language_model = hf_sdpa.model.language_model  # SDPA layers take the boolean mask as it is
    rope = language_model.rotary_emb(hidden, positions.gather(1, kept_positions))  # the ORIGINAL positions
    for layer in language_model.layers[k:]:
        hidden = layer(hidden, attention_mask=attention_mask, position_embeddings=rope)
    return hf_sdpa.lm_head(language_model.norm(hidden))[:, -1], torch.stack(kept_visual)


@pytest.fixture(scope="module")
def hf_eager(saved):
    from transformers import VideoLlavaForConditionalGeneration

    return VideoLlavaForConditionalGeneration.from_pretrained(saved, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.mark.parametrize("k, r, num_images, batch_size", [(2, 0.5, 0, 1), (1, 0.75, 1, 1), (3, 0.25, 0, 2), (2, 0.5, 1, 2)])
def test_fastv_on_video_tokens_matches_the_official_way(ours, hf_eager, hf_video, k, r, num_images, batch_size):
    rows = [prompt(num_images, 1, text_before=4 + 3 * row, text_after=6 + row, seed=row) for row in range(batch_size)]
    ids, mask = left_pad(rows, pad_id=PAD_TOKEN)
    images, videos = pixels(num_images * batch_size, batch_size, seed=k)
    expected_logits, expected_kept = reference_fastv(hf_eager, hf_video, ids, images, videos, mask, k, r)
    cache = ours.new_cache(ids, M.FastV(k, r))
    with torch.no_grad():
        logits = ours(ids, images, videos, attention_mask=mask, cache=cache, fastv=M.FastV(k, r))
    assert torch.equal(cache.kept_image_tokens, expected_kept)
    assert_close(logits[:, -1], expected_logits, f"FastV K={k} R={r} on video tokens")


def test_decoding_with_the_pruned_cache_equals_a_cache_free_loop(ours):
    ids, (images, videos) = prompt(1, 1), pixels(1, 1)
    fastv = M.FastV(2, 0.5)
    generated = generate(ours, ids, images, videos, max_new_tokens=8, fastv=fastv, eos_token_id=-1)
    cache = ours.new_cache(ids, fastv)
    with torch.no_grad():
        ours(ids, images, videos, cache=cache, fastv=fastv)
    chosen = cache.kept_image_tokens
    same_choice = M.FastV(2, 0.5, rule=lambda inputs: chosen)  # the prefill's choice, kept at every step
    sequence, tokens = ids, []
    with torch.no_grad():
        for _ in range(8):
            token = ours(sequence, images, videos, fastv=same_choice)[:, -1].argmax(-1)
            tokens.append(token)
            sequence = torch.cat([sequence, token[:, None]], dim=1)
    assert torch.equal(generated, torch.stack(tokens, dim=1))


def test_rules_see_frames_and_patches(ours):
    """Image tokens first (16 per image, no CLS), then 8 frames of a CLS token and 16 patches, row by row."""
    ids, (images, videos) = prompt(1, 1), pixels(1, 1)
    seen = {}

    def spy(inputs):
        seen["inputs"] = inputs
        return M.fastv_rule(inputs)

    with torch.no_grad():
        ours(ids, images, videos, fastv=M.FastV(2, 0.5, rule=spy))
    inputs = seen["inputs"]
    assert inputs.is_video[0].tolist() == [False] * 16 + [True] * 136
    assert inputs.frame[0].tolist() == [0] * 16 + [frame for frame in range(8) for _ in range(17)]
    assert inputs.patch[0].tolist() == list(range(16)) + [-1, *range(16)] * 8
    assert inputs.grid_size == 4


# ----------------------------------------------------------------------------------------------------
# Frames: sampling, decoding, preprocessing


@pytest.mark.parametrize("total", [1, 3, 7, 8, 9, 10, 17, 25, 30, 100, 257, 1000, 2999])
def test_sampling_is_the_model_cards(total):
    assert sample_indices(total) == np.arange(0, total, total / 8).astype(int).tolist()


def write_gif(path, count, size=(40, 30)):
    """An animated GIF whose frame i is gray level 10 * i."""
    frames = [Image.new("RGB", size, (10 * i,) * 3) for i in range(count)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return path


def gray_levels(frames):
    return [frame.getpixel((0, 0))[0] for frame in frames]


def test_gif_frames_are_sampled(tmp_path):
    frames, note = load_video(write_gif(tmp_path / "clip.gif", 20))
    assert note is None and gray_levels(frames) == [10 * i for i in sample_indices(20)]


def test_a_short_video_repeats_frames_and_says_so(tmp_path):
    frames, note = load_video(write_gif(tmp_path / "short.gif", 3))
    assert gray_levels(frames) == [0, 0, 0, 10, 10, 10, 20, 20]
    assert "3 frame(s), fewer than the 8" in note and "0, 0, 0, 1, 1, 1, 2, 2" in note


def test_a_folder_of_frames_in_name_order(tmp_path):
    for i in range(12):
        Image.new("RGB", (20, 20), (10 * i,) * 3).save(tmp_path / f"frame_{i:03d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    frames, _ = load_video(tmp_path)
    assert gray_levels(frames) == [10 * i for i in sample_indices(12)]


def test_mp4_frames_are_the_model_cards(tmp_path):
    """PyAV decoding as the model card's read_video_pyav does it: the same frames, bit for bit."""
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 12 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with av.open(str(path)) as container:  # the model card's way
        indices = np.arange(0, container.streams.video[0].frames, container.streams.video[0].frames / 8).astype(int)
        expected = [frame.to_ndarray(format="rgb24") for i, frame in enumerate(container.decode(video=0)) if i in indices]
    frames, note = load_video(path)
    assert note is None and len(frames) == 8
    for ours_frame, theirs in zip(frames, expected):
        assert np.array_equal(np.asarray(ours_frame), theirs)


def test_frames_preprocess_like_transformers(tmp_path):
    """Each frame through image.py at 224 px equals transformers' VideoLlava image processor on that frame."""
    from transformers import VideoLlavaImageProcessor

    generator = np.random.default_rng(0)
    frames = [Image.fromarray(generator.integers(0, 256, (300, 400, 3), dtype=np.uint8)) for _ in range(8)]
    ours = preprocess_video(frames)
    processor = VideoLlavaImageProcessor()
    theirs = processor(images=frames, return_tensors="pt")
    theirs = theirs.get("pixel_values", theirs.get("pixel_values_images"))
    assert ours.shape == (8, 3, 224, 224) and torch.equal(ours, theirs)


# ----------------------------------------------------------------------------------------------------
# Prompts: VideoLlavaProcessor's ids


def processor_ids(folder, text):
    """What VideoLlavaProcessor does to a prompt: it repeats each placeholder once per feature in the text (256 per
    224 px image, 8 x 257 per video: video_seq_length in Video-LLaVA's config.json), then tokenizes with the
    checkpoint's tokenizer.json as written (transformers' fast tokenizer, as it loads llava checkpoints). The
    processor itself needs torchvision for its video processor, which this project does not install."""
    from transformers import PreTrainedTokenizerFast

    expanded = text.replace("<image>", "<image>" * 256).replace("<video>", "<video>" * 2056)
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))(expanded, return_tensors="pt")["input_ids"]


def original_code_ids(folder, text, video_id, image_id):
    """What the original Video-LLaVA code (tokenizer_X_token) gives: the text between placeholders tokenized piece
    by piece by the Llama tokenizer (legacy), each piece's own <s> dropped, the placeholders expanded in between.
    transformers 5's LlamaTokenizer is no longer sentencepiece itself, so this stands in for the original only
    where a piece starts with a newline, as in the model card's prompts."""
    from transformers import LlamaTokenizer

    tokenizer = LlamaTokenizer.from_pretrained(folder, legacy=True)
    ids = []
    for number, piece in enumerate(text.replace("<image>", "\0i").replace("<video>", "\0v").split("\0")):
        if number:
            ids += [image_id] * 256 if piece[0] == "i" else [video_id] * 2056
            piece = piece[1:]
        ids += tokenizer(piece)["input_ids"][1 if number else 0:] if piece else []
    return torch.tensor([ids])


def real_tokenizer_with_video(folder):
    """llava-hf's tokenizer.json (Llama 2's) with <video> added after <pad>, as a Video-LLaVA-style tokenizer, and a
    video_llava config.json beside it (transformers picks the tokenizer class by it, as in a real checkpoint)."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import VideoLlavaConfig

    tokenizer = Tokenizer.from_file(str(REFERENCE / "llava-1.5-7b-hf" / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken("<video>", normalized=False, special=True)])
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_bytes((REFERENCE / "llava-1.5-7b-hf" / "special_tokens_map.json").read_bytes())
    config = json.loads((REFERENCE / "llava-1.5-7b-hf" / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"][str(tokenizer.token_to_id("<video>"))] = dict(
        content="<video>", lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    VideoLlavaConfig(image_token_index=32000, video_token_index=tokenizer.token_to_id("<video>")).save_pretrained(folder)
    return folder


@pytest.mark.skipif(not (REFERENCE / "llava-1.5-7b-hf" / "tokenizer.json").is_file(), reason="../shared/reference absent")
@pytest.mark.parametrize("question, num_images, num_videos", [
    ("Why is this funny?", 0, 1), ("What happens first?", 1, 1), ("Does <video> match <image>?", 1, 1)])
def test_prompt_ids_equal_video_llava_processor_and_the_original_code(tmp_path, question, num_images, num_videos):
    """The ▁ after each placeholder stays, as in LLaVA (prompt.py): the original code's piecewise tokenization
    puts it there. (transformers 5.24's AutoTokenizer picks the LlamaTokenizer class for a video_llava folder,
    whose rebuilt pipeline drops it: see test_prompt.py for the same choice on LLaVA.)"""
    from minifastv.prompt import Tokenizer, encode_prompt, format_prompt

    folder = real_tokenizer_with_video(tmp_path / "tokenizer")
    tokenizer = Tokenizer.from_folder(folder)
    text = format_prompt(question, num_images=num_images, num_videos=num_videos)
    if num_videos and "<video>" not in question:
        assert text.startswith("USER: " + "<image>\n" * num_images + "<video>\n")
    ours = encode_prompt(tokenizer, text, 256, 8 * 257)
    assert torch.equal(ours, processor_ids(folder, text))
    if "<video>" not in question:  # the model card's layout: every piece after a placeholder starts with "\n"
        assert torch.equal(ours, original_code_ids(folder, text, tokenizer.video_token_id, tokenizer.image_token_id))
    assert int((ours == tokenizer.video_token_id).sum()) == 2056 * num_videos


# ----------------------------------------------------------------------------------------------------
# The commands with a video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_gif(tmp_path_factory.mktemp("clip") / "clip.gif", 12, size=(80, 60))


def run(command, args, capsys):
    code = COMMANDS[command](args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory):
    from minifastv.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-video") / "model", video=True)


def test_ask_about_a_video(tiny_video, clip, capsys, monkeypatch):
    towers_loaded = []
    real_load = cli.load
    monkeypatch.setattr(cli, "load", lambda *a, **kw: towers_loaded.append(kw["towers"]) or real_load(*a, **kw))
    code, out, err = run("ask", ["--model", str(tiny_video), "--device", "cpu", "--video", str(clip),
                                 "--max-new-tokens", "3", "--compare"], capsys)
    assert code == 0, err
    assert "video tokens 2056 -> 1028 kept" in out and towers_loaded == [("video",)]
    code, out, err = run("ask", ["--model", str(tiny_video), "--device", "cpu", "--video", str(clip), "--image",
                                 str(cli.DEFAULT_IMAGE), "--max-new-tokens", "2"], capsys)
    assert code == 0, err
    assert "image and video tokens 2312 -> 1156 kept" in out and towers_loaded[-1] == ("image", "video")


def test_analyze_a_video(tiny_video, clip, tmp_path, capsys):
    code, out, err = run("analyze", ["--model", str(tiny_video), "--device", "cpu", "--video", str(clip),
                                     "--max-new-tokens", "2", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert "image 2056" in out  # the video's tokens are the image class: FastV's pool
    assert "(the image class holds the video's frame tokens)" in out  # and the output says so
    picture = Image.open(tmp_path / "kept_patches.png")
    assert picture.height > 8 * 224  # one row per frame


def bad_video_cases(tmp_path, tiny_video, llava_folder):
    broken = tmp_path / "broken.gif"
    broken.write_bytes(b"GIF89a" + bytes(40))
    empty_folder = tmp_path / "no-frames"
    empty_folder.mkdir()
    empty_file = tmp_path / "empty.gif"
    empty_file.write_bytes(b"")
    odd = tmp_path / "clip.xyz"
    odd.write_text("?")
    clip = write_gif(tmp_path / "ok.gif", 10)
    cut = tmp_path / "cut.gif"
    cut.write_bytes(write_gif(tmp_path / "whole.gif", 20, size=(80, 60)).read_bytes()[:-300])  # frames lost at the end
    model = ["--model", str(tiny_video), "--device", "cpu"]
    return {
        "unreadable": ([*model, "--video", str(broken)], ["Video", "broken.gif", "cannot be read"]),
        "no frames": ([*model, "--video", str(empty_folder)], ["no-frames", "no frames"]),
        "zero-size file": ([*model, "--video", str(empty_file)], ["Video", "empty.gif", "cannot be read"]),
        "cut short": ([*model, "--video", str(cut)], ["Video", "cut.gif", "truncated"]),
        "unknown kind": ([*model, "--video", str(odd)], ["clip.xyz", "known video"]),
        "missing": ([*model, "--video", str(tmp_path / "nowhere.mp4")], ["nowhere.mp4", "does not exist"]),
        "more <video> than videos": ([*model, "--video", str(clip), "--prompt", "<video> or <video>?"], ["2 <video>", "1 video"]),
        "<video> without a video": ([*model, "--prompt", "What is in <video>?"], ["1 <video>", "0 video"]),
        "a LLaVA model": (["--model", str(llava_folder), "--device", "cpu", "--video", str(clip)], ["Video-LLaVA"]),
    }


BAD_VIDEO = ["unreadable", "no frames", "zero-size file", "cut short", "unknown kind", "missing", "more <video> than videos",
             "<video> without a video", "a LLaVA model"]


@pytest.mark.parametrize("command", ["ask", "analyze"])
@pytest.mark.parametrize("case", BAD_VIDEO)
def test_bad_video_input_is_one_sentence(command, case, tmp_path, tiny_video, cli_checkpoint, capsys, monkeypatch):
    args, words = bad_video_cases(tmp_path, tiny_video, cli_checkpoint)[case]
    monkeypatch.setattr(cli, "load_model", lambda *args: pytest.fail("loaded before the bad video was noticed"))
    code, _, err = run(command, args + (["--out", str(tmp_path / "out")] if command == "analyze" else []), capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1, err
    for word in words:
        assert word in errors[0], errors[0]


def test_mp4_without_pyav_names_the_package(tmp_path, monkeypatch):
    (tmp_path / "clip.mp4").write_bytes(b"\0" * 100)
    monkeypatch.setitem(sys.modules, "av", None)  # import av now fails as if it were not installed
    with pytest.raises(minifastv.VideoError, match="PyAV package: pip install av"):
        load_video(tmp_path / "clip.mp4")


def test_a_video_that_is_not_one(tmp_path):
    pytest.importorskip("av")
    (tmp_path / "clip.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(minifastv.VideoError, match="clip.mp4 cannot be read"):
        load_video(tmp_path / "clip.mp4")


def test_the_cli_says_video_in_one_process(tiny_video, clip):
    """The same through `python -m minifastv` in a real process: exit 0, the note about the tiny model absent."""
    result = subprocess.run([sys.executable, "-m", "minifastv", "--model", str(tiny_video), "--device", "cpu",
                             "--video", str(clip), "--max-new-tokens", "2"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "video tokens 2056 -> 1028 kept" in result.stdout


def test_file_names_cover_both_towers():
    assert file_name("image_tower.layers.0.mlp.fc1.weight") == "image_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert file_name("video_tower.embeddings.class_embedding", "transformers-save") == "video_tower.embeddings.class_embedding"
    assert file_name("video_tower.layers.1.layer_norm1.bias", "transformers") == "model.video_tower.encoder.layers.1.layer_norm1.bias"


def cat_pan_frames():
    """The example clip's frames, as minifastv/assets/README.md describes them."""
    cat = Image.open(ROOT / "minifastv" / "assets" / "chelsea.png").convert("RGB")
    width = round(cat.width * 224 / cat.height)
    cat = cat.resize((width, 224), Image.BICUBIC)
    return [cat.crop((x, 0, x + 224, 224)) for x in (round(i * (width - 224) / 11) for i in range(12))]


def test_the_example_clip_is_the_cat_panned():
    clip = ROOT / "minifastv" / "assets" / "chelsea_pan.webp"
    assert clip.stat().st_size < 100_000
    with Image.open(clip) as video:
        assert video.n_frames == 12
        stored = [np.asarray(frame.convert("RGB"), dtype=np.float32) for frame in ImageSequence.Iterator(video)]
    for frame, expected in zip(stored, cat_pan_frames()):
        assert np.abs(frame - np.asarray(expected, dtype=np.float32)).mean() < 6  # lossy WebP: ~4 here; a frame off by one: ~25
    frames, note = load_video(clip)
    assert note is None and len(frames) == 8 and frames[0].size == (224, 224)
