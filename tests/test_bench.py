"""The benchmark script runs and reports every setting (its numbers are for people, not for asserts)."""

import re

from minifastv import bench


def test_bench_reports_each_setting(capsys):
    bench.main(["--layers", "3", "--width", "64", "--repeats", "1", "--device", "cpu", "--no-transformers"])
    out = capsys.readouterr().out
    for setting in ("no FastV", "R=0.00", "R=0.25", "R=0.50", "R=0.75"):
        assert re.search(rf"^\s*{re.escape(setting)}\s+\d+\.\d", out, flags=re.MULTILINE), out
    assert "scoring overhead" in out and "576 of them image" in out
    # The FLOPs column falls with R: the prediction the timings are set against.
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s*(no FastV|R=)", line)]
    ratios = [float(row[-4]) for row in rows]  # columns from the right: KV MB, realized, predicted, FLOPs ratio
    assert ratios[0] == 1.0 and ratios[1] == 1.0 and ratios[2] > ratios[3] > ratios[4]


def test_transformers_twin_has_the_same_weights():
    """The comparison is only fair if transformers runs the very same model: equal logits."""
    import torch

    model = bench.random_llava(torch.device("cpu"), torch.float32, layers=3, width=64)
    twin = bench.transformers_twin(model)
    ids, visual = bench.benchmark_prompt(model.config, 10)
    with torch.no_grad():
        ours = model(ids, **visual)
        theirs = twin(input_ids=ids, **visual).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_bench_compares_with_transformers(capsys):
    bench.main(["--layers", "3", "--width", "64", "--repeats", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert re.search(r"^\s*transformers\s+\d+\.\d\s+\d+\.\d", out, flags=re.MULTILINE), out
    assert re.search(r"minifastv / transformers: prefill time \d+\.\d\d", out)


def test_bench_times_a_video_prompt(capsys):
    """--video: a random Video-LLaVA-shaped model and a video prompt, 2,056 of its tokens video."""
    bench.main(["--video", "--layers", "3", "--width", "64", "--repeats", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "2056 of them video" in out and re.search(r"^\s*R=0\.50\s+\d+\.\d", out, flags=re.MULTILINE), out
    assert "VideoLlavaForConditionalGeneration" in out  # the same weights through transformers' Video-LLaVA


def test_video_twin_has_the_same_weights():
    import torch

    model = bench.random_llava(torch.device("cpu"), torch.float32, layers=3, width=64, video=True)
    twin = bench.transformers_twin(model)
    ids, visual = bench.benchmark_prompt(model.config, 10, video=True)
    with torch.no_grad():
        difference = (model(ids, **visual) - twin(input_ids=ids, **visual).logits).abs().max().item()
    assert difference < 1e-4
