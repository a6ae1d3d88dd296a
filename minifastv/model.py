"""LLaVA-1.5 in one file: CLIP vision tower, projector, Llama decoder, and FastV at layer K.

Read it top to bottom: configuration, the Llama decoder blocks, the CLIP vision blocks, the LLaVA model
that joins them (with the FastV step inline in its decoder loop), loading llava-hf safetensors, and
generation with a KV cache. Shapes are tagged in comments: B batch, T tokens, S cached keys, H heads,
D head size, C channels.
"""

import json
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------
# Configuration: three dataclasses filled from a llava-hf config.json.
# The hub's config.json is sparse: what it leaves out takes the Llama / CLIP defaults below.


def _known_fields(cls, values):
    """Keep only the keys that the dataclass `cls` knows (config.json carries many more)."""
    names = {f.name for f in fields(cls)}
    return cls(**{key: value for key, value in values.items() if key in names})


def _refuse_unsupported(values, **supported):
    """Raise when the config asks for a variant this file does not implement (e.g. biased attention)."""
    for key, expected in supported.items():
        if values.get(key, expected) != expected:
            raise ValueError(f"minifastv supports only {key}={expected!r}, but the config has {values[key]!r}.")


@dataclass
class TextConfig:
    """The Llama (Vicuna) decoder. Defaults are Llama's; LLaVA-1.5-7B leaves most of them out."""

    vocab_size: int = 32000  # llava-hf: 32064 = Llama's 32000 + <image> + <pad>, padded to 64
    hidden_size: int = 4096  # width of the residual stream (5120 for 13B)
    intermediate_size: int = 11008  # SwiGLU hidden width (13824 for 13B)
    num_hidden_layers: int = 32  # decoder layers (40 for 13B)
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: one key/value head per query head (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads = 128
    max_position_embeddings: int = 2048  # the context (Llama's default; llava-hf sets 4096)
    rms_norm_eps: float = 1e-6  # Llama's default; llava-hf's config.json sets 1e-5
    rope_theta: float = 10000.0  # base of the rotary frequencies
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, values):
        values = dict(values)
        rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"minifastv supports only plain RoPE, but the config asks for {rope}.")
        values.setdefault("rope_theta", rope.get("rope_theta", cls.rope_theta))
        _refuse_unsupported(values, hidden_act="silu", attention_bias=False, mlp_bias=False)
        return _known_fields(cls, values)


@dataclass
class VisionConfig:
    """The CLIP vision transformer. Defaults are CLIP's; LLaVA-1.5 uses ViT-L/14 at 336 px."""

    hidden_size: int = 768  # ViT-L: 1024
    intermediate_size: int = 3072  # ViT-L: 4096
    num_hidden_layers: int = 12  # ViT-L: 24
    num_attention_heads: int = 12  # ViT-L: 16
    num_channels: int = 3
    image_size: int = 224  # LLaVA-1.5: 336
    patch_size: int = 32  # LLaVA-1.5: 14, so a 336 px image is a 24 x 24 grid of 576 patches
    layer_norm_eps: float = 1e-5

    @property
    def grid_size(self):
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, values):
        _refuse_unsupported(values, hidden_act="quick_gelu")
        return _known_fields(cls, values)


@dataclass
class LlavaConfig:
    """How the two towers are joined."""

    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 32000  # the <image> placeholder id: one per image feature in the prompt
    pad_token_id: int = 32001
    vision_feature_layer: int = -2  # which CLIP hidden state feeds the projector (-2: second to last)
    vision_feature_select_strategy: str = "default"  # "default" drops the CLS token, "full" keeps it

    @property
    def image_tokens_per_image(self):
        cls_token = 1 if self.vision_feature_select_strategy == "full" else 0
        return self.vision.grid_size**2 + cls_token  # 576 for LLaVA-1.5

    @classmethod
    def from_dict(cls, values):
        values = dict(values)
        values.setdefault("image_token_id", values.get("image_token_index", cls.image_token_id))
        _refuse_unsupported(values, projector_hidden_act="gelu", multimodal_projector_bias=True)
        _refuse_unsupported(values.get("text_config", {}), tie_word_embeddings=False)
        _refuse_unsupported(values, tie_word_embeddings=False)
        if not isinstance(values.get("vision_feature_layer", -2), int):
            raise ValueError("minifastv supports one vision_feature_layer, not a list of layers.")
        if values.get("vision_feature_select_strategy", "default") not in ("default", "full"):
            raise ValueError("vision_feature_select_strategy must be 'default' or 'full'.")
        config = _known_fields(cls, {**values, "text": None, "vision": None})
        config.text = TextConfig.from_dict(values.get("text_config", {}))
        config.vision = VisionConfig.from_dict(values.get("vision_config", {}))
        return config

    @classmethod
    def from_file(cls, path):
        return cls.from_dict(json.loads(Path(path).read_text()))


# ----------------------------------------------------------------------------------------------------
# The Llama decoder: RMSNorm, rotary embedding, attention, SwiGLU MLP, decoder layer.


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalize in float32 for stability, cast back, then scale: the order transformers uses.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_tables(config: TextConfig, device):
    """cos and sin of every (position, frequency) angle, (max_positions, D), float32.

    Built in float32 once the model has real memory (never in fp16: angles up to 4096 rad need
    float32). Each position has its own row, so a pruned token can keep its original position.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float, device=device)
    angles = positions[:, None] * inv_freq[None, :]  # (P, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (P, D): "rotate half" pairs dim i with dim i + D/2
    return angles.cos(), angles.sin()


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x, cos, sin):
    """Rotate queries or keys (B, H, T, D) by their positions' angles; cos/sin are (B, 1, T, D)."""
    return x * cos + rotate_half(x) * sin


class LlamaAttention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def project(self, x, cos, sin):
        """Queries, keys and values with RoPE applied: (B, H, T, D), (B, H_kv, T, D), (B, H_kv, T, D)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, mask, cache=None, layer_index=None):
        q, k, v = self.project(x, cos, sin)
        if cache is not None:  # prepend the keys and values of earlier tokens
            k, v = cache.update(layer_index, k, v)  # (B, H_kv, S, D)
        # Fused attention (SDPA): never materializes the (T, S) weights. `mask is None` means plain causal.
        # enable_gqa lets several query heads share a key/value head (grouped-query attention).
        is_causal = mask is None and q.shape[2] > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.head_dim**-0.5,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (B, T, H * D)
        return self.o_proj(out), (q, k)  # FastV scores with this layer's queries and keys


class LlamaMLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU: three matrices


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, mask, cache=None, layer_index=None):
        attention_out, queries_keys = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer_index)
        x = x + attention_out
        return x + self.mlp(self.post_attention_layernorm(x)), queries_keys


class LlamaModel(nn.Module):
    """The decoder's weights. Its loop runs in Llava.forward, where FastV can cut in at layer K."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def causal_padding_mask(key_mask, num_queries):
    """Boolean (B, 1, T, S) mask, True where a query may attend to a key; None when plain causal will do.

    `key_mask` (B, S) marks real tokens (1) and left padding (0) of every key, cached ones included;
    the T queries are the last T of those keys. Pure causal attention is left to SDPA's `is_causal`,
    which lets it pick its fastest kernel.
    """
    num_keys = key_mask.shape[1]
    if bool(key_mask.all()) and num_queries in (1, num_keys):
        return None
    key_index = torch.arange(num_keys, device=key_mask.device)
    query_index = key_index[num_keys - num_queries :]
    causal = key_index[None, :] <= query_index[:, None]  # (T, S)
    itself = key_index[None, :] == query_index[:, None]  # (T, S)
    # A padding query sees only itself: a row with no key at all gives NaN in some SDPA kernels, and a
    # NaN value would leak into real tokens (0 x NaN = NaN) even though they never attend to padding.
    return (causal[None, None] & key_mask.bool()[:, None, None, :]) | itself[None, None]  # (B, 1, T, S)


# ----------------------------------------------------------------------------------------------------
# The CLIP vision tower (ViT-L/14-336) and the projector into the decoder's space.


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.position_embedding = nn.Embedding(config.grid_size**2 + 1, config.hidden_size)

    def forward(self, pixel_values):
        patches = self.patch_embedding(pixel_values)  # (N, C, 24, 24): one vector per 14 x 14 patch
        patches = patches.flatten(2).transpose(1, 2)  # (N, 576, C), row by row from the top left
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)  # (N, 1, C)
        tokens = torch.cat([cls, patches], dim=1)  # (N, 577, C)
        return tokens + self.position_embedding.weight  # learned absolute positions


class CLIPAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):
        N, T, C = x.shape
        q, k, v = (proj(x).view(N, T, self.num_heads, self.head_dim).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))  # (N, H, T, D)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)  # every patch sees every patch
        return self.out_proj(out.transpose(1, 2).reshape(N, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick_gelu, CLIP's cheap GELU


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPVisionTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: the checkpoint's spelling
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))
        # Unused by LLaVA (it reads a hidden state before the end), but in the checkpoint: loaded, never run.
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values, feature_layer):
        """Hidden state number `feature_layer` of [embeddings, layer 0 output, ..., last layer output]."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        layers_to_run = feature_layer % (len(self.layers) + 1)  # -2 with 24 layers: run 23, skip the last
        for layer in self.layers[:layers_to_run]:
            x = layer(x)
        return x  # (N, 577, C)


class MultiModalProjector(nn.Module):
    """Two linear layers with a GELU: CLIP's 1024-wide features become 4096-wide "words"."""

    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision.hidden_size, config.text.hidden_size)
        self.linear_2 = nn.Linear(config.text.hidden_size, config.text.hidden_size)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))  # exact (erf) GELU


# ----------------------------------------------------------------------------------------------------
# The KV cache: what generation keeps of earlier tokens, so each new token costs one row, not the prompt.


class KVCache:
    """Keys and values (B, H_kv, S, D) of every token seen so far, per layer, and their padding masks.

    After FastV pruned the prompt at layer K, layers >= K hold fewer tokens than layers < K, so the
    cache keeps two masks: one over all tokens (positions, layers < K), one over the kept tokens.
    """

    def __init__(self, num_layers, keep=True):
        self.keep = keep  # False: a forward pass without generation; track masks, store no keys
        self.keys = [None] * num_layers
        self.values = [None] * num_layers
        self.attention_mask = None  # (B, S): 1 for real tokens, 0 for left padding
        self.pruned_at = None  # FastV's K once the prompt was pruned
        self.pruned_attention_mask = None  # (B, S_kept): the tokens that layers >= K hold
        self.keep_indices = None  # (B, T_kept): the prompt positions that survived layer K
        self.kept_image_tokens = None  # (B, num_keep): which image tokens survived (patch = index % 576)

    def extend_mask(self, new_mask):
        past = self.attention_mask
        self.attention_mask = new_mask if past is None else torch.cat([past, new_mask], dim=1)
        return self.attention_mask

    def extend_pruned_mask(self, new_mask):
        self.pruned_attention_mask = torch.cat([self.pruned_attention_mask, new_mask], dim=1)
        return self.pruned_attention_mask

    def record_pruning(self, layer, kept_mask, keep_indices, kept_image_tokens):
        self.pruned_at, self.pruned_attention_mask = layer, kept_mask
        self.keep_indices, self.kept_image_tokens = keep_indices, kept_image_tokens

    def update(self, layer_index, k, v):
        if not self.keep:
            return k, v
        if self.keys[layer_index] is not None:
            k = torch.cat([self.keys[layer_index], k], dim=2)
            v = torch.cat([self.values[layer_index], v], dim=2)
        self.keys[layer_index], self.values[layer_index] = k, v
        return k, v

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


# ----------------------------------------------------------------------------------------------------
# FastV: its settings, what a pruning rule gets to see, and FastV's own rule. The pruning step itself
# sits inline in Llava.forward, where the decoder loop reaches layer K.


@dataclass
class PruningInputs:
    """Everything a pruning rule may look at, at the start of decoder layer K (B batch, T tokens, N image tokens)."""

    last_token_attention: torch.Tensor  # (B, H, T) float32: the last token's softmax row in layer K-1, per head
    image_positions: torch.Tensor  # (B, N): where the image tokens sit in the sequence, all images pooled
    num_keep: int  # how many of the N image tokens to keep: round(N * (1 - R))
    grid_size: int  # each image is a grid_size x grid_size grid of patches (24 for LLaVA-1.5)
    tokens_per_image: int  # 576 for LLaVA-1.5; image i owns image tokens [i * 576, (i + 1) * 576)
    hidden_states: torch.Tensor  # (B, T, C): the input of layer K
    queries: torch.Tensor  # (B, H, T, D): layer K-1's queries, after RoPE
    keys: torch.Tensor  # (B, H_kv, T, D): layer K-1's keys, after RoPE
    cos: torch.Tensor  # (B, 1, T, D): the rotary angles the queries and keys were turned by
    sin: torch.Tensor
    attention_mask: torch.Tensor  # (B, T): 1 for real tokens, 0 for left padding

    @property
    def queries_without_rope(self):
        return apply_rope(self.queries, self.cos, -self.sin)  # turning back by the same angle undoes RoPE

    @property
    def keys_without_rope(self):
        return apply_rope(self.keys, self.cos, -self.sin)


def fastv_rule(inputs: PruningInputs):
    """FastV's rule: keep the image tokens that the last token attended to most (mean over heads).

    Returns (B, num_keep) indices into the image tokens (0 .. N-1), in any order.
    """
    attention = inputs.last_token_attention.mean(dim=1)  # (B, T): mean over heads
    image_attention = attention.gather(1, inputs.image_positions)  # (B, N)
    return image_attention.topk(inputs.num_keep, dim=-1).indices


@dataclass
class FastV:
    """FastV settings: at decoder layer k, drop the share r of image tokens that layer k-1 attended to least."""

    k: int = 2  # layers 0 .. k-1 see every token; layers k .. see the kept ones (paper: K=2)
    r: float = 0.5  # share of image tokens dropped (paper: 50%); r=0 scores but keeps everything
    rule: object = fastv_rule  # a function PruningInputs -> (B, num_keep) indices: the homework knob

    def __post_init__(self):
        if not 0 <= self.r < 1:
            raise ValueError(f"FastV's r is the share of image tokens to drop and must be in [0, 1), got {self.r}.")
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"FastV's k is the first pruned layer and must be an integer >= 1, got {self.k}.")


def last_token_attention(queries, keys, key_mask):
    """Softmax attention row of the LAST query over all keys, per head: (B, H, T), float32.

    Only this one row is needed, so attention itself stays fused (SDPA) and no T x T matrix exists.
    """
    keys = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)  # (B, H, T, D)
    scale = queries.shape[-1] ** -0.5
    scores = (queries[:, :, -1:].float() @ keys.float().transpose(-1, -2)) * scale  # (B, H, 1, T)
    scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))  # never pick padding
    return scores.softmax(dim=-1)[:, :, 0]  # (B, H, T)


def check_kept(keep, batch_size, num_image_tokens, num_keep):
    """A rule's answer must be (B, num_keep) distinct indices of image tokens: say so clearly if not."""
    if not isinstance(keep, torch.Tensor) or tuple(keep.shape) != (batch_size, num_keep):
        shape = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"The pruning rule must return a ({batch_size}, {num_keep}) tensor of indices, got {shape}.")
    ordered = keep.sort(dim=-1).values
    if keep.numel() and (ordered[:, 0].min() < 0 or ordered[:, -1].max() >= num_image_tokens or (ordered.diff(dim=-1) == 0).any()):
        raise ValueError(f"The pruning rule must return distinct image-token indices in [0, {num_image_tokens}).")
    return keep.long()


# ----------------------------------------------------------------------------------------------------
# LLaVA: image features replace the <image> placeholders, then the decoder runs.


class Llava(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionTower(config.vision)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = LlamaModel(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        # RoPE tables: computed by init_rope() once real memory exists (they are not in the checkpoint).
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    def init_rope(self):
        device = self.lm_head.weight.device
        self.rope_cos, self.rope_sin = rope_tables(self.config.text, device)

    def rope(self, positions, dtype):
        """cos and sin (B, 1, T, D) for token positions (B, T): rows of the float32 tables, cast."""
        return self.rope_cos[positions].to(dtype)[:, None], self.rope_sin[positions].to(dtype)[:, None]

    @property
    def device(self):
        return self.lm_head.weight.device

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    def image_features(self, pixel_values):
        """(N, 3, 336, 336) pixels -> (N, 576, hidden) decoder inputs, one row per image patch."""
        size = self.config.vision.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (self.config.vision.num_channels, size, size):
            raise ValueError(f"pixel_values must have shape (num_images, 3, {size}, {size}), got {tuple(pixel_values.shape)}.")
        hidden = self.vision_tower(pixel_values.to(self.device, self.dtype), self.config.vision_feature_layer)
        if self.config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]  # drop CLS: (N, 576, C)
        return self.multi_modal_projector(hidden)  # (N, 576, hidden)

    def embed(self, input_ids, pixel_values):
        """Token embeddings with the image features written over the <image> placeholders, in order."""
        embeds = self.language_model.embed_tokens(input_ids)  # (B, T, hidden)
        is_image = input_ids == self.config.image_token_id
        num_placeholders = int(is_image.sum())
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        per_image = self.config.image_tokens_per_image
        if num_placeholders != num_images * per_image:
            raise ValueError(
                f"The prompt holds {num_placeholders} <image> tokens but {num_images} image(s) need "
                f"{num_images * per_image} ({per_image} per image): one <image> id per image feature."
            )
        if num_images:
            features = self.image_features(pixel_values).reshape(-1, embeds.shape[-1])  # (N * 576, hidden)
            embeds = embeds.masked_scatter(is_image[..., None], features.to(embeds.dtype))
        return embeds

    def forward(self, input_ids, pixel_values=None, attention_mask=None, cache=None, fastv=None, last_logits_only=False):
        """Logits for `input_ids` (B, T); left padding is marked 0 in `attention_mask`.

        With a `cache` (see KVCache) the earlier tokens live in the cache and input_ids holds only
        the new ones. With `fastv` (see FastV) and image tokens in input_ids, image tokens are
        dropped at layer K, and the logits cover the kept tokens only: (B, T_kept, vocab).
        """
        B, T = input_ids.shape
        device = self.device
        input_ids = input_ids.to(device)
        new_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
        if new_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(new_mask.shape)} but input_ids has {tuple(input_ids.shape)}.")
        if fastv is not None and not fastv.k < len(self.language_model.layers):
            raise ValueError(f"FastV's k must be between 1 and {len(self.language_model.layers) - 1} for this model, got {fastv.k}.")
        cache = cache if cache is not None else KVCache(len(self.language_model.layers), keep=False)
        key_mask = cache.extend_mask(new_mask)  # (B, S): every token so far, for positions and layers < K
        if key_mask.shape[1] > self.config.text.max_position_embeddings:
            raise ValueError(
                f"The sequence has {key_mask.shape[1]} tokens but the model's context is "
                f"{self.config.text.max_position_embeddings} tokens."
            )
        # Each token's position among the real (unpadded) tokens; padding gets 0. FastV never changes it.
        positions = (key_mask.cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
        x = self.embed(input_ids, pixel_values)
        cos, sin = self.rope(positions, x.dtype)
        mask = causal_padding_mask(key_mask, T)
        is_image = input_ids == self.config.image_token_id  # (B, T)
        prune_now = fastv is not None and bool(is_image.any())
        if prune_now and key_mask.shape[1] != T:
            raise ValueError("FastV prunes the prompt once, at prefill: pass fastv only with an empty cache.")
        if prune_now and bool((is_image.sum(dim=1) != is_image[0].sum()).any()):
            raise ValueError(f"FastV needs the same number of image tokens in every prompt of a batch, got {is_image.sum(dim=1).tolist()}.")

        for index, layer in enumerate(self.language_model.layers):
            if index == cache.pruned_at:  # decoding after FastV: these layers cached only the kept tokens
                mask = causal_padding_mask(cache.extend_pruned_mask(new_mask), T)
            if prune_now and index == fastv.k:
                # ===================================== FastV =====================================
                # Rank the image tokens by the attention the LAST token paid them in layer K-1
                # (`queries`, `keys` are that layer's), keep the top (1 - R), drop the rest.
                image_positions = is_image.nonzero()[:, 1].view(B, -1)  # (B, N), in sequence order
                num_image_tokens = image_positions.shape[1]
                num_keep = round(num_image_tokens * (1 - fastv.r))
                inputs = PruningInputs(
                    last_token_attention=last_token_attention(queries, keys, key_mask),
                    image_positions=image_positions, num_keep=num_keep, grid_size=self.config.vision.grid_size,
                    tokens_per_image=self.config.image_tokens_per_image, hidden_states=x,
                    queries=queries, keys=keys, cos=cos, sin=sin, attention_mask=key_mask,
                )
                keep_image = check_kept(fastv.rule(inputs), B, num_image_tokens, num_keep)  # (B, num_keep)
                # Every text token stays; so do the chosen image tokens. nonzero() keeps sequence order.
                is_kept = ~is_image
                is_kept.scatter_(1, image_positions.gather(1, keep_image), True)
                keep_indices = is_kept.nonzero()[:, 1].view(B, -1)  # (B, T_kept)
                x = x[torch.arange(B, device=device)[:, None], keep_indices]  # (B, T_kept, C): the survivors
                positions = positions.gather(1, keep_indices)  # their ORIGINAL positions: never renumbered
                cos, sin = self.rope(positions, x.dtype)
                kept_mask = key_mask.gather(1, keep_indices)  # (B, T_kept)
                mask = causal_padding_mask(kept_mask, keep_indices.shape[1])
                cache.record_pruning(fastv.k, kept_mask, keep_indices, keep_image.sort(dim=-1).values)
                # ==================================================================================
            x, (queries, keys) = layer(x, cos, sin, mask, cache, index)

        if last_logits_only:
            x = x[:, -1:]
        return self.lm_head(self.language_model.norm(x))  # (B, T or T_kept, vocab)

    # ------------------------------------------------------------------------------------------------
    # Generation: prefill the prompt once (FastV prunes here), then one token at a time against the cache.

    @torch.inference_mode()
    def stream(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=64, temperature=0.0,
               top_p=1.0, eos_token_id=None, generator=None, fastv=None, stats=None):
        """Yield the next token of every sequence, (B,), until each has produced EOS or the limit.

        Greedy when temperature is 0; otherwise sampled from softmax(logits / temperature), keeping
        the smallest set of tokens whose probability reaches top_p. Finished sequences yield pad ids.
        FastV prunes once, at prefill: the cache of layers >= K holds only the kept tokens, and every
        generated token attends to those. Pass a GenerationStats as `stats` to have it filled in.
        """
        eos_token_id = self.config.text.eos_token_id if eos_token_id is None else eos_token_id
        context = self.config.text.max_position_embeddings
        if input_ids.shape[1] + max_new_tokens > context:
            raise ValueError(
                f"The prompt has {input_ids.shape[1]} tokens and max_new_tokens asks for {max_new_tokens} more, "
                f"but the model's context is {context} tokens."
            )
        cache = KVCache(len(self.language_model.layers))
        started = time.perf_counter()
        logits = self(input_ids, pixel_values, attention_mask, cache=cache, fastv=fastv, last_logits_only=True)
        next_token = pick_token(logits[:, -1].float(), temperature, top_p, generator)  # (B,)
        synchronize(self.device)
        if stats is not None:
            stats.record_prefill(self.config, input_ids, cache, fastv, time.perf_counter() - started)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            next_token = next_token.masked_fill(finished, self.config.pad_token_id)
            yield next_token
            finished |= next_token == eos_token_id
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            started = time.perf_counter()  # timed per step: what the caller does between tokens is not ours
            logits = self(next_token[:, None], cache=cache, last_logits_only=True)
            next_token = pick_token(logits[:, -1].float(), temperature, top_p, generator)
            if stats is not None:
                synchronize(self.device)
                stats.decode_tokens += 1
                stats.decode_seconds += time.perf_counter() - started
        if stats is not None:
            stats.kv_cache_bytes = cache.nbytes()

    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=64, **options):
        """The new token ids (B, N), EOS included; see `stream` for the options (fastv=, stats=, sampling)."""
        tokens = list(self.stream(input_ids, pixel_values, attention_mask, max_new_tokens, **options))
        return torch.stack(tokens, dim=1) if tokens else input_ids.new_zeros(input_ids.shape[0], 0)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous: wait for it before reading the clock


def pick_token(logits, temperature, top_p, generator):
    """Greedy (temperature 0) or nucleus sampling over (B, vocab) float32 logits."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside_nucleus = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the first token always stays
    sorted_probs = sorted_probs.masked_fill(outside_nucleus, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # (B, 1); renormalizes itself
    return order.gather(-1, choice)[:, 0]


@dataclass
class GenerationStats:
    """What a generate() run measured; pass one as `stats=` and read it afterwards."""

    prompt_tokens: int = 0  # per prompt, padding included
    image_tokens: int = 0  # per prompt, all images together
    image_tokens_kept: int = 0
    k: int | None = None  # FastV's settings, None without FastV
    r: float | None = None
    kept_image_tokens: torch.Tensor | None = None  # (B, kept): indices of kept image tokens, patch = index % 576
    kv_cache_bytes: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0  # tokens produced by decode steps (the first comes from the prefill)
    decode_seconds: float = 0.0
    flops: dict | None = None  # prefill FLOPs with and without FastV: see minifastv.flops

    @property
    def decode_tokens_per_second(self):
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def record_prefill(self, config, input_ids, cache, fastv, seconds):
        from .flops import prefill_flops_report  # FLOPs are arithmetic on the config, kept out of the model

        self.prompt_tokens = input_ids.shape[1]
        self.image_tokens = int((input_ids[0] == config.image_token_id).sum())
        self.image_tokens_kept = self.image_tokens
        if cache.pruned_at is not None:
            self.k, self.r = fastv.k, fastv.r
            self.image_tokens_kept = cache.kept_image_tokens.shape[1]
            self.kept_image_tokens = cache.kept_image_tokens.cpu()
        self.prefill_seconds = seconds
        self.flops = prefill_flops_report(config, self.prompt_tokens, self.image_tokens, fastv if cache.pruned_at else None,
                                          batch_size=input_ids.shape[0])


# ----------------------------------------------------------------------------------------------------
# Loading llava-hf safetensors: build on the meta device, stream each tensor onto the target device.

DEFAULT_REPO = "llava-hf/llava-1.5-7b-hf"
WEIGHTS_DIR = Path(os.environ.get("MINIFASTV_WEIGHTS", Path(__file__).resolve().parent.parent / "weights"))
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
             "processor_config.json", "chat_template.json"]


class CheckpointError(ValueError):
    """The checkpoint does not fit the model: a missing, unexpected or misshapen tensor, or no safetensors."""


def model_name(checkpoint_name):
    """This file's parameter name for a tensor name from any of the three llava-hf naming schemes.

    hub:                    language_model.model.layers.0...,  vision_tower.vision_model.encoder.layers.0...
    transformers 5 save:    language_model.model.layers.0...,  vision_tower.encoder.layers.0...
    transformers internal:  model.language_model.layers.0...,  model.vision_tower.encoder.layers.0..., lm_head
    this file:              language_model.layers.0...,        vision_tower.layers.0...,              lm_head
    """
    name = checkpoint_name.removeprefix("model.")
    for old, new in (("language_model.model.", "language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.vision_model.", "vision_tower."), ("vision_tower.encoder.", "vision_tower.")):
        if name.startswith(old):
            name = new + name.removeprefix(old)
    return name


def hub_name(name):
    """The inverse of model_name for the hub scheme: the name a llava-hf download uses."""
    for ours, hub in (("language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                      ("vision_tower.layers.", "vision_tower.vision_model.encoder.layers."),
                      ("vision_tower.", "vision_tower.vision_model.")):
        if name.startswith(ours):
            return hub + name.removeprefix(ours)
    return name


def expected_tensors(config: LlavaConfig):
    """{hub tensor name: shape} that a checkpoint for `config` must hold; builds nothing but meta tensors."""
    with torch.device("meta"):
        model = Llava(config)
    return {hub_name(name): tuple(p.shape) for name, p in model.state_dict().items()}


def safetensors_files(folder):
    """The checkpoint's .safetensors files, from the shard index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted({folder / shard for shard in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" It has {', '.join(pickles)}: pickle files can run code, so minifastv never loads them." if pickles else ""
        raise CheckpointError(f"No .safetensors weights in {folder}.{hint}")
    for file in files:
        if not file.exists():
            raise CheckpointError(f"The shard index names {file.name}, which is not in {folder}.")
    return files


SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def read_safetensors(file, accept):
    """Yield (name, tensor on CPU) for each tensor of a .safetensors file, one at a time, in file order.

    The format is simple: 8 bytes giving the header's length, a JSON header
    {name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the raw bytes. `accept(name, shape)`
    checks each entry before its bytes are read. Reading each tensor into its own buffer (rather than
    mapping the whole file, as the safetensors library does) keeps host memory at one tensor.
    """
    with open(file, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
        header.pop("__metadata__", None)
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if not accept(name, tuple(entry["shape"])):
                continue
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"Tensor {name} in {file.name} is {entry['dtype']}; minifastv reads F16, BF16 and F32.")
            begin, end = entry["data_offsets"]
            f.seek(8 + header_size + begin)
            buffer = bytearray(end - begin)
            f.readinto(buffer)
            yield name, torch.frombuffer(buffer, dtype=SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])
            del buffer  # let it go before the next one is read: host memory holds one tensor at a time


def load(path_or_repo_id=DEFAULT_REPO, device=None, dtype=None, progress=True):
    """A ready-to-run Llava from a local llava-hf folder or a hub repo id (downloaded into weights/).

    device: default "cuda" when available, else "cpu". dtype: default bfloat16 on GPUs that support
    it, float16 on other GPUs (the T4), float32 on the CPU. Tensors go one by one from the file to
    the device in the target dtype, so host memory never holds the checkpoint (a Colab has 12.7 GB of
    RAM for a 14 GB checkpoint).
    """
    folder = resolve_folder(path_or_repo_id)
    config_file = folder / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"No config.json in {folder}: a llava-hf model folder holds config.json and *.safetensors.")
    config = LlavaConfig.from_file(config_file)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)

    with torch.device("meta"):  # no memory yet: every parameter is a shape only
        model = Llava(config)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    state = {}

    def accept(checkpoint_name, shape):
        """Check a tensor's name and shape against the model before its bytes are read."""
        if checkpoint_name.endswith(("rotary_emb.inv_freq", "position_ids")):
            return False  # buffers some exporters save; they carry no weights
        name = model_name(checkpoint_name)
        if name not in expected:
            raise CheckpointError(f"Unexpected tensor {checkpoint_name} in the checkpoint: the model has no such weight.")
        if shape != expected[name]:
            raise CheckpointError(f"Tensor {checkpoint_name} has shape {shape} in the checkpoint, but the model expects {expected[name]}.")
        if name in state:
            raise CheckpointError(f"Tensor {checkpoint_name} appears twice in the checkpoint.")
        return True

    files = safetensors_files(folder)
    from tqdm.auto import tqdm  # the progress bar huggingface-hub uses for downloads

    bar = tqdm(total=sum(file.stat().st_size for file in files), unit="B", unit_scale=True, desc="loading",
               disable=not progress, file=sys.stderr)
    for file in files:
        bar.set_postfix_str(file.name)
        for checkpoint_name, tensor in read_safetensors(file, accept):
            state[model_name(checkpoint_name)] = tensor.to(device=device, dtype=dtype)
            bar.update(tensor.numel() * tensor.element_size())
            del tensor  # on a GPU, the host copy is garbage now
    bar.close()
    missing = [hub_name(name) for name in expected if name not in state]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"The checkpoint lacks tensor {', '.join(missing[:3])}{more}.")
    model.load_state_dict(state, strict=True, assign=True)  # the loaded tensors become the parameters
    model.init_rope()
    return model.eval().requires_grad_(False)


def default_dtype(device):
    """bfloat16 on GPUs with native bf16 (compute capability 8.0+, Ampere on), float16 on older ones such
    as Colab's T4 (torch.cuda.is_bf16_supported() says yes there too, but only through slow emulation),
    float32 on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_properties(device).major >= 8 else torch.float16
    return torch.float32


def resolve_folder(path_or_repo_id):
    """A local folder as is; a hub repo id downloaded (once) into weights/<owner>--<name>."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    if path.exists() or str(path_or_repo_id).count("/") != 1:
        raise FileNotFoundError(f"{path_or_repo_id} is neither a model folder nor a hub repo id like {DEFAULT_REPO}.")
    from huggingface_hub import snapshot_download

    target = WEIGHTS_DIR / str(path_or_repo_id).replace("/", "--")
    try:
        snapshot_download(repo_id=str(path_or_repo_id), local_dir=target, allow_patterns=HUB_FILES)
    except Exception as error:  # the hub's errors vary by version and network; all mean the same to a user
        if (target / "config.json").exists() and any(target.glob("*.safetensors")):
            print(f"Could not reach the hub ({type(error).__name__}); using the copy in {target}.", file=sys.stderr, flush=True)
            return target
        reason = " ".join(str(error).split())  # the hub's messages span lines; ours is one sentence
        raise ConnectionError(
            f"There is no folder {path_or_repo_id}, and it could not be downloaded from the Hugging Face hub "
            f"({type(error).__name__}: {reason}). Check the network and the repo id, or pass a local model folder."
        ) from error
    return target
