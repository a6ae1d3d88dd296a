"""Generation: prefill the prompt once (FastV prunes there), then one token at a time.

Free functions that drive the model (model.py), as llama's generation.py and gpt-fast do: the model
never imports this file. `generate(model, input_ids, ...)` returns the new tokens; `stream` yields
them one at a time. Sampling settings are one small dataclass; a GenerationStats records what a
run measured.
"""

import time
from dataclasses import dataclass, fields

import torch

from .errors import SettingsError
from .flops import flops_text, prefill_flops_report


@dataclass
class Sampling:
    """How the next token is picked: greedy (temperature 0, the default) or nucleus sampling."""

    temperature: float = 0.0  # 0 picks the likeliest token; > 0 samples softmax(logits / it)
    top_p: float = 1.0  # sampling: only from the fewest tokens whose probability reaches top_p
    seed: int = 0  # the random generator's seed: the same seed, the same answer

    def __post_init__(self):
        if not 0 <= self.temperature < float("inf"):  # also refuses NaN
            raise SettingsError("The sampling temperature must be 0 (greedy) or a finite number "
                                f"above it, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise SettingsError(f"top-p is a share of the probability and must be in (0, 1], "
                                f"got {self.top_p}.")
        if not 0 <= self.seed < 2**64:  # what torch.Generator.manual_seed takes
            raise SettingsError(f"The seed must be in [0, 2**64), got {self.seed}.")
        if self.temperature == 0 and self.top_p != 1:
            raise SettingsError("top-p applies only when sampling: set a temperature above 0 too.")


def pick_token(logits, sampling, generator):
    """Greedy (temperature 0) or nucleus sampling over (B, vocab) float32 logits."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside_nucleus = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p  # the first stays
    sorted_probs = sorted_probs.masked_fill(outside_nucleus, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # (B, 1); renormalizes
    return order.gather(-1, choice)[:, 0]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous: wait before reading the clock


@dataclass
class GenerationStats:
    """What a generate() run measured; pass one as `stats=` and read it afterwards.

    Counts and settings, and one tensor: kept_image_indices (image_tokens_kept is their count).
    """

    prompt_tokens: int = 0  # per prompt, padding included
    image_tokens: int = 0  # per prompt: the tokens FastV ranks, of all images and videos together
    video_tokens: int = 0  # of those, how many are video frames'
    image_tokens_kept: int = 0  # of those, how many FastV kept (all of them without FastV)
    k: int | None = None  # FastV's settings, None without FastV
    r: float | None = None
    # (B, image_tokens_kept), sorted: WHICH image tokens FastV kept, as indices among the prompt's
    # image tokens (0 is the first); cache.kept_image_tokens, on the CPU. None without FastV.
    kept_image_indices: torch.Tensor | None = None
    kv_cache_bytes: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0  # tokens produced by decode steps (the first comes from the prefill)
    decode_seconds: float = 0.0
    flops: dict | None = None  # prefill FLOPs with and without FastV: see minifastv.flops

    @property
    def decode_tokens_per_second(self):
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def __repr__(self):
        """Counts and settings as they are; the indices as their shape, the FLOPs as their ratio."""
        def short(name, value):
            if isinstance(value, torch.Tensor):
                return f"<{tuple(value.shape)} tensor>"
            if name == "flops" and value is not None:
                return f"<{flops_text(value['exact'])}, {value['exact_ratio']:.1%} of unpruned>"
            return f"{value:.4g}" if isinstance(value, float) else repr(value)

        shown = ", ".join(f"{field.name}={short(field.name, getattr(self, field.name))}"
                          for field in fields(self))
        return f"GenerationStats({shown})"

    def record_prefill(self, config, input_ids, cache, fastv, seconds):
        self.prompt_tokens = input_ids.shape[1]
        self.image_tokens = self.image_tokens_kept = int(config.is_visual(input_ids[0]).sum())
        if config.video_token_id is not None:
            self.video_tokens = int((input_ids[0] == config.video_token_id).sum())
        pruned = cache.kept_image_tokens is not None
        if pruned:
            self.k, self.r = fastv.k, fastv.r
            self.image_tokens_kept = cache.kept_image_tokens.shape[1]
            self.kept_image_indices = cache.kept_image_tokens.cpu()
        self.prefill_seconds = seconds
        self.kv_cache_bytes = cache.nbytes()
        self.flops = prefill_flops_report(
            config, self.prompt_tokens, self.image_tokens, fastv if pruned else None,
            batch_size=input_ids.shape[0], num_videos=self.video_tokens // config.tokens_per_video)


@torch.inference_mode()
def stream(model, input_ids, pixel_values=None, pixel_values_videos=None, attention_mask=None,
           max_new_tokens=64, fastv=None, sampling=None, stats=None, eos_token_id=None):
    """Yield the next token of every sequence, (B,), until each has produced EOS or the limit.

    `sampling`: a Sampling (default greedy). Finished sequences yield pad ids. FastV prunes once,
    at prefill: the cache of layers >= K holds only the kept tokens, and every generated token
    attends to those. Pass a GenerationStats as `stats` to have it filled in; eos_token_id=-1
    never stops early. The same loop runs a model compiled by minifastv.compile_model.
    """
    sampling = sampling or Sampling()
    generator = torch.Generator(device=model.device).manual_seed(sampling.seed)
    eos_token_id = model.config.text.eos_token_id if eos_token_id is None else eos_token_id
    context = model.config.text.max_position_embeddings
    if input_ids.shape[1] + max_new_tokens > context:
        raise ValueError(f"The prompt has {input_ids.shape[1]} tokens and max_new_tokens asks for "
                         f"{max_new_tokens} more, but the model's context is {context} tokens.")
    started = time.perf_counter()
    # Room for the decode steps' tokens: the last new token is never fed back, so never cached.
    cache = model.new_cache(input_ids, fastv, room=max(max_new_tokens - 1, 0))
    logits = model(input_ids, pixel_values, pixel_values_videos, attention_mask, cache=cache,
                   fastv=fastv, last_logits_only=True)
    next_token = pick_token(logits[:, -1].float(), sampling, generator)  # (B,)
    synchronize(model.device)
    if stats is not None:
        stats.record_prefill(model.config, input_ids, cache, fastv, time.perf_counter() - started)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=model.device)
    for step in range(max_new_tokens):
        next_token = next_token.masked_fill(finished, model.config.pad_token_id)
        yield next_token
        finished |= next_token == eos_token_id
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        started = time.perf_counter()  # per step: what the caller does between tokens is not ours
        torch.compiler.cudagraph_mark_step_begin()  # a CUDA graph may reuse the last outputs now
        next_token = pick_token(model.decode_step(next_token, cache).float(), sampling, generator)
        if stats is not None:
            synchronize(model.device)
            stats.decode_tokens += 1
            stats.decode_seconds += time.perf_counter() - started


def generate(model, input_ids, pixel_values=None, pixel_values_videos=None, attention_mask=None,
             max_new_tokens=64, **options):
    """The new token ids (B, N), EOS included; see `stream` for the options (fastv=, sampling=,
    stats=, eos_token_id=)."""
    tokens = list(stream(model, input_ids, pixel_values, pixel_values_videos, attention_mask,
                         max_new_tokens, **options))
    return torch.stack(tokens, dim=1) if tokens else input_ids.new_zeros(input_ids.shape[0], 0)
