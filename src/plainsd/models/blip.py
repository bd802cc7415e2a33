"""BLIP's captioning model (Li et al. 2022, "BLIP: Bootstrapping Language-Image Pre-training").

A ViT reads the picture into one token per 16x16 patch plus a class token; a BERT-style decoder writes the
caption one WordPiece at a time, each layer attending causally to the caption so far and then, through
cross-attention, to every image token. The decoder's output layer shares its weights with the word embeddings.

Module names equal the keys of the published Hugging Face folders (Salesforce/blip-image-captioning-base and
-large, transformers' BlipForConditionalGeneration): `vision_model.encoder.layers.0.self_attn.qkv`,
`text_decoder.bert.encoder.layer.0.crossattention.self.query`, `text_decoder.cls.predictions.bias`, so their
model.safetensors loads with strict=True once the tied output weight is dropped (plainsd.weights.load_blip).
The search over words (greedy, beam) lives in plainsd.blip; this file holds the network and its KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BlipConfig


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, C] -> [B, heads, N, C / heads]."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


# --- the image tower: a ViT with pre-norm layers ----------------------------------------------------

class VisionAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)  # queries, keys and values in one projection, in that order
        self.projection = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.projection(_merge_heads(self.attend(q, k, v)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention on [B, heads, N, d] tensors: torch's SDPA (its own method so that a CPU can run it another
        way: runtime/attention.py)."""
        return F.scaled_dot_product_attention(q, k, v)


class VisionMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, c: BlipConfig):
        super().__init__()
        self.self_attn = VisionAttention(c.vision_width, c.vision_heads)
        self.layer_norm1 = nn.LayerNorm(c.vision_width, eps=c.vision_eps)
        self.mlp = VisionMLP(c.vision_width, c.vision_hidden)
        self.layer_norm2 = nn.LayerNorm(c.vision_width, eps=c.vision_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEmbeddings(nn.Module):
    """Patches by a strided convolution, a learned class token in front, learned positions added."""

    def __init__(self, c: BlipConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, c.vision_width))
        self.patch_embedding = nn.Conv2d(3, c.vision_width, c.patch_size, stride=c.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, (c.image_size // c.patch_size) ** 2 + 1, c.vision_width))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_embedding.expand(len(pixels), -1, -1), patches], dim=1)
        return tokens + self.position_embedding


class VisionEncoder(nn.Module):
    def __init__(self, c: BlipConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(c) for _ in range(c.vision_layers))


class VisionModel(nn.Module):
    """pixels [B, 3, S, S] (normalised as plainsd.blip.preprocess does) -> image tokens [B, 1 + (S/16)^2, width]."""

    def __init__(self, c: BlipConfig):
        super().__init__()
        self.config = c
        self.embeddings = VisionEmbeddings(c)
        self.encoder = VisionEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.vision_width, eps=c.vision_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixels.shape[-2:] != (size, size):
            raise ValueError(f"BLIP's image tower takes {size}x{size} pictures, not {pixels.shape[-1]}x{pixels.shape[-2]}")
        x = self.embeddings(pixels.to(self.post_layernorm.weight.dtype))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


# --- the text decoder: BERT with cross-attention, post-norm layers ------------------------------------

class TextSelfAttention(nn.Module):
    """BERT's query/key/value projections; keys and values read the image tokens in cross-attention."""

    def __init__(self, width: int, heads: int, context_width: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(context_width, width)
        self.value = nn.Linear(context_width, width)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _split_heads(self.key(x), self.heads), _split_heads(self.value(x), self.heads)


class TextOutput(nn.Module):
    """Projection, then LayerNorm of it plus the residual (BERT is post-norm)."""

    def __init__(self, width: int, eps: float, in_width: int | None = None):
        super().__init__()
        self.dense = nn.Linear(in_width or width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class TextAttention(nn.Module):
    def __init__(self, c: BlipConfig, context_width: int):
        super().__init__()
        self.self = TextSelfAttention(c.text_width, c.text_heads, context_width)
        self.output = TextOutput(c.text_width, c.text_eps)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
        q = _split_heads(self.self.query(x), self.self.heads)
        return self.output(_merge_heads(self.attend(q, k, v, mask)), x)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention on [B, heads, N, d] tensors, mask True where a query may look: torch's SDPA (its own method
        so that a CPU can run it another way: runtime/attention.py)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class TextIntermediate(nn.Module):
    def __init__(self, c: BlipConfig):
        super().__init__()
        self.dense = nn.Linear(c.text_width, c.text_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class TextLayer(nn.Module):
    """Causal self-attention over the caption, cross-attention to the image tokens, then the MLP."""

    def __init__(self, c: BlipConfig):
        super().__init__()
        self.attention = TextAttention(c, c.text_width)
        self.crossattention = TextAttention(c, c.vision_width)
        self.intermediate = TextIntermediate(c)
        self.output = TextOutput(c.text_width, c.text_eps, in_width=c.text_hidden)  # the MLP's second half

    def forward(self, x: torch.Tensor, image_kv: tuple, past: list, mask: torch.Tensor | None) -> torch.Tensor:
        """past is this layer's [keys, values] of the earlier caption tokens (an empty list at first); the new
        tokens' keys and values are appended to it, which is the KV cache that makes each step one token long."""
        k, v = self.attention.self.keys_values(x)
        if past:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        past[:] = [k, v]
        x = self.attention(x, k, v, mask)
        x = self.crossattention(x, *image_kv)
        return self.output(self.intermediate(x), x)


class TextEmbeddings(nn.Module):
    def __init__(self, c: BlipConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.text_width)
        self.position_embeddings = nn.Embedding(c.max_positions, c.text_width)
        self.LayerNorm = nn.LayerNorm(c.text_width, eps=c.text_eps)

    def forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        if start + ids.shape[1] > self.position_embeddings.num_embeddings:
            raise ValueError(f"BLIP's decoder reads at most {self.position_embeddings.num_embeddings} tokens")
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(positions))


class TextEncoder(nn.Module):
    def __init__(self, c: BlipConfig):
        super().__init__()
        self.layer = nn.ModuleList(TextLayer(c) for _ in range(c.text_layers))


class Bert(nn.Module):
    def __init__(self, c: BlipConfig):
        super().__init__()
        self.embeddings = TextEmbeddings(c)
        self.encoder = TextEncoder(c)


class PredictionTransform(nn.Module):
    def __init__(self, c: BlipConfig):
        super().__init__()
        self.dense = nn.Linear(c.text_width, c.text_width)
        self.LayerNorm = nn.LayerNorm(c.text_width, eps=c.text_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class Predictions(nn.Module):
    """BERT's LM head: transform, then the word embeddings (tied, as transformers ties them) plus a bias."""

    def __init__(self, c: BlipConfig):
        super().__init__()
        self.transform = PredictionTransform(c)
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))


class LMHead(nn.Module):
    def __init__(self, c: BlipConfig):
        super().__init__()
        self.predictions = Predictions(c)


class TextDecoder(nn.Module):
    """decoder(ids [B, n], image_kv, cache) -> logits [B, n, vocab] of the token after each position."""

    def __init__(self, c: BlipConfig):
        super().__init__()
        self.config = c
        self.bert = Bert(c)
        self.cls = LMHead(c)

    def image_keys_values(self, image: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The cross-attention keys and values of the image tokens, per layer: computed once per picture."""
        return [layer.crossattention.self.keys_values(image) for layer in self.bert.encoder.layer]

    def new_cache(self) -> list[list]:
        return [[] for _ in self.bert.encoder.layer]

    def forward(self, ids: torch.Tensor, image_kv: list, cache: list[list] | None = None) -> torch.Tensor:
        cache = self.new_cache() if cache is None else cache
        start = cache[0][0].shape[2] if cache[0] else 0
        n = ids.shape[1]
        mask = None
        if n > 1:  # causal over the new tokens; every new token sees all cached ones
            keys, queries = torch.arange(start + n, device=ids.device), torch.arange(start, start + n, device=ids.device)
            mask = keys[None, :] <= queries[:, None]
        x = self.bert.embeddings(ids, start)
        for layer, kv, past in zip(self.bert.encoder.layer, image_kv, cache):
            x = layer(x, kv, past, mask)
        head = self.cls.predictions
        return F.linear(head.transform(x), self.bert.embeddings.word_embeddings.weight, head.bias)

    @staticmethod
    def reorder_cache(cache: list[list], rows: torch.Tensor) -> None:
        """Beam search: keep the cached keys and values of the rows (beams) that continue, in their new order."""
        for past in cache:
            past[:] = [t.index_select(0, rows) for t in past]


class BlipCaptionModel(nn.Module):
    """model(pixels, ids) -> logits [B, n, vocab]: the image tower, then the decoder reading the caption so far."""

    def __init__(self, config: BlipConfig):
        super().__init__()
        self.config = config
        self.vision_model = VisionModel(config)
        self.text_decoder = TextDecoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_model.post_layernorm.weight.dtype

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        image_kv = self.text_decoder.image_keys_values(self.vision_model(pixels))
        return self.text_decoder(ids, image_kv)
