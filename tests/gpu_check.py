"""One GPU run that measures what the GPU issue asks for: python tests/gpu_check.py OUT_FOLDER [--smoke]

The lent GPU machines cannot download anything, so every model here is random, in the real shapes. The
steps run in this order, the least measured first (a loan may end before the last); each writes its own
files into OUT_FOLDER, and a step that fails writes its error and lets the next one run:
1. bench_7b_compiled.json/.txt: the bench on random-7b in bfloat16 with --compile: prefill per setting,
   batch 8, decode against its floor, the GPU's busy share, peak memory, transformers on the same
   weights, compile time; torch.compile's performance hints and recompilations in the .txt;
2. load.json: a random 7B checkpoint written in the hub's names (three float16 shards, about 14 GB) to
   local disk, then read twice from the warm page cache, each in a fresh process: minifastv.load and
   transformers' from_pretrained(device_map="cuda"), seconds and host-memory peak;
3. prefill_graph.json: an experiment, the batch-1 prefill (no KV cache) with its launches recorded as
   CUDA graphs (torch.compile's "cudagraphs" backend, no code generated) against eager, without FastV
   and at R=0.5: how much of FastV's predicted speed-up a prefill without launch overhead realizes;
4. bench_7b.json/.txt: the same as 1, eager;
5. cuda_tests.txt: the CUDA tests (tests/test_cuda.py), float16 and bfloat16 against transformers, the
   compiled path, the loader's GPU path;
6. bench_video.json/.txt: the same as 4 for random-video-7b and a video prompt (2,056 video tokens);
7. memory.json: the T4 question, float16 peak GPU memory (allocated and reserved) of a 32-token answer:
   LLaVA-7B to an image, and Video-LLaVA-7B (video tower only) to a video, each with and without FastV.

--smoke runs the same steps on the CPU with small models, to check this script where no GPU is.
"""

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_step(out, name, function):
    started = time.perf_counter()
    try:
        function()
        status = "ok"
    except Exception:  # a measuring script: record the failure, go on with the next step
        (out / f"{name}.error.txt").write_text(traceback.format_exc())
        status = "failed"
    print(f"{name}: {status} in {time.perf_counter() - started:.0f} s", flush=True)


def module(out, name, args, timeout=900):
    """python -m args..., its output into OUT/name.txt; raises when it fails. A compiled run logs torch.compile's
    performance hints (e.g. why a CUDA graph was skipped) and its recompilations into the same file."""
    env = {**os.environ, "TORCH_LOGS": "perf_hints,recompiles"} if "--compile" in args else None
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    (out / f"{name}.txt").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {result.returncode}")


def write_random_checkpoint(folder, preset, shards=3, smoke=False):
    """A random float16 checkpoint (std 0.02) in the hub's tensor names, split into `shards` files with an index."""
    import torch
    from safetensors.torch import save_file

    from minifastv.checkpoint import PRESETS, expected_tensors
    from minifastv.checkpoint import config_from_dict

    values = json.loads(json.dumps(PRESETS[preset]))
    values.update(model_type="llava", image_token_index=32000, pad_token_id=32001, vocab_size=32064)
    values["text_config"].update(model_type="llama")
    values["vision_config"].update(model_type="clip_vision_model")
    if smoke:
        values["text_config"].update(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(values, indent=2))
    names = list(expected_tensors(config_from_dict(values)).items())
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for shard in range(shards):
        part = names[shard::shards]
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        save_file({name: torch.empty(shape, dtype=torch.float16).normal_(0, 0.02, generator=generator) for name, shape in part},
                  folder / file, metadata={"format": "pt"})
        weight_map.update({name: file for name, _ in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def time_loads(out, smoke):
    from memory_probe import measure_load

    folder = write_random_checkpoint(Path("/tmp/minifastv-random-7b"), "llava-1.5-7b", smoke=smoke)
    size = sum(file.stat().st_size for file in folder.glob("*.safetensors"))
    device = "cpu" if smoke else "cuda"
    for file in folder.glob("*.safetensors"):  # warm the page cache, as a second load would find it
        file.read_bytes()
    results = {"checkpoint_bytes": size, "device": device}
    for which in ("minifastv", "transformers"):
        try:
            result = measure_load(folder, device, "float16", transformers=which == "transformers")
            results[which] = {"seconds": result["seconds"], "host_peak_increase": result["peak_increase"]}
        except RuntimeError as error:  # the loading process failed: keep its output, measure the other
            results[which] = str(error)[-2000:]
    (out / "load.json").write_text(json.dumps(results, indent=2))


def real_config(preset, smoke):
    """A real model's config; with --smoke, the shapes' geometry, narrower and shallower."""
    from minifastv.checkpoint import config_by_name

    config = config_by_name(preset)
    if smoke:
        config.text.hidden_size, config.text.intermediate_size, config.text.num_attention_heads = 256, 688, 2
        config.text.num_key_value_heads, config.text.head_dim = 2, 128
        config.text.num_hidden_layers, config.vision.num_hidden_layers = 3, 2
    return config


def prefill_graph(out, smoke):
    """An experiment for the compiled path's next step: the batch-1 prefill with its launches gone. Llava.forward
    under torch.compile's "cudagraphs" backend (the eager kernels, recorded as CUDA graphs between the forward's few
    host syncs; no code generated) against eager, bfloat16 random-7b, without FastV and at K=2 R=0.5. Without a
    KV cache, on both sides: under torch.compile the prefill's in-place writes into a cache would run as extra
    copies outside the graphs (AOT autograd applies input mutations after the graph), a cost eager never pays."""
    import statistics

    import torch

    import minifastv
    from minifastv import bench, cli
    from minifastv.flops import exact_prefill_flops

    device = torch.device("cpu" if smoke else "cuda")
    config = real_config("llava-1.5-7b", smoke)
    model = bench.random_model(config, device, torch.float32 if smoke else torch.bfloat16)
    ids, visual = bench.benchmark_prompt(config, 40)
    graphed = torch.compile(model, backend="cudagraphs", dynamic=False)
    results = {"device": bench.device_name(device), "torch": torch.__version__, "prompt_tokens": ids.shape[1]}
    with torch.inference_mode():
        for fastv in (None, minifastv.FastV(2, 0.5)):
            name, logits = cli.setting_name(fastv), {}
            for label, run in (("eager", model), ("cudagraphs", graphed)):
                def prefill():
                    torch.compiler.cudagraph_mark_step_begin()  # the last run's outputs may be overwritten now
                    return run(ids, **visual, fastv=fastv, last_logits_only=True)

                for _ in range(3):  # the first runs record the graphs
                    prefill()
                times = [bench.timed(device, prefill) for _ in range(7)]
                results[f"{label}_{name}_ms"] = statistics.median(times) * 1e3
                logits[label] = prefill().float().cpu()  # a replay's
            results[f"max_logit_difference_{name}"] = (logits["eager"] - logits["cudagraphs"]).abs().max().item()
    unpruned = exact_prefill_flops(config, ids.shape[1], 576)
    results["predicted_speedup_K2_R0.5"] = unpruned / exact_prefill_flops(config, ids.shape[1], 576, 2, 0.5)
    for label in ("eager", "cudagraphs"):
        results[f"{label}_speedup_K2_R0.5"] = results[f"{label}_no_fastv_ms"] / results[f"{label}_K2_R0.5_ms"]
    (out / "prefill_graph.json").write_text(json.dumps(results, indent=2))


def peak_memory(out, smoke):
    """float16 peak GPU memory of a 32-token answer, with and without FastV (or, with --smoke, that it runs)."""
    import torch

    import minifastv
    from minifastv import bench
    from minifastv.generation import generate

    device = torch.device("cpu" if smoke else "cuda")
    results = {}
    for preset, video in (("llava-1.5-7b", False), ("video-llava-7b", True)):
        config = real_config(preset, smoke)
        model = bench.random_model(config, device, torch.float16)
        if video:
            model.image_tower = None  # load(towers=("video",)): a video question needs the video tower only
        ids, visual = bench.benchmark_prompt(config, 40, video=video)
        for fastv in (None, minifastv.FastV(2, 0.5)):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            generate(model, ids, **visual, max_new_tokens=32, fastv=fastv, eos_token_id=-1)
            key = f"{preset}{'_video_tower_only' if video else ''}_{'fastv_K2_R0.5' if fastv else 'no_fastv'}"
            results[key] = {"allocated": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
                            "reserved": torch.cuda.max_memory_reserved() if device.type == "cuda" else None,
                            "prompt_tokens": ids.shape[1]}
        del model
    results["device_total"] = torch.cuda.get_device_properties(0).total_memory if device.type == "cuda" else None
    (out / "memory.json").write_text(json.dumps(results, indent=2))


def main():
    out = Path(sys.argv[1])
    smoke = "--smoke" in sys.argv
    out.mkdir(parents=True, exist_ok=True)
    if smoke:
        bench = ["--device", "cpu", "--layers", "3", "--width", "64", "--repeats", "1", "--batch", "2"]
        models = ([], ["--video"])
    else:
        bench = ["--device", "cuda", "--dtype", "bfloat16"]
        models = (["--model", "random-7b"], ["--model", "random-video-7b", "--video"])
    # The least measured first: a loan may end before the last step.
    def bench_7b(name, extra):
        run_step(out, name, lambda: module(out, name, ["minifastv.bench", *models[0], *extra, *bench, "--json", str(out / f"{name}.json")]))

    bench_7b("bench_7b_compiled", ["--compile"])
    run_step(out, "load", lambda: time_loads(out, smoke))
    run_step(out, "prefill_graph", lambda: prefill_graph(out, smoke))
    bench_7b("bench_7b", [])
    if not smoke:
        run_step(out, "cuda_tests", lambda: module(out, "cuda_tests", ["pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"]))
    run_step(out, "bench_video", lambda: module(out, "bench_video", ["minifastv.bench", *models[1], *bench, "--json",
                                                                      str(out / "bench_video.json")]))
    run_step(out, "memory", lambda: peak_memory(out, smoke))


if __name__ == "__main__":
    main()
