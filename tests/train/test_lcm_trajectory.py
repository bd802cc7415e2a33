"""extra.objective "trajectory" of the lcm recipe: the student learns the LCM sampler's own timesteps, toward the
guided teacher's DPM++ 2M solutions, computed once per run."""

import dataclasses

import pytest
import torch

import plainsd
from plainsd import lora as lora_mod
from plainsd.diffusion import schedules
from plainsd.diffusion.denoisers import DiscreteDenoiser
from plainsd.diffusion.guidance import CFGDenoiser
from plainsd.diffusion.samplers import sample_dpmpp_2m
from plainsd.train import lcm
from plainsd.train.lcm import LCMSettings, student_timesteps, train_lcm, trajectory_loss, trajectory_pairs
from plainsd.train.loop import TrainConfig


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_student_timesteps_are_those_the_lcm_sampler_visits():
    from plainsd.pipeline import txt2img

    sd = plainsd.build("tiny", seed=0)
    seen, forward = [], sd.unet.forward
    sd.unet.forward = lambda x, t, *a, **k: seen.append(int(t.reshape(-1)[0])) or forward(x, t, *a, **k)
    visited = set()
    for n in (1, 2, 4):
        seen.clear()
        txt2img(sd, "a red circle", steps=n, sampler="LCM", cfg_scale=1.0, seed=0)
        assert student_timesteps([n]) == seen  # each step count's own, in the sampler's order
        visited |= set(seen)
    assert student_timesteps([1, 2, 4]) == sorted(visited, reverse=True) == [999, 679, 339, 19]


def _small(tmp_path, **extra):
    base = plainsd.build("tiny", seed=0)
    path = plainsd.save(base, tmp_path / "base.safetensors")
    extra = {"base": str(path), "rank": 2, "latent_cache": 8, "objective": "trajectory", "pairs": 12,
             "solve_steps": 4, "guidance_min_t": 200, **extra}
    return TrainConfig(network="lcm", steps=4, batch_size=4, lr=1e-2, checkpoint_every=2, out=str(tmp_path / "lcm"),
                       data={"kind": "shapes", "seed": 0, "length": 8}, extra=extra)


def _pairs(sd, s, seed=0, path=None):
    from plainsd.train.recipes import _latent_cache, dataset

    cfg = TrainConfig(network="lcm", data={"kind": "shapes", "seed": 0, "length": 8})
    cache = _latent_cache(sd.vae, dataset(cfg, sd.config.resolution), s.latent_cache, False)
    with torch.no_grad():
        uncond = sd.text_encoder(sd.tokenizer([""]))
    return cache, uncond, trajectory_pairs(sd, cache, uncond, s, seed, {}, path, progress=False)


def test_a_stored_target_is_plainsd_dpmpp_2m_run_by_hand_from_its_x_t():
    sd = plainsd.build("tiny", seed=0)
    s = LCMSettings.from_extra({"objective": "trajectory", "pairs": 8, "latent_cache": 8, "solve_steps": 5,
                                "guidance_min_t": 200, "w_min": 1.0, "w_max": 4.0})
    cache, uncond, pairs = _pairs(sd, s)
    assert set(pairs["t"].tolist()) <= {999, 679, 339, 19} and len(set(pairs["t"].tolist())) > 1
    base = DiscreteDenoiser(lambda x, t, cond: sd.unet(x, t, cond), "eps")
    ac = schedules.alphas_cumprod()
    for i in range(len(pairs["t"])):
        t, w = int(pairs["t"][i]), float(pairs["w"][i])
        cond = sd.text_encoder(sd.tokenizer([cache[2][int(pairs["caption"][i])]])).detach()
        guided = CFGDenoiser(base, scale=w + 1)

        def model(x, sigma):  # CFG w + 1 from timestep 200 up, the prompt alone below
            if base.sigma_to_t(sigma)[0] >= 200:
                return guided(x, sigma, cond=cond, uncond=uncond)
            return base(x, sigma, cond=cond)

        sigma_t = float(((1 - ac[t]) / ac[t]).sqrt())
        sigmas = schedules.get_sigmas_karras(5, base.sigma_min, sigma_t)
        x = pairs["x"][i:i + 1]
        by_hand = sample_dpmpp_2m(model, x / ac[t].sqrt(), sigmas, disable=True)
        torch.testing.assert_close(pairs["target"][i:i + 1], by_hand, atol=1e-4, rtol=1e-4)
    # the same seed draws the same pairs, another seed others
    again = _pairs(sd, s)[2]
    assert all(torch.equal(pairs[k], again[k]) for k in pairs)
    assert not torch.equal(_pairs(sd, s, seed=1)[2]["x"], pairs["x"])


def test_a_few_steps_lower_the_trajectory_loss_and_the_lora_changes_the_picture(tmp_path):
    from plainsd.pipeline import txt2img

    cfg = _small(tmp_path)
    trained = train_lcm(dataclasses.replace(cfg, steps=10, batch_size=12, lr=3e-3), progress=False)
    out = tmp_path / "lcm"
    assert (out / "lcm-lora.safetensors").is_file() and (out / "trajectory_pairs.safetensors").is_file()

    # the trajectory loss of a fixed batch, before (no LoRA) and after, on the same model
    sd = plainsd.load(cfg.extra["base"], dtype=torch.float32)
    s = LCMSettings.from_extra({k: v for k, v in cfg.extra.items() if k not in ("base",)})
    from safetensors.torch import load_file

    from plainsd.train.recipes import _latent_cache, dataset

    pairs = load_file(out / "trajectory_pairs.safetensors")

    captions = _latent_cache(sd.vae, dataset(cfg, sd.config.resolution), 8, False)[2]
    idx = list(range(12))
    with torch.no_grad():
        cond = sd.text_encoder(sd.tokenizer([captions[i] for i in pairs["caption"].tolist()]))
        adapters = lora_mod.attach(sd, rank=2, targets="all")
        before = trajectory_loss(sd.unet, pairs, idx, cond, s, "eps").item()
        for key, p in adapters.items():
            for name, param in p.named_parameters():
                param.copy_(trained["weights"][f"{key}.{name}"])
        after = trajectory_loss(sd.unet, pairs, idx, cond, s, "eps").item()
    assert after < before

    # the exported file through a prompt tag changes the picture
    model = plainsd.load(cfg.extra["base"], dtype=torch.float32)
    settings = dict(steps=2, sampler="LCM", cfg_scale=1.0, seed=3)
    tagged = txt2img(model, "a red circle <lora:lcm-lora:1>", lora_dir=out, **settings).images[0]
    plain = txt2img(model, "a red circle", **settings).images[0]
    assert (torch.tensor(list(tagged.getdata())) - torch.tensor(list(plain.getdata()))).abs().max().item() > 2


def test_resume_reuses_the_stored_pairs(tmp_path, monkeypatch):
    cfg = _small(tmp_path)
    solves = []
    real = lcm.teacher_solution
    monkeypatch.setattr(lcm, "teacher_solution", lambda *a, **k: solves.append(1) or real(*a, **k))
    first = train_lcm(cfg, progress=False)
    made = len(solves)
    assert made > 0
    stored = tmp_path / "lcm" / "trajectory_pairs.safetensors"
    mtime = stored.stat().st_mtime_ns
    resumed = train_lcm(dataclasses.replace(cfg, steps=6), resume=True, progress=False)
    assert len(solves) == made and stored.stat().st_mtime_ns == mtime  # no teacher call, the file untouched
    assert resumed["losses"][:4] == first["losses"] and len(resumed["losses"]) == 6
    # pairs made with other settings, or by another teacher, are made again
    train_lcm(dataclasses.replace(cfg, extra={**cfg.extra, "solve_steps": 3}), progress=False)
    assert len(solves) > made
    made = len(solves)
    other = plainsd.save(plainsd.build("tiny", seed=1), tmp_path / "other.safetensors")
    train_lcm(dataclasses.replace(cfg, extra={**cfg.extra, "solve_steps": 3, "base": str(other)}), progress=False)
    assert len(solves) > made


def test_bad_trajectory_settings_are_refused_with_their_sentence():
    with pytest.raises(ValueError, match="extra.objective of the lcm recipe is 'consistency' or 'trajectory'"):
        LCMSettings.from_extra({"objective": "direct"})
    with pytest.raises(ValueError, match="extra.student_steps of the lcm recipe is a non-empty list of step counts"):
        LCMSettings.from_extra({"objective": "trajectory", "student_steps": [0, 4]})
    with pytest.raises(ValueError, match="extra.student_steps of the lcm recipe is a non-empty list"):
        LCMSettings.from_extra({"objective": "trajectory", "student_steps": []})
    with pytest.raises(ValueError, match="extra.student_steps of the lcm recipe must be a list of whole numbers"):
        LCMSettings.from_extra({"objective": "trajectory", "student_steps": [1.5]})
    with pytest.raises(ValueError, match="extra.solve_steps of the lcm recipe must be at least 1, not 0"):
        LCMSettings.from_extra({"objective": "trajectory", "solve_steps": 0})
    with pytest.raises(ValueError, match="extra.pairs of the lcm recipe must be at least 1, not 0"):
        LCMSettings.from_extra({"objective": "trajectory", "pairs": 0})
    with pytest.raises(ValueError, match="extra.target_ema of the lcm recipe is a setting of the other objective"):
        LCMSettings.from_extra({"objective": "trajectory", "target_ema": 0.95})
    with pytest.raises(ValueError, match="extra.pairs of the lcm recipe is a setting of the other objective"):
        LCMSettings.from_extra({"pairs": 512})
    assert LCMSettings.from_extra({"objective": "trajectory", "student_steps": [4]}).student_steps == (4,)
