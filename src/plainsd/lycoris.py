"""LyCORIS's other ways of changing a layer's weight, as A1111's built-in Lora extension rebuilds them
(extensions-builtin/Lora: network_hada.py, network_lokr.py, network_ia3.py, and DoRA in network.py).

Each layer's change is computed at strength 1 from the file's tensors and the layer's own weight, then scaled by
the prompt's weight (lora.deltas). alpha / dim scales the low-rank kinds as in A1111, where dim is the rank the
file shows (LoHa: hada_w1_b's rows; LoKr: lokr_w1_b's, else lokr_w2_b's; a LoKr of two whole matrices and
(IA)^3 have none: scale 1).
- LoHa (Hadamard product): (w1_a @ w1_b) * (w2_a @ w2_b); with hada_t1 / hada_t2 each factor is a CP-decomposed
  convolution t x_1 a x_2 b.
- LoKr (Kronecker product): kron(w1, w2), each either whole (lokr_w1) or low-rank (lokr_w1_a @ lokr_w1_b),
  lokr_t2 a CP-decomposed w2.
- (IA)^3: the weight's output channels (input channels with on_input) scaled by `weight`: the change is W * w.
- DoRA (weight decomposition, with any of the above): the merged weight W + dW scaled per column (dora_scale
  [1, in, ...], kohya's and A1111's convention) or per row ([out, 1, ...] or [out]: LyCORIS' default and PEFT's
  lora_magnitude_vector) to the stored magnitudes; the change is that weight minus W.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _scale(alpha: float | None, dim: int | None) -> float:
    return alpha / dim if alpha is not None and dim else 1.0


def cp_weight(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A CP-decomposed convolution weight: t [r, r, k, k] with a [r, out] and b [r, in] -> [out, in, k, k]."""
    return torch.einsum("i j k l, i p, j r -> p r k l", t.float(), a.float(), b.float())


def decompose(delta: torch.Tensor, weight: torch.Tensor, dora_scale: torch.Tensor | None) -> torch.Tensor:
    """DoRA: the change that gives W + delta the stored magnitudes (delta itself without dora_scale)."""
    if dora_scale is None:
        return delta
    merged = weight.float() + delta
    m = dora_scale.float()
    per_row = m.ndim == 1 or (m.shape[0] == merged.shape[0] and m.shape[0] != 1 and m[0].numel() == 1)
    if per_row:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.ndim - 1))
        m = m.reshape(norm.shape)
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, -1, *[1] * (merged.ndim - 2))
        m = m.reshape(norm.shape)
    return merged * (m / norm) - weight.float()


@dataclass
class LoHaLayer:
    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float | None
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    def change(self, weight: torch.Tensor) -> torch.Tensor:
        def factor(t, a, b):
            if t is not None:
                return cp_weight(t, a, b)
            return a.float().flatten(1) @ b.float().flatten(1)

        f1, f2 = factor(self.t1, self.w1a, self.w1b), factor(self.t2, self.w2a, self.w2b)
        if f1.numel() != weight.numel() or f2.numel() != weight.numel():
            raise ValueError(f"Hadamard factors of {list(f1.shape)} and {list(f2.shape)} do not fit a weight of "
                             f"{list(weight.shape)}")
        d = f1.reshape(weight.shape) * f2.reshape(weight.shape)
        return decompose(d * _scale(self.alpha, self.rank), weight, self.dora_scale)


@dataclass
class LoKrLayer:
    w1: torch.Tensor | None
    w1a: torch.Tensor | None
    w1b: torch.Tensor | None
    w2: torch.Tensor | None
    w2a: torch.Tensor | None
    w2b: torch.Tensor | None
    alpha: float | None
    t2: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int | None:
        return self.w2b.shape[0] if self.w2b is not None else (self.w1b.shape[0] if self.w1b is not None else None)

    def change(self, weight: torch.Tensor) -> torch.Tensor:
        w1 = self.w1.float() if self.w1 is not None else self.w1a.float() @ self.w1b.float()
        if self.w2 is not None:
            w2 = self.w2.float()
        elif self.t2 is not None:
            w2 = cp_weight(self.t2, self.w2a, self.w2b)
        else:
            w2 = self.w2a.float() @ self.w2b.float()
        while w1.ndim < w2.ndim:
            w1 = w1.unsqueeze(-1)
        d = torch.kron(w1, w2.contiguous())
        if d.numel() != weight.numel():
            raise ValueError(f"kron of {list(w1.shape)} and {list(w2.shape)} does not fit a weight of {list(weight.shape)}")
        return decompose(d.reshape(weight.shape) * _scale(self.alpha, self.rank), weight, self.dora_scale)


@dataclass
class IA3Layer:
    w: torch.Tensor
    on_input: bool

    def change(self, weight: torch.Tensor) -> torch.Tensor:
        axis = 1 if self.on_input else 0
        if self.w.numel() != weight.shape[axis]:
            raise ValueError(f"{self.w.numel()} (IA)^3 scales do not fit the {weight.shape[axis]} "
                             f"{'input' if self.on_input else 'output'} channels of a weight of {list(weight.shape)}")
        shape = [1] * weight.ndim
        shape[axis] = -1
        return weight.float() * self.w.float().reshape(shape)
