"""The compiled path: the same model code, fewer kernel launches. Opt-in; eager is the reference.

On a fast GPU at batch 1, a decoder layer's arithmetic takes less time than launching its ~40
small kernels from Python, so FLOPs saved by FastV barely show as time saved. compile_model:
- prefill: compiles each decoder layer's norms, projections with RoPE and MLP (torch.compile fuses
  their elementwise steps) and each CLIP tower whole; Llava.forward runs as written, FastV and all;
- decode: compiles Llava.decode_step whole. The KV cache is preallocated and written in place, so
  every step has the same shapes; on a GPU the step is captured as a CUDA graph
  (mode="reduce-overhead") that replays a token's hundreds of kernels with one launch.
A CUDA graph replays on the addresses it was recorded with, so the compiled model reuses its KV
caches' buffers from one generation to the next (one generation at a time per model).
"""

import torch

from .model import KVCache

BUCKET = 256  # cache capacities round up to this: prompts of many lengths share a few shapes


def reusing_caches(model, keep=2):
    """A new_cache for `model` that hands back the buffers of an earlier cache of the same shape:
    it keeps its last `keep` shapes (with and without FastV, say)."""
    pool = {}  # shape -> KVCache, the oldest first

    def new_cache(input_ids, fastv=None, room=0):
        shape = model.cache_shape(input_ids, fastv, room, BUCKET)
        cache = pool.pop(shape, None)
        if cache is None:
            while len(pool) >= keep:  # free the oldest before allocating
                pool.pop(next(iter(pool)))
            cache = KVCache(model.config.text, *shape, model.device, model.dtype)
            for tensor in (*cache.keys, *cache.values, *cache.valid, *cache.length,
                           cache.next_position):
                torch._dynamo.mark_static_address(tensor)  # the graph reads and writes them there
        cache.prefilled = False  # the prefill overwrites what the last generation left
        pool[shape] = cache
        return cache

    return new_cache


def compile_model(model, backend="inductor"):
    """Switch `model` to the compiled path, in place, and return it. Compiling happens during the
    first calls; calling this again changes nothing. `backend` is torch.compile's: the tests use
    "aot_eager", which captures the same graphs without generating code."""
    if "decode_step" in vars(model):  # compiled already
        return model
    for layer in model.language_model.layers:
        for part in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp):
            part.compile(dynamic=None, backend=backend)  # static shapes, dynamic from a 2nd length
        layer.self_attn.project = torch.compile(layer.self_attn.project, backend=backend)
    for tower in model.towers():  # no cache, no FastV: a whole tower compiles to one graph
        tower.compile(dynamic=None, backend=backend)
    cuda_graph = model.device.type == "cuda" and backend == "inductor"
    # Not fullgraph=True: past torch._dynamo.config.recompile_limit versions of the step (new K,
    # new shapes, other models in the process) it runs uncompiled, still right, without raising.
    # tests/test_compiled.py checks that the step is one graph.
    model.decode_step = torch.compile(model.decode_step, backend=backend,
                                      mode="reduce-overhead" if cuda_graph else None)
    model.new_cache = reusing_caches(model)
    return model
