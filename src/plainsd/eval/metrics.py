"""Evaluation on held-out prompts and images of the shapes world, as JSON-ready numbers.

- adherence: the judge reads each generated image; the share of images whose stated colour and shape,
  position and size are right (single objects), and the same for two-object prompts;
- vae_psnr: reconstruction PSNR of held-out images;
- vae_roundtrip_adherence: the judge on VAE round trips of the held-out prompts' renders: the ceiling the
  autoencoder puts on adherence (a UNet cannot draw what the decoder cannot give back);
- clip_retrieval: text -> image top-1 among held-out pairs;
- guidance_sweep, negative_prompt_effect, img2img_keeps: that CFG, negative prompts and img2img do their job;
- concept_rate: how often a prompt draws a given shape (the fine-tuning proofs); scene_rate: how often it draws
  a given object on a given background, every attribute right (the textual-inversion proof).
"""

from __future__ import annotations

import math
import random

import torch

from ..images import to_tensor
from ..train.data import SHAPES, Scene, ShapesDataset, caption, random_scene
from .judge import judge

HELD_OUT_SEED = 424242  # never used by the training recipes


def held_out_scenes(n: int, objects: int = 1, seed: int = HELD_OUT_SEED, shapes=SHAPES):
    """n scenes with every attribute stated (so that every attribute can be judged)."""
    rng = random.Random(f"{seed}:{objects}")
    scenes = []
    while len(scenes) < n:
        s = random_scene(rng, shapes, two_objects=1.0 if objects == 2 else 0.0)
        s.stated = [{"shape", "colour", "size", "position"} for _ in s.objects]
        s.caption = caption(s, rng)
        scenes.append(s)
    return scenes


def _scores(verdicts: list[dict[str, bool]]) -> dict[str, bool]:
    """One image's verdicts (one per object asked for) -> the four tallies of adherence."""
    return {"colour_and_shape": all(v["colour"] and v["shape"] for v in verdicts),
            "position": all(v["position"] for v in verdicts), "size": all(v["size"] for v in verdicts),
            "all": all(all(v.values()) for v in verdicts)}


def _shares(tallies: list[dict[str, bool]]) -> dict[str, float]:
    return {k: sum(t[k] for t in tallies) / len(tallies) for k in tallies[0]}


def adherence(sd, n: int = 100, objects: int = 1, steps: int = 20, sampler: str = "DPM++ 2M",
              schedule: str = "karras", cfg_scale: float = 5.0, negative_prompt: str = "", seed: int = 0,
              shapes=SHAPES, progress: bool = False, keep_images: list | None = None, fast=False,
              guidance_until: float | None = None, token_merging: float = 0.0) -> dict:
    from ..pipeline import txt2img

    scenes = held_out_scenes(n, objects, shapes=shapes)
    tallies = []
    for i, scene in enumerate(scenes):
        image = txt2img(sd, scene.caption, negative_prompt, steps=steps, sampler=sampler, schedule=schedule,
                        cfg_scale=cfg_scale, seed=seed + i, fast=fast, guidance_until=guidance_until,
                        token_merging=token_merging).images[0]
        if keep_images is not None:
            keep_images.append((image, scene))
        tallies.append(_scores(judge(image, scene)))
        if progress:
            print(f"\r{i + 1}/{n}", end="", flush=True)
    if progress:
        print()
    return _shares(tallies)


@torch.no_grad()
def vae_psnr(vae, n: int = 128, size: int = 64) -> float:
    ds = ShapesDataset(seed=HELD_OUT_SEED, size=size)
    x = torch.cat([to_tensor(ds[i][0]) for i in range(n)])
    recon = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
    mse = float(((recon - x) ** 2).mean())
    return 10 * math.log10(4.0 / max(mse, 1e-12))  # peak-to-peak 2 in [-1, 1]


@torch.no_grad()
def vae_roundtrip_adherence(vae, n: int = 100, size: int = 64, tiny_decoder=None, scale_factor: float = 1.0) -> dict:
    """Adherence of encode-then-decode of ground-truth renders for the single-object held-out prompts.

    With `tiny_decoder` (fast mode's TAESD decoder), the VAE encodes and the tiny decoder decodes the
    latents times `scale_factor`, as fast mode decodes the UNet's output."""
    from ..images import to_pil
    from ..train.data import render

    scenes = held_out_scenes(n, 1)
    tallies = []
    for i in range(0, n, 32):
        batch = scenes[i:i + 32]
        x = torch.cat([to_tensor(render(s, size)) for s in batch]).to(vae.dtype)
        z = vae.encode(x).mode()
        decoded = vae.decode(z) if tiny_decoder is None else tiny_decoder.decode(z.float() * scale_factor)
        for image, scene in zip(to_pil(decoded.float()), batch):
            tallies.append(_scores(judge(image, scene)))
    return _shares(tallies)


@torch.no_grad()
def clip_retrieval(text_encoder, vision, tokenizer, n: int = 100) -> float:
    scenes = held_out_scenes(n, 1)
    from ..train.data import render

    images = torch.cat([to_tensor(render(s)) for s in scenes])
    t = torch.nn.functional.normalize(text_encoder.pooled(tokenizer([s.caption for s in scenes])).float(), dim=-1)
    v = torch.nn.functional.normalize(vision(images).float(), dim=-1)
    return float((t @ v.T).argmax(dim=1).eq(torch.arange(n)).float().mean())


def distribution_metrics(pairs, text_encoder, vision, tokenizer) -> dict:
    """FID against ground-truth renders of the same scenes, CLIP score, Inception Score over judge labels."""
    from ..train.data import render
    from .fid import clip_score, fid, inception_score
    from .judge import detect

    images = [im for im, _ in pairs]
    labels = []
    for im in images:
        found = detect(im)[1]
        labels.append(f"{found[0].colour} {found[0].shape}" if found else "nothing")
    return {"fid_clip": round(fid(vision, images, [render(s) for _, s in pairs]), 4),
            "clip_score": round(clip_score(text_encoder, vision, tokenizer, images, [s.caption for _, s in pairs]), 2),
            "inception_score_judge": round(inception_score(labels), 2)}


def guidance_sweep(sd, scales=(1.0, 2.0, 3.0, 5.0), n: int = 50, **kwargs) -> dict:
    """Colour-and-shape adherence of single-object prompts at each CFG scale."""
    return {str(scale): adherence(sd, n, 1, cfg_scale=scale, **kwargs)["colour_and_shape"] for scale in scales}


def _has(image, colour: str | None = None, shape: str | None = None) -> bool:
    from .judge import detect

    return any((colour is None or d.colour == colour) and (shape is None or d.shape == shape)
               for d in detect(image)[1])


def negative_prompt_effect(sd, prompt: str = "a circle", negative: str = "red", colour: str = "red", n: int = 100,
                           steps: int = 20, sampler: str = "DPM++ 2M", schedule: str = "karras",
                           cfg_scale: float = 5.0, guidance_until: float | None = None) -> dict:
    """Share of images with a `colour` object for `prompt`, without and with the negative prompt."""
    from ..pipeline import txt2img

    def share(neg):
        hits = [_has(txt2img(sd, prompt, neg, steps=steps, sampler=sampler, schedule=schedule, cfg_scale=cfg_scale,
                             guidance_until=guidance_until, seed=i).images[0], colour=colour) for i in range(n)]
        return sum(hits) / n
    without, with_neg = share(""), share(negative)
    return {"prompt": prompt, "negative_prompt": negative, f"{colour}_without": without, f"{colour}_with": with_neg}


def img2img_keeps(sd, n: int = 50, strength: float = 0.3, steps: int = 20, sampler: str = "DPM++ 2M",
                  schedule: str = "karras", cfg_scale: float = 5.0, guidance_until: float | None = None) -> float:
    """Share of held-out renders whose shape, colour and position survive img2img at `strength`."""
    from ..pipeline import as_engine, img2img
    from ..train.data import render

    kept = []
    size = as_engine(sd).sd.config.resolution
    for i, scene in enumerate(held_out_scenes(n, 1, seed=HELD_OUT_SEED + 1)):
        out = img2img(sd, render(scene, size), scene.caption, strength=strength, steps=steps,
                      sampler=sampler, schedule=schedule, cfg_scale=cfg_scale, guidance_until=guidance_until,
                      seed=i).images[0]
        v = judge(out, scene)[0]
        kept.append(v["shape"] and v["colour"] and v["position"])
    return sum(kept) / n


def scene_rate(sd, prompt: str, scene: Scene, n: int = 100, **kwargs) -> dict[str, float]:
    """Shares of n images for `prompt` (seeds 0..n-1) in which the judge reads each attribute of the scene's one
    object, its background, one object only, and all of these at once (the textual-inversion proof)."""
    from ..pipeline import txt2img
    from .judge import ATTRIBUTES, detect

    defaults = dict(steps=20, sampler="DPM++ 2M", schedule="karras", cfg_scale=5.0)
    asked = Scene(scene.objects[:1], scene.background, stated=[set(ATTRIBUTES)])
    tallies = []
    for i in range(n):
        image = txt2img(sd, prompt, seed=i, **{**defaults, **kwargs}).images[0]
        verdict = {"count": True, **judge(image, asked)[0]}
        verdict["background"] = detect(image)[0] == scene.background
        tallies.append({**verdict, "all": all(verdict.values())})
    return _shares(tallies)


def concept_rate(sd, prompt: str, shape: str, n: int = 50, **kwargs) -> float:
    """Share of images for `prompt` in which the judge finds a `shape` (the fine-tuning proofs)."""
    from ..pipeline import txt2img

    defaults = dict(steps=20, sampler="DPM++ 2M", schedule="karras", cfg_scale=5.0)
    return sum(_has(txt2img(sd, prompt, seed=i, **{**defaults, **kwargs}).images[0], shape=shape) for i in range(n)) / n
