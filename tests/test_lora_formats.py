"""LoRA files in diffusers' and PEFT's layouts (how LCM-LoRA, Hyper-SD and TCD files come): plainsd's merge
equals diffusers' load_lora_weights + fuse_lora (or PEFT's merge) on the same random file, conv layers included."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import plainsd
from plainsd import lora
from plainsd.pipeline import txt2img
from plainsd.weights import CheckpointError
from tests.reference import diffusers_from_our_file, max_diff, perturb

# The LCM-LoRA training script's targets (attention, feed-forward, ResBlock convs and time projections, the
# up/down samplers), plus the time embedding and conv_in / conv_out: every Linear / Conv2d kind of the UNet.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj", "time_embedding.linear_1",
                "time_embedding.linear_2", "conv_in", "conv_out"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    sd = plainsd.build("tiny", seed=3)
    for m in (sd.unet, sd.text_encoder):
        perturb(m, 5, 0.02)
    folder = tmp_path_factory.mktemp("formats")
    plainsd.save(sd, folder / "base.safetensors")
    return folder


def _randomise(model, seed: int):
    """PEFT starts lora_B at zero (the base model); random A and B make every layer's change visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def adapters(base, mixed: bool, seed: int = 0):
    """Random PEFT adapters on diffusers' UNet and transformers' text encoder of the base file:
    (unet state, text state, unet LoraConfig, text LoraConfig). mixed: rank / alpha patterns and alpha != rank."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = plainsd.load(base / "base.safetensors").config
    unet, _, text = diffusers_from_our_file(base / "base.safetensors", config)
    if mixed:
        unet_config = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, rank_pattern={"conv1": 2, "conv_out": 3},
                                 alpha_pattern={"to_q": 3.0, "^down_blocks.1.resnets.0.conv_shortcut": 1.0})
        text_config = LoraConfig(r=4, lora_alpha=2, target_modules=TEXT_TARGETS, use_rslora=True)
    else:  # what a file without alphas or config means to diffusers: scale 1 (its lora_alpha is the rank)
        unet_config = LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS)
        text_config = LoraConfig(r=4, lora_alpha=4, target_modules=TEXT_TARGETS)
    unet.add_adapter(unet_config)
    text.add_adapter(text_config)
    _randomise(unet, seed)
    _randomise(text, seed + 1)
    return get_peft_model_state_dict(unet), get_peft_model_state_dict(text), unet_config, text_config


def old_diffusers_layout(unet_state: dict, text_state: dict) -> dict:
    """diffusers' older keys: attention processors (to_q_lora, to_out_lora), .lora.down / .lora.up on the
    other UNet layers, and .lora_linear_layer on the text encoder."""
    out = {}
    for key, value in unet_state.items():
        path, part = key.rsplit(".lora_", 1)
        side = "down" if part.startswith("A") else "up"
        head, _, last = path.removesuffix(".0").rpartition(".")
        if last in ("to_q", "to_k", "to_v", "to_out"):
            out[f"unet.{head}.processor.{last}_lora.{side}.weight"] = value
        else:
            out[f"unet.{path}.lora.{side}.weight"] = value
    for key, value in text_state.items():
        path, part = key.rsplit(".lora_", 1)
        out[f"text_encoder.{path}.lora_linear_layer.{'down' if part.startswith('A') else 'up'}.weight"] = value
    return out


def write_layout(base, layout: str, folder: Path) -> Path:
    """A random LoRA saved in one layout; returns the file."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_kohya

    unet_state, text_state, unet_config, text_config = adapters(base, mixed=layout == "diffusers-metadata")
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers-metadata":  # diffusers' own saving, LoraConfig fields in the header
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=unet_state, text_encoder_lora_layers=text_state,
                                                  unet_lora_adapter_metadata=unet_config.to_dict(),
                                                  text_encoder_lora_adapter_metadata=text_config.to_dict())
    elif layout == "diffusers":
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=unet_state, text_encoder_lora_layers=text_state)
    elif layout == "diffusers-old":
        save_file(old_diffusers_layout(unet_state, text_state), str(folder / "pytorch_lora_weights.safetensors"))
    elif layout == "kohya":  # diffusers' converter writes SDXL's lora_te1_ for the text encoder; SD 1's is lora_te_
        prefixed = {**{f"unet.{k}": v for k, v in unet_state.items()}, **{f"text_encoder.{k}": v for k, v in text_state.items()}}
        state = {k.replace("lora_te1_", "lora_te_"): v for k, v in convert_state_dict_to_kohya(prefixed).items()}
        save_file(state, str(folder / "pytorch_lora_weights.safetensors"))
    return folder / "pytorch_lora_weights.safetensors"


def compare(base, sd, unet, text) -> tuple[float, float, float]:
    """(text encoder difference, UNet difference, how much the LoRA changed the text encoder's output)."""
    ids = sd.tokenizer(["a red circle on the left"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        ctx = sd.text_encoder(ids)
        d_text = max_diff(ctx, text(ids).last_hidden_state) if text is not None else 0.0
        d_unet = max_diff(sd.unet(x, t, ctx), unet(x, t, encoder_hidden_states=ctx).sample)
        plain = plainsd.load(base / "base.safetensors")
        changed = max_diff(plain.unet(x, t, plain.text_encoder(ids)), sd.unet(x, t, ctx))
    return d_text, d_unet, changed


@pytest.mark.parametrize("layout, weight", [("diffusers-metadata", 0.7), ("diffusers-metadata", -1.0), ("diffusers", 1.0),
                                            ("diffusers-old", 0.7), ("kohya", 0.7)])
def test_merge_equals_diffusers_load_and_fuse(base, tmp_path, record_parity, layout, weight):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    path = write_layout(base, layout, tmp_path / layout)
    sd = plainsd.load(base / "base.safetensors")
    unet, vae, text = diffusers_from_our_file(base / "base.safetensors", sd.config)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=DDIMScheduler(clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=weight)

    adapter = lora.read_lora(path)
    adapted = sum(1 for m in [*unet.modules(), *text.modules()] if hasattr(m, "lora_A"))
    ours = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in [*sd.unet.modules(), *sd.text_encoder.modules()])
    assert len(adapter.layers) == adapted == ours  # every Linear / Conv2d of both networks, each read
    assert any("resnets_0_conv1" in k for k in adapter.layers) and "lora_unet_conv_in" in adapter.layers
    lora.merge(sd, adapter, weight)
    d_text, d_unet, changed = compare(base, sd, unet, text)
    record_parity(f"LoRA {layout} vs diffusers load_lora_weights+fuse_lora, weight {weight}", max(d_text, d_unet))
    assert changed > 0.01
    assert d_text <= 1e-5 and d_unet <= 1e-5


def test_peft_adapter_folder_equals_peft_merge(base, tmp_path, record_parity):
    """PEFT's own save_pretrained: adapter_model.safetensors (base_model.model.* keys) beside adapter_config.json."""
    from peft import LoraConfig, get_peft_model

    sd = plainsd.load(base / "base.safetensors")
    unet, _, _ = diffusers_from_our_file(base / "base.safetensors", sd.config)
    config = LoraConfig(r=4, lora_alpha=6, target_modules=UNET_TARGETS, rank_pattern={"time_emb_proj": 2},
                        alpha_pattern={"conv2": 1.5})
    model = get_peft_model(unet, config)
    _randomise(model, 7)
    model.save_pretrained(tmp_path / "my-adapter")
    keys = json.loads((tmp_path / "my-adapter" / "adapter_config.json").read_text())
    assert keys["lora_alpha"] == 6 and keys["alpha_pattern"] == {"conv2": 1.5}
    merged = model.merge_and_unload()

    adapter = lora.read_lora(tmp_path / "my-adapter" / "adapter_model.safetensors")
    assert adapter.name == "my-adapter"
    lora.merge(sd, adapter)
    _, d_unet, changed = compare(base, sd, merged, None)
    record_parity("LoRA PEFT adapter folder vs PEFT merge_and_unload", d_unet)
    assert changed > 0.01 and d_unet <= 1e-5


def test_prompt_tag_applies_a_diffusers_file_named_after_its_folder(base, tmp_path):
    path = write_layout(base, "diffusers-metadata", tmp_path / "loras" / "lcm-like")
    assert lora.find_loras(tmp_path / "loras") == {**lora.find_loras(None), "lcm-like": path}  # (the shipped ones first)
    sd = plainsd.load(base / "base.safetensors")
    kw = dict(steps=3, seed=1, width=32, height=32)
    plain = txt2img(sd, "a circle", **kw).images[0]
    tagged = txt2img(sd, "a circle <lora:lcm-like:0.7>", lora_dir=tmp_path / "loras", **kw).images[0]
    merged = lora.merge(plainsd.load(base / "base.safetensors"), lora.read_lora(path), 0.7)
    assert txt2img(merged, "a circle", **kw).images[0].tobytes() == tagged.tobytes()
    assert tagged.tobytes() != plain.tobytes()


def test_scales_follow_the_config(tmp_path):
    """alpha / rank is lora_alpha / r, the first matching rank / alpha pattern, lora_alpha / sqrt(r) with rsLoRA."""
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    other = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    state = {f"{k}.lora_{ab}.weight": torch.zeros(2, 2) for k in (key, other) for ab in "AB"}
    cases = [({"r": 2, "lora_alpha": 8}, 4.0, 4.0), ({"r": 2, "lora_alpha": 8, "alpha_pattern": {"to_q": 1}}, 0.5, 4.0),
             ({"r": 4, "lora_alpha": 8, "rank_pattern": {"attn1.to_k": 2}}, 2.0, 4.0),
             ({"r": 2, "lora_alpha": 2, "use_rslora": True}, 2 ** 0.5, 2 ** 0.5)]
    for config, scale_q, scale_k in cases:
        meta = {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()})}
        save_file(state, str(tmp_path / "a.safetensors"), metadata=meta)
        layers = lora.read_lora(tmp_path / "a.safetensors").layers
        q, k = (layers["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_" + n] for n in ("to_q", "to_k"))
        assert (q.alpha / q.rank, k.alpha / k.rank) == pytest.approx((scale_q, scale_k)), config
    save_file({**state, f"{key}.alpha": torch.tensor(1.0)}, str(tmp_path / "b.safetensors"))
    layers = lora.read_lora(tmp_path / "b.safetensors").layers
    q, k = (layers["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_" + n] for n in ("to_q", "to_k"))
    assert (q.alpha, k.alpha) == (1.0, None)  # no config: the .alpha tensor if given, else scale 1


def test_unread_layouts_are_one_sentence(tmp_path):
    cases = [({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 4),
               "unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector": torch.zeros(4)}, "lacks its lora_down or lora_up"),
             ({"text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(2, 4)}, "lacks its lora_down or lora_up"),
             ({"lora_unet_down_blocks_0_resnets_0_conv1.lokr_w1": torch.zeros(2, 4)}, "LoKr layer .* lacks some"),
             ({"unet.conv_in.lora_A.weight": torch.zeros(2, 4)}, "lacks its lora_down or lora_up"),
             ({"unet.conv_in.lora_B.bias": torch.zeros(2)}, "not a LoRA plainsd reads.*PEFT"),
             ({"model.diffusion_model.out.2.weight": torch.zeros(2)}, "not a LoRA plainsd reads")]
    for state, message in cases:
        save_file(state, str(tmp_path / "x.safetensors"))
        with pytest.raises(CheckpointError, match=message):
            lora.read_lora(tmp_path / "x.safetensors")
    (tmp_path / "peft").mkdir()
    save_file({"base_model.model.conv_in.lora_A.weight": torch.zeros(2, 4), "base_model.model.conv_in.lora_B.weight":
               torch.zeros(4, 2)}, str(tmp_path / "peft" / "adapter_model.safetensors"))
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(CheckpointError, match="its config says use_dora, but layer conv_in has no lora_magnitude_vector"):
        lora.read_lora(tmp_path / "peft" / "adapter_model.safetensors")
