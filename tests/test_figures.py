"""The course's figures (minifastv/assets/figures/): up to date with the code, well-formed SVG, and drawing the
numbers that the code, the real config.json and the bench's JSON give."""

import json
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest
import torch

from minifastv import bench, figures
from minifastv.checkpoint import read_config
from minifastv.flops import exact_prefill_flops
from minifastv.model import FastV, apply_rope, attention_rows, rope_tables

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "minifastv" / "assets" / "figures"
NAMES = ["architecture.svg", "pruning_sequence.svg", "rope_decay.svg", "flops_and_time.svg", "gpu_time.svg", "kept_patches.svg"]
REAL_CONFIG = Path(__file__).resolve().parent / "data" / "llava-1.5-7b-hf"  # llava-hf's config.json, as downloaded
REFERENCE_TOKENIZER = ROOT.parent / "shared" / "reference" / "llava-1.5-7b-hf"
SVG = "{http://www.w3.org/2000/svg}"


def svg_texts(name):
    """Every <text> of a committed figure, in order."""
    return [element.text for element in ET.parse(FIGURES / name).getroot().iter(f"{SVG}text")]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    figures.main(["--out", str(out)])
    return out


def test_the_committed_figures_are_up_to_date(regenerated):
    assert sorted(path.name for path in regenerated.iterdir()) == sorted(NAMES)
    for name in NAMES:
        assert (FIGURES / name).is_file(), f"minifastv/assets/figures/{name} is missing: run python -m minifastv.figures."
        assert (regenerated / name).read_bytes() == (FIGURES / name).read_bytes(), (
            f"minifastv/assets/figures/{name} is out of date with the code: run python -m minifastv.figures and commit it.")


@pytest.mark.parametrize("name", NAMES)
def test_each_figure_is_an_svg_with_a_size_and_a_title(name):
    root = ET.parse(FIGURES / name).getroot()
    assert root.tag == f"{SVG}svg"
    assert float(root.get("width")) > 0 and float(root.get("height")) > 0
    assert root.get("viewBox") == f"0 0 {root.get('width')} {root.get('height')}"
    assert root.find(f"{SVG}title").text


def test_the_readme_names_every_figure_and_the_ones_that_need_the_7b_weights():
    readme = (FIGURES / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in NAMES + ["bench-cpu.json", "bench-h200-eager.json", "bench-h200-compiled.json"])
    assert "python -m minifastv.analyze" in readme and "attention_allocation.png" in readme


def test_architecture_draws_the_real_checkpoint_numbers():
    """Read from llava-hf's own config.json (the figure reads the built-in preset): the two must agree."""
    config = read_config(REAL_CONFIG)
    vision, text = config.vision, config.text
    patches = (vision.image_size // vision.patch_size) ** 2
    tokens = 5 + patches + 12  # <s> USER: ▁, the patches, then the 12 tokens of "\nWhat animal is this? ASSISTANT:"
    kept_image = patches // 2  # K=2, R=50%: FastV's defaults, the paper's setting
    shown = " | ".join(svg_texts("architecture.svg"))
    for expected in (f"{vision.image_size} x {vision.image_size} px", f"= {patches} + CLS token",
                     f"{patches} tokens x {vision.hidden_size}", f"{patches} tokens x {text.hidden_size}",
                     f"Linear {vision.hidden_size} -> {text.hidden_size}, GELU,", f"{patches} image", f"runs {vision.num_hidden_layers - 1} layers",
                     f"{text.num_hidden_layers} layers, {text.hidden_size} wide", f"all {tokens} tokens",
                     f"keep the top {kept_image}", f"layers 2-{text.num_hidden_layers - 1}: {tokens - patches + kept_image} tokens",
                     f"{text.vocab_size} scores"):
        assert expected in shown, expected


@pytest.mark.skipif(not REFERENCE_TOKENIZER.is_dir(), reason="needs ../shared/reference (the real tokenizer.json)")
def test_the_prompt_pieces_are_what_the_real_tokenizer_makes():
    from minifastv.prompt import Tokenizer, encode_prompt, format_prompt

    tokenizer = Tokenizer.from_folder(REFERENCE_TOKENIZER)
    ids = encode_prompt(tokenizer, format_prompt("What animal is this?"), 576)[0].tolist()
    pieces = [tokenizer.backend.id_to_token(token) for token in ids]
    first, last = pieces.index("<image>"), len(pieces) - pieces[::-1].index("<image>")
    assert tuple(pieces[:first]) == figures.SYSTEM_TOKENS
    assert tuple(pieces[last:]) == figures.QUESTION_TOKENS
    assert len(pieces) == figures.prompt_length(576) == 593


def test_pruning_keeps_every_text_token_and_the_original_positions():
    before, after = figures.toy_positions(FastV(2, 0.5))
    num_image = figures.TOY_GRID**2
    image = range(5, 5 + num_image)
    assert before == list(range(5 + num_image + 12))
    assert after == sorted(after) and len([p for p in after if p in image]) == round(num_image * 0.5)
    assert [p for p in after if p not in image] == [p for p in before if p not in image]
    model = figures.toy_llava()  # the same survivors as the KV cache records in a prefill
    input_ids, pixel_values = figures.toy_prompt(model.config)
    cache = model.new_cache(input_ids, FastV(2, 0.5))
    with torch.no_grad():
        model(input_ids, pixel_values, cache=cache, fastv=FastV(2, 0.5))
    assert (cache.kept_image_tokens[0] + 5).tolist() == [p for p in after if p in image]
    # Each kept token's id is drawn in both rows, each dropped one in the first row only.
    ids_drawn = Counter(int(words) for words in svg_texts("pruning_sequence.svg") if words.isdigit())
    assert ids_drawn == Counter(before + after)


def test_the_rope_curve_is_rope_tables_and_the_image_sits_12_to_587_back():
    config = read_config(REAL_CONFIG)
    cos, _ = rope_tables(config.text, "cpu")
    for distance in (0, 1, 12, 100, 587, 640):
        assert abs(cos[distance].double().mean().item() - figures.rope_similarity(distance, config.text)) < 1e-5
    distances = figures.image_distances(576, 24)
    assert distances[-1][-1] == 592 - 580 == 12 and distances[0][0] == 592 - 5 == 587  # last token 592, image 5..580
    row_means = [cos[592 - 5 - 24 * row - torch.arange(24)].double().mean().item() for row in (0, 23)]
    shown = " | ".join(svg_texts("rope_decay.svg"))
    assert f"top row, farthest: mean {row_means[0]:.2f}" in shown and f"bottom row, nearest the question: mean {row_means[1]:.2f}" in shown
    assert row_means[1] > 2 * row_means[0]  # the decay the figure is about
    assert "sits 12 positions before the last prompt token, the top-left 587" in shown


def test_flops_and_time_draws_the_bench_json_and_the_flops_prediction(monkeypatch):
    """The JSON came from the bench's default model (its prediction is recomputed here), and the figure draws it."""
    results = json.loads((FIGURES / "bench-cpu.json").read_text())
    monkeypatch.setattr(bench, "random_model", lambda config, device, dtype: config)  # the config, no weights
    defaults = bench.parse_args([])
    config = bench.random_llava("cpu", torch.float32, defaults.layers, defaults.width)
    num_tokens = bench.benchmark_prompt(config, defaults.text_tokens)[0].shape[1]
    assert (results["prompt_tokens"], results["image_tokens"]) == (num_tokens, 576), "bench-cpu.json is from another shape: rerun the bench"
    shown = " | ".join(svg_texts("flops_and_time.svg"))
    baseline = results["prefill_ms"]["no_fastv"]
    for r in (0.0, 0.25, 0.5, 0.75):
        predicted = exact_prefill_flops(config, num_tokens, 576) / exact_prefill_flops(config, num_tokens, 576, 2, r)
        assert results["predicted_speedup"][f"K2_R{r:g}"] == pytest.approx(predicted, rel=1e-12)
        assert f"{predicted:.2f}x" in shown and f"{baseline / results['prefill_ms'][f'K2_R{r:g}']:.2f}x" in shown
    assert f"measured on {results['machine']}: device {results['device']}, {results['dtype']}, torch {results['torch']}" in shown


def test_gpu_time_draws_the_h200_runs():
    """The GPU figure's speed-ups are the JSONs' prefill times divided, eager and compiled, batch 1 and 8, and its
    prediction is the exact FLOPs count of the real 7B shape; the machine is named."""
    from minifastv.checkpoint import config_by_name

    shown = " | ".join(svg_texts("gpu_time.svg"))
    config = config_by_name("llava-1.5-7b")
    for mode in ("eager", "compiled"):
        results = json.loads((FIGURES / f"bench-h200-{mode}.json").read_text())
        assert results["compiled"] is (mode == "compiled") and results["model"] == "random-7b"
        assert (results["prompt_tokens"], results["image_tokens"]) == (616, 576)
        for timings in (results["prefill_ms"], results["prefill_ms_batch8"]):
            assert f"{timings['no_fastv'] / timings['K2_R0.75']:.2f}x" in shown
    predicted = exact_prefill_flops(config, 616, 576) / exact_prefill_flops(config, 616, 576, 2, 0.75)
    assert results["predicted_speedup"]["K2_R0.75"] == pytest.approx(predicted, rel=1e-12)
    assert f"{predicted:.2f}x" in shown
    assert f"measured on an NVIDIA H200 ({results['machine']}), bfloat16, torch {results['torch']}" in shown


def test_kept_patches_are_the_rules_own_and_fastv_drifts_down():
    kept = figures.kept_by_rule(FastV(2, 0.5))
    assert list(kept) == ["fastv_rule", "no_rope_rule", "grid_rule", "random_rule"]
    assert all(int(is_kept.sum()) == 288 for is_kept in kept.values())
    saliency = figures.saliency_map(24).flatten()
    assert set(saliency.topk(288).indices.tolist()) == set(kept["no_rope_rule"].flatten().nonzero()[:, 0].tolist())
    mean_row = {name: is_kept.nonzero()[:, 0].double().mean().item() for name, is_kept in kept.items()}
    assert mean_row["fastv_rule"] > mean_row["no_rope_rule"] + 3  # RoPE pulls FastV's choice toward the bottom
    shown = " | ".join(svg_texts("kept_patches.svg"))
    assert shown.count("288 of 576 kept") == 4 and "python -m minifastv.analyze" in shown and "SYNTHETIC" in shown


def test_the_kept_patches_are_far_from_a_tie():
    """The 288th and 289th scores differ by far more than float32 rounding, so every machine keeps the same patches."""
    inputs = figures.synthetic_pruning_inputs(read_config(REAL_CONFIG), FastV(2, 0.5))
    without_rope = attention_rows(apply_rope(inputs.queries, inputs.cos, -inputs.sin), apply_rope(inputs.keys, inputs.cos, -inputs.sin), inputs.attention_mask)[:, :, -1]
    for rows in (inputs.last_token_attention, without_rope):
        scores = rows.mean(dim=1)[0, inputs.image_positions[0]].double().sort(descending=True).values
        assert (scores[287] - scores[288]) / scores[287] > 1e-4


def test_bad_paths_get_one_sentence_and_exit_code_2(tmp_path, capsys):
    assert figures.command(["--bench", str(tmp_path / "missing.json"), "--out", str(tmp_path / "out")]) == 2
    assert "is not a JSON file written by python -m minifastv.bench" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert figures.command(["--out", str(tmp_path / "file")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --out") and error.count("\n") == 1
    assert not (tmp_path / "out").exists()
