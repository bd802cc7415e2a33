"""plainsd's captioner for the shapes world: a small convolutional encoder and a small transformer decoder.

The encoder turns a 64x64 picture into an 8x8 grid of feature vectors (strided 3x3 convolutions, no
normalisation: a norm layer would take away the mean of a channel, and with it the colour that the caption has
to name), adds a learned embedding of each cell's place (the caption names positions), and hands the 64 cells to
the decoder as its image tokens. The decoder is GPT-like (causal self-attention over the words so far) with
cross-attention to the image tokens after each self-attention, as BLIP's text decoder reads its image
(Li et al. 2022), and writes one word at a time from a closed vocabulary (config.words).

A closed vocabulary of the caption grammar's few dozen words rather than CLIP's 49408 BPE ids: the world has
that many words, every one of them a whole token, so the output layer stays a few thousand weights and each
decoding step is one choice among the words the world has.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CaptionerConfig
from .layers import attention

PAD, BOS, EOS = 0, 1, 2
SPECIAL = 3  # ids below this are the three special tokens


class ImageEncoder(nn.Module):
    """[B, 3, S, S] in [-1, 1] -> [B, (S / 2**stages)**2, width] image tokens."""

    def __init__(self, c: CaptionerConfig):
        super().__init__()
        stages, before = [], 3
        for ch in c.channels:
            stages.append(nn.Sequential(nn.Conv2d(before, ch, 3, stride=2, padding=1), nn.GELU(),
                                        nn.Conv2d(ch, ch, 3, padding=1), nn.GELU()))
            before = ch
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Linear(before, c.width)
        side = c.image_size // 2 ** len(c.channels)
        self.position = nn.Parameter(torch.zeros(side * side, c.width))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stages(images)
        x = x.flatten(2).transpose(1, 2)  # [B, cells, C], cells row by row
        return self.proj(x) + self.position


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        context = x if context is None else context
        return self.out(attention(self.q(x), self.k(context), self.v(context), self.heads, causal=causal))


class DecoderBlock(nn.Module):
    """Pre-norm: causal self-attention, cross-attention to the image tokens, a GELU MLP; each added to x."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = Attention(width, heads)
        self.cross_attn = Attention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), causal=True)
        x = x + self.cross_attn(self.norm2(x), image)
        return x + self.mlp(self.norm3(x))


class Captioner(nn.Module):
    """captioner(images, ids) -> next-word logits [B, N, vocab]; captioner.generate(images) -> captions."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.config = c = config
        self.encoder = ImageEncoder(c)
        self.token_embedding = nn.Embedding(SPECIAL + len(c.words), c.width)
        self.position_embedding = nn.Parameter(torch.zeros(c.max_length, c.width))
        self.blocks = nn.ModuleList(DecoderBlock(c.width, c.heads) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, SPECIAL + len(c.words))
        nn.init.normal_(self.position_embedding, std=0.02)
        nn.init.normal_(self.encoder.position, std=0.02)

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    def decode(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Logits of the word after each position of ids [B, N], given the image tokens."""
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, image)
        return self.head(self.norm(x))

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.decode(ids, self.encoder(images))

    def encode_words(self, words: list[str]) -> list[int]:
        """start, the words' ids, end (a word outside the vocabulary is a KeyError: captions are the grammar's)."""
        index = {w: i + SPECIAL for i, w in enumerate(self.config.words)}
        return [BOS] + [index[w] for w in words] + [EOS]

    @torch.no_grad()
    def generate(self, images: torch.Tensor) -> list[list[str]]:
        """Greedy decoding, the whole batch at once, until every row has written its end token: the words of each
        caption. (The decoder is small and its prefix short, so each step reruns it on the prefix; no cache.)"""
        if images.shape[-2:] != (self.config.image_size,) * 2:
            images = F.interpolate(images, size=(self.config.image_size,) * 2, mode="bilinear", antialias=True,
                                   align_corners=False)
        image = self.encoder(images.to(self.dtype))
        ids = torch.full((images.shape[0], 1), BOS, dtype=torch.long)
        done = torch.zeros(images.shape[0], dtype=torch.bool)
        for _ in range(self.config.max_length - 1):
            logits = self.decode(ids, image)[:, -1].float()
            logits[:, :SPECIAL - 1] = -float("inf")  # never padding or a second start
            nxt = torch.where(done, torch.full_like(done, PAD, dtype=torch.long), logits.argmax(-1))
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == EOS
            if done.all():
                break
        words = self.config.words
        return [[words[i - SPECIAL] for i in row[1:].tolist() if i >= SPECIAL] for row in ids]
