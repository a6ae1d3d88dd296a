"""The course's figures, written as SVG text: python -m minifastv.figures [--out DIR]

Six figures, each computed from minifastv's own code and configs (nothing typed in by hand):
1. architecture.svg: LLaVA-1.5-7B from pixels to logits, with FastV cutting in at layer K.
2. pruning_sequence.svg: a toy prompt before and after FastV, each token with its position id.
3. rope_decay.svg: how RoPE turns a key away from the query the further apart they are.
4. flops_and_time.svg: predicted and measured prefill speed-up against R, from bench-cpu.json;
   gpu_time.svg: the same on an H200, eager and compiled, batch 1 and 8, from bench-h200-*.json.
5. kept_patches.svg: which of the 24 x 24 patches four pruning rules keep (synthetic queries and
   keys).

SVG is plain text. Every number is rounded before it is written, so the files come out byte for
byte the same on every machine, and tests/test_figures.py regenerates them and compares.
"""

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from xml.sax.saxutils import escape

import torch

from . import cli
from .checkpoint import config_by_name
from .errors import UsageError
from .flops import kept_tokens
from .model import (FastV, Llava, LlavaConfig, PruningInputs, TextConfig, VisionConfig, apply_rope,
                    attention_rows, fastv_rule, rope_tables)
from .rules import grid_rule, no_rope_rule, random_rule

FIGURES = Path(__file__).resolve().parent / "assets" / "figures"
BENCH_JSON = FIGURES / "bench-cpu.json"  # written once by: python -m minifastv.bench --json <it>
MODEL = "llava-1.5-7b"  # the config of every figure but the toy and the bench (config_by_name)
# LLaVA-1.5's prompt around one image, as Llama-2's tokenizer splits
# "USER: <image>\nWhat animal is this? ASSISTANT:" (tests/test_figures.py checks them against the
# real tokenizer.json when ../shared/reference is there).
SYSTEM_TOKENS = ("<s>", "▁US", "ER", ":", "▁")  # everything before the image
QUESTION_TOKENS = ("▁", "<0x0A>", "What", "▁animal", "▁is", "▁this", "?", "▁A", "SS", "IST", "ANT",
                   ":")
# analyze.py's class colors, and a grey
BLUE, ORANGE, GREEN, RED, GREY = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#999999"
CLASS_COLORS = {"system": BLUE, "image": ORANGE, "instruction": GREEN}


def prompt_length(num_image):
    """Tokens in the LLaVA-1.5 prompt above with `num_image` image tokens (5 + 576 + 12 = 593 for
    the real model)."""
    return len(SYSTEM_TOKENS) + num_image + len(QUESTION_TOKENS)


# ------------------------------------------------------------------------------------------------
# SVG, by hand: a few shapes and text, every number rounded to one decimal.


def number(value):
    """A coordinate as SVG text: at most one decimal ("12", "12.5"), never "-0"."""
    text = f"{round(value, 1) + 0.0:.1f}"
    return text[:-2] if text.endswith(".0") else text


def attributes(values):
    """' name="value"' pairs: numbers rounded, text escaped, underscores in names made dashes
    (stroke_width)."""
    pairs = []
    for name, value in values.items():
        if isinstance(value, (int, float)):
            value = number(value)
        else:
            value = escape(str(value), {'"': "&quot;"})
        pairs.append(f' {name.replace("_", "-")}="{value}"')
    return "".join(pairs)


def rect(x, y, width, height, fill="none", stroke="black", **extra):
    values = dict(x=x, y=y, width=width, height=height, fill=fill, stroke=stroke, **extra)
    return f"<rect{attributes(values)}/>"


def circle(x, y, radius, fill):
    return f"<circle{attributes(dict(cx=x, cy=y, r=radius, fill=fill))}/>"


def text(x, y, words, size=12, anchor="start", **extra):
    values = dict(x=x, y=y, font_size=size, text_anchor=anchor, **extra)
    return f"<text{attributes(values)}>{escape(words)}</text>"


def line(x1, y1, x2, y2, stroke="black", **extra):
    return f"<line{attributes(dict(x1=x1, y1=y1, x2=x2, y2=y2, stroke=stroke, **extra))}/>"


def polyline(points, stroke="black", **extra):
    path = " ".join(f"{number(x)},{number(y)}" for x, y in points)
    return f"<polyline{attributes(dict(points=path, fill='none', stroke=stroke, **extra))}/>"


def arrow(x1, y1, x2, y2):
    """A line from (x1, y1) to (x2, y2) with a filled head at the end."""
    length = math.hypot(x2 - x1, y2 - y1)
    ux, uy = (x2 - x1) / length, (y2 - y1) / length  # unit vector along the arrow
    head = [(x2, y2), (x2 - 9 * ux + 4 * uy, y2 - 9 * uy - 4 * ux),
            (x2 - 9 * ux - 4 * uy, y2 - 9 * uy + 4 * ux)]
    points = " ".join(f"{number(x)},{number(y)}" for x, y in head)
    shaft = line(x1, y1, x2 - 8 * ux, y2 - 8 * uy, stroke_width=1.5)
    return shaft + f'<polygon points="{points}"/>'


def lines_of_text(x, y, rows, size=12, step=None, **extra):
    """Several lines of text, one under the other."""
    return [text(x, y + index * (step or size + 4), row, size, **extra)
            for index, row in enumerate(rows)]


def box(x, y, width, height, title, rows, fill):
    """A rounded box with a bold title and a few lines of text, centred."""
    middle = x + width / 2
    return [rect(x, y, width, height, fill=fill, rx=6),
            text(middle, y + 20, title, 13, "middle", font_weight="bold"),
            *lines_of_text(middle, y + 38, rows, 11, anchor="middle")]


def axes(left, top, width, height, y_ticks, x_ticks, x_label):
    """A chart's axes: y_ticks and x_ticks are [(pixel, label)]; a light line across at each y
    tick."""
    bottom = top + height
    elements = [line(left, top, left, bottom), line(left, bottom, left + width, bottom),
                text(left + width / 2, bottom + 38, x_label, 12, "middle")]
    for y, label in y_ticks:
        elements += [line(left - 5, y, left + width, y, stroke="#dddddd"),
                     text(left - 8, y + 4, label, 11, "end")]
    for x, label in x_ticks:
        elements += [line(x, bottom, x, bottom + 5), text(x, bottom + 18, label, 11, "middle")]
    return elements


def grid_of_cells(x0, y0, cell, colors):
    """A grid of colored squares, colors[row][column]; a run of one color in a row is drawn as one
    rectangle."""
    elements = []
    for row, row_colors in enumerate(colors):
        column = 0
        for color, run in itertools.groupby(row_colors):
            length = len(list(run))
            elements.append(rect(x0 + column * cell, y0 + row * cell, length * cell, cell,
                                 fill=color, stroke="none"))
            column += length
    return elements


def document(width, height, title, elements):
    """The SVG file: a white page, a title for screen readers, then the elements in order."""
    size = f'width="{number(width)}" height="{number(height)}"'
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" {size} '
            f'viewBox="0 0 {number(width)} {number(height)}" font-family="sans-serif">')
    body = [f"<title>{escape(title)}</title>",
            rect(0, 0, width, height, fill="white", stroke="none"), *elements]
    return "\n".join([head, *body, "</svg>"]) + "\n"


# ------------------------------------------------------------------------------------------------
# 1. The architecture: every number from config_by_name("llava-1.5-7b") and FastV's defaults.


def architecture_svg():
    config, fastv = config_by_name(MODEL), FastV()
    vision, text_config = config.vision, config.text
    grid, num_image = vision.grid_size, config.image_tokens_per_image
    # -2 of 24 layers: the first 23 run
    layers_run = config.vision_feature_layer % (vision.num_hidden_layers + 1)
    num_tokens, num_kept_image = prompt_length(num_image), round(num_image * (1 - fastv.r))
    num_kept = kept_tokens(num_tokens, num_image, fastv.r)
    k, last = fastv.k, text_config.num_hidden_layers - 1
    clip_width, text_width = vision.hidden_size, text_config.hidden_size
    title = (f"LLaVA-1.5-7B with FastV (K={k}, R={fastv.r:g}): one image and a question, "
             f"{num_tokens} tokens")
    elements = [text(20, 28, title, 15, font_weight="bold")]
    top = 50  # the vision side, left to right
    elements += box(20, top, 170, 110, "image",
                    [f"{vision.image_size} x {vision.image_size} px, RGB",
                     "resized, center-cropped,", "normalized (image.py)"], "#f2f2f2")
    elements += box(230, top, 300, 110,
                    f"CLIP ViT-L/{vision.patch_size} ({vision.num_hidden_layers} layers)",
                    [f"{vision.patch_size} px patches: {grid} x {grid} = {grid * grid} + CLS "
                     "token,",
                     f"{clip_width} wide; runs {layers_run} layers and reads the output",
                     f"of layer {layers_run - 1}, the second to last (feature layer "
                     f"{config.vision_feature_layer});",
                     "the CLS token is dropped"], "#fde9d9")
    elements += box(570, top, 270, 110, "projector",
                    [f"Linear {clip_width} -> {text_width}, GELU,",
                     f"Linear {text_width} -> {text_width}",
                     "(2-layer MLP)"], "#fde9d9")
    elements += [arrow(190, top + 55, 230, top + 55), arrow(530, top + 55, 570, top + 55),
                 text(550, top + 130, f"{num_image} tokens x {clip_width}", 11, "middle")]
    middle = 240  # the prompt: the projected patches written over the <image> placeholders
    elements += [arrow(705, top + 110, 705, middle - 5),
                 text(712, middle - 25, f"{num_image} tokens x {text_width}", 11),
                 text(20, middle - 8, "the prompt (prompt.py), one row per token:", 12)]
    x = 20
    for name, count, label, width in (
            ("system", len(SYSTEM_TOKENS), "<s> USER:", 120),
            ("image", num_image, f"{num_image} x <image>, replaced by the patches", 580),
            ("instruction", len(QUESTION_TOKENS), "question ASSISTANT:", 120)):
        elements += [rect(x, middle, width, 40, fill=CLASS_COLORS[name], stroke="white"),
                     text(x + width / 2, middle + 17, f"{count} {name}", 12, "middle",
                          fill="white", font_weight="bold"),
                     text(x + width / 2, middle + 32, label, 10, "middle", fill="white")]
        x += width
    bottom, full = 330, 90  # the decoder: a bar's height is the number of tokens its layers run on
    cut = full * num_kept / num_tokens
    fastv_step = [f"FastV at layer {k}", f"rank the {num_image} image",
                  f"tokens by layer {k - 1}'s", "last-token attention,",
                  f"keep the top {num_kept_image}"]
    elements += [arrow(95, middle + 40, 95, bottom - 5),
                 rect(20, bottom, 150, full, fill="#dbe8f5"),
                 *lines_of_text(95, bottom + 30, [f"layers 0-{k - 1}", f"all {num_tokens} tokens"],
                                12, anchor="middle"),
                 rect(170, bottom, 130, full, fill="#fff3cd", stroke=RED, stroke_width=2),
                 *lines_of_text(235, bottom + 18, fastv_step, 11, 14, anchor="middle"),
                 rect(300, bottom + full - cut, 420, cut, fill="#dbe8f5"),
                 *lines_of_text(510, bottom + full - cut + 20,
                                [f"layers {k}-{last}: {num_kept} tokens",
                                 f"({num_kept_image} image tokens, every text token)"],
                                12, anchor="middle"),
                 arrow(720, bottom + 65, 760, bottom + 65),
                 *box(760, bottom + 20, 170, 70, "next-token logits",
                      [f"{text_config.vocab_size} scores", "(lm_head, last token)"], "#f2f2f2"),
                 text(20, bottom + 112,
                      f"Llama decoder (Vicuna-7B): {text_config.num_hidden_layers} layers, "
                      f"{text_width} wide, {text_config.num_attention_heads} heads of "
                      f"{text_config.head_dim}; "
                      "a bar's height is the number of tokens its layers see", 12)]
    return document(950, 460, "LLaVA-1.5-7B with FastV: image to CLIP to projector to decoder",
                    elements)


# ------------------------------------------------------------------------------------------------
# 2. The sequence before and after pruning, from a real forward pass of a toy model.

TOY_GRID, TOY_SEED = 4, 0  # a 4 x 4 image: 16 image tokens instead of 576, so that every box fits


def toy_llava():
    """A random LLaVA with a TOY_GRID x TOY_GRID patch image and a small 4-layer decoder: FastV runs
    for real on it. Its weights are drawn here (normal, std 0.08; biases 0), not by torch's
    initializers, so they never change."""
    config = LlavaConfig(
        text=TextConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, max_position_embeddings=64),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, image_size=14 * TOY_GRID, patch_size=14),
        image_token_id=63, pad_token_id=62)
    model = Llava(config).eval()
    generator = torch.Generator().manual_seed(TOY_SEED)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.08)
            elif name.endswith("bias"):
                parameter.zero_()
    model.init_rope()
    return model


def toy_prompt(config):
    """The toy's input_ids (1, T), laid out like SYSTEM_TOKENS, the image, QUESTION_TOKENS, and its
    pixel_values."""
    # any text ids: the weights are random
    words = list(range(1, len(SYSTEM_TOKENS) + len(QUESTION_TOKENS) + 1))
    image = [config.image_token_id] * config.image_tokens_per_image
    input_ids = torch.tensor([words[:len(SYSTEM_TOKENS)] + image + words[len(SYSTEM_TOKENS):]])
    size = config.vision.image_size
    generator = torch.Generator().manual_seed(TOY_SEED)
    return input_ids, torch.randn(1, 3, size, size, generator=generator)


@torch.inference_mode()
def toy_positions(fastv):
    """The position ids of the tokens the toy's decoder layers run on, read with the model's
    `observe` hook: first every token's (layer 0), then the kept ones' (layer K), the positions
    Llava.forward hands to RoPE."""
    model = toy_llava()
    positions = {}  # {layer: [position of each token it ran on]}

    def observe(view):
        positions[view.index] = view.positions[0].tolist()

    model(*toy_prompt(model.config), fastv=fastv, last_logits_only=True, observe=observe)
    return positions[0], positions[fastv.k]


def pruning_sequence_svg():
    fastv, num_image = FastV(), TOY_GRID**2
    before, after = toy_positions(fastv)
    pieces = (*SYSTEM_TOKENS, *(f"p{patch}" for patch in range(num_image)), *QUESTION_TOKENS)
    labels = [piece.replace("<0x0A>", "\\n") for piece in pieces]
    kind = (["system"] * len(SYSTEM_TOKENS) + ["image"] * num_image
            + ["instruction"] * len(QUESTION_TOKENS))
    real_image = config_by_name(MODEL).image_tokens_per_image
    step, left = 30, 20
    elements = [text(left, 26, f"FastV (K={fastv.k}, R={fastv.r:g}) on a toy prompt: every token "
                               "keeps its ORIGINAL position id", 15, font_weight="bold"),
                text(left, 46, f"LLaVA-1.5's prompt with a {TOY_GRID} x {TOY_GRID}-patch image "
                               f"({num_image} image tokens instead of {real_image}): numbers in "
                               "the boxes are the position ids, under them the token", 12)]
    for y, title, positions in (
            (90, f"layers 0-{fastv.k - 1}: all {len(before)} tokens", before),
            (190, f"layers {fastv.k}-: {len(after)} tokens, gaps where image tokens were dropped",
             after)):
        elements.append(text(left, y - 10, title, 12, font_weight="bold"))
        for position in positions:
            x = left + position * step
            middle = x + (step - 4) / 2
            elements += [rect(x, y, step - 4, 26, fill=CLASS_COLORS[kind[position]],
                              stroke="white"),
                         text(middle, y + 17, str(position), 12, "middle", fill="white",
                              font_weight="bold"),
                         text(middle, y + 40, labels[position], 8, "middle")]
        for position in sorted(set(before) - set(positions)):
            elements.append(rect(left + position * step, y, step - 4, 26, stroke=GREY,
                                 stroke_dasharray="3,3"))
    elements += lines_of_text(left, 270, [
        f"Which {round(num_image * (1 - fastv.r))} image tokens survive is decided by fastv_rule "
        "on a toy model with random weights (model.py's forward, recorded);",
        "the position ids are the ones Llava.forward passes to RoPE before and after the cut. "
        "Renumbering the survivors 0, 1, 2, ... would show layer K",
        f"a prompt the model never saw in training. In LLaVA-1.5 the same prompt has "
        f"{len(SYSTEM_TOKENS)} + {real_image} + {len(QUESTION_TOKENS)} = "
        f"{prompt_length(real_image)} tokens."], 11)
    return document(left * 2 + len(before) * step, 330,
                    "A prompt before and after FastV's pruning, with position ids", elements)


# ------------------------------------------------------------------------------------------------
# 3. RoPE's decay with distance, and where the image tokens sit from the last prompt token.


def rope_similarity(distance, text_config):
    """Mean over the rotary frequency pairs of cos(distance x frequency), in float64: RoPE's factor
    on q . k when the query and the key are one and the same vector of ones. rope_tables (model.py)
    holds the same angles in float32."""
    pairs = text_config.head_dim // 2
    frequencies = [text_config.rope_theta ** (-2 * pair / text_config.head_dim)
                   for pair in range(pairs)]
    return sum(math.cos(distance * frequency) for frequency in frequencies) / pairs


def image_distances(num_image, grid):
    """[row][column]: how many positions image patch (row, column) sits before the last token of
    the LLaVA prompt."""
    last = prompt_length(num_image) - 1
    return [[last - (len(SYSTEM_TOKENS) + row * grid + column) for column in range(grid)]
            for row in range(grid)]


def rope_decay_svg():
    config = config_by_name(MODEL)
    text_config, grid = config.text, config.vision.grid_size
    num_image, head_dim = config.image_tokens_per_image, config.text.head_dim
    distances = image_distances(num_image, grid)
    nearest, farthest, max_distance = distances[-1][-1], distances[0][0], 640
    left, top, width, height = 70, 90, 800, 300
    x_of = lambda distance: left + distance / max_distance * width  # data to pixels
    y_of = lambda value: top + (1 - value) / 1.2 * height  # the y axis runs from -0.2 to 1
    curve = [(x_of(d), y_of(rope_similarity(d, text_config))) for d in range(max_distance + 1)]
    elements = [
        text(20, 24, "RoPE turns a key away from the query the further back it sits", 15,
             font_weight="bold"),
        *lines_of_text(20, 44, [f"Llama's head_dim {head_dim}, rope_theta "
                                f"{text_config.rope_theta:g}. Plotted: the mean over the "
                                f"{head_dim // 2} frequency pairs of cos(distance x frequency),",
                                "RoPE's factor on q . k when the query and the key are one and the "
                                "same vector (of ones)."]),
        rect(x_of(nearest), top, x_of(farthest) - x_of(nearest), height, fill=ORANGE,
             fill_opacity=0.15, stroke="none"),
        text(x_of((nearest + farthest) / 2), top + 16,
             f"the {num_image} image tokens of LLaVA-1.5's prompt", 12, "middle"),
        *axes(left, top, width, height,
              [(y_of(value), f"{value:g}") for value in (-0.2, 0, 0.2, 0.4, 0.6, 0.8, 1)],
              [(x_of(distance), str(distance)) for distance in range(0, max_distance + 1, 100)],
              "distance from the last prompt token (positions)"),
        polyline(curve, BLUE, stroke_width=1.5)]
    row_means = [sum(rope_similarity(d, text_config) for d in row) / grid for row in distances]
    for row, mean in enumerate(row_means):  # one dot per image row, at its middle distance
        elements.append(circle(x_of(sum(distances[row]) / grid), y_of(mean), 3.5, RED))
    # labels above and below the curve
    for row, anchor, value in ((grid - 1, "start", 0.68), (0, "end", 0.08)):
        where = "bottom row, nearest the question" if row else "top row, farthest"
        elements.append(text(x_of(sum(distances[row]) / grid), y_of(value),
                             f"{where}: mean {row_means[row]:.2f}", 11, anchor, fill=RED))
    elements += lines_of_text(20, top + height + 62, [
        f"Blue: every distance. Red: the mean over each of the {grid} rows of the {grid} x {grid} "
        "image; the bottom-right patch",
        f"sits {nearest} positions before the last prompt token, the top-left {farthest}. Content "
        "aside, the last token's attention favours the bottom",
        "of the image, so FastV keeps it (FEATHER, arXiv 2412.13180); rules.no_rope_rule scores "
        "without RoPE (kept_patches.svg)."], 11)
    return document(900, top + height + 116,
                    "RoPE's decay with distance and where the image tokens sit", elements)


# ------------------------------------------------------------------------------------------------
# 4. FLOPs and measured time against R, from the bench's JSON (this script never runs the bench).
# Its tables are keyed by setting, "no_fastv" or "K2_R0.5": cli.setting_of reads k and r back.


def read_bench(path):
    """The bench's numbers by R: {R: (predicted speed-up, measured speed-up, prefill ms)}, and the
    whole JSON. "no_fastv" is the baseline of both speed-ups."""
    try:
        results = json.loads(Path(path).read_text())
        baseline = results["prefill_ms"]["no_fastv"]
        by_r = {cli.setting_of(name)[1]: (results["predicted_speedup"][name], baseline / ms, ms)
                for name, ms in results["prefill_ms"].items() if name != "no_fastv"}
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        raise UsageError(f"--bench {path} is not a JSON file written by python -m minifastv.bench "
                         f"--json ({type(error).__name__}: {error}).") from None
    return by_r, results


def flops_and_time_svg(bench_path=BENCH_JSON):
    by_r, results = read_bench(bench_path)
    k = next(cli.setting_of(name)[0] for name in results["prefill_ms"] if name != "no_fastv")
    rs = sorted(by_r)
    # the y axis ends on a half
    top_value = math.ceil(max(max(values[:2]) for values in by_r.values()) * 2) / 2
    left, top, width, height = 80, 90, 560, 280
    x_of = lambda r: left + 40 + r / max(rs) * (width - 80)  # data to pixels
    y_of = lambda value: top + (1 - value / top_value) * height
    # "machine" and "torch" were added to the bench's JSON by hand
    machine = results.get("machine", results["device"])
    torch_version = f", torch {results['torch']}" if "torch" in results else ""
    elements = [
        text(20, 26, f"FastV (K={k}): the prefill's speed-up against R, predicted by the FLOPs and "
                     "measured", 15, font_weight="bold"),
        *lines_of_text(20, 46, [f"measured on {machine}: device {results['device']}, "
                                f"{results['dtype']}{torch_version}",
                                f"median of {results['repeats']} prefills per setting; model: "
                                f"{results['model']} (python -m minifastv.bench), "
                                f"{results['prompt_tokens']} prompt tokens, "
                                f"{results['image_tokens']} of them image"], 12),
        *axes(left, top, width, height,
              [(y_of(step / 2), f"{step / 2:g}x") for step in range(int(top_value * 2) + 1)],
              [(x_of(r), f"{r:g}") for r in rs],
              f"R, the share of image tokens dropped at layer {k}")]
    for series, (name, color, dy) in enumerate((
            ("predicted: by the FLOPs (exact count)", BLUE, -10),
            ("measured: by the prefill time", RED, 18))):
        points = [(x_of(r), y_of(by_r[r][series])) for r in rs]
        elements.append(polyline(points, color, stroke_width=2))
        for r, (x, y) in zip(rs, points):
            elements += [circle(x, y, 4, color),
                         text(x, y + dy, f"{by_r[r][series]:.2f}x", 11, "middle", fill=color)]
        y = top + 20 + series * 40  # the legend, to the right
        elements += [rect(left + width + 20, y, 14, 14, fill=color, stroke="none"),
                     *lines_of_text(left + width + 40, y + 11, name.split(": "), 11)]
    elements += lines_of_text(left + width + 20, top + 120, [
        "speed-up = without FastV / with",
        f"prefill without FastV: {results['prefill_ms']['no_fastv']:.0f} ms",
        *(f"R={r:g}: {by_r[r][2]:.0f} ms" for r in rs), "(R=0 scores, keeps every token)"], 11)
    return document(left + width + 230, top + height + 60,
                    "Predicted and measured prefill speed-up against R", elements)


GPU_BENCH_JSONS = {"eager": FIGURES / "bench-h200-eager.json",
                   "compiled": FIGURES / "bench-h200-compiled.json"}


def gpu_time_svg(bench_paths=GPU_BENCH_JSONS):
    """4b. The same question on a fast GPU, eager and compiled, batch 1 and batch 8: FLOPs are not
    time."""
    runs = {mode: json.loads(Path(path).read_text()) for mode, path in bench_paths.items()}
    eager, compiled = runs["eager"], runs["compiled"]

    def by_r(table):  # {R: value}; "no_fastv" drops nothing: R=0, unless a K2_R0 comes later
        return {cli.setting_of(name)[1]: value for name, value in table.items()}

    rs = sorted(cli.setting_of(name)[1] for name in eager["prefill_ms"] if name != "no_fastv")
    left, top, width, height, top_value = 80, 130, 560, 280, 3.0
    x_of = lambda r: left + 40 + r / max(rs) * (width - 80)
    y_of = lambda value: top + (1 - value / top_value) * height
    # (label, color, dashes, {R: speed-up}); a later R=0 setting (K2_R0) replaces no_fastv's 1.0
    # where there is one
    series = [("predicted by the FLOPs", BLUE, None, by_r(eager["predicted_speedup"]))]
    for mode, color in (("eager", RED), ("compiled", ORANGE)):
        for batch, dash in (("1", None), ("8", "6 4")):
            timings = runs[mode]["prefill_ms"] if batch == "1" else runs[mode]["prefill_ms_batch8"]
            speedups = by_r({name: timings["no_fastv"] / ms for name, ms in timings.items()})
            series.append((f"{mode}, batch {batch}", color, dash, speedups))
    elements = [
        text(20, 26, "FLOPs are not time: FastV's prefill speed-up on a fast GPU, eager and "
                     "compiled, batch 1 and 8", 15, font_weight="bold"),
        *lines_of_text(20, 46, [
            f"measured on an {eager['device']} ({eager['machine']}), {eager['dtype']}, torch "
            f"{eager['torch']}",
            f"python -m minifastv.bench --model {eager['model']} [--compile]: random weights in "
            f"the real 7B shape, {eager['prompt_tokens']} tokens ({eager['image_tokens']} image), "
            f"K=2, median of {eager['repeats']}",
            "R=0 scores and keeps every token: its distance from 1.00x is this run's noise at "
            "batch 1; at batch 8 R=0 is the unpruned baseline",
            f"prefill without FastV, batch 1: eager {eager['prefill_ms']['no_fastv']:.1f} ms, "
            f"compiled {compiled['prefill_ms']['no_fastv']:.1f} ms; decode: eager "
            f"{eager['decode_tokens_per_s']['no_fastv']:.0f}, compiled "
            f"{compiled['decode_tokens_per_s']['no_fastv']:.0f} tokens/s "
            f"(floor {eager['decode_floor_tokens_per_s']:.0f})"], 12),
        *axes(left, top, width, height,
              [(y_of(step / 2), f"{step / 2:g}x") for step in range(int(top_value * 2) + 1)],
              [(x_of(r), f"{r:g}") for r in rs], "R, the share of image tokens dropped at layer 2")]
    for index, (name, color, dash, speedups) in enumerate(series):
        style = {"stroke_dasharray": dash} if dash else {}
        points = [(x_of(r), y_of(value)) for r, value in sorted(speedups.items())]
        elements.append(polyline(points, color, stroke_width=2, **style))
        elements += [circle(x, y, 3.5, color) for x, y in points]
        last_r, last_value = max(speedups.items())
        elements.append(text(x_of(last_r) + 8, y_of(last_value) + 4, f"{last_value:.2f}x", 11,
                             fill=color))
        y = top + 20 + index * 24  # the legend, to the right
        elements += [line(left + width + 40, y, left + width + 66, y, color, stroke_width=2,
                          **style),
                     text(left + width + 72, y + 4, name, 11)]
    return document(left + width + 260, top + height + 60,
                    "FastV's prefill speed-up on a GPU, eager and compiled", elements)


# ------------------------------------------------------------------------------------------------
# 5. Kept patches by rule, on synthetic queries and keys placed where LLaVA-1.5's prompt puts them.


def saliency_map(grid):
    """A made-up "object": a bright blob above the centre of the image on a dim background,
    (grid, grid) float64. Its centre is off the grid's axes of symmetry, so that no two patches
    tie."""
    rows = torch.arange(grid, dtype=torch.float64)[:, None] / grid
    columns = torch.arange(grid, dtype=torch.float64)[None, :] / grid
    return 0.25 + 0.75 * torch.exp(-((rows - 0.33) ** 2) / 0.03 - ((columns - 0.52) ** 2) / 0.05)


def synthetic_pruning_inputs(config, fastv):
    """PruningInputs for LLaVA-1.5's prompt with one image, where the last token's query is a vector
    of ones and every image token's key is that vector times the patch's saliency (text tokens'
    keys are zero), with RoPE at the real positions from rope_tables. So the attention follows the
    saliency before RoPE, and RoPE adds its decay."""
    grid, num_image, head_dim = (config.vision.grid_size, config.image_tokens_per_image,
                                 config.text.head_dim)
    num_tokens = prompt_length(num_image)
    first = len(SYSTEM_TOKENS)
    image_positions = torch.arange(first, first + num_image)[None]  # (1, N)
    raw_queries = torch.ones(1, 1, num_tokens, head_dim)  # (B, H, T, D): one head
    raw_keys = torch.zeros(1, 1, num_tokens, head_dim)
    raw_keys[0, 0, image_positions[0]] = saliency_map(grid).flatten().float()[:, None]  # (N, D)
    cos_table, sin_table = rope_tables(config.text, "cpu")
    # (B, 1, T, D): the angles of positions 0 .. T-1
    cos, sin = cos_table[None, None, :num_tokens], sin_table[None, None, :num_tokens]
    queries, keys = apply_rope(raw_queries, cos, sin), apply_rope(raw_keys, cos, sin)
    every_token = torch.ones(1, num_tokens, dtype=torch.long)
    return PruningInputs(
        last_token_attention=attention_rows(queries, keys, every_token)[:, :, -1],
        image_positions=image_positions, num_keep=round(num_image * (1 - fastv.r)),
        grid_size=grid, is_video=torch.zeros(1, num_image, dtype=torch.bool),
        frame=torch.zeros(1, num_image, dtype=torch.long), patch=torch.arange(num_image)[None],
        hidden_states=None, queries=queries, keys=keys, cos=cos, sin=sin,
        attention_mask=every_token)


def kept_by_rule(fastv):
    """{rule name: (grid, grid) bool, True where the rule keeps the patch}: minifastv's four rules
    on the inputs above."""
    config = config_by_name(MODEL)
    inputs, grid = synthetic_pruning_inputs(config, fastv), config.vision.grid_size
    kept = {}
    for rule in (fastv_rule, no_rope_rule, grid_rule, random_rule):
        # random_rule draws from torch's global generator: seed it, then put it back
        with torch.random.fork_rng():
            torch.manual_seed(0)
            keep = rule(inputs)[0]
        is_kept = torch.zeros(grid * grid, dtype=torch.bool)
        is_kept[keep] = True
        kept[rule.__name__] = is_kept.view(grid, grid)
    return kept


def kept_patches_svg():
    fastv, grid = FastV(), config_by_name(MODEL).vision.grid_size
    cell, gap, left, top = 7, 24, 20, 90
    side = cell * grid
    panels = [("saliency (made up)", None)] + list(kept_by_rule(fastv).items())
    elements = [
        text(left, 26, f"Which of the {grid} x {grid} patches each rule keeps at R={fastv.r:g} "
                       "(kept: orange, dropped: dark)", 15, font_weight="bold"),
        *lines_of_text(left, 46, ["SYNTHETIC, not the 7B model: the last token's query is a "
                                  "vector of ones, each image key that vector times the made-up "
                                  "saliency (left);",
                                  "RoPE at the real positions of LLaVA-1.5's prompt. The rules are "
                                  "minifastv's own (model.py, rules.py), run on these queries and "
                                  "keys."])]
    for index, (name, kept) in enumerate(panels):
        x0 = left + index * (side + gap)
        if kept is None:  # bright: salient, in 16 shades of grey
            shades = (saliency_map(grid) * 16).round().mul(255 / 16).round().int().tolist()
            colors = [[f"rgb({shade},{shade},{shade})" for shade in row] for row in shades]
            subtitle = "bright: salient"
        else:
            colors = [[ORANGE if is_kept else "#333333" for is_kept in row]
                      for row in kept.tolist()]
            mean_row = kept.nonzero()[:, 0].double().mean()
            subtitle = f"{int(kept.sum())} of {grid * grid} kept, mean row {mean_row:.1f}"
        elements += [text(x0, top - 6, name, 12, font_weight="bold"),
                     *grid_of_cells(x0, top, cell, colors),
                     rect(x0, top, side, side), text(x0, top + side + 16, subtitle, 11)]
    elements += lines_of_text(left, top + side + 44, [
        "fastv_rule drifts to the bottom rows, nearest the question (see rope_decay.svg); "
        "no_rope_rule follows the saliency; grid_rule and random_rule do not look.",
        "The same picture on the real model and the cat photo (needs the 7B weights, a 14 GB "
        "download): python -m minifastv.analyze  ->  analysis/kept_patches.png"], 11)
    return document(left * 2 + len(panels) * side + (len(panels) - 1) * gap, top + side + 80,
                    "Kept patches by rule on synthetic queries and keys", elements)


# ------------------------------------------------------------------------------------------------
# The command line.


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m minifastv.figures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(FIGURES),
                        help="folder for the SVG files (default: minifastv/assets/figures)")
    parser.add_argument("--bench", default=str(BENCH_JSON),
                        help="the bench's JSON for flops_and_time.svg (default: "
                             "minifastv/assets/figures/bench-cpu.json)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # first: a bad --bench is refused before anything is written
    flops_and_time = flops_and_time_svg(args.bench)
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {args.out} cannot be a folder for the figures "
                         f"({error.strerror}).") from None
    figures = {"architecture.svg": architecture_svg(),
               "pruning_sequence.svg": pruning_sequence_svg(), "rope_decay.svg": rope_decay_svg(),
               "flops_and_time.svg": flops_and_time, "gpu_time.svg": gpu_time_svg(),
               "kept_patches.svg": kept_patches_svg()}
    for name, svg in figures.items():
        (Path(args.out) / name).write_text(svg, encoding="utf-8")
        print(f"wrote {Path(args.out) / name}")


def command(argv=None):
    return cli.report_errors(main, argv)


if __name__ == "__main__":
    sys.exit(command())
