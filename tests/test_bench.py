"""The benchmark runs and reports every setting; its JSON holds every number a GPU run needs (the
numbers themselves are for people, not for asserts: only their structure, their arithmetic and the
order the runs take are checked). Bad input is one sentence naming the flag, before any model."""

import ast
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minifastv import bench, cli, compiled
from minifastv.checkpoint import config_by_name
from minifastv.flops import exact_prefill_flops
from minifastv.model import FastV

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--layers", "3", "--width", "64", "--repeats", "1", "--device", "cpu"]
SETTINGS = ("no_fastv", "K2_R0", "K2_R0.25", "K2_R0.5", "K2_R0.75")


def test_bench_reports_each_setting_and_its_progress(capsys):
    bench.main(SMALL + ["--no-transformers"])
    out, err = capsys.readouterr()
    for setting in ("no FastV", "R=0.00", "R=0.25", "R=0.50", "R=0.75"):
        assert re.search(rf"^\s*{re.escape(setting)}\s+\d+\.\d", out, flags=re.MULTILINE), out
    assert "scoring overhead" in out and "576 of them image" in out and "decode, greedy" in out
    # The FLOPs column falls with R: the prediction the timings are set against.
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s*(no FastV|R=)", line)]
    # columns from the right: peak MiB, KV MB, realized, predicted, FLOPs ratio
    ratios = [float(row[-5]) for row in rows]
    assert ratios[0] == 1.0 and ratios[1] == 1.0 and ratios[2] > ratios[3] > ratios[4]
    # Progress on stderr, one line per setting as its measurement ends; no developers' targets.
    for setting in ("no FastV", "K=2 R=0.00", "K=2 R=0.25", "K=2 R=0.50", "K=2 R=0.75"):
        assert re.search(rf"^prefill, {setting}: \d+\.\d ms$", err, flags=re.MULTILINE), err
    assert re.search(r"^decode, K=2 R=0\.50: [\d.]+ tokens/s$", err, flags=re.MULTILINE), err
    assert err.index("warming up") < err.index("prefill, no FastV")
    assert "target" not in out + err


def test_bench_json_holds_every_number(tmp_path, capsys):
    """What a GPU run reads back: every key the GPU issue names, with values of the right kind."""
    path = tmp_path / "bench.json"
    results = bench.main(SMALL + ["--batch", "2", "--json", str(path)])
    out = capsys.readouterr().out
    assert f"wrote {path}" in out
    written = json.loads(path.read_text())
    assert written == json.loads(json.dumps(results))
    assert written["device"].startswith("cpu") and written["dtype"] == "float32"
    assert written["compiled"] is False
    assert (written["prompt_tokens"], written["image_tokens"]) == (616, 576)
    for table in ("prefill_ms", "prefill_ms_runs", "predicted_speedup", "peak_gpu_bytes"):
        assert set(written[table]) == set(SETTINGS), table
    assert all(value > 0 for value in written["prefill_ms"].values())
    # every timed run is kept (one here), and the table shows their median
    assert all(runs == [written["prefill_ms"][name]]
               for name, runs in written["prefill_ms_runs"].items())
    assert written["warnings"] in ([], [bench.BASELINE_WARNING])  # the timings decide which
    assert set(written["prefill_ms_batch2"]) == {"no_fastv", "K2_R0.5", "K2_R0.75"}
    assert set(written["decode_tokens_per_s"]) == {"no_fastv", "K2_R0.5"}
    assert written["decode_floor_tokens_per_s"] > 0
    assert all(value is None for value in written["peak_gpu_bytes"].values())  # on the CPU
    assert written["device_busy_share"] == {}  # CUDA only (tests/test_cuda.py checks it there)
    assert written["load_seconds"] is None  # a random model: nothing read from disk
    assert set(written["transformers"]) == {"prefill_ms", "decode_tokens_per_s"}
    # the predicted speed-ups are the exact FLOPs count's, computed here from the prompt's shape
    config = bench.random_config(layers=3, width=64)
    unpruned = exact_prefill_flops(config, 616, 576)
    assert written["predicted_speedup"]["K2_R0.5"] == pytest.approx(
        unpruned / exact_prefill_flops(config, 616, 576, 2, 0.5))
    assert written["predicted_speedup"]["no_fastv"] == 1.0
    # scoring alone costs a last row of attention
    assert 0.999 < written["predicted_speedup"]["K2_R0"] < 1.0
    # the same weights through transformers, and no developer's target in the line
    assert re.search(r"same weights through transformers \(sdpa\), unpruned: prefill \d+\.\d ms",
                     out), out
    assert re.search(r"^minifastv / transformers: prefill time \d+\.\d\d, decode speed [\d.]+x$",
                     out, flags=re.MULTILINE), out


# ------------------------------------------------------------------------------------------------
# How it times: warm-up first, settings in turns, and the check that R=0 is not faster


def test_the_settings_take_turns_every_other_round_in_reverse():
    """Each setting's mean place is the same over two rounds, and its neighbours change."""
    order = list(bench.in_turns(["a", "b", "c"], 4))
    assert order == ["a", "b", "c", "c", "b", "a", "a", "b", "c", "c", "b", "a"]


def test_every_setting_is_warmed_before_any_is_timed_and_the_timed_runs_take_turns(
        monkeypatch, capsys, tmp_path):
    """Every prefill the bench runs is recorded with its setting, its batch size and whether the
    clock ran. The clock is faked to make no FastV slower than R=0 in every run: the bench must
    then say so, in its output and its JSON."""
    calls = []  # (setting, batch size, timed) of every prefill, in the order run
    clock = {"running": False}
    build, untimed = bench.random_model, bench.timed

    def recording_model(config, device, dtype):
        model = build(config, device, dtype)
        forward = model.forward

        def recorded(input_ids, *args, fastv=None, **kwargs):
            calls.append((cli.setting_name(fastv), input_ids.shape[0], clock["running"]))
            return forward(input_ids, *args, fastv=fastv, **kwargs)

        model.forward = recorded
        return model

    def timed(device, function):
        clock["running"] = True
        try:
            seconds = untimed(device, function)
        finally:
            clock["running"] = False
        return 0.002 if calls and calls[-1][0] == "no_fastv" else seconds / 1e6  # R=0 faster

    monkeypatch.setattr(bench, "random_model", recording_model)
    monkeypatch.setattr(bench, "timed", timed)
    path = tmp_path / "bench.json"
    bench.main(SMALL + ["--repeats", "2", "--batch", "2", "--no-transformers",
                        "--json", str(path)])
    first_timed = next(i for i, (_, _, timed_run) in enumerate(calls) if timed_run)
    timed_runs = [(name, size) for name, size, timed_run in calls if timed_run]
    warmed = {(name, size) for name, size, timed_run in calls[:first_timed]}
    assert set(timed_runs) <= warmed  # every setting and shape ran untimed before any was timed
    assert {(name, 2) for name in ("no_fastv", "K2_R0.5", "K2_R0.75")} <= warmed
    # One prompt: 2 rounds of the 5 settings, the second in reverse; then the batch's 3 settings.
    assert [name for name, _ in timed_runs[:10]] == [*SETTINGS, *reversed(SETTINGS)]
    batch = [name for name, size in timed_runs[10:16] if size == 2]
    assert batch == ["no_fastv", "K2_R0.5", "K2_R0.75", "K2_R0.75", "K2_R0.5", "no_fastv"]
    # The decode: per run an untimed generation, then the one GenerationStats times (each
    # prefills once), the two settings in turns.
    decode = ["no_fastv", "K2_R0.5", "K2_R0.5", "no_fastv"]
    last_timed = max(i for i, (_, _, timed_run) in enumerate(calls) if timed_run)
    assert len(timed_runs) == 16
    assert [name for name, _, _ in calls[last_timed + 1:]][-8:] == [
        name for name in decode for _ in range(2)]
    # no FastV took 2 ms a run, R=0 less: the bench says it cannot be, in its output and JSON
    out = capsys.readouterr().out
    assert f"warning: {bench.BASELINE_WARNING}" in out.splitlines()
    written = json.loads(path.read_text())
    assert written["warnings"] == [bench.BASELINE_WARNING]
    assert written["prefill_ms_runs"]["no_fastv"] == [2.0, 2.0]
    assert written["prefill_ms"]["no_fastv"] == 2.0


def test_the_baseline_check_flags_only_what_the_spread_cannot_explain():
    runs = {"no_fastv": [2.0, 2.1, 2.2], "K2_R0": [1.7, 1.8, 1.9]}  # every plain run slower
    assert bench.baseline_check(runs, 2) == bench.BASELINE_WARNING
    runs["K2_R0"].append(2.05)  # one R=0 run as slow as a plain one: within the spread
    assert bench.baseline_check(runs, 2) is None
    assert bench.baseline_check({"no_fastv": [1.0], "K3_R0": [1.1]}, 3) is None


# ------------------------------------------------------------------------------------------------
# Bad input: one sentence naming a flag the user gave, exit code 2, before any model is built


@pytest.fixture
def no_model(monkeypatch):
    """The bench may not build or load a model: every refusal comes first."""
    monkeypatch.setattr(bench, "random_model", lambda *args: pytest.fail("built a model"))
    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: pytest.fail("loaded a model"))


BAD = {  # case: (arguments, how the one sentence starts)
    "k not passed, too few layers": (["--layers", "2"],
                                     "--layers must be above --k (2, its default)"),
    "k and layers passed": (["--k", "3", "--layers", "3"],
                            "--k must be between 1 and 2 for --layers 3"),
    "k passed, default layers": (["--k", "12"],
                                 "--k must be between 1 and 11 for the default --layers 12"),
    "k zero": (["--k", "0"], "--k is the first decoder layer"),
    "k for a random 7b": (["--model", "random-7b", "--k", "32"],
                          "--k must be between 1 and 31 for --model random-7b (32 layers)"),
    "one layer": (["--layers", "1"], "--layers must be at least 2"),
    "zero width": (["--width", "0"], "--width must be a multiple of 64"),
    "odd width": (["--width", "100"], "--width must be a multiple of 64"),
    "zero repeats": (["--repeats", "0"], "--repeats must be at least 1"),
    "no text": (["--text-tokens", "0"], "--text-tokens must be at least 1"),
    "past the context": (["--text-tokens", "4000"],
                         "--text-tokens 4000 makes a 4576-token prompt, too long"),
    # 4,086 tokens fit the 4,096 of the context, not with the decode's 16 after them
    "video past the context": (["--video", "--text-tokens", "2030"],
                               "--text-tokens 2030 makes a 4086-token prompt, too long"),
    "negative batch": (["--batch", "-1"], "--batch must be at least 0"),
    "batch of one": (["--batch", "1"], "--batch 1 is the one-prompt prefill"),
    "layers with a model": (["--model", "random-7b", "--layers", "3"],
                            "--layers and --width size the default random model"),
}


@pytest.mark.parametrize("case", BAD, ids=lambda case: case.replace(" ", "-"))
def test_bad_input_is_one_sentence_naming_the_flag(case, no_model, capsys):
    argv, message = BAD[case]
    assert bench.command(argv + ["--device", "cpu"]) == 2
    captured = capsys.readouterr()
    error = captured.err.strip()
    assert error.startswith(f"error: {message}") and "\n" not in error, error
    assert error.endswith(".") and "Traceback" not in error and captured.out == ""


def test_an_unwritable_json_is_refused_before_the_bench(tmp_path, no_model, capsys):
    """A path under a regular file cannot be written, even by root (chmod would not stop root)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert bench.command(SMALL + ["--json", str(blocker / "bench.json")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: --json {blocker / 'bench.json'} cannot be written")
    assert "\n" not in error
    assert bench.command(SMALL + ["--json", str(tmp_path)]) == 2  # a folder
    assert "cannot be written (it is a folder)" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.command(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"minifastv {cli.VERSION}"


def test_ctrl_c_is_one_line_and_exit_code_130(tmp_path):
    """SIGINT, as Ctrl-C sends it, once the bench reports its first progress: exit 130, no
    traceback."""
    process = subprocess.Popen(
        [sys.executable, "-m", "minifastv.bench", "--model", "tiny", "--device", "cpu",
         "--no-transformers"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "MINIFASTV_WEIGHTS": str(tmp_path)},
        # Python turns SIGINT into KeyboardInterrupt unless it starts with the signal ignored, as
        # a job started in the background by a shell without job control does
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    try:
        for line in process.stderr:
            seen.append(line)
            if line.startswith("warming up"):
                break
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    err = "".join(seen) + err
    assert process.returncode == 130, err
    assert "Traceback" not in err and err.rstrip().endswith("interrupted (Ctrl-C)"), err


def test_the_bench_never_catches_ctrl_c_itself():
    """cli.report_errors turns Ctrl-C into one line and exit code 130: no handler in bench.py may
    catch it first (a bare except, BaseException or KeyboardInterrupt)."""
    tree = ast.parse((ROOT / "minifastv" / "bench.py").read_text())
    for handler in ast.walk(tree):
        if isinstance(handler, ast.ExceptHandler):
            caught = ast.unparse(handler.type) if handler.type else "everything"
            assert not re.search(r"everything|BaseException|KeyboardInterrupt", caught), caught


# ------------------------------------------------------------------------------------------------
# The pieces


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
    three settings taking turns, caches are made anew, but never for a timed generation."""
    model = bench.random_llava(torch.device("cpu"), torch.float32, layers=3, width=64)
    model.new_cache = compiled.reusing_caches(model)  # the compiled path's caches, not compiled
    ids, visual = bench.benchmark_prompt(model.config, 10)
    counts = {"caches": 0, "timed": 0, "caches_made_for_timed": 0}

    class CountedKVCache(compiled.KVCache):
        def __init__(self, *args):
            super().__init__(*args)
            counts["caches"] += 1

    untimed_generate = bench.generate

    def generate(*args, stats=None, **options):
        before = counts["caches"]
        tokens = untimed_generate(*args, stats=stats, **options)
        if stats is not None:  # the timed one: GenerationStats times its decode steps
            counts["timed"] += 1
            counts["caches_made_for_timed"] += counts["caches"] - before
        return tokens

    monkeypatch.setattr(compiled, "KVCache", CountedKVCache)
    monkeypatch.setattr(bench, "generate", generate)
    settings = {cli.setting_name(fastv): fastv for fastv in (None, FastV(2, 0.5), FastV(2, 0.75))}
    speeds = bench.decode_speeds(model, ids, visual, settings, repeats=2)
    assert set(speeds) == set(settings) and all(len(runs) == 2 for runs in speeds.values())
    assert all(0 < speed < float("inf") for runs in speeds.values() for speed in runs)
    assert counts["timed"] == 2 * 3  # rounds x settings
    assert counts["caches"] > 3  # three shapes in turns, two kept: caches were made again
    assert counts["caches_made_for_timed"] == 0


def test_the_token_clock_times_the_decode_steps_alone():
    """transformers' decode speed: a streamer's clock, from the first new token to the last."""
    clock = bench.TokenClock()
    clock.times = [0.0, 5.0, 5.5, 6.0, 6.5]  # the prompt, then 4 new tokens: 3 decode steps
    assert clock.decode_tokens_per_second() == 3 / 1.5


def test_bench_times_a_checkpoint_load(tmp_path, monkeypatch):
    import minifastv.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path)
    results = bench.main(["--model", "tiny", "--device", "cpu", "--repeats", "1",
                          "--no-transformers"])
    assert results["load_seconds"] > 0
    assert results["prefill_ms_batch0"] is None  # no batch on the CPU by default


def test_random_weights_in_the_real_shapes():
    """random-7b's recipe on a small config: every tensor drawn on the device, in the dtype, with
    std 0.02."""
    config = bench.random_config(layers=2, width=128)
    model = bench.random_model(config, torch.device("cpu"), torch.bfloat16)
    weights = torch.cat([p.float().flatten() for p in model.parameters()])
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert abs(weights.std().item() - 0.02) < 0.001 and abs(weights.mean().item()) < 0.001
    assert model.rope_cos.dtype == torch.float32  # the rotary tables are built, in float32


def test_random_models_name_the_real_configs():
    layers = {name: config_by_name(preset).text.num_hidden_layers
              for name, preset in bench.RANDOM_MODELS.items()}
    assert layers == {"random-7b": 32, "random-13b": 40, "random-video-7b": 32}


def test_decode_floor_counts_the_weights_a_step_reads():
    model = bench.random_llava(torch.device("cpu"), torch.float32, layers=2, width=64)
    decoder = (sum(p.numel() for p in model.language_model.layers.parameters()) + 64
               + model.lm_head.weight.numel())
    # no embedding table, vision tower or projector
    assert bench.decode_step_bytes(model) == 4 * decoder


def test_transformers_twin_has_the_same_weights():
    """The comparison is only fair if transformers runs the very same model: equal logits, shared
    tensors."""
    model = bench.random_llava(torch.device("cpu"), torch.float32, layers=3, width=64)
    twin = bench.transformers_twin(model)
    ids, visual = bench.benchmark_prompt(model.config, 10)
    with torch.no_grad():
        ours = model(ids, **visual)
        theirs = twin(input_ids=ids, **visual).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    # no second copy of the weights
    assert twin.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()


def test_bench_times_a_video_prompt(capsys):
    """--video: a random Video-LLaVA-shaped model and a video prompt, 2,056 of its tokens video."""
    results = bench.main(["--video"] + SMALL)
    out = capsys.readouterr().out
    assert "2056 of them video" in out
    assert re.search(r"^\s*R=0\.50\s+\d+\.\d", out, flags=re.MULTILINE), out
    assert results["image_tokens"] == 2056 and results["transformers"] is not None


def test_video_twin_has_the_same_weights():
    model = bench.random_llava(torch.device("cpu"), torch.float32, layers=3, width=64, video=True)
    twin = bench.transformers_twin(model)
    ids, visual = bench.benchmark_prompt(model.config, 10, video=True)
    with torch.no_grad():
        difference = (model(ids, **visual) - twin(input_ids=ids, **visual).logits).abs().max()
    assert difference.item() < 1e-4


def test_bench_compiled_writes_its_compile_time(tmp_path, capsys, monkeypatch, fresh_compiler):
    """--compile times the compiled path after warm-up runs that compile it (captured with
    aot_eager here: inductor's code generation takes minutes on a CPU; tests/test_compiled.py runs
    it once)."""
    import functools

    monkeypatch.setattr(cli, "compile_model",
                        functools.partial(compiled.compile_model, backend="aot_eager"))
    path = tmp_path / "bench.json"
    bench.main(SMALL + ["--no-transformers", "--compile", "--json", str(path)])
    captured = capsys.readouterr()
    written = json.loads(path.read_text())
    assert written["compiled"] is True and written["compile_seconds"] > 0
    assert "compiled in" in captured.err and "compiled (first runs" in captured.out
    # the warm-up that compiles is the one every setting gets, before any timing
    assert captured.err.index("warming up") < captured.err.index("compiled in")
    assert written["torch"] == torch.__version__ and written["machine"]
