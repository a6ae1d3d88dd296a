"""Where does the attention go? The FastV paper's Sec. 3 analysis, and which patches FastV keeps.

    python -m minifastv.analyze --image photo.jpg --prompt "What is on the table?"

1. Generate an answer, then run the model once over prompt + answer and, after each decoder layer
   (the model's `observe` hook), split the answer tokens' attention over four classes of tokens:
   the allocation table, a stacked-bar chart, and the full attention map of a few layers (log
   scale), one layer at a time.
2. Prune with FastV (K, R) under several rules and dim the dropped patches over the image, one
   row per image and video frame.

The tables go to the terminal, the three pictures (attention_allocation.png,
attention_heatmaps.png, kept_patches.png) into --out: analysis/ in the current folder unless you
name another.
"""

import argparse
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from . import cli
from .errors import UsageError
from .generation import generate
from .image import ImageProcessorConfig
from .model import FastV, attention_rows, fastv_rule, visual_layout
from .rules import grid_rule, no_rope_rule, random_rule

# The paper's four token classes. "system" is what comes before the first image: with llava-hf's
# template (--system none, the default) <s> and "USER: ", 5 tokens (<s> ▁US ER : ▁); the paper's
# template also had "A chat between a curious human and an artificial intelligence assistant..."
# there, which --system llava_v1 puts back.
CLASSES = ("system", "image", "instruction", "output")  # drawn blue, orange, green, red:
CLASS_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))
RULES = (fastv_rule, no_rope_rule, random_rule, grid_rule)
RULE_TITLES = {fastv_rule: "FastV", no_rope_rule: "FastV without RoPE", random_rule: "random",
               grid_rule: "uniform grid"}  # the kept-patch picture's column titles
FONT = ImageFont.load_default(size=14)
HEATMAP_SIZE = 512  # pixels per heatmap: longer sequences are average-pooled down to this
DIM = 0.3  # a pruned patch keeps 30% of its brightness
PANELS_TOP = 70  # the kept-patch picture: title and two-line captions above, the panels below

# ------------------------------------------------------------------------------------------------
# 1. Attention allocation: the answer tokens' attention rows only, one layer at a time.


def token_classes(input_ids, visual_token_ids, num_output):
    """The class of every token of prompt + answer: (T,) indices into CLASSES.

    system: every token before the first image. image: every <image> token, and every <video>
    token of Video-LLaVA (visual_token_ids: the one id or both; FastV prunes them as one pool).
    instruction: the other prompt tokens after the first image, "ASSISTANT:" included. output: the
    last num_output tokens.
    """
    ids = input_ids.reshape(-1).cpu()  # one sequence
    is_image = torch.isin(ids, torch.tensor(visual_token_ids).reshape(-1))
    if not bool(is_image.any()):
        raise ValueError("The attention analysis needs at least one image in the prompt.")
    classes = torch.full_like(ids, CLASSES.index("instruction"))
    classes[: int(is_image.nonzero()[0])] = CLASSES.index("system")
    classes[is_image] = CLASSES.index("image")
    classes[len(ids) - num_output :] = CLASSES.index("output")
    return classes


def mean_attention_matrix(queries, keys):
    """One layer's full causal attention, mean over heads: (T, T) float32. For a heatmap, one head
    at a time."""
    T, group = queries.shape[2], queries.shape[1] // keys.shape[1]  # query heads per key head (GQA)
    every_token = torch.ones(1, T, dtype=torch.long, device=queries.device)  # no padding
    total = torch.zeros(T, T, device=queries.device)
    for head in range(queries.shape[1]):
        head_keys = keys[:, head // group : head // group + 1]  # (1, 1, T, D): this head's keys
        rows = attention_rows(queries[:, head : head + 1], head_keys, every_token, num_rows=T)
        total += rows[0, 0]  # (T, T)
    return total / queries.shape[1]


@dataclass
class AttentionAllocation:
    allocation: torch.Tensor  # (L, 4): output tokens' attention share per class; rows sum to 1
    class_sizes: torch.Tensor  # (4,): how many tokens each class holds
    heatmaps: dict  # {layer: PIL image of that layer's T x T attention}

    @property
    def efficiency(self):
        return self.allocation / self.class_sizes  # (L, 4): attention per token of the class


@torch.inference_mode()
def attention_allocation(model, input_ids, pixel_values, num_output, heatmap_layers=(),
                         pixel_values_videos=None):
    """One prefill over prompt + answer (1, T), without FastV; after each decoder layer (the model's
    `observe` hook), keep only the four class shares, and the heatmaps of heatmap_layers."""
    config = model.config
    visual_ids = [i for i in (config.image_token_id, config.video_token_id) if i is not None]
    classes = token_classes(input_ids, visual_ids, num_output).to(model.device)  # (T,)
    one_hot = F.one_hot(classes, len(CLASSES)).float()  # (T, 4)
    shares, heatmaps = [], {}

    def observe(view):  # a LayerView: queries (1, H, T, D) and keys (1, H_kv, T, D) after RoPE
        rows = attention_rows(view.queries, view.keys, view.attention_mask, num_output)
        shares.append((rows @ one_hot).mean(dim=(0, 1, 2)).cpu())  # (1, H, n_out, 4) -> (4,)
        if view.index in heatmap_layers:  # this layer's T x T lives only until its picture is drawn
            matrix = mean_attention_matrix(view.queries, view.keys).cpu()  # (T, T)
            heatmaps[view.index] = attention_heatmap(matrix, classes.cpu())

    model(input_ids, pixel_values, pixel_values_videos, last_logits_only=True, observe=observe)
    return AttentionAllocation(torch.stack(shares), one_hot.sum(dim=0).cpu(), heatmaps)


def allocation_table(result):
    """One line per layer: the four allocations, then the four efficiencies (per token)."""
    names = " ".join(f"{name:>11}" for name in CLASSES)
    rows = [f"layer {names} | efficiency: {names}"]
    per_layer = zip(result.allocation.tolist(), result.efficiency.tolist())
    for layer, (shares, per_token) in enumerate(per_layer):
        allocation = " ".join(f"{share:>11.4f}" for share in shares)
        efficiency = " ".join(f"{value:>11.2e}" for value in per_token)
        rows.append(f"{layer:>5} {allocation} | {'':>11} {efficiency}")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------
# Pictures, with Pillow alone.


def pil_image(rgb):
    """(H, W, 3) uint8 tensor -> PIL RGB image."""
    data = bytes(rgb.contiguous().flatten().tolist())
    return Image.frombytes("RGB", (rgb.shape[1], rgb.shape[0]), data)


def colormap(level):
    """Levels in [0, 1] -> (..., 3) uint8 colors, dark purple to yellow (viridis, five anchors)."""
    anchors = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
    anchors = torch.tensor(anchors).float()
    position = level.clamp(0, 1) * (len(anchors) - 1)
    low = position.floor().long().clamp(max=len(anchors) - 2)
    fraction = (position - low)[..., None]
    return (anchors[low] * (1 - fraction) + anchors[low + 1] * fraction).round().to(torch.uint8)


def attention_heatmap(attention, classes, size=HEATMAP_SIZE):
    """A (T, T) attention matrix as a picture: log10 from 1e-4 (dark) to 1 (yellow), future keys
    white.

    Colored strips on the top and left edges show each token's class (the bar chart's colors).
    """
    visible = torch.ones_like(attention).tril()  # 1 where a query may look
    if attention.shape[0] > size:  # average-pool a long sequence down to size x size
        attention, visible = (F.adaptive_avg_pool2d(m[None, None], size)[0, 0]
                              for m in (attention, visible))
    rgb = colormap((attention.clamp(min=1e-4).log10() + 4) / 4)  # (t, t, 3)
    rgb[visible == 0] = 255
    strip = pil_image(torch.tensor(CLASS_COLORS, dtype=torch.uint8)[classes][None])  # (1, T) colors
    strip = strip.resize((size, 6), Image.NEAREST)
    panel = Image.new("RGB", (size + 8, size + 8), "white")
    panel.paste(pil_image(rgb).resize((size, size), Image.NEAREST), (8, 8))
    panel.paste(strip, (8, 0))
    panel.paste(strip.transpose(Image.Transpose.ROTATE_270), (0, 8))
    return panel


def legend(draw, x, y, across=False):
    """A colored square and the name of each class, in a column (or a row, across=True)."""
    for name, color in zip(CLASSES, CLASS_COLORS):
        draw.rectangle((x, y, x + 14, y + 14), fill=color)
        draw.text((x + 20, y), name, fill="black", font=FONT)
        x, y = (x + 40 + FONT.getlength(name), y) if across else (x, y + 22)


def heatmaps_figure(heatmaps, columns=3):
    """The heatmap panels of `heatmaps` ({layer: panel}) in a grid, titled, with a color scale and a
    legend."""
    side = max(panel.width for panel in heatmaps.values())
    rows = -(-len(heatmaps) // columns)
    width, height = 20 + min(columns, len(heatmaps)) * (side + 20), 40 + rows * (side + 30) + 90
    figure = Image.new("RGB", (max(width, 560), height), "white")
    draw = ImageDraw.Draw(figure)
    title = "Attention of each token (row) to earlier tokens (column), mean over heads"
    draw.text((20, 10), title, fill="black", font=FONT)
    for number, (layer, panel) in enumerate(sorted(heatmaps.items())):
        x, y = 20 + number % columns * (side + 20), 40 + number // columns * (side + 30)
        draw.text((x, y), f"layer {layer}", fill="black", font=FONT)
        figure.paste(panel, (x, y + 20))
    scale_y = height - 80
    scale = colormap(torch.linspace(0, 1, 200))[None].expand(16, -1, -1)  # (16, 200, 3)
    figure.paste(pil_image(scale), (20, scale_y))
    for label, x in (("1e-4", 20), ("1e-2", 120), ("1", 220)):
        draw.text((x, scale_y + 20), label, fill="black", font=FONT, anchor="mt")
    draw.text((240, scale_y), "attention (log scale); white: future", fill="black", font=FONT)
    legend(draw, 20, scale_y + 40, across=True)  # the classes drawn on the panels' edges
    return figure


def allocation_chart(allocation):
    """Stacked bars, one per layer: how the output tokens' attention splits over the four
    classes."""
    num_layers = allocation.shape[0]
    step = max(10, min(28, 720 // num_layers))  # pixels per bar
    left, top, plot_height = 70, 40, 300
    plot_width = step * num_layers
    title = "Where the output tokens' attention goes, per layer"
    width = max(left + plot_width + 160, int(FONT.getlength(title)) + 20)  # room: legend, title
    chart = Image.new("RGB", (width, top + plot_height + 60), "white")
    draw = ImageDraw.Draw(chart)
    draw.text((10, 10), title, fill="black", font=FONT)
    bottom = top + plot_height
    for tick in (0, 0.25, 0.5, 0.75, 1):
        y = bottom - tick * plot_height
        draw.line((left - 5, y, left, y), fill="black")
        draw.text((left - 8, y), f"{tick:g}", fill="black", font=FONT, anchor="rm")
    label_every = 1 if step >= 20 else 4
    for layer, shares in enumerate(allocation.tolist()):
        x, y = left + layer * step + 1, bottom
        for share, color in zip(shares, CLASS_COLORS):
            draw.rectangle((x, y - share * plot_height, x + step - 3, y), fill=color)
            y -= share * plot_height
        if layer % label_every == 0:
            draw.text((x + step / 2 - 1, bottom + 5), str(layer), fill="black", font=FONT,
                      anchor="mt")
    draw.line((left, top, left, bottom, left + plot_width, bottom), fill="black")
    draw.text((left + plot_width / 2, bottom + 28), "decoder layer", fill="black", font=FONT,
              anchor="mt")
    y_label = Image.new("RGB", (170, 18), "white")
    ImageDraw.Draw(y_label).text((0, 0), "share of attention", fill="black", font=FONT)
    chart.paste(y_label.rotate(90, expand=True), (4, top + plot_height // 2 - 85))
    legend(draw, left + plot_width + 20, top)
    return chart


# ------------------------------------------------------------------------------------------------
# 2. Kept patches: which image tokens survive FastV's layer K, drawn over the image.


def preprocessed_image(pixels, image_config):
    """One (3, H, W) pixel_values image back to the PIL image the model saw: normalization
    undone."""
    pixels = pixels.float().cpu()
    if image_config.do_normalize:
        mean, std = (torch.tensor(values).view(3, 1, 1)
                     for values in (image_config.image_mean, image_config.image_std))
        pixels = pixels * std + mean
    if image_config.do_rescale:
        pixels = pixels / image_config.rescale_factor
    return pil_image(pixels.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0))  # (H, W, 3)


@torch.inference_mode()
def kept_image_tokens(model, input_ids, pixel_values, fastv, pixel_values_videos=None):
    """(N_kept,) indices into the prompt's image (and video) tokens that FastV keeps, sorted: one
    prefill into a KV cache, which records them."""
    cache = model.new_cache(input_ids, fastv)
    model(input_ids, pixel_values, pixel_values_videos, cache=cache, fastv=fastv,
          last_logits_only=True)
    return cache.kept_image_tokens[0].cpu()


def kept_patch_grids(kept, input_ids, config):
    """(pictures, grid, grid) bool, True where a patch's token was kept: the images, then every
    video frame."""
    visual_ids = input_ids.reshape(-1)[config.is_visual(input_ids.reshape(-1))]
    layout = visual_layout(visual_ids[None].cpu(), config)
    is_video, frame, patch = (part[0] for part in layout)  # (N,) each
    num_images = int((~is_video).sum()) // config.image_tokens_per_image
    picture = torch.where(is_video, num_images + frame, frame)  # the images, then the frames
    grid = config.vision.grid_size
    is_kept = torch.zeros(int(picture.max()) + 1, grid * grid, dtype=torch.bool)
    kept = kept[patch[kept] >= 0]  # a CLS token stands for no patch
    is_kept[picture[kept], patch[kept]] = True
    return is_kept.view(-1, grid, grid)  # row = patch // grid, column = patch % grid


def kept_patches_panel(image, is_kept):
    """The image with its patch grid drawn over it and the pruned patches dimmed to DIM
    brightness."""
    grid_size = is_kept.shape[0]
    patch = image.width // grid_size
    pruned = Image.new("L", image.size, 0)  # 255 over the pruned patches
    for row, column in (~is_kept).nonzero().tolist():
        left, top = column * patch, row * patch
        ImageDraw.Draw(pruned).rectangle((left, top, left + patch - 1, top + patch - 1), fill=255)
    panel = Image.composite(image.point(lambda value: int(value * DIM)), image, pruned)
    draw = ImageDraw.Draw(panel, "RGBA")  # RGBA: the grid lines are half transparent
    for line in range(grid_size):  # each patch's top row and left column of pixels
        draw.line((line * patch, 0, line * patch, image.height), fill=(255, 255, 255, 90))
        draw.line((0, line * patch, image.width, line * patch), fill=(255, 255, 255, 90))
    return panel


def rule_title(rule):
    """A rule's name in words, for a picture: RULE_TITLES, or the function's name without "_rule"
    and underscores (a rule of your own, row_balanced_rule: "row balanced")."""
    return RULE_TITLES.get(rule) or rule.__name__.removesuffix("_rule").replace("_", " ")


def picture_labels(num_images, num_videos, num_frames):
    """The label of each picture in the prompt's order, the images, then every video's frames:
    "image 1", "image 2", "frame 1" .. "frame 8" ("video 2, frame 1" when there are several)."""
    labels = [f"image {number}" for number in range(1, num_images + 1)]
    for video in range(1, num_videos + 1):
        prefix = f"video {video}, " if num_videos > 1 else ""
        labels += [f"{prefix}frame {frame}" for frame in range(1, num_frames + 1)]
    return labels


def kept_patches_figure(model, input_ids, pixel_values, image_config, k, r, rules=RULES,
                        pixel_values_videos=None):
    """One column per rule, one row per image and video frame, each row labelled: the patches
    FastV(k, r, rule) keeps, the pruned ones dimmed."""
    images = [] if pixel_values is None else list(pixel_values)  # (3, H, W) each
    videos = [] if pixel_values_videos is None else list(pixel_values_videos)  # (F, 3, H, W) each
    labels = picture_labels(len(images), len(videos), len(videos[0]) if videos else 0)
    pictures = [preprocessed_image(pixels, image_config)
                for pixels in images + [frame for video in videos for frame in video]]
    side = pictures[0].width
    num_tokens = int(model.config.is_visual(input_ids).sum())  # image and video tokens
    columns = []
    for rule in rules:
        torch.manual_seed(0)  # random_rule draws from torch's global generator: the same each run
        kept = kept_image_tokens(model, input_ids, pixel_values, FastV(k, r, rule=rule),
                                 pixel_values_videos)
        grids = kept_patch_grids(kept, input_ids, model.config)
        caption = f"{rule_title(rule)}\n{len(kept)} of {num_tokens} kept"
        panels = [kept_patches_panel(picture, grid) for picture, grid in zip(pictures, grids)]
        columns.append((caption, panels))
    kinds = " and ".join(kind for kind, given in (("image", images), ("video", videos)) if given)
    title = f"FastV K={k}, R={r:g}: the {kinds} tokens kept at layer {k} (pruned patches dimmed)"
    left = 10 + max(int(FONT.getlength(label)) for label in labels) + 10  # the row labels' margin
    step = max(side, *(int(FONT.getlength(line)) for caption, _ in columns
                       for line in caption.split("\n"))) + 10  # a column, as wide as its caption
    width = max(left + len(rules) * step, int(FONT.getlength(title)) + 20)
    figure = Image.new("RGB", (width, PANELS_TOP + len(pictures) * (side + 10)), "white")
    draw = ImageDraw.Draw(figure)
    draw.text((10, 8), title, fill="black", font=FONT)
    for row, label in enumerate(labels):
        draw.text((10, PANELS_TOP + row * (side + 10) + side / 2), label, fill="black", font=FONT,
                  anchor="lm")
    for number, (caption, panels) in enumerate(columns):
        x = left + number * step
        draw.multiline_text((x, 30), caption, fill="black", font=FONT)
        for row, panel in enumerate(panels):
            figure.paste(panel, (x, PANELS_TOP + row * (side + 10)))
    return figure


# ------------------------------------------------------------------------------------------------
# The command line.

DEFAULT_HEATMAP_LAYERS = (0, 1, 2, 15, 31)  # LLaVA-1.5-7B's first three layers, a middle, the last


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m minifastv.analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_version_argument(parser)
    cli.add_model_arguments(parser)
    cli.add_question_arguments(parser, max_new_tokens=32)
    cli.add_fastv_arguments(parser)
    cli.add_system_argument(parser, default="none")
    parser.add_argument(
        "--heatmap-layers", metavar="LAYERS",
        help="the layers whose full attention map to draw, counted from 0, each below the "
             "model's layer count (default 0,1,2,15,31 on a 32-layer model; on a smaller one "
             "its first three, middle and last layers, said in a note)")
    parser.add_argument(
        "--out", default="analysis", metavar="FOLDER",
        help="the folder for the three PNGs, created if missing (default analysis/ in the "
             "current folder; the repository's .gitignore leaves it out of git)")
    return parser.parse_args(argv)


def parse_heatmap_layers(text):
    """The layer numbers of --heatmap-layers ("0,1,2,15,31"), in order, checked as far as they
    can be without the model: numbers, none negative, none twice."""
    try:
        layers = [int(word) for word in text.split(",") if word.strip()]
    except ValueError:
        raise UsageError("--heatmap-layers must be comma-separated layer numbers like 0,1,2,15,31, "
                         f"got {text!r}.") from None
    if not layers or any(layer < 0 for layer in layers):
        raise UsageError("--heatmap-layers must be one or more layer numbers >= 0, "
                         f"got {text!r}.")
    twice = sorted({layer for layer in layers if layers.count(layer) > 1})
    if twice:
        raise UsageError(f"--heatmap-layers names layer {twice[0]} more than once: give each "
                         "layer once.")
    return layers


def heatmap_layers(layers, num_layers):
    """The layers to draw: --heatmap-layers (parsed; None when not given), each checked against the
    model's num_layers. The default, when it does not fit, becomes the model's first three,
    middle and last layers, with a note on stderr."""
    if layers is None:
        if max(DEFAULT_HEATMAP_LAYERS) < num_layers:
            return set(DEFAULT_HEATMAP_LAYERS)
        fitted = sorted({layer for layer in (0, 1, 2, num_layers // 2 - 1, num_layers - 1)
                         if 0 <= layer < num_layers})
        print(f"note: this model has {num_layers} decoder layers, so the heatmaps are of layers "
              f"{','.join(map(str, fitted))} instead of the default "
              f"{','.join(map(str, DEFAULT_HEATMAP_LAYERS))}.", file=sys.stderr, flush=True)
        return set(fitted)
    outside = [layer for layer in layers if layer >= num_layers]
    if outside:
        raise UsageError(f"--heatmap-layers {outside[0]} is not a layer of this model: it has "
                         f"{num_layers} decoder layers, 0 to {num_layers - 1}.")
    return set(layers)


def stage(text):
    """One line on stderr as a slow step starts, so that a long run shows where it is."""
    print(text, file=sys.stderr, flush=True)


def main(argv=None, out=None):
    out = out or sys.stdout
    args = parse_args(argv)
    # every check before the download and the load: the flags alone, the output folder, then the
    # question against the model's files
    layers = None if args.heatmap_layers is None else parse_heatmap_layers(args.heatmap_layers)
    cli.check_fastv(args.k, args.r)
    cli.check_at_least("--max-new-tokens", args.max_new_tokens)
    out_folder = cli.check_output(args.out, "--out", folder=True)  # made when writing
    question = cli.prepare_question(args)
    layers = heatmap_layers(layers, question.config.text.num_hidden_layers)
    model = cli.load_model(question.folder, question.device, question.dtype, question.towers)
    input_ids, pixel_values = question.input_ids, question.pixel_values
    videos = question.pixel_values_videos
    stage(f"answering (at most {args.max_new_tokens} new tokens)")
    answer = generate(model, input_ids, pixel_values, videos,
                      max_new_tokens=args.max_new_tokens).cpu()  # (1, n_out)
    print(f"answer: {question.tokenizer.decode(answer[0].tolist()).strip()}", file=out)
    sequence = torch.cat([input_ids, answer], dim=1)  # (1, T): prompt + answer
    stage(f"measuring the attention of {sequence.shape[1]} tokens in every layer, heatmaps of "
          f"layers {','.join(map(str, sorted(layers)))}")
    result = attention_allocation(model, sequence, pixel_values, answer.shape[1], layers, videos)
    sizes = ", ".join(f"{name} {int(size)}" for name, size in zip(CLASSES, result.class_sizes))
    if videos is not None:  # the paper's four classes: its "image" is every visual token
        sizes += " (the image class holds the video's frame tokens)"
    print(f"tokens: {sizes}\n{allocation_table(result)}", file=out)
    stage(f"pruning with FastV K={args.k}, R={args.r:g} under {len(RULES)} rules")
    image_config = ImageProcessorConfig.from_folder(question.folder)
    kept = kept_patches_figure(model, input_ids, pixel_values, image_config, args.k, args.r,
                               pixel_values_videos=videos)
    pictures = {"attention_allocation.png": allocation_chart(result.allocation),
                "attention_heatmaps.png": heatmaps_figure(result.heatmaps),
                "kept_patches.png": kept}
    out_folder.mkdir(parents=True, exist_ok=True)
    for name, picture in pictures.items():
        picture.save(out_folder / name)
        print(f"wrote {out_folder / name} ({picture.width} x {picture.height})", file=out)


def command(argv=None):
    return cli.report_errors(main, argv)


if __name__ == "__main__":
    sys.exit(command())
