"""SDXL LoRA files: kohya's (lora_te1_ / lora_te2_ / lora_unet_ with the original UNet's names, as kohya's SDXL
trainer writes them) and diffusers' / PEFT's (unet., text_encoder., text_encoder_2.). plainsd's merge equals
diffusers' StableDiffusionXLPipeline.load_lora_weights + fuse_lora on the same random file and weights, for the
UNet and both text towers; a <lora:...> tag in an SDXL prompt draws what the merged model draws."""

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import plainsd
from plainsd import lora
from plainsd.cli import main
from plainsd.lycoris import LoHaLayer
from plainsd.models.sdxl import size_numbers, vector
from plainsd.models.tokenizer import Tokenizer
from plainsd.pipeline import txt2img
from plainsd.weights import CheckpointError
from tests.reference import build_diffusers_sdxl, max_diff, sdxl_text_reference, write_diffusers_sdxl_folder
from tests.test_configs import test_config
from tests.test_lora_formats import TEXT_TARGETS, UNET_TARGETS, _randomise

PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """(config, diffusers folder, the diffusers / transformers networks it was written from)."""
    config = test_config("tiny-sdxl")
    nets = build_diffusers_sdxl(config, seed=11)
    folder = write_diffusers_sdxl_folder(tmp_path_factory.mktemp("xl"), *nets)
    return config, folder, nets


def _pipe(nets):
    """A diffusers SDXL pipeline on copies of the networks (a LoRA fused into it leaves the originals alone)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    unet, vae, text, text2 = (copy.deepcopy(n) for n in nets)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text2, tokenizer=None, tokenizer_2=None,
                                     unet=unet, scheduler=EulerDiscreteScheduler(), add_watermarker=False)


def kohya_file(sd, path, seed=0):
    """A random kohya SDXL LoRA over every Linear / Conv2d of the UNet (original names) and of both towers' layers
    (transformers' names), with ranks that differ from layer to layer and one alpha, as kohya's network_alpha.
    (diffusers drops an alpha that differs from the file's usual one on attention layers: its alpha_pattern keeps
    the processor names, to_q_lora, that match no module; plainsd's per-layer alpha is tested in test_lora.py.)"""
    g = torch.Generator().manual_seed(seed)
    layers = {"lora_unet_": sd.unet, "lora_te1_": sd.text_encoder.towers[0], "lora_te2_": sd.text_encoder.towers[1]}
    state = {}
    adapted = [(prefix, name, layer) for prefix, net in layers.items() for name, layer in _adaptable(net, prefix)]
    for i, (prefix, name, layer) in enumerate(adapted):
        rank = 2 + i % 3
        key = prefix + name.replace(".", "_")
        if isinstance(layer, nn.Conv2d):
            down = (rank, layer.in_channels, *layer.kernel_size)
            up = (layer.out_channels, rank, 1, 1)
        else:
            down, up = (rank, layer.in_features), (layer.out_features, rank)
        state[f"{key}.lora_down.weight"] = torch.randn(down, generator=g) * 0.1
        state[f"{key}.lora_up.weight"] = torch.randn(up, generator=g) * 0.1
        state[f"{key}.alpha"] = torch.tensor(3.0)
    save_file(state, str(path))
    return path


def _adaptable(net, prefix):
    """A network's Linear / Conv2d layers a kohya file adapts (the towers' transformer layers, not the projection)."""
    for name, m in net.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and (prefix == "lora_unet_" or ".layers." in name):
            yield name, m


def peft_file(nets, folder, seed=0):
    """Random PEFT adapters on diffusers' UNet (label_emb's add_embedding too) and both transformers towers, saved
    by diffusers' StableDiffusionXLPipeline.save_lora_weights with their LoraConfig fields (rank and alpha
    patterns, rsLoRA on bigG)."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet, _, text, text2 = (copy.deepcopy(n) for n in nets)
    configs = [LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS + ["add_embedding.linear_1", "add_embedding.linear_2"],
                          rank_pattern={"conv1": 2}, alpha_pattern={"to_q": 3.0}),
               LoraConfig(r=4, lora_alpha=2, target_modules=TEXT_TARGETS),
               LoraConfig(r=2, lora_alpha=3, target_modules=TEXT_TARGETS, use_rslora=True)]
    states = []
    for i, (model, config) in enumerate(zip((unet, text, text2), configs)):
        model.add_adapter(config)
        _randomise(model, seed + i)
        states.append(get_peft_model_state_dict(model))
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=states[0], text_encoder_lora_layers=states[1],
                                                text_encoder_2_lora_layers=states[2],
                                                unet_lora_adapter_metadata=configs[0].to_dict(),
                                                text_encoder_lora_adapter_metadata=configs[1].to_dict(),
                                                text_encoder_2_lora_adapter_metadata=configs[2].to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def compare(sd, pipe) -> tuple[float, float]:
    """(text difference: both towers' states and the pooled text, UNet difference) between plainsd and diffusers."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([500])
    numbers = torch.tensor([size_numbers("base", 64, 64)])
    with torch.no_grad():
        states, pooled = sd.text_encoder.encode(sd.tokenizer([PROMPT]))
        want_states, want_pooled = sdxl_text_reference(pipe.text_encoder, pipe.text_encoder_2, Tokenizer("sd1")([PROMPT]),
                                                       Tokenizer("sd2")([PROMPT]))
        got = sd.unet(x, t, want_states, y=vector(want_pooled, numbers))
        want = pipe.unet(x, t, encoder_hidden_states=want_states,
                         added_cond_kwargs={"text_embeds": want_pooled, "time_ids": numbers}).sample
    return max(max_diff(states, want_states), max_diff(pooled, want_pooled)), max_diff(got, want)


@pytest.mark.parametrize("layout, weight", [("kohya", 0.8), ("peft", -0.6)])
def test_merge_equals_diffusers_load_and_fuse(xl, tmp_path, record_parity, layout, weight):
    config, folder, nets = xl
    sd = plainsd.load(folder)
    path = kohya_file(sd, tmp_path / "style.safetensors") if layout == "kohya" else peft_file(nets, tmp_path / "style")
    pipe = _pipe(nets)
    before = compare(sd, pipe)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=weight)
    adapter = lora.read_lora(path)
    adapted = sum(1 for n in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) for m in n.modules() if hasattr(m, "lora_A"))
    towers = {k.split("_")[1] for k in adapter.layers}
    assert len(adapter.layers) == adapted and towers == {"unet", "te1" if layout == "kohya" else "te", "te2"}
    unmerged = compare(sd, pipe)
    lora.merge(sd, adapter, weight)
    d_text, d_unet = compare(sd, pipe)
    record_parity(f"SDXL LoRA {layout} vs diffusers load_lora_weights+fuse_lora, weight {weight}", max(d_text, d_unet))
    assert max(before) <= 1e-5 and min(unmerged) > 1e-2  # the LoRA changes both networks, measurably
    assert d_text <= 1e-5 and d_unet <= 1e-5, (d_text, d_unet)


def test_prompt_tag_draws_what_the_merged_model_draws(xl, tmp_path):
    """<lora:style:0.7> in an SDXL prompt (its hires pass too) equals the model with the LoRA merged at 0.7, and the
    model's weights are its own again afterwards; `plainsd lora merge` writes the merged model."""
    config, folder, _ = xl
    sd = plainsd.load(folder)
    kohya_file(sd, (tmp_path / "loras").mkdir() or tmp_path / "loras" / "style.safetensors")
    kw = dict(steps=3, seed=4, width=64, height=64, cfg_scale=5.0)
    plain = np.asarray(txt2img(sd, "a red circle", **kw).images[0])
    tagged = np.asarray(txt2img(sd, "a red circle <lora:style:0.7>", lora_dir=tmp_path / "loras", **kw).images[0])
    again = np.asarray(txt2img(sd, "a red circle", **kw).images[0])
    merged = lora.merge(plainsd.load(folder), lora.read_lora(tmp_path / "loras" / "style.safetensors"), 0.7)
    assert np.array_equal(np.asarray(txt2img(merged, "a red circle", **kw).images[0]), tagged)
    assert np.array_equal(plain, again) and np.abs(plain.astype(int) - tagged).max() > 10
    assert main(["lora", "merge", str(folder), str(tmp_path / "loras" / "style.safetensors"), "--weight", "0.7",
                 "-o", str(tmp_path / "merged.safetensors")]) == 0
    written = plainsd.load(tmp_path / "merged.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(written.state_dict().values(), merged.state_dict().values()))


def test_loha_on_sdxl_uses_the_same_names(xl, tmp_path):
    """A LyCORIS LoHa layer on bigG (lora_te2_) and one on an SDXL UNet attention (original names) change exactly
    those weights by (w1_a w1_b) * (w2_a w2_b) * alpha / dim."""
    _, folder, _ = xl
    sd = plainsd.load(folder)
    g = torch.Generator().manual_seed(1)
    attn = next(n for n, _ in sd.unet.named_modules() if n.startswith("input_blocks.") and n.endswith(".attn2.to_k"))
    names = {"lora_te2_text_model_encoder_layers_0_mlp_fc1": sd.text_encoder.towers[1].text_model.encoder.layers[0].mlp.fc1,
             "lora_unet_" + attn.replace(".", "_"): sd.unet.get_submodule(attn)}
    state, expected = {}, {}
    for key, layer in names.items():
        out, inp = layer.weight.shape
        parts = {"hada_w1_a": (out, 2), "hada_w1_b": (2, inp), "hada_w2_a": (out, 2), "hada_w2_b": (2, inp)}
        state.update({f"{key}.{p}": torch.randn(s, generator=g) for p, s in parts.items()})
        state[f"{key}.alpha"] = torch.tensor(1.0)
        t = {p: state[f"{key}.{p}"] for p in parts}
        expected[key] = layer.weight + (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * 0.5
    save_file(state, str(tmp_path / "loha.safetensors"))
    adapter = lora.read_lora(tmp_path / "loha.safetensors")
    assert all(isinstance(layer, LoHaLayer) for layer in adapter.layers.values())
    lora.merge(sd, adapter)
    for key, layer in names.items():
        assert torch.allclose(layer.weight, expected[key], atol=1e-6)


def test_a_lora_of_another_family_is_one_sentence(xl, tmp_path):
    _, folder, _ = xl
    kohya_file(plainsd.load(folder), tmp_path / "xl.safetensors")
    with pytest.raises(CheckpointError, match="does not fit this SD1 model: .* lora_"):
        lora.deltas(plainsd.build("tiny", seed=0), lora.read_lora(tmp_path / "xl.safetensors"))
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"  # SD 1's first level has attention, SDXL's none
    save_file({f"{key}.lora_down.weight": torch.zeros(2, 4), f"{key}.lora_up.weight": torch.zeros(4, 2)},
              str(tmp_path / "sd1.safetensors"))
    with pytest.raises(CheckpointError, match="does not fit this SDXL model"):
        lora.deltas(plainsd.load(folder), lora.read_lora(tmp_path / "sd1.safetensors"))


def test_adapters_on_sdxl_take_kohyas_sdxl_names():
    """Training adapters on an SDXL model names them as kohya's SDXL trainer does (original UNet names, lora_te1_ /
    lora_te2_), and the reader's table finds each one's layer again."""
    sd = plainsd.build("tiny-sdxl", seed=0)
    adapters = lora.attach(sd, rank=2, text_encoder=True)
    try:
        table = lora.name_table(sd)
        assert all(k in table for k in adapters)
        assert {k.split("_")[1] for k in adapters} == {"unet", "te1", "te2"}
        assert any(k.startswith("lora_unet_input_blocks_") for k in adapters)
        assert not any("down_blocks" in k for k in adapters)
    finally:
        lora.detach(adapters)
