import dataclasses

import pytest
import torch
from torch import nn

import plainsd
from plainsd import lora as lora_mod
from plainsd.diffusion import schedules
from plainsd.diffusion.denoisers import boundary_scalings
from plainsd.train.lcm import LCMSettings, _adapters_off, _TargetEMA, consistency_loss, train_lcm, x0_and_eps
from plainsd.train.loop import TrainConfig


def test_boundary_scalings_are_lcm_schedulers():
    from diffusers import LCMScheduler

    scheduler = LCMScheduler()
    for t in (0, 1, 19, 259, 999):
        ours = boundary_scalings(torch.tensor([t]))
        theirs = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert ours[0].item() == pytest.approx(float(theirs[0]), rel=1e-6)
        assert ours[1].item() == pytest.approx(float(theirs[1]), rel=1e-6)
    skip, out = boundary_scalings(torch.tensor([0]))
    assert (skip.item(), out.item()) == (1.0, 0.0)  # the consistency function is the identity at t = 0


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_x0_and_eps_invert_the_forward_process(prediction):
    ac = schedules.alphas_cumprod()
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([5, 400, 990])
    x = schedules.add_noise(x0, noise, t, ac)
    a = ac[t].view(-1, 1, 1, 1)
    out = noise if prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
    got_x0, got_eps = x0_and_eps(out, x, a, prediction)
    torch.testing.assert_close(got_x0, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_eps, noise, atol=1e-4, rtol=1e-4)


def test_all_targets_adapt_every_layer_of_the_unet_under_the_names_a1111_reads():
    sd = plainsd.build("tiny", seed=0)
    adapters = lora_mod.attach(sd, rank=2, targets="all")
    layers = [m for m in sd.unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(adapters) == len(layers)
    for name in ("lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding_linear_1",
                 "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_downsamplers_0_conv",
                 "lora_unet_mid_block_resnets_0_time_emb_proj", "lora_unet_up_blocks_0_upsamplers_0_conv"):
        assert name in adapters
    assert not [k for k in adapters if "input_blocks" in k or "output_blocks" in k or "middle_block" in k]
    with pytest.raises(ValueError, match="'attention' or 'all'"):
        lora_mod.attach(sd, targets="everything")


def test_the_teacher_is_the_base_model_exactly():
    sd = plainsd.build("tiny", seed=0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 800])
    context = sd.text_encoder(sd.tokenizer(["a red circle", ""]))
    with torch.no_grad():
        base = sd.unet(x, t, context)
        adapters = lora_mod.attach(sd, rank=2, targets="all")
        for a in adapters.values():
            nn.init.normal_(a.up.weight, std=0.1)
        adapted = sd.unet(x, t, context)
        with _adapters_off(adapters):
            off = sd.unet(x, t, context)
    assert not torch.allclose(adapted, base)
    assert torch.equal(off, base)
    assert all(a.scale == 1.0 for a in adapters.values())  # back on after the block


def test_settings_refuse_what_the_recipe_cannot_use():
    with pytest.raises(ValueError, match="divide 1000"):
        LCMSettings.from_extra({"ddim_steps": 30})
    with pytest.raises(ValueError, match="w_min <= w_max"):
        LCMSettings.from_extra({"w_min": 5.0, "w_max": 2.0})
    with pytest.raises(ValueError, match="'huber' or 'l2'"):
        LCMSettings.from_extra({"loss": "l1"})


def test_lcm_recipe_trains_a_lora_the_pipeline_applies_as_trained(tmp_path):
    from plainsd.pipeline import txt2img

    base = plainsd.build("tiny", seed=0)
    path = plainsd.save(base, tmp_path / "base.safetensors")
    before = path.read_bytes()
    cfg = TrainConfig(network="lcm", steps=4, batch_size=4, lr=1e-2, checkpoint_every=2, out=str(tmp_path / "lcm"),
                      data={"kind": "shapes", "seed": 0, "length": 8},
                      extra={"base": str(path), "rank": 2, "latent_cache": 8, "guidance_min_t": 200})
    first = train_lcm(cfg, progress=False)
    resumed = train_lcm(dataclasses.replace(cfg, steps=6), resume=True, progress=False)
    assert resumed["losses"][:4] == first["losses"] and len(resumed["losses"]) == 6
    assert path.read_bytes() == before  # the teacher's file untouched
    made = tmp_path / "lcm" / "lcm-lora.safetensors"
    lora = lora_mod.read_lora(made)
    assert lora.metadata["ss_network_dim"] == "2"
    assert len(lora.layers) == sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in base.unet.modules())
    assert any(layer.up.abs().sum() > 0 for layer in lora.layers.values())  # it learnt something

    # the file through a prompt tag draws what the trained adapters (float16-rounded) draw on the hooked model
    model = plainsd.load(path, dtype=torch.float32)
    settings = dict(steps=2, sampler="LCM", cfg_scale=1.0, seed=3)
    tagged = txt2img(model, "a red circle <lora:lcm-lora:1>", lora_dir=tmp_path / "lcm", **settings).images[0]
    hooked = plainsd.load(path, dtype=torch.float32)
    adapters = lora_mod.attach(hooked, rank=2, targets="all")
    with torch.no_grad():
        for key, a in adapters.items():
            a.down.weight.copy_(lora.layers[key].down.float().reshape(a.down.weight.shape))
            a.up.weight.copy_(lora.layers[key].up.float().reshape(a.up.weight.shape))
    expected = txt2img(hooked, "a red circle", **settings).images[0]
    plain = txt2img(model, "a red circle", **settings).images[0]
    diff = lambda p, q: (torch.tensor(list(p.getdata())) - torch.tensor(list(q.getdata()))).abs().max().item()  # noqa: E731
    assert diff(tagged, expected) <= 2
    assert diff(tagged, plain) > 2


def test_target_ema_follows_the_trained_weights_with_its_decay():
    params = {"a": torch.nn.Parameter(torch.zeros(3))}
    ema = _TargetEMA(params, 0.9)
    with torch.no_grad():
        params["a"].fill_(1.0)
    ema.update(params, 5)   # the first update (or the first after a resume) starts from the weights
    assert torch.equal(ema.shadow["a"], torch.ones(3))
    with torch.no_grad():
        params["a"].fill_(3.0)
    ema.update(params, 5)   # the same step again (another micro-batch): no update
    ema.update(params, 6)
    torch.testing.assert_close(ema.shadow["a"], torch.full((3,), 0.9 * 1 + 0.1 * 3))


def test_the_target_network_is_the_online_one_unless_given_other_weights():
    sd = plainsd.build("tiny", seed=0)
    adapters = lora_mod.attach(sd, rank=2, targets="all")
    for a in adapters.values():
        nn.init.normal_(a.up.weight, std=0.05)
    params = {f"{k}.{n}": p for k, a in adapters.items() for n, p in a.named_parameters()}
    latents = torch.randn(2, 4, 8, 8)
    cond = sd.text_encoder(sd.tokenizer(["a red circle", "a blue square"])).detach()
    uncond = sd.text_encoder(sd.tokenizer(["", ""])).detach()
    s = LCMSettings()

    def loss(target):
        return consistency_loss(sd.unet, latents, cond, uncond, s, "eps", torch.Generator().manual_seed(1),
                                adapters, target=target).item()

    online = {k: p.detach().clone() for k, p in params.items()}
    zero = {k: torch.zeros_like(p) if k.endswith("up.weight") else p.detach().clone() for k, p in params.items()}
    assert loss(online) == loss(None)
    assert loss(zero) != loss(None)
    assert all(torch.equal(p, online[k]) for k, p in params.items())  # the weights are back after the target
