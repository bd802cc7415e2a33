"""T2I-Adapter files (weights.load_adapter / save_adapter): TencentARC's names, diffusers' names and folders, the
config read from the shapes, one clear sentence for everything else."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import plainsd
from plainsd.config import AdapterConfig
from plainsd.models.t2i_adapter import T2IAdapter
from plainsd.weights import CheckpointError, load_adapter, load_control_model, save_adapter
from tests.reference import max_diff, perturb

SD_SHAPED = AdapterConfig(channels=(32, 64, 128, 128), num_res_blocks=2)  # four levels, as SD's UNets have


def _adapter(cfg, seed=0):
    torch.manual_seed(seed)
    return perturb(T2IAdapter(cfg), seed)


def _features(adapter, seed=0):
    hint = torch.rand(2, adapter.config.hint_channels, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return adapter(hint)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(_features(a), _features(b)))


def test_save_load_round_trip(tmp_path):
    adapter = _adapter(AdapterConfig(channels=(32, 64), num_res_blocks=2))  # two levels: the metadata says so
    back = load_adapter(save_adapter(adapter, tmp_path / "a.safetensors"))
    assert back.config == adapter.config and back.name == "a" and _same(adapter, back)
    assert os.listdir(tmp_path) == ["a.safetensors"]
    half = load_adapter(save_adapter(adapter, tmp_path / "h.safetensors", dtype=torch.float16), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half.conv_in.weight, adapter.conv_in.weight.half().bfloat16())


def _tencentarc_names(state, n=2):
    """diffusers' names to TencentARC's, from the A1111 extension's table (controlnet_model_guess.py)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[1] == "body" and parts[3] == "resnets":
            key = ".".join(["body", str(int(parts[2]) * n + int(parts[4])), *parts[5:]])
        elif parts[1] == "body":
            key = ".".join(["body", str(int(parts[2]) * n), *parts[3:]])
        else:
            key = ".".join(parts[1:])
        out[key] = value
    return out


@pytest.mark.parametrize("layout", ["TencentARC .pth", "adapter.-prefixed .safetensors", "diffusers-named .safetensors"])
def test_files_people_have_load_with_the_config_from_the_shapes(tmp_path, layout):
    from diffusers import T2IAdapter as DiffusersAdapter

    torch.manual_seed(0)
    theirs = perturb(DiffusersAdapter(in_channels=1, channels=[32, 64, 128, 128], num_res_blocks=2, downscale_factor=8,
                                      adapter_type="full_adapter"), 1)
    state = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    if layout == "TencentARC .pth":
        torch.save(_tencentarc_names(state), tmp_path / "t2iadapter_sketch_sd14v1.pth")
    elif layout.startswith("adapter."):
        save_file({"adapter." + k: v for k, v in _tencentarc_names(state).items()}, str(tmp_path / "a.safetensors"))
    else:
        save_file(state, str(tmp_path / "a.safetensors"))
    adapter = load_adapter(next(tmp_path.iterdir()))
    assert adapter.config == AdapterConfig(channels=(32, 64, 128, 128), num_res_blocks=2, hint_channels=1)
    assert _same(load_control_model(next(tmp_path.iterdir())), adapter)  # what a ControlNet unit loads
    hint = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert all(max_diff(a, b) <= 1e-6 for a, b in zip(adapter(hint), theirs(hint)))


@pytest.mark.parametrize("cfg", [AdapterConfig(channels=(32, 64, 128, 128), ksize=3, use_conv=True),
                                 AdapterConfig(channels=(32, 64, 128, 128), num_res_blocks=3)], ids=["ksize3-conv", "3-blocks"])
def test_tencentarc_variants_are_read_from_the_shapes(tmp_path, cfg):
    adapter = _adapter(cfg)
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(tmp_path / "a.safetensors"))
    back = load_adapter(tmp_path / "a.safetensors")
    assert back.config == cfg and _same(adapter, back)


def test_what_is_not_an_sd_adapter_gets_one_sentence(tmp_path):
    state = {k: v.contiguous() for k, v in _adapter(SD_SHAPED).state_dict().items()}
    cases = {
        "style.safetensors": ({"style_embedding": torch.zeros(1, 8, 16), "conv_in.weight": torch.zeros(1)}, "style or light"),
        "light.safetensors": ({"body.0.in_conv.weight": torch.zeros(1), "body.0.body.0.block1.weight": torch.zeros(1)},
                              "style or light"),
        "odd.safetensors": ({**state, "conv_in.weight": torch.zeros(32, 500, 3, 3)}, "reads 500 channels"),
        "missing.safetensors": ({k: v for k, v in state.items() if k != "body.3.block2.bias"},
                                r"1 tensors missing \(body\.3\.block2\.bias\)"),
        "lora.safetensors": ({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, "not a T2I-Adapter.*a LoRA file"),
        "cn.safetensors": ({"input_hint_block.0.weight": torch.zeros(1)}, "a ControlNet \\(load it with load_controlnet\\)"),
    }
    for name, (tensors, _) in cases.items():
        save_file(tensors, str(tmp_path / name))
    plainsd.save(plainsd.build("tiny"), tmp_path / "sd.safetensors")
    cases["sd.safetensors"] = (None, "a Stable Diffusion checkpoint")
    cases["nothing.pth"] = (None, "no such T2I-Adapter")
    for name, (_, message) in cases.items():
        with pytest.raises(CheckpointError, match=message) as e:
            load_adapter(tmp_path / name)
        assert "\n" not in str(e.value), name


@pytest.mark.parametrize("layout", ["diffusers folder", "diffusers-named .safetensors", "TencentARC .safetensors"])
def test_sdxl_adapters_load_in_each_layout(tmp_path, layout):
    """SDXL's adapters (diffusers' full_adapter_xl; lllyasviel's t2i-adapter_diffusers_xl_* files are its names in one
    file): the fold of 16 read from the config or from conv_in's 768 (or 256) channels."""
    from diffusers import T2IAdapter as DiffusersAdapter

    torch.manual_seed(0)
    theirs = perturb(DiffusersAdapter(in_channels=3, channels=[32, 64, 128, 128], num_res_blocks=2,
                                      downscale_factor=16, adapter_type="full_adapter_xl"), 1).eval()
    state = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    if layout == "diffusers folder":
        theirs.save_pretrained(tmp_path / "t2i-adapter-canny-sdxl-1.0")
    elif layout.startswith("diffusers"):
        save_file(state, str(tmp_path / "t2i-adapter_diffusers_xl_canny.safetensors"))
    else:
        save_file(_tencentarc_names(state), str(tmp_path / "adapter_xl_canny.safetensors"))
    path = next(tmp_path.iterdir())
    adapter = load_adapter(path)
    assert adapter.config == AdapterConfig(channels=(32, 64, 128, 128), num_res_blocks=2, xl=True)
    assert _same(load_control_model(path), adapter)
    hint = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert all(max_diff(a, b) <= 1e-6 for a, b in zip(adapter(hint), theirs(hint)))
    back = load_adapter(save_adapter(adapter, tmp_path / "saved.safetensors"))
    assert back.config == adapter.config and _same(back, adapter)


def test_diffusers_folders_of_other_kinds_are_refused(tmp_path):
    from diffusers import T2IAdapter as DiffusersAdapter

    folder = tmp_path / "light"
    DiffusersAdapter(channels=[32, 64, 64], num_res_blocks=1, downscale_factor=8,
                     adapter_type="light_adapter").save_pretrained(folder)
    with pytest.raises(CheckpointError, match="is a light_adapter T2I-Adapter.*full_adapter_xl"):
        load_adapter(folder)
    (folder / "config.json").write_text(json.dumps({"_class_name": "T2IAdapter", "adapter_type": "full_adapter_xl",
                                                    "downscale_factor": 8}))
    with pytest.raises(CheckpointError, match=r"full_adapter_xl T2I-Adapter \(downscale factor 8\)"):
        load_adapter(folder)
    (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    with pytest.raises(CheckpointError, match="not a diffusers T2IAdapter folder"):
        load_adapter(folder)


def test_a_diffusers_adapter_folder_is_what_a_controlnet_unit_loads(tmp_path):
    from diffusers import T2IAdapter as DiffusersAdapter

    torch.manual_seed(0)
    DiffusersAdapter(in_channels=3, channels=[32, 64, 128, 128], num_res_blocks=2, downscale_factor=8,
                     adapter_type="full_adapter").save_pretrained(tmp_path / "t2iadapter_canny")
    got = load_control_model(tmp_path / "t2iadapter_canny")
    assert isinstance(got, T2IAdapter) and _same(got, load_adapter(tmp_path / "t2iadapter_canny"))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="holds a diffusers UNet2DConditionModel, not a ControlNetModel"):
        load_control_model(tmp_path / "unet")
