"""SDXL checkpoints: the original single-file layout (conditioner.embedders.0/1), diffusers folders written by
diffusers' own save functions, fp16 files, the config read from the tensors, and other tools reading our files."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import plainsd
from plainsd.config import preset
from plainsd.models import StableDiffusion
from plainsd.models.sdxl import size_numbers, vector
from plainsd.models.tokenizer import Tokenizer
from plainsd.weights import CheckpointError, infer_config, original_state_dict
from tests.reference import (diffusers_unet_kwargs, diffusers_vae_kwargs, hf_text_kwargs, max_diff, perturb,
                             sdxl_text_reference)


def _outputs(sd, seed=0):
    """The text conditioner's states and pooled text, a UNet prediction and a VAE decode."""
    g = torch.Generator().manual_seed(seed)
    ids = sd.tokenizer(["a red circle", "a blue square on the left"])
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        states, pooled = sd.text_encoder.encode(ids)
        y = vector(pooled, torch.tensor([size_numbers(sd.config.sdxl, 64, 64)] * 2))
        return states, pooled, sd.unet(x, torch.tensor([1, 999]), states, y=y), sd.vae.decode(torch.randn(1, 4, 8, 8, generator=g))


def _bare(sd, path):
    """An original-layout file as other tools write it: no plainsd metadata."""
    save_file({k: v.contiguous() for k, v in original_state_dict(sd).items()}, str(path))
    return path


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sdxl-refiner"])
def test_save_load_round_trip_and_from_shapes(tmp_path, name):
    sd = perturb(plainsd.build(name, seed=1), 1)
    plainsd.save(sd, tmp_path / "m.safetensors")
    back = plainsd.load(tmp_path / "m.safetensors")
    bare = plainsd.load(_bare(sd, tmp_path / "bare.safetensors"))  # its config read from the shapes
    assert back.config == sd.config
    assert (bare.config.unet, bare.config.text, bare.config.text2, bare.config.vae) == \
        (sd.config.unet, sd.config.text, sd.config.text2, sd.config.vae)
    assert (bare.config.sdxl, bare.config.scale_factor, bare.config.resolution) == (sd.config.sdxl, 0.13025, 1024)
    for a, b, c in zip(_outputs(sd), _outputs(back), _outputs(bare)):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_saved_keys_are_the_original_layout(tmp_path):
    plainsd.save(plainsd.build("tiny-sdxl"), tmp_path / "base.safetensors")
    plainsd.save(plainsd.build("tiny-sdxl-refiner"), tmp_path / "refiner.safetensors")
    base = set(safe_open(str(tmp_path / "base.safetensors"), "pt").keys())
    refiner = set(safe_open(str(tmp_path / "refiner.safetensors"), "pt").keys())
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in base
    assert {"conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
            "conditioner.embedders.1.model.text_projection", "model.diffusion_model.label_emb.0.2.bias",
            "model.diffusion_model.input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight"} <= base
    assert not any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in base)  # no attention at level 0
    assert "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight" in refiner
    assert not any(k.startswith(("conditioner.embedders.1.", "cond_stage_model.")) for k in refiner)


def _meta_shapes(name):
    with torch.device("meta"):
        sd = StableDiffusion(preset(name))
    return {k: tuple(v.shape) for k, v in original_state_dict(sd).items()}


@pytest.mark.parametrize("name", ["sdxl", "sdxl-refiner"])
def test_full_size_configs_are_recognised_from_shapes(name):
    config, v_key = infer_config(_meta_shapes(name), {})
    assert config == preset(name) and v_key is None


def test_unet_parameters_are_diffusers_count():
    from diffusers import UNet2DConditionModel

    for name in ("sdxl", "sdxl-refiner"):
        with torch.device("meta"):
            ours = StableDiffusion(preset(name)).unet
            theirs = UNet2DConditionModel(**diffusers_unet_kwargs(preset(name).unet))
        count = sum(p.numel() for p in ours.parameters())
        assert count == sum(p.numel() for p in theirs.parameters())
        assert count == {"sdxl": 2_567_463_684, "sdxl-refiner": 2_259_526_660}[name]


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sdxl-refiner"])
def test_diffusers_folder_loads(sdxl_reference, record_parity, name):
    """A folder written by diffusers' and transformers' save_pretrained: config from its config.json files, UNet and
    VAE equal to diffusers' (the text towers: tests/models/test_sdxl.py)."""
    config, unet, vae, _, _, sd = sdxl_reference(name)
    assert (sd.config.unet, sd.config.text, sd.config.text2, sd.config.vae, sd.config.sdxl, sd.config.scale_factor) == \
        (config.unet, config.text, config.text2, config.vae, config.sdxl, 0.13025)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, config.unet.context_dim, generator=g)
    pooled = torch.randn(2, (config.text2 or config.text).projection_dim, generator=g)
    numbers = torch.tensor([size_numbers(config.sdxl, 64, 64)] * 2)
    z = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        d_unet = max_diff(sd.unet(x, torch.tensor([10, 700]), ctx, y=vector(pooled, numbers)),
                          unet(x, torch.tensor([10, 700]), encoder_hidden_states=ctx,
                               added_cond_kwargs={"text_embeds": pooled, "time_ids": numbers}).sample)
        d_vae = max_diff(sd.vae.decode(z), vae.decode(z).sample)
    record_parity(f"diffusers folder {name}: UNet / VAE", max(d_unet, d_vae))
    assert d_unet <= 1e-5 and d_vae <= 1e-5


def test_diffusers_reads_what_plainsd_writes(tmp_path, record_parity):
    """diffusers' own single-file converters (what from_single_file runs) on a file plainsd.save wrote."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sd = perturb(plainsd.build("tiny-sdxl", seed=2), 2)
    plainsd.save(sd, tmp_path / "xl.safetensors")
    ckpt, config = load_file(str(tmp_path / "xl.safetensors")), sd.config
    unet = UNet2DConditionModel(**diffusers_unet_kwargs(config.unet))
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, dict(unet.config)), strict=True)
    vae = AutoencoderKL(**diffusers_vae_kwargs(config.vae, config.scale_factor))
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, dict(vae.config)), strict=True)
    text = CLIPTextModel(CLIPTextConfig(**hf_text_kwargs(config.text)))
    text.load_state_dict(convert_ldm_clip_checkpoint(ckpt), strict=False)
    text2 = CLIPTextModelWithProjection(CLIPTextConfig(**hf_text_kwargs(config.text2)))
    missing, unexpected = text2.load_state_dict(convert_open_clip_checkpoint(text2, ckpt, "conditioner.embedders.1.model."),
                                                strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    prompts = ["a red circle", "a blue square on the left"]  # (as _outputs encodes them)
    states, pooled, eps, image = _outputs(sd)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        want_states, want_pooled = sdxl_text_reference(text.eval(), text2.eval(), Tokenizer("sd1")(prompts),
                                                       Tokenizer("sd2")(prompts))
        numbers = torch.tensor([size_numbers("base", 64, 64)] * 2)
        want_eps = unet.eval()(x, torch.tensor([1, 999]), encoder_hidden_states=states,
                               added_cond_kwargs={"text_embeds": pooled, "time_ids": numbers}).sample
        want_image = vae.eval().decode(torch.randn(1, 4, 8, 8, generator=g)).sample
    d = {"text": max(max_diff(states, want_states), max_diff(pooled, want_pooled)), "unet": max_diff(eps, want_eps), "vae": max_diff(image, want_image)}
    for part, value in d.items():
        record_parity(f"plainsd.save -> diffusers converters, tiny-sdxl {part}", value)
    assert max(d.values()) <= 1e-5, d


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_as_float32_or_as_asked(tmp_path, dtype):
    sd = plainsd.build("tiny-sdxl", seed=3)
    plainsd.save(sd, tmp_path / "half.safetensors", dtype=dtype)
    back = plainsd.load(tmp_path / "half.safetensors")
    assert back.unet.dtype == torch.float32 and back.text_encoder.dtype == torch.float32
    rounded = {k: v.to(dtype).float() for k, v in sd.state_dict().items()}
    assert all(torch.equal(rounded[k], v) for k, v in back.state_dict().items())
    assert plainsd.load(tmp_path / "half.safetensors", dtype=torch.bfloat16).unet.dtype == torch.bfloat16


def test_the_refiner_is_not_taken_for_sd2_in_sgm_layout(tmp_path):
    """The refiner keeps bigG under conditioner.embedders.0.model., where Stability's SD 2.x files keep theirs."""
    back = plainsd.load(_bare(plainsd.build("tiny-sdxl-refiner"), tmp_path / "r.safetensors"))
    assert back.config.sdxl == "refiner" and "SDXL refiner" in repr(back)


def test_broken_sdxl_files_are_named(tmp_path):
    sd = plainsd.build("tiny-sdxl")
    state = {k: v.contiguous() for k, v in original_state_dict(sd).items()}
    text_only = {k: v for k, v in state.items() if k.startswith("conditioner.")}
    save_file(text_only, str(tmp_path / "text.safetensors"))
    with pytest.raises(CheckpointError, match="not a whole SDXL checkpoint: it has text encoder tensors"):
        plainsd.load(tmp_path / "text.safetensors")
    no_clip_l = {k: v for k, v in state.items() if not k.startswith("conditioner.embedders.1.")}
    save_file(no_clip_l, str(tmp_path / "half.safetensors"))
    with pytest.raises(CheckpointError, match="text encoders are not CLIP-L and OpenCLIP bigG"):
        plainsd.load(tmp_path / "half.safetensors")
    wide = dict(state)
    wide["model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"] = torch.zeros(128, 200)
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointError, match="give states 192 wide, but its UNet reads 200"):
        plainsd.load(tmp_path / "wide.safetensors")
    missing = {k: v for k, v in state.items() if k != "model.diffusion_model.label_emb.0.2.bias"}
    save_file(missing, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match=r"SDXL model it looks like: 1 tensors missing \(model\.diffusion_model\.label_emb\.0\.2\.bias\)"):
        plainsd.load(tmp_path / "m.safetensors")
