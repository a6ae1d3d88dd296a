"""FLOPs of a LLaVA prefill, with and without FastV: the paper's model and an exact count.

The paper (FastV, Sec. 4) counts, per decoder layer with n tokens, hidden size d and FFN size m,

    C(n) = 4 n d^2 + 2 n^2 d + 2 n d m

(attention projections, attention scores, two FFN matrices) and evaluates it for the image tokens
and a 36-token system prompt. SwiGLU has a third FFN matrix, and the vision tower and lm_head cost
FLOPs too, so `exact_prefill_flops` counts every matrix product minifastv runs instead: 2 FLOPs per
multiply-add, attention as the full T x T product that SDPA's math kernel computes, nothing for
norms, activations and softmax (cheap elementwise work).

Plain arithmetic on a LlavaConfig (model.py): this module imports nothing of minifastv, so
that generation can fill GenerationStats.flops. `python -m minifastv.flops`
(flops/__main__.py) prints the numbers.
"""


def kept_tokens(num_tokens, num_image_tokens, r):
    """Tokens left after FastV drops round(N * r) of the N image tokens (it keeps
    round(N * (1 - r)))."""
    return num_tokens - num_image_tokens + round(num_image_tokens * (1 - r))


def paper_layer_flops(n, d, m):
    return 4 * n * d**2 + 2 * n**2 * d + 2 * n * d * m


def paper_flops(config, num_text_tokens, num_image_tokens, k=None, r=0.0):
    """The paper's FLOPs of all decoder layers; FastV when k is given. Divide by the layer
    count for Table 1."""
    d, m, layers = (config.text.hidden_size, config.text.intermediate_size,
                    config.text.num_hidden_layers)
    n = num_text_tokens + num_image_tokens
    if k is None:
        return layers * paper_layer_flops(n, d, m)
    n_kept = num_text_tokens + (1 - r) * num_image_tokens  # unrounded, as the paper evaluates it
    return k * paper_layer_flops(n, d, m) + (layers - k) * paper_layer_flops(n_kept, d, m)


def decoder_layer_flops(config, n):
    """Exact matmul FLOPs of one decoder layer over n tokens (prefill, no cache)."""
    text = config.text
    q_width, kv_width = (text.num_attention_heads * text.head_dim,
                         text.num_key_value_heads * text.head_dim)
    projections = 2 * n * text.hidden_size * (2 * q_width + 2 * kv_width)  # q, o and k, v
    attention = 2 * 2 * text.num_attention_heads * n * n * text.head_dim  # Q K^T and weights @ V
    mlp = 3 * 2 * n * text.hidden_size * text.intermediate_size  # gate, up, down
    return projections + attention + mlp


def vision_flops(config, num_images, num_frames=0):
    """Exact matmul FLOPs of the vision tower (the layers that run) and the projector, for images
    and video frames."""
    vision = config.vision
    c, patches = vision.hidden_size, vision.grid_size**2
    n = patches + 1  # CLS token
    patch_embedding = 2 * patches * vision.num_channels * vision.patch_size**2 * c
    layer = 4 * 2 * n * c * c + 2 * 2 * n * n * c + 2 * 2 * n * c * vision.intermediate_size
    tower = patch_embedding + (
        config.vision_feature_layer % (vision.num_hidden_layers + 1) * layer  # the layers that run
    )

    def projector(tokens):
        return 2 * tokens * c * config.text.hidden_size + 2 * tokens * config.text.hidden_size**2

    return (num_images * (tower + projector(config.image_tokens_per_image))
            + num_frames * (tower + projector(n)))


def exact_prefill_flops(config, num_tokens, num_image_tokens, k=None, r=0.0, num_videos=0):
    """Exact matmul FLOPs of one prompt's prefill: vision, decoder, FastV's scoring row, the
    last token's logits.

    num_image_tokens counts every token FastV may prune: the images' and the
    `num_videos` videos' together.
    """
    text = config.text
    num_images = ((num_image_tokens - num_videos * config.tokens_per_video)
                  // config.image_tokens_per_image)
    flops = vision_flops(config, num_images, num_videos * config.num_frames)
    if k is None:
        flops += text.num_hidden_layers * decoder_layer_flops(config, num_tokens)
    else:
        n_kept = kept_tokens(num_tokens, num_image_tokens, r)
        flops += (k * decoder_layer_flops(config, num_tokens)
                  + (text.num_hidden_layers - k) * decoder_layer_flops(config, n_kept))
        # the last token's scores in layer K-1
        flops += 2 * text.num_attention_heads * num_tokens * text.head_dim
    return flops + 2 * text.hidden_size * text.vocab_size  # lm_head, for the last token only


def prefill_flops_report(config, num_tokens, num_image_tokens, fastv=None, batch_size=1,
                         num_videos=0):
    """Prefill FLOPs of a batch, both models, with FastV's settings (or the unpruned model
    twice)."""
    k, r = (fastv.k, fastv.r) if fastv is not None else (None, 0.0)
    num_text = num_tokens - num_image_tokens
    report = {
        "paper": batch_size * paper_flops(config, num_text, num_image_tokens, k, r),
        "paper_unpruned": batch_size * paper_flops(config, num_text, num_image_tokens),
        "exact": batch_size * exact_prefill_flops(
            config, num_tokens, num_image_tokens, k, r, num_videos
        ),
        "exact_unpruned": batch_size * exact_prefill_flops(
            config, num_tokens, num_image_tokens, num_videos=num_videos
        ),
    }
    report["paper_ratio"] = report["paper"] / report["paper_unpruned"]
    report["exact_ratio"] = report["exact"] / report["exact_unpruned"]
    return report


def flops_unit(flops):
    """(scale, name) of the unit that shows a FLOP count readably: TFLOPs for a 7B model's prefill,
    GFLOPs or MFLOPs for a tiny model's."""
    for scale, name in ((1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs")):
        if flops >= scale:
            return scale, name
    return 1, "FLOPs"


def flops_text(flops):
    """8.51 TFLOPs for a real model's prefill, 2.00 GFLOPs for the tiny one's."""
    scale, name = flops_unit(flops)
    return f"{flops / scale:.2f} {name}"


# ------------------------------------------------------------------------------------------------
# Memory: what FastV's pruned KV cache saves, next to the weights


def parameter_count(config, towers=("image", "video")):
    """Parameters of the model for `config`: the decoder, the projector, and its CLIP tower(s).
    Video-LLaVA has two towers of one shape; `towers` says which of them are loaded
    (checkpoint.load(towers=...))."""
    text, vision = config.text, config.vision
    d, c = text.hidden_size, vision.hidden_size
    q_width, kv_width = (text.num_attention_heads * text.head_dim,
                         text.num_key_value_heads * text.head_dim)
    decoder_layer = (2 * d * q_width + 2 * d * kv_width + 3 * d * text.intermediate_size
                     + 2 * d)  # + 2 RMSNorms
    # embeddings, lm_head, final norm
    decoder = 2 * text.vocab_size * d + text.num_hidden_layers * decoder_layer + d
    clip_layer = (4 * (c * c + c) + 2 * c * vision.intermediate_size + vision.intermediate_size
                  + c + 4 * c)
    tower = (vision.num_channels * vision.patch_size**2 * c  # patches
             + c + (vision.grid_size**2 + 1) * c  # CLS, positions
             + 4 * c + vision.num_hidden_layers * clip_layer)  # pre and post LayerNorm, the layers
    num_towers = 1 if config.video_token_id is None else len(towers)
    return decoder + (c * d + d + d * d + d) + num_towers * tower


def kv_cache_bytes(config, num_tokens, num_image_tokens, k=None, r=0.0, bytes_per_value=2):
    """Bytes of one sequence's KV cache after `num_tokens` tokens, `num_image_tokens` of them
    prunable: every layer holds keys and values of every token, except layers >= K with FastV, which
    hold the kept ones."""
    text = config.text
    # a key and a value
    per_token_and_layer = 2 * text.num_key_value_heads * text.head_dim * bytes_per_value
    kept = num_tokens if k is None else kept_tokens(num_tokens, num_image_tokens, r)
    layers_pruned = 0 if k is None else text.num_hidden_layers - k
    return per_token_and_layer * (
        (text.num_hidden_layers - layers_pruned) * num_tokens + layers_pruned * kept
    )
