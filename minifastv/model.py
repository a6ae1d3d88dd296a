"""LLaVA-1.5 in one file: CLIP tower, projector, Llama decoder, KV cache, and FastV at layer K.

Top to bottom: configuration, the decoder, the vision tower and projector, the KV cache, FastV's
settings and rule, and Llava: its prefill (forward, FastV inline) and its decode step. It imports
nothing of the package but its errors: generation.py drives it, checkpoint.py fills it. Shapes:
B batch, T tokens, S keys, H heads, D head size, C channels, N visual (image and video) tokens.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SettingsError

# ------------------------------------------------------------------------------------------------
# Configuration, from config.json (checkpoint.py); what it leaves out takes these defaults.


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
    eos_token_id: int = 2  # generation stops at this token

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads


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


@dataclass
class LlavaConfig:
    """How the towers are joined. LLaVA-1.5 has one CLIP tower; Video-LLaVA has two of one shape,
    one for images and one for video frames, and a second placeholder, <video>."""

    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 32000  # the <image> placeholder id: one per image feature in the prompt
    video_token_id: int | None = None  # Video-LLaVA's <video> (32001); None: LLaVA, no video
    pad_token_id: int = 32001
    num_frames: int = 8  # Video-LLaVA samples 8 frames of a video
    vision_feature_layer: int = -2  # which CLIP hidden state feeds the projector: second to last
    vision_feature_select_strategy: str = "default"  # "default" drops an image's CLS, "full" not

    @property
    def image_tokens_per_image(self):
        cls_token = 1 if self.vision_feature_select_strategy == "full" else 0
        return self.vision.grid_size**2 + cls_token  # 576 for LLaVA-1.5, 256 for Video-LLaVA

    @property
    def tokens_per_video(self):
        return self.num_frames * (self.vision.grid_size**2 + 1)  # a frame keeps its CLS: 8 x 257

    def is_visual(self, input_ids):
        """True where input_ids holds <image> or <video>: the tokens FastV ranks, as one pool."""
        video_id = self.image_token_id if self.video_token_id is None else self.video_token_id
        return (input_ids == self.image_token_id) | (input_ids == video_id)


# ------------------------------------------------------------------------------------------------
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
    """cos and sin (max_positions, D) of every (position, frequency) angle, in float32 (angles up
    to 4096 rad need it). A row per position: a pruned token keeps its original position's."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)  # (D/2,)
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float, device=device)
    angles = positions[:, None] * inv_freq[None, :]  # (P, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (P, D): "rotate half" pairs dim i, i + D/2
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate queries or keys (B, H, T, D) by their positions' angles; cos/sin are (B, 1, T, D)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin  # "rotate half": pairs i, i + D/2


class LlamaAttention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * head_dim, hidden, bias=False)

    def project(self, x, cos, sin):
        """Queries (B, H, T, D), keys and values (B, H_kv, T, D), RoPE applied to the first two."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, mask, cache=None, layer_index=None):
        q, k, v = self.project(x, cos, sin)
        if cache is not None:  # prefill: stored; decode: the keys and values of every slot back
            k, v = cache.update(layer_index, k, v)  # (B, H_kv, S, D)
        # Fused attention (SDPA): its flash kernels never build the (T, S) weights. `mask is None`
        # means causal; enable_gqa lets query heads share a key/value head (grouped-query).
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
            scale=self.head_dim**-0.5, enable_gqa=self.num_kv_heads != self.num_heads)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (B, T, H * D)
        return self.o_proj(out), (q, k)  # FastV scores with this layer's queries and keys


class LlamaMLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU: 3 matrices


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, mask, cache=None, layer_index=None):
        normed = self.input_layernorm(x)
        attention_out, queries_keys = self.self_attn(normed, cos, sin, mask, cache, layer_index)
        x = x + attention_out
        return x + self.mlp(self.post_attention_layernorm(x)), queries_keys


def visible_keys(key_mask, num_queries):
    """Boolean (B, 1, T, S): True where each of the last T queries may attend to a key. key_mask
    (B, S) is 1 for real tokens, 0 for left padding; a query sees earlier real tokens and itself."""
    num_keys = key_mask.shape[1]
    key_index = torch.arange(num_keys, device=key_mask.device)  # (S,)
    query_index = key_index[num_keys - num_queries :, None]  # (T, 1)
    # A padding query sees only itself: a row with no key at all gives NaN in some SDPA kernels,
    # and a NaN value would leak into real tokens (0 x NaN = NaN) though they never attend to it.
    seen = (key_index <= query_index) & key_mask.bool()[:, None, None, :]  # (B, 1, T, S)
    return seen | (key_index == query_index)


# ------------------------------------------------------------------------------------------------
# The CLIP vision tower (ViT-L/14-336) and the projector into the decoder's space.


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, bias=False,
                                         kernel_size=config.patch_size, stride=config.patch_size)
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.position_embedding = nn.Embedding(config.grid_size**2 + 1, config.hidden_size)

    def forward(self, pixel_values):
        patches = self.patch_embedding(pixel_values)  # (N, C, 24, 24): a vector per 14 x 14 patch
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
        q, k, v = (proj(x).view(N, T, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (N, H, T, D)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)  # no mask
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
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic
        layers = (CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.layers = nn.ModuleList(layers)
        # Unused by LLaVA (it reads a hidden state before the end), but in the checkpoint: loaded.
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values, feature_layer):
        """Hidden state `feature_layer` of [embeddings, layer 0's output, ..., the last's]."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        layers_to_run = feature_layer % (len(self.layers) + 1)  # -2 of 24 layers: run 23
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


# ------------------------------------------------------------------------------------------------
# The KV cache: earlier tokens' keys and values, so a new token costs one row, not the prompt.


class KVCache:
    """keys[i], values[i]: (B, H_kv, capacity, D) per decoder layer, allocated once, empty.

    The prefill fills slots 0, 1, ...; each decode step one more. With FastV, layers < K hold every
    prompt token and layers >= K the kept ones only, in fewer slots: a slot is NOT a position
    (after FastV, slot 40 of layer K may hold the token at position 300, and its rotary angle is
    its position's, never renumbered). Per group g of layers: valid[g] (B, capacity) bool, True
    where a slot holds a real token; length[g] (1,), the slots written, where the next one goes.
    next_position (B,): the next token's position. kept_image_tokens: (B, num_keep) FastV kept.
    All change in place: a compiled decode step sees the same shapes and addresses."""

    def __init__(self, config: TextConfig, batch_size, capacities, first_pruned_layer, device,
                 dtype):  # capacities: slots of the layers before first_pruned_layer, from it on
        self.first_pruned_layer = first_pruned_layer  # FastV's K; num_hidden_layers without FastV
        # Per layer, its group: 0 holds every token, 1 FastV's kept ones.
        self.group = [int(i >= first_pruned_layer) for i in range(config.num_hidden_layers)]
        B, H_kv, D = batch_size, config.num_key_value_heads, config.head_dim
        # Zeros, not empty memory: an empty slot is masked out, but 0 x NaN would still be NaN.
        self.keys = [torch.zeros(B, H_kv, capacities[group], D, device=device, dtype=dtype)
                     for group in self.group]
        self.values = [torch.zeros_like(keys) for keys in self.keys]
        self.valid = [torch.zeros(B, c, dtype=torch.bool, device=device) for c in capacities]
        self.length = [torch.zeros(1, dtype=torch.long, device=device) for _ in capacities]
        self.next_position = torch.zeros(B, dtype=torch.long, device=device)
        self.kept_image_tokens = None
        self.prefilled = False

    def update(self, layer_index, k, v):
        """Prefill: keys and values (B, H_kv, T, D) go to slots 0 .. T-1 and come back as they are.
        Decode: the new token's go to slot length[g]; every slot comes back."""
        keys, values = self.keys[layer_index], self.values[layer_index]
        if not self.prefilled:
            keys[:, :, : k.shape[2]], values[:, :, : v.shape[2]] = k, v
            return k, v
        slot = self.length[self.group[layer_index]]
        keys.index_copy_(2, slot, k)
        values.index_copy_(2, slot, v)
        return keys, values  # (B, H_kv, capacity, D): `valid` masks what is not a real token

    def finish_prefill(self, key_masks, kept_image_tokens):
        """After the prefill: which slots hold real tokens, per group ((B, T) and (B, T_kept))."""
        for valid, length, mask in zip(self.valid, self.length, key_masks):
            valid.zero_()
            valid[:, : mask.shape[1]] = mask.bool()
            length.fill_(mask.shape[1])
        self.next_position.copy_(key_masks[0].sum(dim=1))  # real tokens so far = the next position
        self.kept_image_tokens = kept_image_tokens
        self.prefilled = True

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


# ------------------------------------------------------------------------------------------------
# FastV: its settings, what a rule sees, FastV's rule. The step is inline in Llava.forward.


def attention_rows(queries, keys, key_mask, num_rows=1):
    """Softmax attention (B, H, num_rows, S), float32, of the last num_rows queries: the weights
    SDPA never returns, for just the rows we need (FastV: one, the last token's)."""
    keys = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)  # (B, H, S, D): GQA
    scale = queries.shape[-1] ** -0.5
    scores = queries[:, :, -num_rows:].float() @ keys.float().transpose(-1, -2) * scale
    scores = scores.masked_fill(~visible_keys(key_mask, num_rows), float("-inf"))  # (B, H, n, S)
    return scores.softmax(dim=-1)


@dataclass
class PruningInputs:
    """Everything a pruning rule may look at, at the start of decoder layer K (B batch, T tokens,
    N visual tokens: images and videos pooled, called image tokens here as in the paper)."""

    last_token_attention: torch.Tensor  # (B, H, T) float32: the last token's row in layer K-1
    image_positions: torch.Tensor  # (B, N): where the visual tokens sit in the sequence
    num_keep: int  # how many of the N visual tokens to keep: round(N * (1 - R))
    grid_size: int  # an image or frame is a grid_size x grid_size grid of patches (24: LLaVA-1.5)
    is_video: torch.Tensor  # (B, N) bool: a video frame's token (Video-LLaVA), not an image's
    frame: torch.Tensor  # (B, N): which image, or which video frame (over all videos) it shows
    patch: torch.Tensor  # (B, N): its patch, row by row (row = patch // grid_size); -1: a CLS
    hidden_states: torch.Tensor  # (B, T, C): the input of layer K
    queries: torch.Tensor  # (B, H, T, D): layer K-1's queries, after RoPE
    keys: torch.Tensor  # (B, H_kv, T, D): layer K-1's keys, after RoPE
    cos: torch.Tensor  # (B, 1, T, D): the rotary angles the queries and keys were turned by
    sin: torch.Tensor
    attention_mask: torch.Tensor  # (B, T): 1 for real tokens, 0 for left padding


def fastv_rule(inputs: PruningInputs):
    """FastV's rule: keep the image tokens the last token attended to most (mean over heads).
    Returns (B, num_keep) indices into the image tokens (0 .. N-1), in any order."""
    attention = inputs.last_token_attention.mean(dim=1)  # (B, T): mean over heads
    image_attention = attention.gather(1, inputs.image_positions)  # (B, N)
    return image_attention.topk(inputs.num_keep, dim=-1).indices


@dataclass
class FastV:
    """At decoder layer k, drop the share r of image tokens that layer k-1 attended to least."""

    k: int = 2  # layers 0 .. k-1 see every token; layers k .. the kept ones (paper: K=2)
    r: float = 0.5  # share of image tokens dropped (paper: 50%); r=0 scores but keeps all
    rule: object = fastv_rule  # PruningInputs -> (B, num_keep) indices: the homework knob

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, (int, float)) or not 0 <= self.r < 1:
            raise SettingsError("FastV's r is the share of image tokens to drop and must be in "
                                f"[0, 1), got {self.r}.")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise SettingsError("FastV's k is the first pruned layer and must be an integer >= 1, "
                                f"got {self.k}.")

    def num_keep(self, num_visual):
        return round(num_visual * (1 - self.r))


def visual_layout(visual_ids, config: LlavaConfig):
    """is_video, frame and patch of a prompt's visual tokens (B, N), as PruningInputs has them;
    images and frames counted apart, a frame's CLS token (patch -1) first, as a "full" image's."""
    is_video = visual_ids != config.image_token_id  # (B, N): the only other visual token: <video>
    rank = torch.where(is_video, is_video.cumsum(1), (~is_video).cumsum(1)) - 1  # among its kind
    per_item = torch.where(is_video, config.vision.grid_size**2 + 1, config.image_tokens_per_image)
    has_cls = torch.where(is_video, 1, int(config.vision_feature_select_strategy == "full"))
    return is_video, rank // per_item, rank % per_item - has_cls


def first_true(mask, count):
    """Indices (B, count) of the first `count` True entries of each row of mask (B, T), in order:
    nonzero() without the host waiting for the GPU to count (a stable sort moves them first)."""
    return mask.long().argsort(dim=1, descending=True, stable=True)[:, :count]


def check_kept(keep, batch_size, num_visual, num_keep, check_values=True):
    """A rule's answer, sorted, once it is (B, num_keep) distinct image-token indices. Checking the
    values waits for the GPU, so FastV's own top-k, right by construction, skips it."""
    shape = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
    ordered = keep.sort(dim=-1).values if shape == (batch_size, num_keep) else None
    if ordered is None or check_values and keep.numel() and (ordered[:, 0].min() < 0 or (
            ordered[:, -1].max() >= num_visual) or (ordered.diff() == 0).any()):
        raise SettingsError(f"The pruning rule must return a ({batch_size}, {num_keep}) tensor of "
                            f"distinct image-token indices in [0, {num_visual}), got {shape}.")
    return ordered.long()


def check_shape(name, tensor, expected):
    """A ValueError naming the argument unless tensor.shape is `expected` (None: any size)."""
    if tensor.ndim != len(expected) or any(
            size not in (None, got) for size, got in zip(expected, tensor.shape)):
        expected = tuple("N" if size is None else size for size in expected)
        raise ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}.")


@dataclass
class LayerView:
    """What `observe` gets after each decoder layer of a prefill: the one way to look inside."""

    index: int  # the decoder layer
    queries: torch.Tensor  # (B, H, T, D): its queries, after RoPE (T shrinks from FastV's K on)
    keys: torch.Tensor  # (B, H_kv, T, D): its keys, after RoPE
    positions: torch.Tensor  # (B, T): each token's original position (FastV never renumbers)
    attention_mask: torch.Tensor  # (B, T): 1 for real tokens, 0 for left padding


# ------------------------------------------------------------------------------------------------
# LLaVA: the prefill (forward, FastV inline) once, then decode_step a token at a time.


class Llava(nn.Module):
    TOWERS = ("vision_tower", "image_tower", "video_tower")  # LLaVA's CLIP tower; Video-LLaVA's 2

    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        if config.video_token_id is None:  # LLaVA: one CLIP tower
            self.vision_tower = CLIPVisionTower(config.vision)
        else:  # Video-LLaVA: two towers of one shape, one for images and one for video frames
            self.image_tower = CLIPVisionTower(config.vision)
            self.video_tower = CLIPVisionTower(config.vision)
        self.multi_modal_projector = MultiModalProjector(config)
        text = config.text  # the decoder's weights; its loop is Llava.forward's, FastV inline
        self.language_model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(text.vocab_size, text.hidden_size),
            layers=nn.ModuleList(LlamaDecoderLayer(text) for _ in range(text.num_hidden_layers)),
            norm=RMSNorm(text.hidden_size, text.rms_norm_eps)))
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        # RoPE tables: made by init_rope() once real memory exists (they are not in the checkpoint).
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    def init_rope(self):
        self.rope_cos, self.rope_sin = rope_tables(self.config.text, self.device)

    def rope(self, positions, dtype):
        """cos and sin (B, 1, T, D) for token positions (B, T): rows of the float32 tables, cast."""
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, D)
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]

    device = property(lambda self: self.lm_head.weight.device)
    dtype = property(lambda self: self.lm_head.weight.dtype)

    def towers(self):
        """The loaded CLIP towers: LLaVA's one, Video-LLaVA's two, or the one loaded."""
        return [tower for name in self.TOWERS if (tower := getattr(self, name, None)) is not None]

    def cache_shape(self, input_ids, fastv=None, room=0, bucket=1):
        """(B, capacities, K) of a KVCache for a prefill of input_ids (B, T) and `room` tokens
        after it; capacities round up to a multiple of `bucket` (compiled.py)."""
        num_visual = int(self.config.is_visual(input_ids[0]).sum())
        prunes = fastv is not None and num_visual > 0
        num_tokens = input_ids.shape[1]
        kept = num_tokens - num_visual + fastv.num_keep(num_visual) if prunes else num_tokens
        capacities = tuple(-(-(tokens + room) // bucket) * bucket for tokens in (num_tokens, kept))
        first_pruned_layer = fastv.k if prunes else len(self.language_model.layers)
        return input_ids.shape[0], capacities, first_pruned_layer

    def new_cache(self, input_ids, fastv=None, room=0):
        """An empty KVCache for a prefill of input_ids with `fastv`, and `room` tokens after it."""
        shape = self.cache_shape(input_ids, fastv, room)
        return KVCache(self.config.text, *shape, self.device, self.dtype)

    def tower_features(self, tower, pixels, keep_cls):
        """(N, 3, S, S) pixels through a CLIP tower and the projector: (N, (S/14)^2 [+ CLS], C)."""
        if tower is None:
            raise SettingsError("The model was loaded without the tower these pixels need: load "
                                "it with towers=('image', 'video').")
        hidden = tower(pixels.to(self.device, self.dtype), self.config.vision_feature_layer)
        return self.multi_modal_projector(hidden if keep_cls else hidden[:, 1:])  # CLS: token 0

    def image_features(self, pixel_values):
        """(N, 3, 336, 336) pixels -> (N, 576, C) decoder inputs, one row per image patch."""
        size, channels = self.config.vision.image_size, self.config.vision.num_channels
        check_shape("pixel_values", pixel_values, (None, channels, size, size))
        tower = self.vision_tower if self.config.video_token_id is None else self.image_tower
        keep_cls = self.config.vision_feature_select_strategy == "full"
        return self.tower_features(tower, pixel_values, keep_cls)

    def video_features(self, pixel_values_videos):
        """(V, 8, 3, 224, 224) frames -> (V, 8 x 257, C): each frame's CLS, then its patches."""
        size, channels = self.config.vision.image_size, self.config.vision.num_channels
        check_shape("pixel_values_videos", pixel_values_videos,
                    (None, self.config.num_frames, channels, size, size))
        frames = self.tower_features(self.video_tower, pixel_values_videos.flatten(0, 1),
                                     keep_cls=True)  # (V * 8, 257, C)
        return frames.reshape(pixel_values_videos.shape[0], -1, frames.shape[-1])

    def embed(self, input_ids, pixel_values=None, pixel_values_videos=None):
        """Token embeddings with the image and video features written over their placeholders."""
        config = self.config
        embeds = self.language_model.embed_tokens(input_ids)  # (B, T, C)
        for kind, token_id, pixels, features, per_item in (
                ("image", config.image_token_id, pixel_values, self.image_features,
                 config.image_tokens_per_image),
                ("video", config.video_token_id, pixel_values_videos, self.video_features,
                 config.tokens_per_video)):
            if token_id is None:  # LLaVA has no <video>
                if pixels is not None:
                    raise ValueError("This model has no video tower: pixel_values_videos needs a "
                                     "Video-LLaVA checkpoint.")
                continue
            is_placeholder = input_ids == token_id
            num_placeholders = int(is_placeholder.sum())
            num_items = 0 if pixels is None else len(pixels)
            if num_placeholders != num_items * per_item:
                raise ValueError(f"The prompt holds {num_placeholders} <{kind}> tokens but "
                                 f"{num_items} {kind}(s) need {num_items * per_item} ({per_item} "
                                 f"per {kind}): one <{kind}> id per feature.")
            if num_items:
                in_order = features(pixels).reshape(-1, embeds.shape[-1])  # (items x per_item, C)
                embeds = embeds.masked_scatter(is_placeholder[..., None], in_order.to(embeds.dtype))
        return embeds

    def forward(self, input_ids, pixel_values=None, pixel_values_videos=None, attention_mask=None,
                cache=None, fastv=None, last_logits_only=False, observe=None):
        """The prefill: logits for input_ids (B, T), left padding marked 0 in attention_mask. With
        `fastv`, visual tokens are dropped at layer K: logits (B, T_kept, vocab). `cache` (from
        new_cache) stores keys and values for decode_step; `observe` gets each layer's LayerView."""
        B, T = input_ids.shape
        config, device, num_layers = self.config, self.device, len(self.language_model.layers)
        # Counted where the caller holds the ids (the host, usually): FastV never waits for the GPU.
        visual_counts = [0] if fastv is None else config.is_visual(input_ids).sum(dim=1).tolist()
        prunes = fastv is not None and visual_counts[0] > 0
        input_ids = input_ids.to(device)
        key_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        check_shape("attention_mask", key_mask, tuple(input_ids.shape))
        key_mask = key_mask.to(device).long()  # (B, T): 1 for real tokens, 0 for left padding
        if T > config.text.max_position_embeddings:
            raise ValueError(f"The prompt has {T} tokens, the model's context is "
                             f"{config.text.max_position_embeddings} tokens.")
        if fastv is not None and not fastv.k < num_layers:
            raise SettingsError(f"FastV's k must be between 1 and {num_layers - 1}, got {fastv.k}.")
        if prunes and len(set(visual_counts)) > 1:
            raise SettingsError("FastV needs the same number of image tokens in every prompt of a "
                                f"batch, got {visual_counts}.")
        if cache is not None and (cache.prefilled or cache.first_pruned_layer != (
                fastv.k if prunes else num_layers)):
            raise SettingsError("A KVCache holds one prefill, with the FastV settings it was made "
                                "for: make one with model.new_cache(input_ids, fastv).")
        # Each token's position among the real (unpadded) tokens; padding gets 0. FastV keeps it.
        positions = (key_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        x = self.embed(input_ids, pixel_values, pixel_values_videos)  # (B, T, C)
        cos, sin = self.rope(positions, x.dtype)
        # Without padding SDPA's `is_causal` will do (mask None), and it picks its fastest kernel.
        mask = None if bool(key_mask.all()) else visible_keys(key_mask, T)  # (B, 1, T, T)
        key_masks, kept_image_tokens = [key_mask], None  # per group of the cache's layers
        previous_queries = previous_keys = None  # the last layer's, after RoPE: FastV scores them

        for index, layer in enumerate(self.language_model.layers):
            if prunes and index == fastv.k:
                # ===================================== FastV =====================================
                # Rank the visual tokens by the attention the LAST token paid them in layer K-1
                # (previous_queries and previous_keys are that layer's), keep the top (1 - R).
                is_visual = config.is_visual(input_ids)  # (B, T): image and video tokens
                num_visual, num_keep = visual_counts[0], fastv.num_keep(visual_counts[0])
                visual_positions = first_true(is_visual, num_visual)  # (B, N), in sequence order
                visual_ids = input_ids.gather(1, visual_positions)  # (B, N)
                is_video, frame, patch = visual_layout(visual_ids, config)
                last_row = attention_rows(previous_queries, previous_keys, key_mask)[:, :, -1]
                inputs = PruningInputs(
                    last_token_attention=last_row,  # (B, H, T)
                    image_positions=visual_positions, num_keep=num_keep,
                    grid_size=config.vision.grid_size, is_video=is_video, frame=frame, patch=patch,
                    hidden_states=x, queries=previous_queries, keys=previous_keys, cos=cos, sin=sin,
                    attention_mask=key_mask)
                kept_image_tokens = check_kept(fastv.rule(inputs), B, num_visual, num_keep,
                                         check_values=fastv.rule is not fastv_rule)  # sorted
                # Every text token survives; so do the chosen visual tokens, in sequence order.
                survives = ~is_visual
                survives.scatter_(1, visual_positions.gather(1, kept_image_tokens), True)
                survivors = first_true(survives, T - num_visual + num_keep)  # (B, T_kept)
                x = x[torch.arange(B, device=device)[:, None], survivors]  # (B, T_kept, C)
                positions = positions.gather(1, survivors)  # their ORIGINAL positions
                cos, sin = self.rope(positions, x.dtype)
                key_mask = key_mask.gather(1, survivors)  # (B, T_kept)
                mask = None if mask is None else visible_keys(key_mask, survivors.shape[1])
                key_masks.append(key_mask)
                # ==================================================================================
            x, (previous_queries, previous_keys) = layer(x, cos, sin, mask, cache, index)
            if observe is not None:
                observe(LayerView(index, previous_queries, previous_keys, positions, key_mask))

        if cache is not None:
            cache.finish_prefill(key_masks, kept_image_tokens)
        if last_logits_only:
            x = x[:, -1:]
        return self.lm_head(self.language_model.norm(x))  # (B, T or T_kept, vocab)

    def decode_step(self, token, cache):
        """One new token per sequence (B,) after a prefill into `cache`: logits (B, vocab). Fixed
        shapes, no host sync, so it compiles to one graph: each layer attends to all its slots."""
        for valid, length in zip(cache.valid, cache.length):
            valid.index_fill_(1, length, True)
        x = self.language_model.embed_tokens(token[:, None])  # (B, 1, C)
        cos, sin = self.rope(cache.next_position[:, None], x.dtype)  # (B, 1, 1, D)
        masks = [valid[:, None, None, :] for valid in cache.valid]  # (B, 1, 1, capacity) a group
        for index, layer in enumerate(self.language_model.layers):
            x, _ = layer(x, cos, sin, masks[cache.group[index]], cache, index)
        for counter in (*cache.length, cache.next_position):  # a slot and a position further on
            counter.add_(1)
        return self.lm_head(self.language_model.norm(x))[:, -1]  # (B, vocab)
