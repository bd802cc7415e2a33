"""The text encoder gives transformers' CLIPTextModel (SD1) and open_clip's text tower (SD2) outputs."""

import pytest
import torch

import plainsd
from plainsd.config import preset
from tests.reference import build_open_clip_text, hf_text_kwargs, max_diff, open_clip_hidden, perturb

TOL = 1e-4
PROMPTS = ["a red circle on the left", "a photograph of an astronaut riding a horse, highly detailed", ""]


def _compare_transformers(text, sd, record_parity, name):
    ids = sd.tokenizer(PROMPTS)
    with torch.no_grad():
        out = text(ids, output_hidden_states=True)
        d1 = max_diff(sd.text_encoder(ids, clip_skip=1), out.last_hidden_state)
        d2 = max_diff(sd.text_encoder(ids, clip_skip=2), text.text_model.final_layer_norm(out.hidden_states[-2]))
    record_parity(f"text encoder {name} vs transformers (last layer)", d1)
    record_parity(f"text encoder {name} vs transformers (clip skip 2)", d2)
    assert d1 <= TOL and d2 <= TOL


def _load_with_tower(tmp_path, base: str, prefix: str, tower: torch.nn.Module) -> plainsd.StableDiffusion:
    """plainsd.load of a single file holding a tiny model's UNet and VAE and this text tower under prefix: a
    full-size tower is tested without building a full-size UNet beside it."""
    from safetensors.torch import save_file

    from plainsd.weights import original_state_dict

    state = {k: v for k, v in original_state_dict(plainsd.build(base)).items() if not k.startswith("cond_stage_model.")}
    state.update({prefix + k: v.contiguous() for k, v in tower.state_dict().items() if k != "attn_mask"})
    save_file(state, str(tmp_path / "model.safetensors"))
    sd = plainsd.load(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()  # the disk is freed when the memory-mapped weights are
    return sd


def test_tiny_text_matches_transformers(reference, record_parity):
    """Loaded with the rest of a diffusers folder, by plainsd.load."""
    _, _, _, text, _, sd = reference("tiny")
    _compare_transformers(text, sd, record_parity, "tiny")


@pytest.mark.slow
def test_full_sd1_text_matches_transformers(record_parity, tmp_path):
    """CLIP ViT-L/14's text model in an SD1 single file (the folder loader reads the whole SD1.5 folder in
    tests/models/test_unet.py)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from plainsd.weights import TEXT_OPENAI

    config = preset("sd15")
    torch.manual_seed(3)
    text = perturb(CLIPTextModel(CLIPTextConfig(**hf_text_kwargs(config.text))), 4, scale=0.02)
    sd = _load_with_tower(tmp_path, "tiny", TEXT_OPENAI, text)
    assert sd.config.text == config.text
    _compare_transformers(text, sd, record_parity, "sd15")


def _compare_open_clip(record_parity, tmp_path, name):
    """An SD2 single file whose text tower comes from open_clip loads and encodes as open_clip does."""
    from plainsd.weights import TEXT_OPENCLIP

    config = preset(name)
    tower = build_open_clip_text(config.text)
    sd = _load_with_tower(tmp_path, "tiny-sd2", TEXT_OPENCLIP, tower)
    assert sd.config.text.layout == "openclip" and sd.config.text.act == "gelu" and sd.config.text.clip_skip == 2
    ids = sd.tokenizer(PROMPTS)
    assert ids[0, 7] == 49407 and (ids[0, 8:] == 0).all()  # OpenCLIP pads with 0
    with torch.no_grad():
        d1 = max_diff(sd.text_encoder(ids, clip_skip=1), open_clip_hidden(tower, ids, 1))
        d2 = max_diff(sd.text_encoder(ids), open_clip_hidden(tower, ids, 2))  # SD2 default: penultimate
        d3 = max_diff(sd.text_encoder.pooled(ids), tower(ids))
    record_parity(f"text encoder {name} vs open_clip (last layer)", d1)
    record_parity(f"text encoder {name} vs open_clip (penultimate, SD2 default)", d2)
    record_parity(f"text encoder {name} vs open_clip (pooled, projected)", d3)
    assert max(d1, d2, d3) <= TOL


def test_tiny_text_matches_open_clip(record_parity, tmp_path):
    _compare_open_clip(record_parity, tmp_path, "tiny-sd2")


@pytest.mark.slow
def test_full_sd2_text_matches_open_clip(record_parity, tmp_path):
    _compare_open_clip(record_parity, tmp_path, "sd21")


def test_clip_skip_bounds(tiny):
    ids = tiny.tokenizer(["x"])
    with pytest.raises(ValueError, match="between 1 and 3"):
        tiny.text_encoder(ids, clip_skip=4)
