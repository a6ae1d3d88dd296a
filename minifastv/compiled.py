"""The compiled path: the same model code, run with fewer kernel launches. Opt-in; eager stays the reference.

On a fast GPU at batch 1, a decoder layer's arithmetic takes less time than launching its ~40 small
kernels from Python, so FLOPs saved by FastV barely show as time saved. Two changes fix that:

- Prefill: every decoder layer's norms, projections with RoPE, and MLP are compiled by torch.compile,
  which fuses their elementwise steps, and so is each CLIP tower, whole. Llava.forward runs as written,
  FastV's step included (it never waits for the GPU, so the host keeps queuing work).
- Decode: the eager KVCache grows by torch.cat, a new shape every token. StaticKVCache allocates every
  buffer once and writes each new key and value in place, so one decode step has the same shapes every
  time: it is compiled whole and, on a GPU, captured as a CUDA graph (mode="reduce-overhead") that
  replays a token's hundreds of kernels with one launch.

Switched on by `minifastv.compile_model(model)` (and `--compile` on the commands); generate() and
stream() then take the compiled path. The first call compiles, which takes a while (the commands
print how long); a second prompt length compiles the prefill once more, for any length after it.
"""

import torch


class StaticKVCache:
    """A KV cache of fixed size, filled from the prefill's KVCache, for compiled decoding. It holds:

    keys[i], values[i]: (B, H_kv, capacity, D) buffers of layer i, written in place at the write index.
    group[i]: 0 for the layers that hold every prompt token, 1 for those after FastV's layer K (fewer).
    valid[g]: (B, capacity) bool, True where group g holds a real token (not padding, not yet written).
    write_index[g]: () long, where group g writes the next token's key and value.
    next_position: (B,) long, the next token's position among the real tokens (RoPE's angle).
    All are tensors on the device, changed in place, so the shapes and addresses never change.
    """

    def __init__(self, cache, max_new_tokens, bucket=256):
        """Buffers for the prefill's KVCache `cache` and max_new_tokens more tokens, filled from it. `bucket`:
        capacities are rounded up to a multiple of it, so that prompts of many lengths share a few shapes (each
        new shape compiles the decode step, and records a CUDA graph, once more)."""
        self.shape = StaticKVCache.shape_for(cache, max_new_tokens, bucket)
        capacities = self.shape[0]
        self.group = [0 if cache.pruned_at is None or i < cache.pruned_at else 1 for i in range(len(cache.keys))]
        batch_size, device = cache.attention_mask.shape[0], cache.attention_mask.device
        self.valid = [torch.zeros(batch_size, capacity, dtype=torch.bool, device=device) for capacity in capacities]
        self.write_index = [torch.zeros((), dtype=torch.long, device=device) for _ in capacities]
        # Zeros, not empty memory: a slot not yet written is masked out, but 0 x NaN would still be NaN.
        self.keys = [k.new_zeros(*k.shape[:2], capacities[group], k.shape[3]) for k, group in zip(cache.keys, self.group)]
        self.values = [v.new_zeros(*v.shape[:2], capacities[group], v.shape[3]) for v, group in zip(cache.values, self.group)]
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        for tensor in (*self.keys, *self.values, *self.valid, *self.write_index, self.next_position):
            torch._dynamo.mark_static_address(tensor)  # the CUDA graph may read and write them where they are
        self.fill(cache)

    @staticmethod
    def shape_for(cache, max_new_tokens, bucket=256):
        """What decides the buffers' shapes: two prefills with the same can share them."""
        capacities = tuple(-(-(mask.shape[1] + max_new_tokens) // bucket) * bucket for mask in prefill_masks(cache))  # rounded up
        return capacities, cache.pruned_at, tuple(cache.keys[0].shape), cache.keys[0].dtype

    def fill(self, cache):
        """Copy a prefill's keys, values and masks in, in place: the buffers keep their addresses. What an earlier
        generation left beyond the prompt stays, masked out by `valid` until it is overwritten."""
        for valid, write_index, mask in zip(self.valid, self.write_index, prefill_masks(cache)):
            valid.zero_()
            valid[:, : mask.shape[1]] = mask.bool()
            write_index.fill_(mask.shape[1])
        for buffers, prefilled in ((self.keys, cache.keys), (self.values, cache.values)):
            for buffer, tensor in zip(buffers, prefilled):
                buffer[:, :, : tensor.shape[2]] = tensor
        self.next_position.copy_(cache.attention_mask.sum(dim=1))  # (B,): real tokens so far = the next one's position

    def update(self, layer_index, k, v):
        """Write the new token's key and value (B, H_kv, 1, D) at the write index; all keys and values back."""
        index = self.write_index[self.group[layer_index]].view(1)
        self.keys[layer_index].index_copy_(2, index, k)
        self.values[layer_index].index_copy_(2, index, v)
        return self.keys[layer_index], self.values[layer_index]  # (B, H_kv, capacity, D): `valid` masks the rest

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def prefill_masks(cache):
    """The padding masks of a prefilled KVCache, one per group of layers: all tokens, and the kept ones after FastV."""
    return [cache.attention_mask] if cache.pruned_at is None else [cache.attention_mask, cache.pruned_attention_mask]


def static_cache(model, cache, max_new_tokens, keep=2):
    """A StaticKVCache holding the prefill's `cache`, in the buffers of an earlier one of the same shape when the
    model has them: a CUDA graph reads and writes the addresses it was recorded with, and new buffers would make
    it record again. The model keeps the buffers of its last `keep` shapes (e.g. with and without FastV), so a
    compiled model runs one generation at a time."""
    shape = StaticKVCache.shape_for(cache, max_new_tokens)
    pool = model.static_caches  # shape -> StaticKVCache, the oldest first (compile_model makes it)
    if shape in pool:
        reused = pool.pop(shape)
        reused.fill(cache)
    else:
        while len(pool) >= keep:  # free the oldest before allocating
            pool.pop(next(iter(pool)))
        reused = StaticKVCache(cache, max_new_tokens)
    pool[shape] = reused
    return reused


def decode_step(model, cache, token):
    """One new token per sequence, (B,), through the decoder against a StaticKVCache: logits (B, vocab).

    The decode half of Llava.forward with fixed shapes and no host synchronization, so it compiles to one
    graph: embed, RoPE at the next position, every layer (attending over the whole buffer, masked by
    `valid`), final norm, head. Then the write indexes and the position move on by one.
    """
    for valid, index in zip(cache.valid, cache.write_index):
        valid.index_fill_(1, index.view(1), True)  # the new token is real and sees itself
    x = model.language_model.embed_tokens(token[:, None])  # (B, 1, C)
    cos, sin = model.rope(cache.next_position[:, None], x.dtype)  # (B, 1, 1, D)
    masks = [valid[:, None, None, :] for valid in cache.valid]  # (B, 1, 1, capacity) per group
    for index, layer in enumerate(model.language_model.layers):
        x, _ = layer(x, cos, sin, masks[cache.group[index]], cache, index)
    for index in cache.write_index:
        index.add_(1)
    cache.next_position.add_(1)
    return model.lm_head(model.language_model.norm(x))[:, -1]  # (B, vocab)


def towers(model):
    """The model's loaded CLIP towers: LLaVA's one, Video-LLaVA's two (or the one it was loaded with)."""
    return [tower for name in ("vision_tower", "image_tower", "video_tower") if (tower := getattr(model, name, None)) is not None]


def compile_model(model, backend="inductor"):
    """Switch `model` to the compiled path, in place, and return it: from now on its vision towers and its decoder
    layers' norms, projections and MLPs run compiled (prefill), and generate() decodes with a StaticKVCache and the compiled
    decode step. Compiling happens during the first calls; calling this again changes nothing. `backend` is
    torch.compile's: the tests use "aot_eager", which captures the same graphs without generating code."""
    if getattr(model, "compiled_decode_step", None) is None:
        for layer in model.language_model.layers:  # prefill: the elementwise steps around the matrix products, fused
            for part in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp):
                part.compile(dynamic=None, backend=backend)  # static shapes first; dynamic once a second prompt length comes
            layer.self_attn.project = torch.compile(layer.self_attn.project, dynamic=None, backend=backend)
        for tower in towers(model):  # no cache, no FastV: a whole tower compiles to one graph
            tower.compile(dynamic=None, backend=backend)
        cuda_graph = model.device.type == "cuda"  # a CUDA graph needs a GPU; on the CPU, fusing alone
        model.static_caches = {}  # the decode step's buffers, reused from one generation to the next
        # Not fullgraph=True: past torch._dynamo.config.recompile_limit versions of the step (new K, new shapes,
        # other models in the same process) it then runs uncompiled, still right, instead of raising.
        # tests/test_compiled.py checks that the step is one graph.
        model.compiled_decode_step = torch.compile(decode_step, backend=backend,
                                                   mode="reduce-overhead" if cuda_graph and backend == "inductor" else None)
    return model
