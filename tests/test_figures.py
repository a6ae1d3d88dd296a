"""The course's figures (minifastv/assets/figures/): up to date with the code, well-formed SVG, and
drawing the numbers that the code, the real config.json and the bench's JSON give."""

import json
import re
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest
import torch

from minifastv import bench, figures
from minifastv.checkpoint import config_by_name, read_config
from minifastv.flops import exact_prefill_flops
from minifastv.model import FastV, apply_rope, attention_rows, rope_tables

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "minifastv" / "assets" / "figures"
NAMES = ["architecture.svg", "patch_grid.svg", "pruning_sequence.svg", "causal_votes.svg",
         "cache_slots.svg", "rope_decay.svg", "flops_and_time.svg", "gpu_time.svg",
         "kept_patches.svg"]
JSONS = ["bench-cpu.json", "bench-h200-eager.json", "bench-h200-compiled.json"]
# llava-hf's config.json, as downloaded
REAL_CONFIG = Path(__file__).resolve().parent / "data" / "llava-1.5-7b-hf"
REFERENCE_TOKENIZER = ROOT.parent / "shared" / "reference" / "llava-1.5-7b-hf"
SVG = "{http://www.w3.org/2000/svg}"


def svg_elements(name, tag):
    """Every <tag> of a committed figure, in order."""
    return list(ET.parse(FIGURES / name).getroot().iter(f"{SVG}{tag}"))


def svg_texts(name):
    """Every <text> of a committed figure, in order."""
    return [element.text for element in svg_elements(name, "text")]


def shown_in(name):
    return " | ".join(svg_texts(name))


def numbers_by_row(name):
    """The texts of a figure that are whole numbers, by their y, top to bottom, each row left to
    right: [[int, ...], ...]."""
    rows = {}
    for element in sorted(svg_elements(name, "text"), key=lambda element: float(element.get("x"))):
        if element.text.isdigit():
            rows.setdefault(float(element.get("y")), []).append(int(element.text))
    return [row for _, row in sorted(rows.items())]


def outline(name, side_cells):
    """(left, top, cell) of the square black outline of a figure's grid of side_cells x side_cells
    cells."""
    for element in svg_elements(name, "rect"):
        width, height = float(element.get("width")), float(element.get("height"))
        style = element.get("fill"), element.get("stroke"), element.get("stroke-dasharray")
        if style == ("none", "black", None) and width == height > 100:
            return float(element.get("x")), float(element.get("y")), width / side_cells
    raise AssertionError(f"{name} has no square outline")


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    figures.main(["--out", str(out)])
    return out


@pytest.fixture(scope="module")
def toy_cache():
    """The toy model's KV cache after a prefill with FastV(2, 0.5) and room for one more token, and
    the positions of the image tokens it kept: what the cache recorded, not the observe hook."""
    cache, _ = figures.toy_prefill(FastV(2, 0.5))
    return cache, (cache.kept_image_tokens[0] + 5).tolist()  # 5 system tokens come first


def test_the_committed_figures_are_up_to_date(regenerated):
    assert sorted(path.name for path in regenerated.iterdir()) == sorted(NAMES)
    for name in NAMES:
        assert (FIGURES / name).is_file(), (
            f"minifastv/assets/figures/{name} is missing: run python -m minifastv.figures.")
        assert (regenerated / name).read_bytes() == (FIGURES / name).read_bytes(), (
            f"minifastv/assets/figures/{name} is out of date with the code: run python -m "
            "minifastv.figures and commit it.")


@pytest.mark.parametrize("name", NAMES)
def test_each_figure_is_an_svg_with_a_size_and_a_title(name):
    root = ET.parse(FIGURES / name).getroot()
    assert root.tag == f"{SVG}svg"
    assert float(root.get("width")) > 0 and float(root.get("height")) > 0
    assert root.get("viewBox") == f"0 0 {root.get('width')} {root.get('height')}"
    assert root.find(f"{SVG}title").text


def test_no_title_is_a_python_name():
    """Titles and bold labels are words ("FastV without RoPE"), not identifiers (no_rope_rule)."""
    for name in NAMES:
        titles = [element.text for element in svg_elements(name, "text")
                  if element.get("font-weight") == "bold"]
        for title in titles + [svg_elements(name, "title")[0].text]:
            assert not re.search(r"[A-Za-z]_[A-Za-z]", title), f"{name}: {title}"


def test_the_readme_names_every_figure_and_the_ones_that_need_the_7b_weights():
    readme = (FIGURES / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in NAMES + JSONS)
    assert "python -m minifastv.analyze" in readme and "attention_allocation.png" in readme


def test_architecture_draws_the_real_checkpoint_numbers():
    """Read from llava-hf's own config.json (the figure reads the built-in preset): the two must
    agree."""
    config = read_config(REAL_CONFIG)
    vision, text = config.vision, config.text
    patches = (vision.image_size // vision.patch_size) ** 2
    # <s> USER: ▁, the patches, then the 12 tokens of "\nWhat animal is this? ASSISTANT:"
    tokens = 5 + patches + 12
    kept_image = patches // 2  # K=2, R=50%: FastV's defaults, the paper's setting
    shown = shown_in("architecture.svg")
    for expected in (
            f"{vision.image_size} x {vision.image_size} px", f"= {patches} + CLS token",
            f"{patches} tokens x {vision.hidden_size}", f"{patches} tokens x {text.hidden_size}",
            f"Linear {vision.hidden_size} -> {text.hidden_size}, GELU,", f"{patches} image",
            f"runs {vision.num_hidden_layers - 1} layers", f"all {tokens} tokens",
            f"{text.num_hidden_layers} layers, {text.hidden_size} wide",
            f"keep the top {kept_image}", f"{text.vocab_size} scores",
            f"layers 2-{text.num_hidden_layers - 1}: {tokens - patches + kept_image} tokens",
            f"enters layer 0: 5 system + {patches} image + 12 instruction = {tokens} tokens"):
        assert expected in shown, expected


def test_patch_grid_numbers_every_patch_in_reading_order():
    """The grid comes from llava-hf's own config.json (336 / 14 = 24), and its 576 numbers run row
    by row from the top left, each in its own cell."""
    vision = read_config(REAL_CONFIG).vision
    grid = vision.image_size // vision.patch_size
    left, top, cell = outline("patch_grid.svg", grid)
    inside = []  # (y, x, number) of the numbers drawn inside the grid
    for element in svg_elements("patch_grid.svg", "text"):
        x, y = float(element.get("x")), float(element.get("y"))
        if element.text.isdigit() and left < x < left + grid * cell and top < y < top + grid * cell:
            inside.append((y, x, int(element.text)))
    assert [patch for _, _, patch in sorted(inside)] == list(range(grid * grid)) == list(range(576))
    assert len({y for y, _, _ in inside}) == len({x for _, x, _ in inside}) == grid
    for y, x, patch in inside:  # row patch // 24, column patch % 24
        assert (int((y - top) // cell), int((x - left) // cell)) == divmod(patch, grid)
    shown = shown_in("patch_grid.svg")
    size, patch = vision.image_size, vision.patch_size
    assert (f"A {size} x {size} px image becomes {grid * grid} tokens: {grid} x {grid} patches of "
            f"{patch} x {patch} px") in shown
    assert "row 0: patches 0-23 -> positions 5-28" in shown
    assert "row 23: patches 552-575 -> positions 557-580" in shown
    assert "The prompt, 593 positions" in shown


@pytest.mark.skipif(not REFERENCE_TOKENIZER.is_dir(),
                    reason="needs ../shared/reference (the real tokenizer.json)")
def test_the_prompt_pieces_are_what_the_real_tokenizer_makes():
    from minifastv.prompt import Tokenizer, encode_prompt, format_prompt

    tokenizer = Tokenizer.from_folder(REFERENCE_TOKENIZER)
    ids = encode_prompt(tokenizer, format_prompt("What animal is this?"), 576)[0].tolist()
    pieces = [tokenizer.backend.id_to_token(token) for token in ids]
    first, last = pieces.index("<image>"), len(pieces) - pieces[::-1].index("<image>")
    assert tuple(pieces[:first]) == figures.SYSTEM_TOKENS
    assert tuple(pieces[last:]) == figures.QUESTION_TOKENS
    assert len(pieces) == figures.prompt_length(576) == 593


def test_pruning_keeps_every_text_token_and_the_original_positions(toy_cache):
    _, positions = figures.toy_prefill(FastV(2, 0.5))
    before, after = positions[0], positions[2]
    num_image = figures.TOY_GRID**2
    image = range(5, 5 + num_image)
    assert before == list(range(5 + num_image + 12))
    assert after == sorted(after)
    assert len([p for p in after if p in image]) == round(num_image * 0.5)
    assert [p for p in after if p not in image] == [p for p in before if p not in image]
    # the same survivors as the KV cache records in a prefill
    assert toy_cache[1] == [p for p in after if p in image]
    # Each kept token's id is drawn in both rows, each dropped one in the first row only.
    drawn = Counter(int(words) for words in svg_texts("pruning_sequence.svg") if words.isdigit())
    assert drawn == Counter(before + after)


def test_causal_votes_draws_the_causal_mask_and_who_sees_a_patch():
    """Row i sees columns 0..i (a lower triangle, written here without the model), each column in
    its key's color; the top-left patch (position 5) is seen by the 16 image rows and the 12
    question rows, the bottom-right (position 20) by 1 and 12."""
    num_tokens = 5 + 16 + 12
    left, top, cell = outline("causal_votes.svg", num_tokens)
    drawn = torch.zeros(num_tokens, num_tokens, dtype=torch.bool)
    colors = {}  # {column: its cells' fill}
    for element in svg_elements("causal_votes.svg", "rect"):
        x, y, fill = float(element.get("x")), float(element.get("y")), element.get("fill")
        inside = left <= x < left + num_tokens * cell and top <= y
        if element.get("stroke") == "none" and fill not in ("white", "none") and inside:
            row, first = round((y - top) / cell), round((x - left) / cell)
            columns = range(first, first + round(float(element.get("width")) / cell))
            drawn[row, columns] = True
            colors.update((column, fill) for column in columns)
    assert torch.equal(drawn, torch.ones(num_tokens, num_tokens).tril().bool())
    by_kind = [colors[0]] * 5 + [colors[5]] * 16 + [colors[21]] * 12
    assert [colors[column] for column in range(num_tokens)] == by_kind
    assert len(set(by_kind)) == 3
    red = [(float(element.get("y")), float(element.get("width")))
           for element in svg_elements("causal_votes.svg", "rect")
           if element.get("stroke") == figures.RED]
    assert red == [(top + (num_tokens - 1) * cell, num_tokens * cell)]  # the last row only
    shown = shown_in("causal_votes.svg")
    for expected in ("16 image rows and 12 question rows see it",
                     "1 image row (its own) and the same 12 question rows",
                     "seen by 576 image rows, the bottom-right by 1",
                     "FastV's vote (red): the LAST row only"):
        assert expected in shown, expected


def test_cache_slots_are_the_cache_of_a_real_prefill(toy_cache):
    """Each layer's row holds, slot by slot, the positions of the tokens its cache holds: all 33 in
    layers 0-1, the 25 survivors (text, and the kept image tokens at their original positions) in
    layers 2-3; and one free slot each."""
    cache, kept = toy_cache
    survivors = list(range(5)) + kept + list(range(21, 33))
    assert [keys.shape[2] for keys in cache.keys] == [34, 34, 26, 26] and len(survivors) == 25
    rows = numbers_by_row("cache_slots.svg")
    assert rows[0] == list(range(34))  # the slots, numbered
    assert rows[1:5] == [list(range(33)), list(range(33)), survivors, survivors]
    shown = shown_in("cache_slots.svg")
    assert shown.count("34 slots") == 2 and shown.count("26 slots") == 2
    assert svg_texts("cache_slots.svg").count("next") == 4
    assert f"positions {', '.join(map(str, kept))}, cache.kept_image_tokens + 5" in shown
    assert "position 33 (cache.next_position)" in shown
    assert "goes to slot 33 in layers 0-1 and to slot 25 in layers 2-3" in shown
    assert "layers 0-1 hold 593 slots, layers 2-31 hold 305" in shown


def test_the_rope_curve_is_rope_tables_and_the_image_sits_12_to_587_back():
    config = read_config(REAL_CONFIG)
    cos, _ = rope_tables(config.text, "cpu")
    for distance in (0, 1, 12, 100, 587, 640):
        mean = cos[distance].double().mean().item()
        assert abs(mean - figures.rope_similarity(distance, config.text)) < 1e-5
    # the last token is 592, the image 5..580: patch (row, column) sits 587 - 24 * row - column back
    row_means = [cos[592 - 5 - 24 * row - torch.arange(24)].double().mean().item()
                 for row in (0, 23)]
    shown = shown_in("rope_decay.svg")
    assert f"top row, farthest: mean {row_means[0]:.2f}" in shown
    assert f"bottom row, nearest the question: mean {row_means[1]:.2f}" in shown
    assert row_means[1] > 2 * row_means[0]  # the decay the figure is about
    assert "sits 12 positions before the last prompt token, the top-left 587" in shown


def test_flops_and_time_draws_the_bench_json_and_the_flops_prediction(monkeypatch):
    """The JSON came from the bench's default model (its prediction is recomputed here), and the
    figure draws it."""
    results = json.loads((FIGURES / "bench-cpu.json").read_text())
    # the config, no weights
    monkeypatch.setattr(bench, "random_model", lambda config, device, dtype: config)
    defaults = bench.parse_args([])
    config = bench.random_llava("cpu", torch.float32, defaults.layers, defaults.width)
    num_tokens = bench.benchmark_prompt(config, defaults.text_tokens)[0].shape[1]
    assert (results["prompt_tokens"], results["image_tokens"]) == (num_tokens, 576), (
        "bench-cpu.json is from another shape: rerun the bench")
    shown = shown_in("flops_and_time.svg")
    prefill_ms = results["prefill_ms"]
    unpruned = exact_prefill_flops(config, num_tokens, 576)
    for r in (0.0, 0.25, 0.5, 0.75):
        predicted = unpruned / exact_prefill_flops(config, num_tokens, 576, 2, r)
        assert results["predicted_speedup"][f"K2_R{r:g}"] == pytest.approx(predicted, rel=1e-12)
        assert f"{predicted:.2f}x" in shown
        assert f"{prefill_ms['no_fastv'] / prefill_ms[f'K2_R{r:g}']:.2f}x" in shown
        assert f"R={r:g}: {prefill_ms[f'K2_R{r:g}']:.0f} ms" in shown
    assert (f"bench-cpu.json, measured on {results['machine']}: device {results['device']}, "
            f"{results['dtype']}, torch {results['torch']}") in shown
    assert f"without FastV: {prefill_ms['no_fastv']:.0f} ms" in shown
    assert "not explained" not in shown  # 1.00x at R=0 in this run: no note


def test_flops_and_time_draws_the_json_it_is_given_and_nothing_else(tmp_path):
    """Every time in the figure moves with the JSON: halve the FastV times and the measured
    speed-ups double; R=0, twice as fast as no FastV, then gets a note that names no cause."""
    results = json.loads((FIGURES / "bench-cpu.json").read_text())
    halved = {name: ms if name == "no_fastv" else ms / 2
              for name, ms in results["prefill_ms"].items()}
    (tmp_path / "other.json").write_text(json.dumps(dict(results, prefill_ms=halved)))
    svg = figures.flops_and_time_svg(tmp_path / "other.json")
    shown = " | ".join(ET.fromstring(svg).itertext())
    for name, ms in halved.items():
        if name != "no_fastv":
            assert f"{ms:.0f} ms" in shown and f"{halved['no_fastv'] / ms:.2f}x" in shown
    assert "other.json, measured on" in shown
    assert (f"this run: without FastV took {halved['no_fastv']:.1f} ms, longer than R=0 "
            f"({halved['K2_R0']:.1f} ms), which does strictly more work: measured, not explained; "
            "not FastV's speed-up.") in shown
    assert "warm" not in shown


def polyline_rs(name):
    """{(stroke, dashes): [R of each point]} of a chart's lines, R read back from the x axis's
    tick labels."""
    ticks = {float(element.get("x")): float(element.text)
             for element in svg_elements(name, "text")
             if re.fullmatch(r"0|0\.\d+", element.text) and element.get("text-anchor") == "middle"}
    return {(line.get("stroke"), line.get("stroke-dasharray")):
            [ticks[float(point.split(",")[0])] for point in line.get("points").split()]
            for line in svg_elements(name, "polyline")}


def test_gpu_time_draws_each_line_only_where_it_was_measured():
    """A line per run and batch size, through the R values of its table in the JSON and no other:
    batch 8 was timed at R=0.5 and 0.75 only; "no_fastv" is the ratios' baseline, never a point."""
    lines = polyline_rs("gpu_time.svg")
    for mode, color in (("eager", figures.RED), ("compiled", figures.ORANGE)):
        results = json.loads((FIGURES / f"bench-h200-{mode}.json").read_text())
        for table, dashes in (("prefill_ms", None), ("prefill_ms_batch8", "6 4")):
            measured = sorted(float(name.split("_R")[1]) for name in results[table]
                              if name.startswith("K2_R"))
            assert lines[(color, dashes)] == measured
    assert lines[(figures.ORANGE, "6 4")] == [0.5, 0.75]
    assert lines[(figures.BLUE, None)] == [0, 0.25, 0.5, 0.75]
    assert len(lines) == 5


def end_values(name):
    """{fill: [the texts written to the right of a line's last point]} of a ratio chart."""
    values = {}
    for element in svg_elements(name, "text"):
        if re.fullmatch(r"\d\.\d\dx", element.text) and element.get("fill"):
            values.setdefault(element.get("fill"), []).append(element.text)
    return values


def test_gpu_time_draws_batch_1_against_r0_and_names_no_cause():
    """In the eager run the unpruned batch-1 prefill took longer than R=0, which does strictly
    more work, for a reason the JSON does not tell: the figure says so with both times and names no
    cause, and divides each batch-1 line by its own R=0 (1x at R=0), so that no_fastv / R=0.75
    (1.24x, no speed-up of FastV's) is drawn nowhere. Batch 8, which ran no R=0, is divided by no
    FastV; the legend says which line is which; no heading calls the ratios a speed-up."""
    eager = json.loads((FIGURES / "bench-h200-eager.json").read_text())["prefill_ms"]
    # what the note is about: a new run without it may drop the note's check
    assert eager["no_fastv"] / eager["K2_R0"] > 1.01
    shown = shown_in("gpu_time.svg")
    assert (f"eager run, batch 1: without FastV took {eager['no_fastv']:.1f} ms, longer than R=0 "
            f"({eager['K2_R0']:.1f} ms), which does strictly more work: measured, not "
            "explained.") in shown
    assert shown.count("not explained") == 1 and "warm" not in shown
    assert f"{eager['no_fastv'] / eager['K2_R0.75']:.2f}x" not in shown
    one = next(float(element.get("y")) - 4 for element in svg_elements("gpu_time.svg", "text")
               if element.text == "1x")  # the y of 1x on the chart
    lines = {(line.get("stroke"), line.get("stroke-dasharray")): line.get("points").split()
             for line in svg_elements("gpu_time.svg", "polyline")}
    ends = end_values("gpu_time.svg")
    for mode, color in (("eager", figures.RED), ("compiled", figures.ORANGE)):
        results = json.loads((FIGURES / f"bench-h200-{mode}.json").read_text())
        batch_1, batch_8 = results["prefill_ms"], results["prefill_ms_batch8"]
        assert "K2_R0" in batch_1 and "K2_R0" not in batch_8
        assert float(lines[(color, None)][0].split(",")[1]) == one  # R=0: 1x
        assert ends[color] == [f"{batch_1['K2_R0'] / batch_1['K2_R0.75']:.2f}x",
                               f"{batch_8['no_fastv'] / batch_8['K2_R0.75']:.2f}x"]
        assert f"{mode} run, batch 1: {batch_1['K2_R0']:.1f} ms" in shown.split("At R=0: ")[1]
    assert shown.count("time at R=0 / time at R") == 2
    assert shown.count("time without FastV / time at R") == 2
    heading = [element.text for element in svg_elements("gpu_time.svg", "text")
               if element.get("font-size") == "15"]
    for title in heading + [svg_elements("gpu_time.svg", "title")[0].text]:
        assert "speed-up" not in title


def test_gpu_time_draws_the_h200_runs():
    """The GPU figure's ratios are the JSONs' prefill times divided (by R=0's where the table has
    it), eager and compiled, batch 1 and 8, and its prediction is the exact FLOPs count of the real 7B shape; the machine is
    named."""
    shown = shown_in("gpu_time.svg")
    config = config_by_name("llava-1.5-7b")
    for mode in ("eager", "compiled"):
        results = json.loads((FIGURES / f"bench-h200-{mode}.json").read_text())
        assert results["compiled"] is (mode == "compiled") and results["model"] == "random-7b"
        assert (results["prompt_tokens"], results["image_tokens"]) == (616, 576)
        for timings in (results["prefill_ms"], results["prefill_ms_batch8"]):
            baseline = timings.get("K2_R0", timings["no_fastv"])  # batch 1: R=0; batch 8: none
            assert f"{baseline / timings['K2_R0.75']:.2f}x" in shown
            assert f"{timings['no_fastv']:.1f} ms" in shown
    predicted = (exact_prefill_flops(config, 616, 576)
                 / exact_prefill_flops(config, 616, 576, 2, 0.75))
    assert results["predicted_speedup"]["K2_R0.75"] == pytest.approx(predicted, rel=1e-12)
    assert f"{predicted:.2f}x" in shown
    assert (f"Measured on an NVIDIA H200 ({results['machine']}), bfloat16, torch "
            f"{results['torch']}") in shown


def test_kept_patches_are_the_rules_own_and_fastv_drifts_down():
    kept = figures.kept_by_rule(FastV(2, 0.5))
    assert list(kept) == ["FastV (last-token attention)", "FastV without RoPE", "uniform grid",
                          "random"]
    assert all(int(is_kept.sum()) == 288 for is_kept in kept.values())
    fastv, no_rope = kept["FastV (last-token attention)"], kept["FastV without RoPE"]
    salient = figures.saliency_map(24).flatten().topk(288).indices
    assert set(salient.tolist()) == set(no_rope.flatten().nonzero()[:, 0].tolist())
    # RoPE pulls FastV's choice toward the bottom
    assert fastv.nonzero()[:, 0].double().mean() > no_rope.nonzero()[:, 0].double().mean() + 3
    shown = shown_in("kept_patches.svg")
    assert shown.count("288 of 576 kept") == 4
    assert "python -m minifastv.analyze" in shown and "SYNTHETIC" in shown
    for is_kept in kept.values():  # each panel's count in each half of the image, counted here
        rows = is_kept.nonzero()[:, 0]
        assert f"top half {int((rows < 12).sum())}, bottom half {int((rows >= 12).sum())}" in shown
    assert (f"keeps {int(fastv[12:].sum())} of its 288 patches in the bottom half, FastV without "
            f"RoPE {int(no_rope[12:].sum())}") in shown
    extra = fastv & ~no_rope  # what FastV keeps that the saliency alone would not
    assert f"The two share {int((fastv & no_rope).sum())} patches" in shown
    assert int(extra[:12].sum()) == 0
    assert (f"FastV's other {int(extra.sum())} all lie in rows "
            f"{int(extra.nonzero()[:, 0].min())}-23") in shown


def test_the_kept_patches_are_far_from_a_tie():
    """The 288th and 289th scores differ by far more than float32 rounding, so every machine keeps
    the same patches."""
    inputs = figures.synthetic_pruning_inputs(read_config(REAL_CONFIG), FastV(2, 0.5))
    unturned = [apply_rope(x, inputs.cos, -inputs.sin) for x in (inputs.queries, inputs.keys)]
    without_rope = attention_rows(*unturned, inputs.attention_mask)[:, :, -1]
    for rows in (inputs.last_token_attention, without_rope):
        scores = rows.mean(dim=1)[0, inputs.image_positions[0]].double()
        scores = scores.sort(descending=True).values
        assert (scores[287] - scores[288]) / scores[287] > 1e-4


def test_bad_paths_get_one_sentence_and_exit_code_2(tmp_path, capsys):
    missing = ["--bench", str(tmp_path / "missing.json"), "--out", str(tmp_path / "out")]
    assert figures.command(missing) == 2
    assert "is not a JSON file written by python -m minifastv.bench" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert figures.command(["--out", str(tmp_path / "file")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --out") and error.count("\n") == 1
    assert not (tmp_path / "out").exists()
