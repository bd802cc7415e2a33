"""Token merging for Stable Diffusion (ToMe; Bolya & Hoffman 2023), as A1111's "Token merging ratio" applies it.

Neighbouring tokens of a feature map are often near copies of each other. Before a transformer block's
self-attention, the most similar of them are averaged into one (merge); attention runs on the fewer tokens, and
its output is copied back to every token that was merged (unmerge). Self-attention's cost grows with the square
of the tokens, so at the UNet's full-resolution level (4096 tokens at 512x512) halving them saves most of its
time; the picture changes a little (not exact).

The matching is bipartite, as in tomesd with A1111's settings (use_rand off, strides 2x2): the top-left token of
every 2x2 cell is a destination, the other three are sources; each source's most similar destination by cosine
similarity of the block's input is its match, and the `r` sources with the best matches are averaged into their
destinations (r = ratio x tokens, at most the number of sources: a ratio of 0.75 merges every source).
"""

from __future__ import annotations

import torch


def check_ratio(ratio, what: str = "the token merging ratio", none_means: str = "") -> None:
    """A1111's token merging ratio: the share of tokens merged, from 0 (off) to below 1."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"{what} must be at least 0 and below 1 (0.5 is usual; 0 = off{none_means}), got {ratio!r}")


def bipartite_matching(metric: torch.Tensor, h: int, w: int, r: int, sx: int = 2, sy: int = 2) -> tuple:
    """(merge, unmerge) for [B, h*w, C] token sequences of an h x w map, matched on `metric` [B, h*w, C'].

    merge: [B, N, C] -> [B, N - r, C] (the unmerged sources, then the destinations averaged with their sources);
    unmerge: [B, N - r, C] -> [B, N, C] (each merged source gets its destination's value)."""
    b, n, _ = metric.shape
    if n != h * w:
        raise ValueError(f"token merging needs the {h}x{w} map's {h * w} tokens, got {n}")
    if r <= 0:
        return _same, _same
    # destinations: the top-left token of each whole sy x sx cell (cells cut off at the right or bottom edge
    # have none); dst_pos and src_pos are token positions, destinations and sources each in raster order
    is_dst = torch.zeros(h, w, dtype=torch.bool, device=metric.device)
    is_dst[:h // sy * sy:sy, :w // sx * sx:sx] = True
    dst_pos, src_pos = is_dst.flatten().nonzero()[:, 0], (~is_dst).flatten().nonzero()[:, 0]
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        scores = unit[:, src_pos] @ unit[:, dst_pos].transpose(1, 2)  # [B, sources, destinations]
        r = min(r, len(src_pos))
        best, best_dst = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)  # sources, best matched first
        kept, merged = order[:, r:], order[:, :r]      # (indices into the sources)
        into = best_dst.gather(1, merged)              # the destination each merged source joins
        kept_pos, merged_pos = src_pos[kept], src_pos[merged]  # [B, ...] token positions

    def rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # x[i, index[i]] for each batch item i
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))

    def merge(x: torch.Tensor) -> torch.Tensor:
        dst = x[:, dst_pos]
        dst = dst.scatter_reduce(1, into[..., None].expand(-1, -1, x.shape[-1]), rows(x, merged_pos), reduce="mean")
        return torch.cat([rows(x, kept_pos), dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        c, k = x.shape[-1], kept.shape[1]
        out = x.new_empty(x.shape[0], n, c)
        out[:, dst_pos] = x[:, k:]
        out.scatter_(1, kept_pos[..., None].expand(-1, -1, c), x[:, :k])
        out.scatter_(1, merged_pos[..., None].expand(-1, -1, c), rows(x[:, k:], into))
        return out

    return merge, unmerge


def _same(x: torch.Tensor) -> torch.Tensor:
    return x
