"""The attention analysis: the token classes, the allocation (checked against a closed form on a model whose
attention is uniform), the kept-patch pictures pixel by pixel, and the command line end to end."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import minifastv
import minifastv.model as M
from minifastv import analyze
from minifastv.cli import DEFAULT_IMAGE
from minifastv.image import ImageProcessorConfig, center_crop, load_image, preprocess, resize_shortest_edge
from minifastv.prompt import Tokenizer, encode_prompt, format_prompt

from conftest import IMAGE_TOKEN, REFERENCE, image_prompt, random_pixels, tiny_hf_model

ROOT = Path(__file__).resolve().parent.parent
TOKENS_PER_IMAGE = 36  # the tiny models: 84 px images, 14 px patches, a 6 x 6 grid
NUM_OUTPUT = 5


@pytest.fixture(scope="module")
def model(hub_checkpoint):
    return minifastv.load(hub_checkpoint, device="cpu", dtype=torch.float32, progress=False)


def prompt_and_answer(num_images=1):
    """A prompt with images, then NUM_OUTPUT random "answer" ids: (1, T)."""
    answer = torch.randint(3, 31000, (1, NUM_OUTPUT), generator=torch.Generator().manual_seed(1))
    return torch.cat([image_prompt(num_images, TOKENS_PER_IMAGE), answer], dim=1)


# ----------------------------------------------------------------------------------------------------
# Token classes


def class_counts(input_ids, image_token_id, num_output):
    classes = analyze.token_classes(input_ids, image_token_id, num_output)
    return [int((classes == index).sum()) for index in range(len(analyze.CLASSES))]


@pytest.mark.parametrize("num_images, expected", [(1, [6, 36, 7, 5]), (2, [6, 72, 12, 5])])
def test_class_split_of_a_built_prompt(num_images, expected):
    # <s>, 5 text ids, then per image 36 <image> ids (5 more text ids before the second), then 7 text ids
    assert class_counts(prompt_and_answer(num_images), IMAGE_TOKEN, NUM_OUTPUT) == expected


@pytest.mark.skipif(not (REFERENCE / "llava-1.5-7b-hf" / "tokenizer.json").is_file(),
                    reason="the real tokenizer is in ../shared/reference, which is not present")
@pytest.mark.parametrize("num_images, expected", [(1, [5, 576, 12, 3]), (2, [5, 1152, 14, 3])])
def test_class_split_of_llava_hf_prompts(num_images, expected):
    """With the real tokenizer: "system" is <s> ▁US ER : ▁ (llava-hf has no system prompt)."""
    tokenizer = Tokenizer.from_folder(REFERENCE / "llava-1.5-7b-hf")
    ids = encode_prompt(tokenizer, format_prompt("Describe this image.", num_images=num_images), 576)
    ids = torch.cat([ids, torch.tensor([[450, 6635, 2]])], dim=1)  # an answer of three tokens
    assert class_counts(ids, tokenizer.image_token_id, 3) == expected
    classes = analyze.token_classes(ids, tokenizer.image_token_id, 3)
    assert tokenizer.decode(ids[0, classes == 0].tolist()) == "USER: "
    assert tokenizer.decode(ids[0, classes == 2].tolist()).endswith("Describe this image. ASSISTANT:")


def test_a_prompt_without_an_image_is_refused():
    with pytest.raises(ValueError, match="at least one image"):
        analyze.token_classes(torch.tensor([[1, 5, 6, 7]]), IMAGE_TOKEN, 2)


# ----------------------------------------------------------------------------------------------------
# Allocation and efficiency


def test_allocation_rows_sum_to_one(model):
    ids = prompt_and_answer(2)
    result = analyze.attention_allocation(model, ids, random_pixels(2), NUM_OUTPUT, heatmap_layers={0, 3})
    assert result.allocation.shape == (4, 4) and (result.allocation > 0).all()
    torch.testing.assert_close(result.allocation.sum(dim=1), torch.ones(4), atol=1e-5, rtol=0)
    assert result.class_sizes.tolist() == [6, 72, 12, 5]
    torch.testing.assert_close(result.efficiency, result.allocation / result.class_sizes)
    assert sorted(result.heatmaps) == [0, 3]
    assert result.heatmaps[0].size == (analyze.HEATMAP_SIZE + 8, analyze.HEATMAP_SIZE + 8)


def test_output_rows_are_the_last_rows_of_the_full_matrix(model):
    torch.manual_seed(0)
    queries, keys = torch.randn(1, 4, 30, 16), torch.randn(1, 2, 30, 16)  # two query heads per key head
    rows = M.attention_rows(queries, keys, torch.ones(1, 30), num_rows=6)  # (1, 4, 6, 30)
    torch.testing.assert_close(rows.mean(dim=1)[0], analyze.mean_attention_matrix(queries, keys)[-6:])
    assert (rows[0, :, 0, -5:] == 0).all()  # the first output token cannot see the five after it


def test_allocation_is_transformers_attention_split_by_class(model):
    """The shares read through the model's observe hook are those of transformers' own attention
    weights (eager attention, output_attentions=True) on the same weights, split by class."""
    reference = tiny_hf_model()  # the weights of the hub_checkpoint the model was loaded from
    reference.set_attn_implementation("eager")
    ids, pixels = prompt_and_answer(2), random_pixels(2)
    result = analyze.attention_allocation(model, ids, pixels, NUM_OUTPUT)
    with torch.no_grad():
        outputs = reference(input_ids=ids, pixel_values=pixels, output_attentions=True)
    classes = torch.nn.functional.one_hot(analyze.token_classes(ids, IMAGE_TOKEN, NUM_OUTPUT), 4)
    assert len(outputs.attentions) == result.allocation.shape[0] == 4
    for layer, weights in enumerate(outputs.attentions):  # (1, H, T, T)
        expected = (weights[0, :, -NUM_OUTPUT:].double() @ classes.double()).mean(dim=(0, 1))
        torch.testing.assert_close(result.allocation[layer].double(), expected, atol=1e-5, rtol=0)


def test_uniform_attention_matches_the_closed_form(hub_checkpoint):
    """With every query zero, all scores are 0: output token p attends 1/(p+1) to each of tokens 0..p."""
    uniform = minifastv.load(hub_checkpoint, device="cpu", dtype=torch.float32, progress=False)
    for layer in uniform.language_model.layers:
        layer.self_attn.q_proj.weight.zero_()
    ids = prompt_and_answer(1)
    result = analyze.attention_allocation(uniform, ids, random_pixels(1), NUM_OUTPUT)

    classes = analyze.token_classes(ids, IMAGE_TOKEN, NUM_OUTPUT)
    T = ids.shape[1]
    expected = torch.zeros(4, dtype=torch.float64)
    for p in range(T - NUM_OUTPUT, T):  # mean over output tokens of |class ∩ [0..p]| / (p + 1)
        expected += torch.bincount(classes[: p + 1], minlength=4).double() / (p + 1) / NUM_OUTPUT
    sizes = torch.bincount(classes, minlength=4).double()
    for layer in range(4):
        torch.testing.assert_close(result.allocation[layer].double(), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(result.efficiency[layer].double(), expected / sizes, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Pictures


def test_preprocessed_image_undoes_the_normalization():
    config = ImageProcessorConfig()
    pixels = preprocess(DEFAULT_IMAGE, config)[0]
    model_view = center_crop(resize_shortest_edge(load_image(DEFAULT_IMAGE), 336, config.resample), 336, 336)
    assert analyze.preprocessed_image(pixels, config).tobytes() == model_view.tobytes()


def brightness(image, box):
    return sum(image.crop(box).convert("L").tobytes()) / ((box[2] - box[0]) * (box[3] - box[1]))


def test_pruned_patches_are_dimmed_and_kept_ones_untouched(model):
    config = ImageProcessorConfig(shortest_edge=84, crop_height=84, crop_width=84)  # the tiny model's image size
    pixels = preprocess(DEFAULT_IMAGE, config)
    ids = prompt_and_answer(1)[:, :-NUM_OUTPUT]
    kept = analyze.kept_image_tokens(model, ids, pixels, M.FastV(2, 0.5))
    grid = analyze.kept_patch_grids(kept, ids, model.config)[0]  # (6, 6)
    assert int(grid.sum()) == 18
    plain = analyze.preprocessed_image(pixels[0], config)
    panel = analyze.kept_patches_panel(plain, grid)
    assert panel.size == plain.size == (84, 84)
    for row in range(6):
        for column in range(6):
            inside = (column * 14 + 1, row * 14 + 1, column * 14 + 14, row * 14 + 14)  # away from the grid lines
            if grid[row, column]:
                assert panel.crop(inside).tobytes() == plain.crop(inside).tobytes()
            else:
                assert brightness(panel, inside) < 0.35 * brightness(plain, inside) + 1

    figure = analyze.kept_patches_figure(model, ids, pixels, config, 2, 0.5)
    assert figure.height == analyze.PANELS_TOP + 84 + 10 and figure.width >= 4 * 94  # a column per rule
    top = analyze.PANELS_TOP
    found = [x for x in range(figure.width - 84)
             if figure.crop((x, top, x + 84, top + 84)).tobytes() == panel.tobytes()]
    assert found and found[0] < figure.width / 4  # fastv_rule's panel comes first, after the row's label
    assert figure.crop((0, top, found[0], top + 84)).convert("L").getextrema()[0] < 100  # the label: dark text


def drawn_texts(monkeypatch):
    """Every text Pillow draws from now on (multiline text line by line too)."""
    from PIL import ImageDraw

    texts, real = [], ImageDraw.ImageDraw.text

    def text(self, xy, words, *args, **kwargs):
        texts.append(words)
        return real(self, xy, words, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
    return texts


def test_kept_patches_are_labelled_in_words(model, monkeypatch):
    """Issue 19: a row label per image ("image 1", "image 2"), the rules' titles in words, not Python names."""
    config = ImageProcessorConfig(shortest_edge=84, crop_height=84, crop_width=84)
    ids = prompt_and_answer(2)[:, :-NUM_OUTPUT]
    texts = drawn_texts(monkeypatch)
    figure = analyze.kept_patches_figure(model, ids, random_pixels(2), config, 2, 0.5)
    assert figure.height == analyze.PANELS_TOP + 2 * (84 + 10)
    shown = "\n".join(texts)
    assert "image 1" in texts and "image 2" in texts
    assert "FastV K=2, R=0.5: the image tokens kept at layer 2" in shown and "video" not in shown
    for title in ("FastV\n36 of 72 kept", "FastV without RoPE\n", "random\n", "uniform grid\n"):
        assert title in shown, shown
    assert "_rule" not in shown


def test_a_videos_kept_patches_are_labelled_by_frame(tmp_path, monkeypatch):
    """Issue 19: Video-LLaVA's picture says "video tokens" and labels its rows "frame 1" .. "frame 8"."""
    from minifastv.tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / "tiny-video", video=True)
    video_model = minifastv.load(folder, device="cpu", dtype=torch.float32, progress=False)
    config = video_model.config
    ids = encode_prompt(Tokenizer.from_folder(folder), format_prompt("Describe this video.", num_images=0, num_videos=1),
                        config.image_tokens_per_image, config.tokens_per_video)
    size = config.vision.image_size
    videos = torch.randn(1, config.num_frames, 3, size, size, generator=torch.Generator().manual_seed(0))
    texts = drawn_texts(monkeypatch)
    figure = analyze.kept_patches_figure(video_model, ids, None, ImageProcessorConfig.from_folder(folder), 2, 0.5,
                                         rules=[M.fastv_rule], pixel_values_videos=videos)  # one rule: quicker
    assert figure.height == analyze.PANELS_TOP + 8 * (size + 10)
    assert [text for text in texts if text.startswith("frame")] == [f"frame {n}" for n in range(1, 9)]
    assert any(text.startswith("FastV K=2, R=0.5: the video tokens kept") for text in texts), texts
    assert not any("image" in text for text in texts), texts


def test_picture_labels_and_rule_titles():
    assert analyze.picture_labels(2, 0, 0) == ["image 1", "image 2"]
    assert analyze.picture_labels(1, 1, 8) == ["image 1"] + [f"frame {n}" for n in range(1, 9)]
    assert analyze.picture_labels(0, 2, 2) == ["video 1, frame 1", "video 1, frame 2", "video 2, frame 1",
                                              "video 2, frame 2"]
    assert [analyze.rule_title(rule) for rule in analyze.RULES] == ["FastV", "FastV without RoPE", "random",
                                                                    "uniform grid"]

    def row_balanced_rule(inputs):  # a rule of one's own: its name in words
        return None

    assert analyze.rule_title(row_balanced_rule) == "row balanced"


def test_kept_image_tokens_are_the_top_of_transformers_last_row(model):
    """FastV keeps the image tokens that the last token attended to most in layer K-1, mean over
    heads: here ranked from transformers' own attention weights, on the same weights."""
    reference = tiny_hf_model()  # the weights of the hub_checkpoint the model was loaded from
    reference.set_attn_implementation("eager")
    ids, pixels = prompt_and_answer(1)[:, :-NUM_OUTPUT], random_pixels(1)
    with torch.no_grad():
        outputs = reference(input_ids=ids, pixel_values=pixels, output_attentions=True)
    image_positions = (ids[0] == IMAGE_TOKEN).nonzero()[:, 0]  # (36,)
    for k in (1, 2, 3):
        scores = outputs.attentions[k - 1][0, :, -1].mean(dim=0)[image_positions]  # (36,)
        ranked = scores.sort(descending=True)
        assert ranked.values[17] - ranked.values[18] > 1e-5  # no near-tie at the cut
        expected = ranked.indices[:18].sort().values
        assert torch.equal(analyze.kept_image_tokens(model, ids, pixels, M.FastV(k, 0.5)), expected)


def test_allocation_chart_stacks_the_classes():
    chart = analyze.allocation_chart(torch.full((32, 4), 0.25))
    assert chart.size == (70 + 32 * 22 + 160, 400)  # 22 px per bar
    bottom = 40 + 300  # the plot is 300 px high, from y = 40
    for index, color in enumerate(analyze.CLASS_COLORS):  # system at the bottom, output on top
        assert chart.getpixel((80, bottom - 75 * index - 37)) == color


def test_heatmap_is_causal_and_at_most_512_px():
    attention = torch.ones(600, 600).tril()
    attention /= attention.sum(dim=1, keepdim=True)
    classes = torch.tensor([0] * 5 + [1] * 576 + [2] * 10 + [3] * 9)
    panel = analyze.attention_heatmap(attention, classes)
    assert panel.size == (520, 520)
    assert panel.getpixel((510, 20)) == (255, 255, 255)  # the future: white
    assert panel.getpixel((20, 510)) != (255, 255, 255)
    assert panel.getpixel((300, 2)) == analyze.CLASS_COLORS[1]  # the class strip over the columns


# ----------------------------------------------------------------------------------------------------
# The command line


def run_analyze(*args):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "minifastv.analyze", *args], cwd=ROOT, capture_output=True, text=True,
                          env=environment, timeout=120)


def test_cli_end_to_end(cli_checkpoint, tmp_path):
    out = tmp_path / "pictures"
    result = run_analyze("--model", str(cli_checkpoint), "--device", "cpu", "--max-new-tokens", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr
    # the default layers, 0,1,2,15,31, fitted to the 4-layer model with a note; a line per slow stage
    assert "note: this model has 4 decoder layers, so the heatmaps are of layers 0,1,2,3" in result.stderr
    for stage in ("loading", "answering (at most 4 new tokens)", "measuring the attention of",
                  "pruning with FastV K=2, R=0.5 under 4 rules"):
        assert stage in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    header = next(index for index, line in enumerate(lines) if line.startswith("layer"))
    assert all(name in lines[header] for name in analyze.CLASSES) and "efficiency" in lines[header]
    for layer in range(4):
        shares = [float(word) for word in lines[header + 1 + layer].split("|")[0].split()[1:]]
        assert lines[header + 1 + layer].split()[0] == str(layer) and abs(sum(shares) - 1) < 2e-4
    sizes = {"attention_allocation.png": None, "attention_heatmaps.png": None, "kept_patches.png": None}
    for name in sizes:
        assert f"wrote {out / name}" in result.stdout
        sizes[name] = Image.open(out / name).size
    assert sizes["kept_patches.png"][1] == analyze.PANELS_TOP + 84 + 10
    assert sizes["attention_allocation.png"][1] == 400


@pytest.mark.parametrize("args, words", [(["--r", "1.5"], ["--r", "[0, 1)"]),
                                         (["--heatmap-layers", "first"], ["--heatmap-layers"])])
def test_cli_bad_input_is_one_sentence(cli_checkpoint, args, words):
    result = run_analyze("--model", str(cli_checkpoint), "--device", "cpu", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(message) == 1 and all(word in message[0] for word in words), result.stderr


def too_late(*args, **kwargs):
    raise AssertionError("the model was opened or loaded before the bad input was noticed")


def one_error_line(err):
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


def analyze_cases(root):
    """{name: (args, words the sentence must hold, whether the model's files may be read first)};
    root/a-file.txt is a file."""
    return {
        "out under a file": (["--out", str(root / "a-file.txt" / "pictures")], ["--out", "a-file.txt", "is a file"],
                             False),
        "out is a file": (["--out", str(root / "a-file.txt")], ["--out", "a-file.txt", "is a file"], False),
        "layer twice": (["--heatmap-layers", "100,3,3"], ["--heatmap-layers", "layer 3 more than once"], False),
        "negative layer": (["--heatmap-layers", "0,-1"], ["--heatmap-layers", ">= 0"], False),
        "no layer": (["--heatmap-layers", ","], ["--heatmap-layers"], False),
        "layer past the model": (["--heatmap-layers", "0,100"], ["--heatmap-layers 100", "4 decoder layers", "0 to 3"],
                                 True),
        "last layer plus one": (["--heatmap-layers", "4"], ["--heatmap-layers 4", "4 decoder layers"], True),
        "k zero": (["--k", "0"], ["--k", "at least 1"], False),
        "k past the model": (["--k", "4"], ["--k", "between 1 and 3"], True),
        "r one": (["--r", "1"], ["--r", "[0, 1)"], False),
        "r not a number": (["--r", "nan"], ["--r", "[0, 1)"], False),
        "no new tokens": (["--max-new-tokens", "0"], ["--max-new-tokens", "at least 1"], False),
        "new tokens past the context": (["--max-new-tokens", str(2**64)], ["--max-new-tokens", "context"], True),
    }


@pytest.mark.parametrize("case", list(analyze_cases(Path("root"))), ids=lambda case: case.replace(" ", "-"))
def test_bad_input_is_one_sentence_before_the_load(case, cli_checkpoint, tmp_path, capsys, monkeypatch):
    """Exit code 2 and one sentence naming the flag, before the model loads; the flags and --out before the
    model's files are even opened (a download, for a hub model)."""
    from minifastv import cli

    (tmp_path / "a-file.txt").write_text("a file, not a folder")
    args, words, reads_the_model = analyze_cases(tmp_path)[case]
    monkeypatch.setattr(cli, "load_model", too_late)
    if not reads_the_model:
        monkeypatch.setattr(cli, "model_folder", too_late)
    monkeypatch.chdir(tmp_path)  # the default --out would land here
    code = analyze.command(["--model", str(cli_checkpoint), "--device", "cpu", *args])
    error = one_error_line(capsys.readouterr().err)
    assert code == 2 and all(word in error for word in words), error
    assert not (tmp_path / "analysis").exists()  # made only when the pictures are written: no empty folder left


def test_heatmap_layers_default_fits_the_model(capsys):
    assert analyze.heatmap_layers(None, 32) == {0, 1, 2, 15, 31}  # LLaVA-1.5-7B: the default as it is
    assert analyze.heatmap_layers(None, 40) == {0, 1, 2, 15, 31} and not capsys.readouterr().err
    for layers, fitted in [(4, {0, 1, 2, 3}), (16, {0, 1, 2, 7, 15}), (2, {0, 1}), (1, {0})]:
        assert analyze.heatmap_layers(None, layers) == fitted
        note = capsys.readouterr().err
        assert note.startswith("note: ") and f"{layers} decoder layers" in note and note.count("\n") == 1
    assert analyze.heatmap_layers(analyze.parse_heatmap_layers("3, 0"), 4) == {0, 3}


def test_system_prompt_changes_the_ids(cli_checkpoint, monkeypatch):
    """--system none (the default), vicuna_v1, llava_v1: the prompt the model reads, token for token."""
    from minifastv.prompt import SYSTEM_PROMPTS

    class Stop(Exception):
        pass

    seen = []

    def first_answer(model, input_ids, *args, **kwargs):  # the prompt is all we want: stop there
        seen.append(input_ids)
        raise Stop

    monkeypatch.setattr(analyze, "generate", first_answer)
    tokenizer = Tokenizer.from_folder(cli_checkpoint)
    for system in (None, "none", "vicuna_v1", "llava_v1"):
        with pytest.raises(Stop):
            analyze.main(["--model", str(cli_checkpoint), "--device", "cpu"] + ["--system", system] * bool(system))
        text = format_prompt("Describe this image.", system=SYSTEM_PROMPTS.get(system))
        assert torch.equal(seen[-1], encode_prompt(tokenizer, text, TOKENS_PER_IMAGE)), system
    assert torch.equal(seen[0], seen[1])  # none is the default
    assert len({tuple(ids[0].tolist()) for ids in seen}) == 3


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit:
        analyze.main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f"minifastv {minifastv.__version__}"
    with pytest.raises(SystemExit):
        analyze.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("analysis/ in the current folder", "--system", "--heatmap-layers", "--version"):
        assert words in text, words
