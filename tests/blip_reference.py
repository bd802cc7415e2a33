"""transformers' BLIP captioning model with random weights, written as a Hugging Face folder for plainsd to load.

Test-only: transformers is a test extra and the package never imports it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

# A small WordPiece vocabulary in BERT's layout: the special pieces first, then words and continuations.
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "'", "!", "?", "-", "a", "an", "the", "of", "on",
              "in", "picture", "photo", "cat", "dog", "red", "blue", "circle", "square", "sit", "##s", "##ting", "##ed",
              "is", "are", "there", "two", "small", "big", "cafe", "n", "t", "s", "don", "do", "not", "it", "re", "we", "ve",
              "at", "top", "left", "right", "black", "back", "##ground", "shape", "##ly", "one", "three", "white",
              "green", "yellow", "orange", "diamond", "heart", "star", "triangle", "with", "and", "many"] + \
             [f"w{i}" for i in range(40)]


def tiny_blip_config(vocab_size: int, sep: int, bos: int):
    from transformers import BlipConfig
    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, bos_token_id=bos, sep_token_id=sep, pad_token_id=0, eos_token_id=2)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, initializer_range=0.02)
    return BlipConfig(text_config=text, vision_config=vision)


def base_blip_config():
    """Salesforce/blip-image-captioning-base's sizes (its config.json: the text decoder has 12 heads)."""
    from transformers import BlipConfig
    return BlipConfig(text_config=dict(num_attention_heads=12), vision_config=dict(initializer_range=0.02))


def randomise(model: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Spread-out random weights (LayerNorm gains around 1), so that logits are far from ties and captions vary."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            gain = name.endswith("weight") and any(n in name for n in ("LayerNorm", "layer_norm", "layernorm"))
            p.copy_(1 + noise if gain else noise)
    return model.eval()


def build_tiny_folder(folder: Path, seed: int = 0, safe: bool = True):
    """A tiny BLIP captioning folder (config.json, weights, vocab.txt) and transformers' model and processor for it."""
    from transformers import BertTokenizer, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    bos = len(TINY_VOCAB)  # [DEC], then [ENC]: the pieces BLIP adds to BERT's vocabulary
    torch.manual_seed(seed)
    model = randomise(BlipForConditionalGeneration(tiny_blip_config(bos + 2, TINY_VOCAB.index("[SEP]"), bos)), seed)
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[TINY_VOCAB.index("[SEP]")] += 3.0  # some captions end early
    model.save_pretrained(folder, safe_serialization=safe)
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    assert tokenizer.bos_token_id == bos
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    return model, processor


def pictures(n: int, seed: int = 0) -> list[Image.Image]:
    """Random pictures of different sizes and modes (RGB, RGBA, L), which preprocessing must all handle."""
    rng = np.random.default_rng(seed)
    modes = ["RGB", "RGBA", "L"]
    out = []
    for i in range(n):
        h, w = 40 + 13 * i, 70 - 9 * i
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[modes[i % 3]]
        arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        out.append(Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, modes[i % 3]))
    return out
