"""FLOPs: the paper's formula reproduces its Table 1, and the exact count equals what torch counts."""

from pathlib import Path

import pytest
import torch

import minifastv
import minifastv.model as M
from minifastv import generate
from minifastv.checkpoint import config_by_name, read_config
from minifastv.flops import exact_prefill_flops, paper_flops, prefill_flops_report

DATA = Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize("k, r, per_layer", [
    (None, 0.0, 154.6), (2, 0.5, 84.6), (2, 0.75, 50.2), (2, 0.9, 29.7), (3, 0.5, 86.4), (5, 0.5, 90.1),
])
def test_paper_table_1_for_llava_13b(k, r, per_layer):
    """FastV's Table 1: 36 system-prompt tokens and 576 image tokens, average per layer, in billions."""
    config = read_config(DATA / "llava-1.5-13b-hf")
    flops = paper_flops(config, 36, 576, k, r) / config.text.num_hidden_layers / 1e9
    assert round(flops, 1) == per_layer


def counted_flops(model, ids, pixels, fastv, videos=None):
    """What torch's FLOP counter sees. The fused CPU attention kernel is invisible to it, so attention runs
    on SDPA's math backend here: the same products (full T x S, as the exact count assumes), spelled out."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids, pixels, videos, fastv=fastv, last_logits_only=True)
    return counter.get_total_flops()


@pytest.mark.parametrize("fastv", [None, M.FastV(2, 0.5), M.FastV(1, 0.75), M.FastV(3, 0.0)])
def test_exact_count_equals_torch_flop_counter(hub_checkpoint, fastv):
    from conftest import image_prompt, random_pixels

    model = minifastv.load(hub_checkpoint, device="cpu", dtype=torch.float32, progress=False)
    ids, pixels = image_prompt(2, 36), random_pixels(2)
    k, r = (fastv.k, fastv.r) if fastv else (None, 0.0)
    assert exact_prefill_flops(model.config, ids.shape[1], 72, k, r) == counted_flops(model, ids, pixels, fastv)


@pytest.mark.parametrize("fastv", [None, M.FastV(2, 0.5)])
def test_exact_count_with_a_video_equals_torch_flop_counter(tmp_path, fastv):
    """Video-LLaVA: an image and a video (8 frames through the video tower, each with its CLS token) in one pool."""
    from minifastv.tiny import write_tiny_checkpoint

    model = minifastv.load(write_tiny_checkpoint(tmp_path / "tiny-video", video=True), device="cpu", progress=False)
    config = model.config
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor([[1, 5, 6] + [config.image_token_id] * 256 + [7] + [config.video_token_id] * 2056 + [8, 9]])
    pixels, videos = torch.randn(1, 3, 224, 224, generator=generator), torch.randn(1, 8, 3, 224, 224, generator=generator)
    k, r = (fastv.k, fastv.r) if fastv else (None, 0.0)
    expected = exact_prefill_flops(config, ids.shape[1], 256 + 2056, k, r, num_videos=1)
    assert expected == counted_flops(model, ids, pixels, fastv, videos)


def test_flops_cli_for_video_llava(capsys):
    from minifastv.flops.__main__ import main

    main(["--config", "video-llava-7b"])
    out = capsys.readouterr().out
    assert "36 text + 2056 video tokens" in out
    # the paper's per-layer formula, by hand: n = 2092, n' = 36 + 1028, d = 4096, m = 11008
    before, after = (4 * n * 4096**2 + 2 * n**2 * 4096 + 2 * n * 4096 * 11008 for n in (2092, 1064))
    fast = (2 * before + 30 * after) / 32
    assert f"{before / 1e9:.1f} -> {fast / 1e9:.1f} GFLOPs ({1 - fast / before:.1%} fewer)" in out


def test_report_ratios():
    config = read_config(DATA / "llava-1.5-7b-hf")
    report = prefill_flops_report(config, 612, 576, M.FastV(2, 0.5))
    assert report["paper_ratio"] == pytest.approx(paper_flops(config, 36, 576, 2, 0.5) / paper_flops(config, 36, 576))
    assert report["exact"] < report["exact_unpruned"] and 0.5 < report["exact_ratio"] < 0.6
    plain = prefill_flops_report(config, 612, 576, None)
    assert plain["exact_ratio"] == 1.0 and plain["paper_ratio"] == 1.0


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_built_in_configs_equal_the_real_files(size):
    assert config_by_name(f"llava-1.5-{size}") == read_config(DATA / f"llava-1.5-{size}-hf")


def test_flops_cli_prints_table_1(capsys):
    from minifastv.flops.__main__ import main

    main([])  # the defaults are the paper's Table 1 setting: 13B, 36 + 576 tokens, K=2, R=50%
    out = capsys.readouterr().out
    assert "154.6 -> 84.6 GFLOPs" in out and "TFLOPs" in out
    main(["--config", str(DATA / "llava-1.5-7b-hf" / "config.json"), "--k", "3", "--r", "0.75"])
    assert "K=3 R=0.75" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# Memory: parameters and KV cache, counted by the formulas and measured on the model


@pytest.mark.parametrize("name, towers", [("llava-1.5-7b", ("image", "video")), ("llava-1.5-13b", ("image", "video")),
                                          ("video-llava-7b", ("image", "video")), ("video-llava-7b", ("video",))])
def test_parameter_count_equals_the_model(name, towers):
    from minifastv.flops import parameter_count

    config = config_by_name(name)
    with torch.device("meta"):
        model = M.Llava(config)
    if config.video_token_id is not None and towers == ("video",):
        model.image_tower = None  # as load(towers=("video",)) leaves it out
    assert parameter_count(config, towers) == sum(p.numel() for p in model.parameters())


def test_parameter_count_of_llava_7b_is_the_checkpoints():
    from minifastv.flops import parameter_count

    assert parameter_count(config_by_name("llava-1.5-7b")) == 7_063_427_072  # FACTS.md, from the hub's tensors


@pytest.mark.parametrize("fastv", [None, M.FastV(2, 0.5), M.FastV(1, 0.75)])
def test_kv_cache_bytes_equal_the_cache(hub_checkpoint, fastv):
    from conftest import image_prompt, random_pixels

    from minifastv.flops import kv_cache_bytes

    model = minifastv.load(hub_checkpoint, device="cpu", dtype=torch.float16, progress=False)
    ids = image_prompt(2, 36)
    stats = minifastv.GenerationStats()
    generate(model, ids, random_pixels(2), max_new_tokens=1, fastv=fastv, stats=stats)  # the prompt's cache only
    k, r = (fastv.k, fastv.r) if fastv else (None, 0.0)
    assert kv_cache_bytes(model.config, ids.shape[1], 72, k, r) == stats.kv_cache_bytes


# ----------------------------------------------------------------------------------------------------
# Printing: a unit that suits the magnitude


def test_flops_text_picks_the_unit():
    from minifastv.flops import flops_text, flops_unit

    assert flops_text(8.514e12) == "8.51 TFLOPs" and flops_text(2.004e9) == "2.00 GFLOPs"
    assert flops_text(191.1e6) == "191.10 MFLOPs" and flops_text(950) == "950.00 FLOPs"
    assert flops_unit(999.9e9) == (1e9, "GFLOPs") and flops_unit(1e12) == (1e12, "TFLOPs")


def test_flops_cli_on_the_tiny_config_prints_mflops_and_gflops(tmp_path, capsys):
    """The tiny model's prefill is a couple of GFLOPs: never "0.00 TFLOPs", nor a 0.00 GiB cache."""
    import json

    from minifastv.flops.__main__ import main
    from minifastv.tiny import tiny_config_values

    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config_values(image_token_id=300, pad_token_id=301, vocab_size=302)))
    main(["--config", str(config)])
    out = capsys.readouterr().out
    assert "MFLOPs (" in out.splitlines()[1] and "GFLOPs (" in out.splitlines()[2], out
    assert "0.00" not in out and "MiB" in out, out


def test_flops_cli_refuses_a_prompt_past_the_context(capsys):
    from minifastv.flops.__main__ import command

    assert command(["--config", "llava-1.5-7b", "--text-tokens", "3521"]) == 2  # 3521 + 576 = 4097 > 4096
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --text-tokens 3521 and 576 image tokens"), err
    assert command(["--config", "llava-1.5-7b", "--text-tokens", "3520"]) in (0, None)  # exactly the context
