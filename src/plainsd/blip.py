"""Captions by BLIP: pictures in, sentences out (the captioner people use to caption training sets).

    captioner = BlipCaptioner.from_folder("blip-image-captioning-base")
    captioner.caption([Image.open("cat.png")])                      # one sentence per picture
    captioner.caption(images, prompt="a picture of", beams=3)      # conditional: continues the prompt

The steps are transformers' BlipForConditionalGeneration.generate with BlipProcessor around it: the picture is
resized to the ViT's side (bicubic, PIL's), scaled to [0, 1] and normalised with OpenAI CLIP's mean and std;
the decoder starts from [DEC] (the prompt's pieces after it, if any) and stops at [SEP]; greedy or beam search
picks the words. Lengths count tokens as transformers does: the start token and the prompt's pieces included.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from .models.blip import BlipCaptionModel, TextDecoder
from .models.wordpiece import WordPieceTokenizer
from .runtime import pack_weights, use_runtime_attention
from .weights import load_blip

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, which BLIP was trained with
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images: list[Image.Image], size: int) -> torch.Tensor:
    """PIL pictures -> [B, 3, size, size] float32: RGB, bicubic resize, /255, normalised (BlipImageProcessor)."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def _penalise(scores: torch.Tensor, seqs: torch.Tensor, min_length: int, eos: int, repetition_penalty: float):
    """transformers' logits processors in its order: [SEP] banned while the sequences are shorter than
    min_length; the scores of tokens already in a sequence divided by the penalty (multiplied where negative)."""
    if seqs.shape[1] < min_length:
        scores[:, eos] = -float("inf")
    if repetition_penalty != 1.0:
        seen = scores.gather(1, seqs)
        scores.scatter_(1, seqs, torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty))
    return scores


@torch.no_grad()
def greedy(decoder: TextDecoder, image_kv: list, prompt: torch.Tensor, min_length: int, max_length: int,
           repetition_penalty: float = 1.0) -> list[list[int]]:
    """The most likely token at each step, until [SEP] or max_length; prompt [B, n] -> the token ids per picture,
    prompt included, ending with [SEP] unless max_length cut them."""
    eos, pad = decoder.config.sep_token_id, decoder.config.pad_token_id
    seqs, cache = prompt, decoder.new_cache()
    done = torch.zeros(len(prompt), dtype=torch.bool)
    logits = decoder(prompt, image_kv, cache)[:, -1].float()
    while seqs.shape[1] < max_length:
        token = _penalise(logits, seqs, min_length, eos, repetition_penalty).argmax(-1)
        token = torch.where(done, pad, token)
        seqs = torch.cat([seqs, token[:, None]], dim=1)
        done |= token == eos
        if done.all() or seqs.shape[1] >= max_length:
            break
        logits = decoder(token[:, None], image_kv, cache)[:, -1].float()
    return [_until_eos(s, prompt.shape[1], eos) for s in seqs.tolist()]


def _until_eos(seq: list[int], start: int, eos: int) -> list[int]:
    return seq[:seq.index(eos, start) + 1] if eos in seq[start:] else seq


@torch.no_grad()
def beam_search(decoder: TextDecoder, image_kv: list, prompt: torch.Tensor, beams: int, min_length: int,
                max_length: int, repetition_penalty: float = 1.0, length_penalty: float = 1.0) -> list[list[int]]:
    """Beam search as transformers runs it (its defaults: no early stopping, length penalty 1): each step keeps the
    2 * beams best continuations of all beams; those ending in [SEP] (or reaching max_length) and ranking among the
    first `beams` join the finished list, scored by their summed log-probabilities over their generated length;
    the best `beams` others run on. It stops when no running beam could beat the worst of `beams` finished ones."""
    c = decoder.config
    eos, b, n, vocab, keep = c.sep_token_id, len(prompt), prompt.shape[1], c.vocab_size, 2 * beams
    image_kv = [(k.repeat_interleave(beams, 0), v.repeat_interleave(beams, 0)) for k, v in image_kv]
    running = torch.full((b, beams, max_length), c.pad_token_id or eos)  # transformers' filler after the end
    running[:, :, :n] = prompt[:, None]
    finished, run_scores = running.clone(), torch.zeros(b, beams)
    run_scores[:, 1:] = -1e9  # the beams start as copies: only the first one may grow at the first step
    fin_scores, fin_done = torch.full((b, beams), -1e9), torch.zeros(b, beams, dtype=torch.bool)
    improvable, top = torch.ones(b, 1, dtype=torch.bool), torch.arange(keep) < beams
    cache = decoder.new_cache()
    logits = decoder(prompt.repeat_interleave(beams, 0), image_kv, cache)[:, -1].float()
    for cur in range(n, max_length):
        logp = _penalise(logits.log_softmax(-1), running[:, :, :cur].reshape(b * beams, cur), min_length, eos,
                         repetition_penalty)
        scores, index = (logp.view(b, beams, vocab) + run_scores[..., None]).view(b, beams * vocab).topk(keep)
        source, token = index // vocab, index % vocab
        candidates = _pick(running, source)
        candidates[:, :, cur] = token
        stops = (token == eos) | (cur + 1 >= max_length)
        alive = scores + stops.float() * -1e9
        next_rows = alive.topk(beams).indices
        running, run_scores, rows = _pick(candidates, next_rows), alive.gather(1, next_rows), source.gather(1, next_rows)
        ended = scores / ((cur + 1 - n) ** length_penalty)
        ended += (~improvable).float() * -1e9
        ended += (~(stops & top)).float() * -1e9
        best = torch.cat([fin_scores, ended], 1).topk(beams).indices
        finished = _pick(torch.cat([finished, candidates], 1), best)
        fin_scores = torch.cat([fin_scores, ended], 1).gather(1, best)
        fin_done = torch.cat([fin_done, stops & top], 1).gather(1, best)
        worst = torch.where(fin_done, fin_scores.min(1, keepdim=True).values, -1e9)
        improvable &= (run_scores[:, :1] / ((cur + 1 - n) ** length_penalty) > worst).any(-1, keepdim=True)
        if not improvable.any() or stops.all():
            break
        TextDecoder.reorder_cache(cache, (rows + torch.arange(b)[:, None] * beams).flatten())
        logits = decoder(running[:, :, cur].reshape(-1, 1), image_kv, cache)[:, -1].float()
    return [_until_eos(s, n, eos) for s in finished[:, 0].tolist()]


def _pick(seqs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """seqs [B, K, L], rows [B, M] -> [B, M, L]: the chosen sequences of each picture."""
    return seqs.gather(1, rows[..., None].expand(-1, -1, seqs.shape[2]))


class BlipCaptioner:
    """BLIP captioning: BlipCaptioner.from_folder(path).caption(images) -> one sentence per picture.

    Defaults: greedy search (as A1111's interrogator; one decoder pass per word), 5 to 30 tokens (BLIP's COCO
    captioning minimum and its generate()'s maximum), no repetition penalty. A1111's interrogator asks for longer
    captions: beams=1, min_length=24, max_length=48. docs/captioning.md has the reasons."""

    batch_size = 8  # pictures per forward pass: bounds the memory of the image tokens and the beams' caches

    def __init__(self, model: BlipCaptionModel, tokenizer: WordPieceTokenizer):
        self.model, self.tokenizer = model, tokenizer

    @classmethod
    def from_folder(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> "BlipCaptioner":
        """The folder's network and tokenizer, readied as runtime.prepare readies a UNet: the attention this CPU
        runs best (in bf16 without AMX, oneDNN's products rather than torch's SDPA kernel: runtime/attention.py)
        and the weights packed once for oneDNN (in bf16 every Linear: runtime/packing.py)."""
        model, tokenizer = load_blip(path, dtype)
        use_runtime_attention(model)
        pack_weights(model)
        return cls(model, tokenizer)

    def caption(self, images: list[Image.Image], prompt: str | None = None, beams: int = 1, min_length: int = 5,
                max_length: int = 30, repetition_penalty: float = 1.0) -> list[str]:
        """The captions of the pictures; with a prompt, each caption continues it (and starts with it)."""
        ids = self.generate(images, prompt, beams, min_length, max_length, repetition_penalty)
        return [self.tokenizer.decode(s) for s in ids]

    def generate(self, images: list[Image.Image], prompt: str | None = None, beams: int = 1, min_length: int = 5,
                 max_length: int = 30, repetition_penalty: float = 1.0) -> list[list[int]]:
        """The token ids of the captions: [DEC], the prompt's pieces, the words, [SEP] (unless max_length cut)."""
        c = self.model.config
        prompt_ids = [c.bos_token_id] + (self.tokenizer.encode(prompt) if prompt else [])
        self._check(images, beams, min_length, max_length, len(prompt_ids), repetition_penalty)
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i:i + self.batch_size]
            with torch.no_grad():
                image_kv = self.model.text_decoder.image_keys_values(self.model.vision_model(preprocess(chunk, c.image_size)))
            start = torch.tensor([prompt_ids] * len(chunk))
            if beams == 1:
                out += greedy(self.model.text_decoder, image_kv, start, min_length, max_length, repetition_penalty)
            else:
                out += beam_search(self.model.text_decoder, image_kv, start, beams, min_length, max_length,
                                   repetition_penalty)
        return out

    def _check(self, images, beams, min_length, max_length, prompt_tokens, repetition_penalty) -> None:
        if not isinstance(images, (list, tuple)) or not all(isinstance(im, Image.Image) for im in images):
            raise ValueError("caption() takes a list of PIL images")
        if not isinstance(beams, int) or isinstance(beams, bool) or not 1 <= beams <= 16:
            raise ValueError(f"beams must be a whole number from 1 to 16, not {beams!r}")
        limit = self.model.config.max_positions
        if not isinstance(max_length, int) or not prompt_tokens < max_length <= limit:
            raise ValueError(f"max_length must be more than the {prompt_tokens} tokens of the start and the prompt "
                             f"and at most {limit}, not {max_length}")
        if not isinstance(min_length, int) or not 0 <= min_length <= max_length:
            raise ValueError(f"min_length must be from 0 to max_length ({max_length}), not {min_length}")
        if not repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be positive, not {repetition_penalty}")
