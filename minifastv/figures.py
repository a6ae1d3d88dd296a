"""The course's figures, written as SVG text: python -m minifastv.figures [--out DIR]

Nine figures, each computed from minifastv's own code and configs (nothing typed in by hand):
1. architecture.svg: LLaVA-1.5-7B from pixels to logits, with FastV cutting in at layer K.
2. patch_grid.svg: a 336 x 336 image cut into 24 x 24 patches, and where each goes in the prompt.
3. On a toy model that runs for real: pruning_sequence.svg, the prompt before and after FastV;
   causal_votes.svg, who can vote for a patch; cache_slots.svg, the KV cache's slots after FastV.
4. rope_decay.svg: how RoPE turns a key away from the query the further apart they are.
5. flops_and_time.svg: predicted and measured prefill speed-up against R, from bench-cpu.json;
   gpu_time.svg: the same on an H200, eager and compiled, batch 1 and 8, from bench-h200-*.json.
6. kept_patches.svg: which of the 24 x 24 patches four pruning rules keep, on synthetic inputs.

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
                    attention_rows, fastv_rule, rope_tables, visible_keys)
from .rules import grid_rule, no_rope_rule, random_rule

FIGURES = Path(__file__).resolve().parent / "assets" / "figures"
BENCH_JSON = FIGURES / "bench-cpu.json"  # written once by: python -m minifastv.bench --json <it>
MODEL = "llava-1.5-7b"
CONFIG = config_by_name(MODEL)  # the config of every figure but the toy and the bench
# LLaVA-1.5's prompt around one image, as Llama-2's tokenizer splits
# "USER: <image>\nWhat animal is this? ASSISTANT:" (tests/test_figures.py checks them against the
# real tokenizer.json when ../shared/reference is there).
SYSTEM_TOKENS = ("<s>", "▁US", "ER", ":", "▁")  # everything before the image
QUESTION_TOKENS = ("▁", "<0x0A>", "What", "▁animal", "▁is", "▁this", "?", "▁A", "SS", "IST", "ANT",
                   ":")
# analyze.py's class colors, a grey, and light versions of the first three (visible mask cells)
BLUE, ORANGE, GREEN, RED, GREY = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#999999"
CLASS_COLORS = {"system": BLUE, "image": ORANGE, "instruction": GREEN}
LIGHT_COLORS = {"system": "#aec7e8", "image": "#ffbb78", "instruction": "#98df8a"}


def prompt_length(num_image):
    """Tokens in that prompt with `num_image` image tokens (5 + 576 + 12 = 593 in the 7B model)."""
    return len(SYSTEM_TOKENS) + num_image + len(QUESTION_TOKENS)


def prompt_kinds(num_image):
    """The kind of each position of that prompt: "system", "image" or "instruction"."""
    return (["system"] * len(SYSTEM_TOKENS) + ["image"] * num_image
            + ["instruction"] * len(QUESTION_TOKENS))


# ------------------------------------------------------------------------------------------------
# SVG, by hand: a few shapes and text, every number rounded to one decimal.


def number(value):
    """A coordinate as SVG text: at most one decimal ("12", "12.5"), never "-0"."""
    text = f"{round(value, 1) + 0.0:.1f}"
    return text[:-2] if text.endswith(".0") else text


def tag(name, words=None, **values):
    """An SVG element, <name .../>, or <name ...>words</name> with words: numbers rounded, lists of
    (x, y) written "x,y x,y", text escaped, underscores in names made dashes (stroke_width)."""
    attributes = ""
    for key, value in values.items():
        if isinstance(value, list):
            value = " ".join(f"{number(x)},{number(y)}" for x, y in value)
        value = number(value) if isinstance(value, (int, float)) else escape(value, {'"': "&quot;"})
        attributes += f' {key.replace("_", "-")}="{value}"'
    closing = "/>" if words is None else f">{escape(words)}</{name}>"
    return f"<{name}{attributes}{closing}"


def rect(x, y, width, height, fill="none", stroke="black", **extra):
    return tag("rect", x=x, y=y, width=width, height=height, fill=fill, stroke=stroke, **extra)


def text(x, y, words, size=12, anchor="start", **extra):
    return tag("text", words, x=x, y=y, font_size=size, text_anchor=anchor, **extra)


def line(x1, y1, x2, y2, stroke="black", **extra):
    return tag("line", x1=x1, y1=y1, x2=x2, y2=y2, stroke=stroke, **extra)


def polyline(points, stroke="black", **extra):
    return tag("polyline", points=points, fill="none", stroke=stroke, **extra)


def dot(x, y, fill):
    return tag("circle", cx=x, cy=y, r=3.5, fill=fill)


def arrow(x1, y1, x2, y2):
    """A line from (x1, y1) to (x2, y2) with a filled head at the end."""
    length = math.hypot(x2 - x1, y2 - y1)
    ux, uy = (x2 - x1) / length, (y2 - y1) / length  # unit vector along the arrow
    head = [(x2, y2), (x2 - 9 * ux + 4 * uy, y2 - 9 * uy - 4 * ux),
            (x2 - 9 * ux - 4 * uy, y2 - 9 * uy + 4 * ux)]
    return line(x1, y1, x2 - 8 * ux, y2 - 8 * uy, stroke_width=1.5) + tag("polygon", points=head)


def lines_of_text(x, y, rows, size=12, step=None, **extra):
    return [text(x, y + index * (step or size + 4), row, size, **extra)
            for index, row in enumerate(rows)]


def heading(words, rows=(), y=26):
    """A figure's bold heading at the top left, and lines of text under it."""
    return [text(20, y, words, 15, font_weight="bold"), *lines_of_text(20, y + 20, rows)]


def box(x, y, width, height, title, rows, fill):
    """A rounded box with a bold title and a few lines of text, centred."""
    middle = x + width / 2
    return [rect(x, y, width, height, fill=fill, rx=6),
            text(middle, y + 20, title, 13, "middle", font_weight="bold"),
            *lines_of_text(middle, y + 38, rows, 11, anchor="middle")]


def token_box(x, y, width, label, kind, under=None, height=26):
    """A token: a box of its class's color with `label` (its position id) in it, `under` below."""
    middle = x + width / 2
    elements = [rect(x, y, width, height, fill=CLASS_COLORS[kind], stroke="white"),
                text(middle, y + 17, label, 12, "middle", fill="white", font_weight="bold")]
    return elements + ([] if under is None else [text(middle, y + 40, under, 8, "middle")])


def axes(left, top, width, height, y_ticks, x_ticks, x_label):
    """A chart's axes, y_ticks and x_ticks [(pixel, label)], a light line across at each y tick."""
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
    """Squares of colors[row][column]; a run of one color in a row is drawn as one rectangle."""
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
    body = [tag("title", title), rect(0, 0, width, height, fill="white", stroke="none"), *elements]
    return "\n".join([head, *body, "</svg>"]) + "\n"


# ------------------------------------------------------------------------------------------------
# 1. The architecture: every number from config_by_name("llava-1.5-7b") and FastV's defaults.


def architecture_svg():
    fastv, vision, text_config = FastV(), CONFIG.vision, CONFIG.text
    grid, num_image = vision.grid_size, CONFIG.image_tokens_per_image
    layers_run = CONFIG.vision_feature_layer % (vision.num_hidden_layers + 1)  # -2 of 24: 23 run
    num_tokens, num_kept_image = prompt_length(num_image), fastv.num_keep(num_image)
    num_kept = kept_tokens(num_tokens, num_image, fastv.r)
    k, clip_width, text_width = fastv.k, vision.hidden_size, text_config.hidden_size
    elements = heading(f"LLaVA-1.5-7B with FastV (K={k}, R={fastv.r:g}): one image and a "
                       f"question, {num_tokens} tokens", y=28)
    top = 50  # the vision side, left to right
    elements += box(20, top, 170, 110, "image",
                    [f"{vision.image_size} x {vision.image_size} px, RGB",
                     "resized, center-cropped,", "normalized (image.py)"], "#f2f2f2")
    elements += box(230, top, 300, 110,
                    f"CLIP ViT-L/{vision.patch_size} ({vision.num_hidden_layers} layers)",
                    [f"{vision.patch_size} px patches: {grid} x {grid} = {grid**2} + CLS token,",
                     f"{clip_width} wide; runs {layers_run} layers and reads the output",
                     f"of layer {layers_run - 1}, the second to last (feature layer "
                     f"{CONFIG.vision_feature_layer});",
                     "the CLS token is dropped"], "#fde9d9")
    elements += box(570, top, 270, 110, "projector", [f"Linear {clip_width} -> {text_width}, GELU,",
                    f"Linear {text_width} -> {text_width}", "(2-layer MLP)"], "#fde9d9")
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
        elements += [*token_box(x, middle, width, f"{count} {name}", name, height=40),
                     text(x + width / 2, middle + 32, label, 10, "middle", fill="white")]
        x += width
    bottom, full = 330, 90  # the decoder: a bar's height is the number of tokens its layers run on
    cut = full * num_kept / num_tokens
    fastv_step = [f"FastV at layer {k}", f"rank the {num_image} image",
                  f"tokens by layer {k - 1}'s", "last-token attention,",
                  f"keep the top {num_kept_image}"]
    # a bracket under the whole prompt: every token of it, not the system's alone, enters layer 0
    brace = middle + 52
    elements += [polyline([(20, middle + 44), (20, brace), (x, brace), (x, middle + 44)]),
                 arrow(95, brace, 95, bottom - 5),
                 text(105, brace + 20, f"the whole sequence enters layer 0: {len(SYSTEM_TOKENS)} "
                                       f"system + {num_image} image + {len(QUESTION_TOKENS)} "
                                       f"instruction = {num_tokens} tokens", 12),
                 rect(20, bottom, 150, full, fill="#dbe8f5"),
                 *lines_of_text(95, bottom + 30, [f"layers 0-{k - 1}", f"all {num_tokens} tokens"],
                                12, anchor="middle"),
                 rect(170, bottom, 130, full, fill="#fff3cd", stroke=RED, stroke_width=2),
                 *lines_of_text(235, bottom + 18, fastv_step, 11, 14, anchor="middle"),
                 rect(300, bottom + full - cut, 420, cut, fill="#dbe8f5"),
                 *lines_of_text(510, bottom + full - cut + 20, [
                     f"layers {k}-{text_config.num_hidden_layers - 1}: {num_kept} tokens",
                     f"({num_kept_image} image tokens, every text token)"], 12, anchor="middle"),
                 arrow(720, bottom + 65, 760, bottom + 65),
                 *box(760, bottom + 20, 170, 70, "next-token logits",
                      [f"{text_config.vocab_size} scores", "(lm_head, last token)"], "#f2f2f2"),
                 text(20, bottom + 112, "Llama decoder (Vicuna-7B): "
                      f"{text_config.num_hidden_layers} layers, {text_width} wide, "
                      f"{text_config.num_attention_heads} heads of {text_config.head_dim}; "
                      "a bar's height is the number of tokens its layers see", 12)]
    return document(950, 460, "LLaVA-1.5-7B with FastV: image to CLIP to projector to decoder",
                    elements)


# ------------------------------------------------------------------------------------------------
# 2. Patches: the image cut into a grid, read row by row into the prompt.


def patch_grid_svg():
    vision, num_image = CONFIG.vision, CONFIG.image_tokens_per_image
    grid, size, patch = vision.grid_size, vision.image_size, vision.patch_size
    first, num_tokens = len(SYSTEM_TOKENS), prompt_length(num_image)
    cell, left, top = 18, 20, 104
    side, shades = grid * cell, (ORANGE, LIGHT_COLORS["image"])  # rows alternate two shades
    elements = [
        *heading(f"A {size} x {size} px image becomes {num_image} tokens: {grid} x {grid} patches "
                 f"of {patch} x {patch} px, numbered in reading order", [
            f"CLIP ViT-L/{patch}'s patch embedding cuts the image into {patch} x {patch} px "
            f"squares: {size} / {patch} = {grid} per side, {grid} x {grid} = {num_image} tokens.",
            f"flatten(2) reads them row by row: patch i sits in row i // {grid}, column i % "
            f"{grid}, and at position {first} + i of the prompt."]),
        text(left, top - 8, f"the image, {size} x {size} px, one square per {patch} x {patch} "
                            "px patch", 12),
        *grid_of_cells(left, top, cell, [[shades[row % 2]] * grid for row in range(grid)]),
        *(line(left + i * cell, top, left + i * cell, top + side, "white", stroke_width=0.6)
          for i in range(1, grid)),
        rect(left, top, side, side),
        *(text(left + (i % grid + 0.5) * cell, top + (i // grid + 0.5) * cell + 2.5, str(i), 6.5,
               "middle") for i in range(num_image))]
    for row in range(grid):  # where each row of the image goes in the prompt
        start = row * grid
        elements.append(text(left + side + 14, top + (row + 0.5) * cell + 4,
                             f"row {row}: patches {start}-{start + grid - 1} -> positions "
                             f"{first + start}-{first + start + grid - 1}", 11))
    y, widths = top + side + 70, (70, 30, 110)  # the prompt: system, one image row, question
    x_image, x_question = left + widths[0], left + widths[0] + grid * widths[1]
    elements += [
        arrow(left + side / 2, top + side + 4, x_image + grid * widths[1] / 2, y - 4),
        text(left + side / 2 + 10, top + side + 34, "row by row", 12),
        *token_box(left, y, widths[0], f"{first} system", "system"),
        *(rect(x_image + row * widths[1], y, widths[1], 26, fill=shades[row % 2], stroke="none")
          for row in range(grid)),
        text(x_image + widths[1] / 2, y - 6, "row 0", 10, "middle"),
        text(x_question - widths[1] / 2, y - 6, f"row {grid - 1}", 10, "middle"),
        text(x_image + grid * widths[1] / 2, y + 17, f"{num_image} image tokens", 12, "middle",
             font_weight="bold"),
        *token_box(x_question, y, widths[2], f"{len(QUESTION_TOKENS)} question", "instruction")]
    for x, position, anchor in ((left, 0, "start"), (x_image, first, "start"),
                                (x_question - 2, first + num_image - 1, "end"),
                                (x_question + 2, first + num_image, "start"),
                                (x_question + widths[2], num_tokens - 1, "end")):
        elements.append(text(x, y + 42, str(position), 11, anchor))
    system, question = ("".join(pieces).replace("▁", " ").replace("<0x0A>", "\\n").strip()
                        for pieces in (SYSTEM_TOKENS, QUESTION_TOKENS))
    elements += lines_of_text(left, y + 70, [
        f"The prompt, {num_tokens} positions (prompt.py): \"{system}\", the {num_image} patches "
        f"row by row, \"{question}\". The bottom row sits",
        f"right before the question, the top row {grid * (grid - 1)} positions further back. "
        f"Numbers from config_by_name(\"{MODEL}\"): image_size {size}, patch_size {patch}."], 11)
    return document(950, y + 100, "An image cut into patches, numbered row by row, and where "
                                  "they sit in the prompt", elements)


# ------------------------------------------------------------------------------------------------
# 3. A toy model that runs for real: the prompt before and after pruning, the mask, the KV cache.

TOY_GRID, TOY_SEED = 4, 0  # a 4 x 4 image: 16 image tokens instead of 576, so that every box fits
# the toy prompt's tokens as the figures write them: the pieces, p0 .. p15 for the patches
TOY_LABELS = [piece.replace("<0x0A>", "\\n") for piece in
              (*SYSTEM_TOKENS, *(f"p{patch}" for patch in range(TOY_GRID**2)), *QUESTION_TOKENS)]


def toy_llava():
    """A random LLaVA with a TOY_GRID x TOY_GRID patch image and a small 4-layer decoder: FastV runs
    for real on it. Its weights are drawn here (normal, std 0.08; biases 0), not by torch's
    initializers, so they never change."""
    model = Llava(LlavaConfig(
        text=TextConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, max_position_embeddings=64),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, image_size=14 * TOY_GRID, patch_size=14),
        image_token_id=63, pad_token_id=62)).eval()
    generator = torch.Generator().manual_seed(TOY_SEED)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.08)
            elif name.endswith("bias"):
                parameter.zero_()
    model.init_rope()
    return model


@torch.inference_mode()
def toy_prefill(fastv):
    """A prefill of the toy prompt (laid out as prompt_kinds says; random pixels) into a real
    KVCache (model.new_cache, with room for one answer token): the cache, and per decoder layer the
    position ids of the tokens it ran on, in the order it stored them in its slots, read with the
    model's `observe` hook."""
    model = toy_llava()
    config, words = model.config, itertools.count(1)  # any text ids: the weights are random
    input_ids = torch.tensor([[config.image_token_id if kind == "image" else next(words)
                               for kind in prompt_kinds(config.image_tokens_per_image)]])
    size, generator = config.vision.image_size, torch.Generator().manual_seed(TOY_SEED)
    cache = model.new_cache(input_ids, fastv, room=1)
    positions = []  # per layer, in order: [position of each token it ran on]
    model(input_ids, torch.randn(1, 3, size, size, generator=generator), cache=cache, fastv=fastv,
          observe=lambda view: positions.append(view.positions[0].tolist()))
    return cache, positions


def pruning_sequence_svg():
    fastv, num_image = FastV(), TOY_GRID**2
    _, positions = toy_prefill(fastv)
    before, after = positions[0], positions[fastv.k]
    kinds, real_image = prompt_kinds(num_image), CONFIG.image_tokens_per_image
    step, left = 30, 20
    elements = heading(f"FastV (K={fastv.k}, R={fastv.r:g}) on a toy prompt: every token keeps "
                       "its ORIGINAL position id", [
        f"LLaVA-1.5's prompt with a {TOY_GRID} x {TOY_GRID}-patch image ({num_image} image tokens "
        f"instead of {real_image}): numbers in the boxes are the position ids, under them the "
        "token"])
    for y, title, positions in (
            (90, f"layers 0-{fastv.k - 1}: all {len(before)} tokens", before),
            (190, f"layers {fastv.k}-: {len(after)} tokens, gaps where image tokens were dropped",
             after)):
        elements.append(text(left, y - 10, title, 12, font_weight="bold"))
        for position in positions:
            elements += token_box(left + position * step, y, step - 4, str(position),
                                  kinds[position], TOY_LABELS[position])
        for position in sorted(set(before) - set(positions)):
            elements.append(rect(left + position * step, y, step - 4, 26, stroke=GREY,
                                 stroke_dasharray="3,3"))
    elements += lines_of_text(left, 270, [
        f"Which {fastv.num_keep(num_image)} image tokens survive is decided by fastv_rule "
        "on a toy model with random weights (model.py's forward, recorded);",
        "the position ids are the ones Llava.forward passes to RoPE before and after the cut. "
        "Renumbering the survivors 0, 1, 2, ... would show layer K",
        f"a prompt the model never saw in training. In LLaVA-1.5 the same prompt has "
        f"{len(SYSTEM_TOKENS)} + {real_image} + {len(QUESTION_TOKENS)} = "
        f"{prompt_length(real_image)} tokens."], 11)
    return document(left * 2 + len(before) * step, 330,
                    "A prompt before and after FastV's pruning, with position ids", elements)


def causal_mask(num_image):
    """The mask of the one-image prompt with `num_image` patches, (T, T) bool, True where a query
    (row) may attend to a key (column): model.visible_keys, as attention_rows applies it."""
    num_tokens = prompt_length(num_image)
    return visible_keys(torch.ones(1, num_tokens, dtype=torch.long), num_tokens)[0, 0]


def patch_voters(num_image):
    """How many image rows and how many question rows of the mask see the first (top-left) and
    the last (bottom-right) patch: [(image rows, question rows), (...)]."""
    seen_by, kinds, first = causal_mask(num_image), prompt_kinds(num_image), len(SYSTEM_TOKENS)
    return [tuple(sum(seen_by[row, column].item() for row, kind in enumerate(kinds) if kind == want)
                  for want in ("image", "instruction"))
            for column in (first, first + num_image - 1)]


def causal_votes_svg():
    num_image, real_image = TOY_GRID**2, CONFIG.image_tokens_per_image
    seen_by, kinds, first = causal_mask(num_image), prompt_kinds(num_image), len(SYSTEM_TOKENS)
    num_tokens, last_patch = len(kinds), first + num_image - 1
    cell, left, top = 14, 70, 150
    side = num_tokens * cell
    colors = [[LIGHT_COLORS[kinds[key]] if seen else "white" for key, seen in enumerate(row)]
              for row in seen_by.tolist()]
    elements = [
        *heading("The causal mask of a toy prompt: which tokens can vote for a patch, and FastV's "
                 "one vote", [f"LLaVA-1.5's prompt with a {TOY_GRID} x {TOY_GRID}-patch image "
                              f"({num_image} image tokens instead of {real_image}), one row and "
                              "one column per token;",
                              "drawn from model.visible_keys, the mask attention_rows applies"]),
        text(left + side / 2, top - 52, "keys (columns): the token attended to", 11, "middle"),
        text(16, top + side / 2, "queries (rows)", 11, "middle",
             transform=f"rotate(-90 16 {number(top + side / 2)})"),
        *grid_of_cells(left, top, cell, colors), rect(left, top, side, side)]
    for index, label in enumerate(TOY_LABELS):  # row labels left, column labels above, turned
        x, y = left + (index + 0.5) * cell, top + (index + 0.5) * cell
        elements += [text(left - 4, y + 3, label, 8, "end"),
                     text(x + 3, top - 4, label, 8, transform=f"rotate(-90 {number(x + 3)} "
                                                              f"{number(top - 4)})")]
    for boundary in (first, first + num_image):  # system | image | question
        at = boundary * cell
        elements += [line(left + at, top, left + at, top + side, GREY),
                     line(left, top + at, left + side, top + at, GREY)]
    elements += [rect(left + column * cell, top, cell, side, stroke_width=2,
                      stroke_dasharray="4 2") for column in (first, last_patch)]
    elements.append(rect(left, top + side - cell, side, cell, stroke=RED, stroke_width=2.5))
    (top_image, top_text), (bottom_image, bottom_text) = patch_voters(num_image)
    (real_top, _), (real_bottom, real_text) = patch_voters(real_image)
    notes = left + side + 24
    elements += lines_of_text(notes, top + 8, [
        "A row is a query, a column a key. A colored cell: the",
        "query may attend to the key, itself and every earlier",
        "token. Color: the key's kind (system, image, question)."], 11)
    elements += lines_of_text(notes, top + 72, [
        "FastV's vote (red): the LAST row only, the last prompt",
        "token's attention in layer K-1. It sees every patch."], 11, fill=RED)
    elements += lines_of_text(notes, top + 120, [
        f"Dashed: {TOY_LABELS[first]}, the top-left patch, first in the sequence:",
        f"{top_image} image rows and {top_text} question rows see it.",
        f"{TOY_LABELS[last_patch]}, the bottom-right patch, last in the sequence:",
        f"{bottom_image} image row (its own) and the same {bottom_text} question rows.",
        f"The {first} system rows come before the image: they see no",
        "patch. Every question row sees every patch."], 11)
    elements += lines_of_text(notes, top + 240, [
        f"In LLaVA-1.5 ({real_image} patches): the top-left patch is",
        f"seen by {real_top} image rows, the bottom-right by {real_bottom}; both",
        f"by the {real_text} question rows. Which rows may vote for a top",
        "patch, which for a bottom one: homework, exercise 1."], 11)
    return document(notes + 340, top + side + 30,
                    "The causal mask of a toy prompt and FastV's last-row vote", elements)


def cache_slots_svg():
    fastv, num_image = FastV(), TOY_GRID**2
    cache, positions = toy_prefill(fastv)
    kinds, k, last_layer = prompt_kinds(num_image), fastv.k, len(positions) - 1
    step, left, top, pitch = 26, 120, 110, 56  # pitch: from one layer's row to the next
    slots = [keys.shape[2] for keys in cache.keys]  # each layer's capacity: prompt and room
    written = [int(cache.length[group]) for group in cache.group]  # the next token's slot
    kept = (cache.kept_image_tokens[0] + len(SYSTEM_TOKENS)).tolist()
    real_image = CONFIG.image_tokens_per_image
    real_tokens = prompt_length(real_image)
    elements = [
        *heading(f"The KV cache after a prefill with FastV (K={k}, R={fastv.r:g}): a slot is not a "
                 "position", [
            f"Measured on the toy ({TOY_GRID} x {TOY_GRID}-patch image, {len(positions)} decoder "
            "layers): model.new_cache(input_ids, FastV(), room=1), then a prefill into it; in each "
            "slot the position id",
            "of the token it holds (LayerView.positions, from the observe hook); slots left to "
            "right, 0 first. Red line: a gap in the position ids."]),
        text(left - 10, top - 12, "slot", 10, "end", fill=GREY),
        *(text(left + slot * step + (step - 4) / 2, top - 12, str(slot), 10, "middle", fill=GREY)
          for slot in range(max(slots)))]
    for layer, layer_positions in enumerate(positions):
        y = top + layer * pitch
        elements += [text(left - 10, y + 12, f"layer {layer}", 12, "end", font_weight="bold"),
                     text(left - 10, y + 26, f"{slots[layer]} slots", 10, "end")]
        for slot, position in enumerate(layer_positions):
            elements += token_box(left + slot * step, y, step - 4, str(position), kinds[position])
            if slot and position - layer_positions[slot - 1] > 1:
                elements.append(line(left + slot * step - 2, y - 4, left + slot * step - 2,
                                     y + 30, RED, stroke_width=2))
        for slot in range(written[layer], slots[layer]):
            elements += [rect(left + slot * step, y, step - 4, 26, stroke=GREY,
                              stroke_dasharray="3,3"),
                         text(left + slot * step + (step - 4) / 2, y + 17, "next", 8, "middle")]
    elements += lines_of_text(20, top + len(positions) * pitch + 10, [
        f"Layers 0-{k - 1}: all {written[0]} prompt tokens in slots 0-{written[0] - 1}, slot = "
        f"position. Layers {k}-{last_layer}: the {written[-1]} survivors in slots "
        f"0-{written[-1] - 1}, each with its ORIGINAL position id",
        f"(the kept image tokens: positions {', '.join(map(str, kept))}, cache.kept_image_tokens "
        f"+ {len(SYSTEM_TOKENS)}). The next token, position {int(cache.next_position[0])} "
        "(cache.next_position),",
        f"goes to slot {written[0]} in layers 0-{k - 1} and to slot {written[-1]} in layers "
        f"{k}-{last_layer}.",
        f"In LLaVA-1.5-7B with one image ({real_tokens} tokens): layers 0-{k - 1} hold "
        f"{real_tokens} slots, layers {k}-{CONFIG.text.num_hidden_layers - 1} hold "
        f"{kept_tokens(real_tokens, real_image, fastv.r)}, each with room for the answer."], 11)
    return document(left + max(slots) * step + 20, top + len(positions) * pitch + 82,
                    "The KV cache's slots after FastV, each with its position id", elements)


# ------------------------------------------------------------------------------------------------
# 4. RoPE's decay with distance, and where the image tokens sit from the last prompt token.


def rope_similarity(distance, text_config):
    """Mean over the rotary frequency pairs of cos(distance x frequency), in float64: RoPE's factor
    on q . k when the query and the key are one and the same vector of ones. rope_tables (model.py)
    holds the same angles in float32."""
    pairs = text_config.head_dim // 2
    frequencies = [text_config.rope_theta ** (-2 * pair / text_config.head_dim)
                   for pair in range(pairs)]
    return sum(math.cos(distance * frequency) for frequency in frequencies) / pairs


def rope_decay_svg():
    text_config, num_image = CONFIG.text, CONFIG.image_tokens_per_image
    grid, head_dim = CONFIG.vision.grid_size, text_config.head_dim
    # distances[row][column]: how many positions patch (row, column) sits before the last token
    last = prompt_length(num_image) - 1 - len(SYSTEM_TOKENS)  # the last token, from patch 0
    distances = [[last - row * grid - column for column in range(grid)] for row in range(grid)]
    nearest, farthest, max_distance = distances[-1][-1], distances[0][0], 640
    left, top, width, height = 70, 90, 800, 300
    x_of = lambda distance: left + distance / max_distance * width  # data to pixels
    y_of = lambda value: top + (1 - value) / 1.2 * height  # the y axis runs from -0.2 to 1
    curve = [(x_of(d), y_of(rope_similarity(d, text_config))) for d in range(max_distance + 1)]
    elements = [
        *heading("RoPE turns a key away from the query the further back it sits", [
            f"Llama's head_dim {head_dim}, rope_theta {text_config.rope_theta:g}. Plotted: the "
            f"mean over the {head_dim // 2} frequency pairs of cos(distance x frequency),",
            "RoPE's factor on q . k when the query and the key are one and the same vector (of "
            "ones)."], y=24),
        rect(x_of(nearest), top, x_of(farthest) - x_of(nearest), height, fill=ORANGE,
             fill_opacity=0.15, stroke="none"),
        text(x_of((nearest + farthest) / 2), top + 16,
             f"the {num_image} image tokens of LLaVA-1.5's prompt", 12, "middle"),
        *axes(left, top, width, height,
              [(y_of(value), f"{value:g}") for value in (-0.2, 0, 0.2, 0.4, 0.6, 0.8, 1)],
              [(x_of(distance), str(distance)) for distance in range(0, max_distance + 1, 100)],
              "distance from the last prompt token (positions)"),
        polyline(curve, BLUE, stroke_width=1.5)]
    middles = [sum(row) / grid for row in distances]  # a dot per image row, at its mean distance
    row_means = [sum(rope_similarity(d, text_config) for d in row) / grid for row in distances]
    elements += [dot(x_of(middle), y_of(mean), RED) for middle, mean in zip(middles, row_means)]
    for row, anchor, value in ((grid - 1, "start", 0.68), (0, "end", 0.08)):  # above, below
        where = "bottom row, nearest the question" if row else "top row, farthest"
        elements.append(text(x_of(middles[row]), y_of(value),
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
# 5. FLOPs and measured time against R, from the bench's JSON (this script never runs the bench).
# Its tables are keyed by setting, "no_fastv" or "K2_R0.5": cli.setting_of reads k and r back.


def by_r(table):
    """{R: value} of a bench table's FastV settings ("no_fastv" left out: it is no R)."""
    return {cli.setting_of(name)[1]: value for name, value in table.items() if name != "no_fastv"}


def time_ratios(prefill_ms, baseline="no_fastv"):
    """{R: prefill time at the baseline (no FastV) / at R}, at the R values the table measured."""
    return {r: prefill_ms[baseline] / ms for r, ms in by_r(prefill_ms).items()}


def read_bench(path):
    """The JSON the bench wrote, once its prefill table and FLOPs prediction read as such."""
    try:
        results = json.loads(Path(path).read_text())
        time_ratios(results["prefill_ms"]), by_r(results["predicted_speedup"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        raise UsageError(f"--bench {path} is not a JSON file written by python -m minifastv.bench "
                         f"--json ({type(error).__name__}: {error}).") from None
    return results


def ratio_chart(left, top, width, height, series, k):
    """Axes from 0x to the next half above the data, then a line per series through the R values
    it has, and no other (nothing assumed in between). series: [(name, color, dashes, {R: value},
    dy)]: each value written dy px below its point (dy None: the last one only, to its right)."""
    rs = sorted({r for *_, values, _ in series for r in values})
    top_value = math.ceil(max(max(values.values()) for *_, values, _ in series) * 2) / 2
    x_of = lambda r: left + 40 + r / max(rs) * (width - 80)  # data to pixels
    y_of = lambda value: top + (1 - value / top_value) * height
    elements = axes(left, top, width, height,
                    [(y_of(step / 2), f"{step / 2:g}x") for step in range(int(top_value * 2) + 1)],
                    [(x_of(r), f"{r:g}") for r in rs],
                    f"R, the share of image tokens dropped at layer {k}")
    legend_y, end_ys = top + 20, []  # end_ys: the y of each end value written so far
    for name, color, dashes, values, dy in series:
        style = {"stroke_dasharray": dashes} if dashes else {}
        points = [(x_of(r), y_of(value), value) for r, value in sorted(values.items())]
        elements.append(polyline([point[:2] for point in points], color, stroke_width=2, **style))
        elements += [dot(x, y, color) for x, y, _ in points]
        for x, y, value in points if dy is not None else points[-1:]:
            x, y, anchor = (x, y + dy, "middle") if dy is not None else (x + 8, y + 4, "start")
            while dy is None and any(abs(y - other) < 11 for other in end_ys):
                y += 12  # two lines ending at the same value: the second's below the first's
            end_ys.append(y)
            elements.append(text(x, y, f"{value:.2f}x", 11, anchor, fill=color))
        elements += [line(left + width + 30, legend_y, left + width + 56, legend_y, color,
                          stroke_width=2, **style),
                     *lines_of_text(left + width + 62, legend_y + 4, name.split("\n"), 11)]
        legend_y += 14 * len(name.split("\n")) + 10
    return elements


def slow_unpruned_notes(name, timings, k, tail="."):
    """[a sentence] when no FastV came out visibly slower (1.01x or more) than R=0, which does
    strictly more work (the same layers on the same tokens, and the scoring). Why is not known
    from the JSON, so the sentence names no cause."""
    r0 = timings.get(f"K{k}_R0")
    if r0 is None or round(timings["no_fastv"] / r0, 2) <= 1:
        return []
    return [f"{name}: without FastV took {timings['no_fastv']:.1f} ms, longer than R=0 "
            f"({r0:.1f} ms), which does strictly more work: measured, not explained{tail}"]


def first_pruned_layer(results):
    """FastV's K in the bench's settings."""
    return next(cli.setting_of(name)[0] for name in results["prefill_ms"] if name != "no_fastv")


def flops_and_time_svg(bench_path=BENCH_JSON):
    results = read_bench(bench_path)
    prefill_ms, k = results["prefill_ms"], first_pruned_layer(results)
    left, top, width, height = 80, 90, 560, 280
    elements = [
        *heading(f"FastV (K={k}), {results['device']}: the prefill's measured speed-up against R, "
                 "and the FLOPs' prediction", [
            f"{Path(bench_path).name}, measured on {results['machine']}: device "
            f"{results['device']}, {results['dtype']}, torch {results['torch']}",
            f"median of {results['repeats']} prefills per setting; model: {results['model']} "
            f"(python -m minifastv.bench), {results['prompt_tokens']} prompt tokens, "
            f"{results['image_tokens']} of them image"]),
        *ratio_chart(left, top, width, height, [
            ("predicted: computed from\nthe exact FLOPs count", BLUE, None,
             by_r(results["predicted_speedup"]), -10),
            ("measured: prefill time\nwithout FastV / with", RED, None, time_ratios(prefill_ms),
             18)], k)]
    elements += lines_of_text(left + width + 30, top + 110, [
        "measured prefill times:", f"without FastV: {prefill_ms['no_fastv']:.0f} ms",
        *(f"R={r:g}: {ms:.0f} ms" for r, ms in by_r(prefill_ms).items()),
        "(R=0 scores, keeps every token)"], 11)
    notes = slow_unpruned_notes("this run", prefill_ms, k, "; not FastV's speed-up.")
    elements += lines_of_text(20, top + height + 70, notes, 11)
    return document(left + width + 230, top + height + 60 + 26 * bool(notes),
                    "Predicted and measured prefill speed-up against R", elements)


GPU_BENCH_JSONS = {mode: FIGURES / f"bench-h200-{mode}.json" for mode in ("eager", "compiled")}


def gpu_time_svg(bench_paths=GPU_BENCH_JSONS):
    """The same on a fast GPU, eager and compiled, batch 1 and batch 8: FLOPs are not time. Each
    line runs through the R values its run measured, and no other. A table with R=0 is drawn
    against it (FastV's pruning alone: the scoring on both sides), batch 8, which has none, against
    no FastV; the legend says which."""
    runs = {mode: read_bench(path) for mode, path in bench_paths.items()}
    eager, k = runs["eager"], first_pruned_layer(runs["eager"])
    series = [("predicted: computed from\nthe exact FLOPs count", BLUE, None,
               by_r(eager["predicted_speedup"]), None)]
    unpruned, at_r0, notes = [], [], []  # prefill times without FastV, at R=0; what is unexplained
    for mode, color in (("eager", RED), ("compiled", ORANGE)):
        for batch, table, dashes in (("1", "prefill_ms", None), ("8", "prefill_ms_batch8", "6 4")):
            timings, name = runs[mode][table], f"{mode} run, batch {batch}"
            baseline = f"K{k}_R0" if f"K{k}_R0" in timings else "no_fastv"
            unpruned.append(f"{name}: {timings['no_fastv']:.1f} ms")
            at_r0 += [f"{name}: {timings[baseline]:.1f} ms"] if baseline != "no_fastv" else []
            notes += slow_unpruned_notes(name, timings, k)
            if mode == "compiled" and batch == "1":  # the bench of 2026-11-26 timed it uncompiled:
                name += "\n(timed uncompiled)"  # drop this with the next run's JSON
            name += f"\ntime {'without FastV' if baseline == 'no_fastv' else 'at R=0'} / time at R"
            series.append((name, color, dashes, time_ratios(timings, baseline), None))
    top, height = 160, 280
    decode = {mode: runs[mode]["decode_tokens_per_s"]["no_fastv"] for mode in runs}
    elements = [
        *heading(f"FLOPs are not time: the prefill on an {eager['device']} against the FLOPs' "
                 "prediction, batch 1 and 8", [
            f"Measured on an {eager['device']} ({eager['machine']}), {eager['dtype']}, torch "
            f"{eager['torch']}, median of {eager['repeats']}:",
            f"python -m minifastv.bench --model {eager['model']} [--compile], random weights in "
            f"the real 7B shape, {eager['prompt_tokens']} tokens ({eager['image_tokens']} image), "
            f"K={k}.",
            "Plotted, only at the R values each run measured: batch 1, prefill time at R=0 "
            "(scores, drops nothing) / at R; batch 8 (no R=0 run), without FastV / at R.",
            f"Without FastV: {'; '.join(unpruned)}.", f"At R=0: {'; '.join(at_r0)}."]),
        *ratio_chart(80, top, 560, height, series, k),
        *lines_of_text(20, top + height + 70, [
            *notes, f"Decode, batch 1, measured: eager {decode['eager']:.0f}, compiled "
                    f"{decode['compiled']:.0f} tokens/s; its floor, computed (weight bytes / "
                    f"measured copy bandwidth): {eager['decode_floor_tokens_per_s']:.0f}."], 12)]
    return document(960, top + height + 90 + 16 * len(notes), "The prefill on a GPU against "
                    "the FLOPs' prediction, eager and compiled, batch 1 and 8", elements)


# ------------------------------------------------------------------------------------------------
# 6. Kept patches by rule, on synthetic queries and keys placed where LLaVA-1.5's prompt puts them.

RULES = {"FastV (last-token attention)": fastv_rule, "FastV without RoPE": no_rope_rule,
         "uniform grid": grid_rule, "random": random_rule}  # minifastv's rules, by what they do


def saliency_map(grid):
    """A made-up "object", (grid, grid) float64: a bright blob above the centre on a dim background,
    off the grid's axes of symmetry so that no two patches tie."""
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
    num_tokens, first = prompt_length(num_image), len(SYSTEM_TOKENS)
    image_positions = torch.arange(first, first + num_image)[None]  # (1, N)
    raw_queries = torch.ones(1, 1, num_tokens, head_dim)  # (B, H, T, D): one head
    raw_keys = torch.zeros(1, 1, num_tokens, head_dim)
    raw_keys[0, 0, image_positions[0]] = saliency_map(grid).flatten().float()[:, None]  # (N, D)
    # (B, 1, T, D): the angles of positions 0 .. T-1
    cos, sin = (table[None, None, :num_tokens] for table in rope_tables(config.text, "cpu"))
    queries, keys = apply_rope(raw_queries, cos, sin), apply_rope(raw_keys, cos, sin)
    every_token = torch.ones(1, num_tokens, dtype=torch.long)
    return PruningInputs(
        last_token_attention=attention_rows(queries, keys, every_token)[:, :, -1],
        image_positions=image_positions, num_keep=fastv.num_keep(num_image),
        grid_size=grid, is_video=torch.zeros(1, num_image, dtype=torch.bool),
        frame=torch.zeros(1, num_image, dtype=torch.long), patch=torch.arange(num_image)[None],
        hidden_states=None, queries=queries, keys=keys, cos=cos, sin=sin,
        attention_mask=every_token)


def kept_by_rule(fastv):
    """{title in RULES: (grid, grid) bool, True where the rule keeps the patch}, on those inputs."""
    inputs, grid = synthetic_pruning_inputs(CONFIG, fastv), CONFIG.vision.grid_size
    kept = {}
    for title, rule in RULES.items():
        is_kept = torch.zeros(grid * grid, dtype=torch.bool)
        with torch.random.fork_rng():  # random_rule draws from torch's global generator: seed it
            torch.manual_seed(0)
            is_kept[rule(inputs)[0]] = True
        kept[title] = is_kept.view(grid, grid)
    return kept


def kept_patches_svg():
    fastv, grid = FastV(), CONFIG.vision.grid_size
    cell, gap, left, top = 7, 36, 20, 90
    side, half = cell * grid, grid // 2
    panels = [("saliency (made up)", None), *kept_by_rule(fastv).items()]
    elements = heading(f"Which of the {grid} x {grid} patches each rule keeps at R={fastv.r:g} "
                       "(kept: orange, dropped: dark)", [
        "SYNTHETIC, not the 7B model: the last token's query is a vector of ones, each image key "
        "that vector times the made-up saliency (left);",
        "RoPE at the real positions of LLaVA-1.5's prompt. The rules are minifastv's own "
        "(model.py, rules.py), run on these queries and keys."])
    for index, (name, is_kept) in enumerate(panels):
        x0 = left + index * (side + gap)
        if is_kept is None:  # bright: salient, in 16 shades of grey
            shades = (saliency_map(grid) * 16).round().mul(255 / 16).round().int().tolist()
            colors = [[f"rgb({shade},{shade},{shade})" for shade in row] for row in shades]
            subtitles = ["bright: salient"]
        else:
            colors = [[ORANGE if keeps else "#333333" for keeps in row] for row in is_kept.tolist()]
            subtitles = [f"{int(is_kept.sum())} of {grid * grid} kept:",
                         f"top half {int(is_kept[:half].sum())}, bottom half "
                         f"{int(is_kept[half:].sum())}"]
        elements += [text(x0, top - 6, name, 11, font_weight="bold"),
                     *grid_of_cells(x0, top, cell, colors),
                     rect(x0, top, side, side), *lines_of_text(x0, top + side + 16, subtitles, 11)]
    (fastv_name, with_rope), (no_rope_name, without_rope) = panels[1:3]
    extra_rows = (with_rope & ~without_rope).nonzero()[:, 0]
    elements += lines_of_text(left, top + side + 60, [
        f"{fastv_name} keeps {int(with_rope[half:].sum())} of its {int(with_rope.sum())} patches "
        f"in the bottom half, {no_rope_name} {int(without_rope[half:].sum())}: RoPE's decay "
        "(rope_decay.svg) pulls the choice toward",
        f"the question. The two share {int((with_rope & without_rope).sum())} patches; FastV's "
        f"other {len(extra_rows)} all lie in rows {int(extra_rows.min())}-{int(extra_rows.max())} "
        f"(of 0-{grid - 1}). The uniform grid and random do not look at the attention.",
        "The same picture on the real model and the cat photo (needs the 7B weights, a 14 GB "
        "download): python -m minifastv.analyze  ->  analysis/kept_patches.png"], 11)
    return document(left * 2 + len(panels) * side + (len(panels) - 1) * gap, top + side + 112,
                    "Kept patches by rule on synthetic queries and keys", elements)


# ------------------------------------------------------------------------------------------------
# The command line.


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minifastv.figures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(FIGURES),
                        help="folder for the SVG files (default: minifastv/assets/figures)")
    parser.add_argument("--bench", default=str(BENCH_JSON),
                        help="the bench's JSON for flops_and_time.svg (default: "
                             "minifastv/assets/figures/bench-cpu.json)")
    cli.add_version_argument(parser)
    args = parser.parse_args(argv)
    # first: a bad --bench is refused before anything is written
    flops_and_time = flops_and_time_svg(args.bench)
    cli.check_output(args.out, "--out", folder=True)
    figures = {"architecture.svg": architecture_svg(), "patch_grid.svg": patch_grid_svg(),
               "pruning_sequence.svg": pruning_sequence_svg(),
               "causal_votes.svg": causal_votes_svg(), "cache_slots.svg": cache_slots_svg(),
               "rope_decay.svg": rope_decay_svg(), "flops_and_time.svg": flops_and_time,
               "gpu_time.svg": gpu_time_svg(), "kept_patches.svg": kept_patches_svg()}
    for name, svg in figures.items():
        cli.write_output(Path(args.out) / name, svg)
        print(f"wrote {Path(args.out) / name}")


def command(argv=None):
    return cli.report_errors(main, argv)


if __name__ == "__main__":
    sys.exit(command())
