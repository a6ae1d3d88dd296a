"""The benchmark runs and reports every setting; its JSON holds every number a GPU run needs (the numbers
themselves are for people, not for asserts: only their structure and their arithmetic are checked)."""

import json
import re

import pytest
import torch

from minifastv import bench, cli, compiled
from minifastv.checkpoint import config_by_name
from minifastv.flops import exact_prefill_flops
from minifastv.model import FastV

SMALL = ["--layers", "3", "--width", "64", "--repeats", "1", "--device", "cpu"]


def test_bench_reports_each_setting(capsys):
    bench.main(SMALL + ["--no-transformers"])
    out = capsys.readouterr().out
    for setting in ("no FastV", "R=0.00", "R=0.25", "R=0.50", "R=0.75"):
        assert re.search(rf"^\s*{re.escape(setting)}\s+\d+\.\d", out, flags=re.MULTILINE), out
    assert "scoring overhead" in out and "576 of them image" in out and "decode, greedy" in out
    # The FLOPs column falls with R: the prediction the timings are set against.
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s*(no FastV|R=)", line)]
    ratios = [float(row[-5]) for row in rows]  # columns from the right: peak MiB, KV MB, realized, predicted, FLOPs ratio
    assert ratios[0] == 1.0 and ratios[1] == 1.0 and ratios[2] > ratios[3] > ratios[4]


def test_bench_json_holds_every_number(tmp_path, capsys):
    """What a GPU run reads back: every key the GPU issue names, with values of the right kind."""
    path = tmp_path / "bench.json"
    results = bench.main(SMALL + ["--batch", "8", "--json", str(path)])
    assert f"wrote {path}" in capsys.readouterr().out
    written = json.loads(path.read_text())
    assert written == json.loads(json.dumps(results))
    settings = {"no_fastv", "K2_R0", "K2_R0.25", "K2_R0.5", "K2_R0.75"}
    assert written["device"].startswith("cpu") and written["dtype"] == "float32" and written["compiled"] is False
    assert (written["prompt_tokens"], written["image_tokens"]) == (616, 576)
    assert set(written["prefill_ms"]) == set(written["predicted_speedup"]) == set(written["peak_gpu_bytes"]) == settings
    assert all(value > 0 for value in written["prefill_ms"].values())
    assert set(written["prefill_ms_batch8"]) == {"no_fastv", "K2_R0.5", "K2_R0.75"}
    assert set(written["decode_tokens_per_s"]) == {"no_fastv", "K2_R0.5"} and written["decode_floor_tokens_per_s"] > 0
    assert all(value is None for value in written["peak_gpu_bytes"].values())  # on the CPU
    assert written["device_busy_share"] == {}  # measured on CUDA only (tests/test_cuda.py checks it there)
    assert written["load_seconds"] is None  # a random model: nothing read from disk
    assert set(written["transformers"]) == {"prefill_ms", "decode_tokens_per_s"}
    # the predicted speed-ups are the exact FLOPs count's, computed here from the prompt's shape
    config = bench.random_llava(torch.device("cpu"), torch.float32, layers=3, width=64).config
    unpruned = exact_prefill_flops(config, 616, 576)
    assert written["predicted_speedup"]["K2_R0.5"] == pytest.approx(unpruned / exact_prefill_flops(config, 616, 576, 2, 0.5))
    assert written["predicted_speedup"]["no_fastv"] == 1.0
    assert 0.999 < written["predicted_speedup"]["K2_R0"] < 1.0  # scoring alone costs a last row of attention


def test_setting_names_are_the_json_keys_and_read_back_as_k_and_r():
    """The bench names its settings as its JSON files (and the committed ones figures.py draws)
    have them."""
    for fastv, name in ((None, "no_fastv"), (FastV(2, 0.0), "K2_R0"), (FastV(2, 0.25), "K2_R0.25"),
                        (FastV(3, 0.5), "K3_R0.5"), (FastV(12, 0.75), "K12_R0.75")):
        assert cli.setting_name(fastv) == name
        assert cli.setting_of(name) == ((None, 0.0) if fastv is None else (fastv.k, fastv.r))


def test_the_timed_scoring_step_picks_what_fastv_keeps():
    """The scoring the bench times starts from layer K-1's queries and keys, taken with the model's
    observe hook: its top-k is what a FastV prefill keeps."""
    model = bench.random_llava(torch.device("cpu"), torch.float32, layers=3, width=64)
    ids, visual = bench.benchmark_prompt(model.config, 10)
    for k in (1, 2):
        cache = model.new_cache(ids, FastV(k, 0.5))
        with torch.no_grad():
            model(ids, **visual, cache=cache, fastv=FastV(k, 0.5))
        kept = bench.scoring_step(model, ids, visual, k)()
        assert kept.shape == (1, 288)
        assert torch.equal(kept.sort(dim=-1).values, cache.kept_image_tokens)


def test_no_timed_generation_is_the_first_of_its_cache_shape(monkeypatch):
    """A compiled model reuses the KV caches of its last two shapes (compiled.reusing_caches): with
    three settings taking turns, caches are made anew, but never while the clock runs."""
    model = bench.random_llava(torch.device("cpu"), torch.float32, layers=3, width=64)
    model.new_cache = compiled.reusing_caches(model)  # the compiled path's caches, not compiled
    ids, visual = bench.benchmark_prompt(model.config, 10)
    clock = {"running": False, "timed_runs": 0, "caches": 0, "caches_made_while_timed": 0}

    class CountedKVCache(compiled.KVCache):
        def __init__(self, *args):
            super().__init__(*args)
            clock["caches"] += 1
            clock["caches_made_while_timed"] += clock["running"]

    untimed = bench.timed

    def timed(device, function):
        clock["running"], clock["timed_runs"] = True, clock["timed_runs"] + 1
        try:
            return untimed(device, function)
        finally:
            clock["running"] = False

    monkeypatch.setattr(compiled, "KVCache", CountedKVCache)
    monkeypatch.setattr(bench, "timed", timed)
    settings = {cli.setting_name(fastv): fastv for fastv in (None, FastV(2, 0.5), FastV(2, 0.75))}
    speeds = bench.decode_speeds(model, ids, visual, settings, repeats=2)
    assert set(speeds) == set(settings) and all(speed > 0 for speed in speeds.values())
    assert clock["timed_runs"] == 3 * 3 * 2  # rounds x settings x (1 token, NEW_TOKENS)
    assert clock["caches"] > 3  # three shapes in turns, two kept: caches were made again
    assert clock["caches_made_while_timed"] == 0


def test_bench_times_a_checkpoint_load(tmp_path, monkeypatch):
    import minifastv.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path)
    results = bench.main(["--model", "tiny", "--device", "cpu", "--repeats", "1", "--no-transformers"])
    assert results["load_seconds"] > 0 and results["prefill_ms_batch0"] is None  # no batch on the CPU by default


def test_random_weights_in_the_real_shapes():
    """random-7b's recipe on a small config: every tensor drawn on the device, in the dtype, with std 0.02."""
    config = bench.random_llava(torch.device("cpu"), torch.float32, layers=2, width=128).config
    model = bench.random_model(config, torch.device("cpu"), torch.bfloat16)
    weights = torch.cat([p.float().flatten() for p in model.parameters()])
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert abs(weights.std().item() - 0.02) < 0.001 and abs(weights.mean().item()) < 0.001
    assert model.rope_cos.dtype == torch.float32  # the rotary tables are built, in float32


def test_random_models_name_the_real_configs():
    assert {name: config_by_name(preset).text.num_hidden_layers for name, preset in bench.RANDOM_MODELS.items()} == {
        "random-7b": 32, "random-13b": 40, "random-video-7b": 32}


def test_decode_floor_counts_the_weights_a_step_reads():
    model = bench.random_llava(torch.device("cpu"), torch.float32, layers=2, width=64)
    decoder = sum(p.numel() for p in model.language_model.layers.parameters()) + 64 + model.lm_head.weight.numel()
    assert bench.decode_step_bytes(model) == 4 * decoder  # no embedding table, vision tower or projector


def test_transformers_twin_has_the_same_weights():
    """The comparison is only fair if transformers runs the very same model: equal logits, shared tensors."""
    model = bench.random_llava(torch.device("cpu"), torch.float32, layers=3, width=64)
    twin = bench.transformers_twin(model)
    ids, visual = bench.benchmark_prompt(model.config, 10)
    with torch.no_grad():
        ours = model(ids, **visual)
        theirs = twin(input_ids=ids, **visual).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert twin.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()  # no second copy of the weights


def test_bench_compares_with_transformers(capsys):
    bench.main(SMALL)
    out = capsys.readouterr().out
    assert re.search(r"same weights through transformers \(sdpa\), unpruned: prefill \d+\.\d ms", out), out
    assert re.search(r"minifastv / transformers: prefill time \d+\.\d\d", out)


def test_bench_times_a_video_prompt(capsys):
    """--video: a random Video-LLaVA-shaped model and a video prompt, 2,056 of its tokens video."""
    results = bench.main(["--video"] + SMALL)
    out = capsys.readouterr().out
    assert "2056 of them video" in out and re.search(r"^\s*R=0\.50\s+\d+\.\d", out, flags=re.MULTILINE), out
    assert results["image_tokens"] == 2056 and results["transformers"] is not None


def test_video_twin_has_the_same_weights():
    model = bench.random_llava(torch.device("cpu"), torch.float32, layers=3, width=64, video=True)
    twin = bench.transformers_twin(model)
    ids, visual = bench.benchmark_prompt(model.config, 10, video=True)
    with torch.no_grad():
        difference = (model(ids, **visual) - twin(input_ids=ids, **visual).logits).abs().max().item()
    assert difference < 1e-4


def test_bench_compiled_writes_its_compile_time(tmp_path, capsys, monkeypatch, fresh_compiler):
    """--compile times the compiled path after warm-up runs that compile it (captured with aot_eager here: inductor's
    code generation takes minutes on a CPU; tests/test_compiled.py runs it once)."""
    import functools

    from minifastv import cli, compiled

    monkeypatch.setattr(cli, "compile_model", functools.partial(compiled.compile_model, backend="aot_eager"))
    path = tmp_path / "bench.json"
    bench.main(SMALL + ["--no-transformers", "--compile", "--json", str(path)])
    captured = capsys.readouterr()
    written = json.loads(path.read_text())
    assert written["compiled"] is True and written["compile_seconds"] > 0
    assert "compiled in" in captured.err and "compiled (first runs" in captured.out
    assert written["torch"] == torch.__version__ and written["machine"]
