"""Training under torchrun, two processes on this machine over loopback: each computes half of every batch and
they train the weights one process trains on the whole batch; a process killed mid-run makes torchrun restart
the group, which goes on from the last checkpoint and ends bit for bit where an uninterrupted run ends."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import plainsd
from plainsd.train.loop import TrainConfig
from plainsd.train.recipes import train_clip, train_vae
from tests.train.dist_recipes import DATA, TINY, runs

SCRIPT = Path(__file__).with_name("dist_recipes.py")


def torchrun(*args, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            f"--max-restarts={restarts}", *args]


def run(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Path:
    """What the recipes start from: a VAE and a CLIP trained one step, and a tiny whole model."""
    d = tmp_path_factory.mktemp("bases")
    for name, recipe in (("vae", train_vae), ("clip", train_clip)):
        recipe(TrainConfig(network=name, steps=1, batch_size=4, model=TINY, data=DATA, out=str(d / name)),
               progress=False)
    plainsd.save(plainsd.build("tiny", seed=0), d / "model.safetensors")
    files = {"vae": str(d / "vae" / "vae.safetensors"), "clip": str(d / "clip" / "clip.safetensors"),
             "model": str(d / "model.safetensors")}
    (d / "bases.json").write_text(json.dumps(files))
    return d / "bases.json"


def trained(folder: Path) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The weights and the logged losses (the whole batch's, averaged over the processes) of a run."""
    path = str(folder / "checkpoint.safetensors")
    losses = json.loads(safe_open(path, framework="pt").metadata()["plainsd.train"])["losses"]
    return {k: v for k, v in load_file(path).items() if k.startswith("model.")}, losses


def test_two_processes_train_the_weights_of_one_with_the_whole_batch(bases, tmp_path, record_parity):
    """The losses, which would show any row taken twice or normalised over half the batch, agree to float
    rounding at the first step (the same weights) and nearly so after; the weights to within the learning rate
    (1e-3) per step: Adam's first steps move every weight by about the learning rate times the sign of its
    gradient, so a gradient that is nearly zero can come out with either sign when the batch is summed in another
    order, and the later steps start from weights that differ by that much."""
    run([sys.executable, str(SCRIPT), str(bases), str(tmp_path / "one")], tmp_path)
    run(torchrun(str(SCRIPT), str(bases), str(tmp_path / "two")), tmp_path)
    for name in runs(json.loads(bases.read_text())):
        (one, loss_one), (two, loss_two) = trained(tmp_path / "one" / name), trained(tmp_path / "two" / name)
        assert one.keys() == two.keys() and one and len(loss_one) == len(loss_two) == 3
        first_gap = abs(loss_one[0] - loss_two[0]) / abs(loss_one[0])
        loss_gap = max(abs(a - b) / abs(a) for a, b in zip(loss_one, loss_two))
        moved = max(float((a - b).abs().max()) for a, b in zip(one.values(), two.values()))
        record_parity(f"torchrun 2 x batch 2 vs 1 x batch 4, 3 steps, {name}: loss (rel)", loss_gap)
        record_parity(f"torchrun 2 x batch 2 vs 1 x batch 4, 3 steps, {name}: weights", moved)
        assert first_gap <= 1e-5 and loss_gap <= 1e-4 and moved <= 3e-3, (name, loss_one, loss_two, moved)
    assert not (tmp_path / "two" / "unet" / "samples").exists()  # nothing but rank 0's files
    assert sorted(p.name for p in (tmp_path / "two" / "dreambooth" / "class_images").iterdir()) == \
        [f"{i:04d}.png" for i in range(4)]  # drawn half by each process


def _checkpoint_step(path: Path) -> int:
    try:
        return json.loads(safe_open(str(path), framework="pt").metadata()["plainsd.train"])["step"]
    except Exception:  # not written yet
        return 0


def _kill_rank_at(launcher: subprocess.Popen, checkpoint: Path, step: int, rank: str = "1") -> list[int]:
    """Once the run's checkpoint has reached `step`, kill the process of that rank (as a crash would)."""
    killed = []
    while launcher.poll() is None and not killed:
        if _checkpoint_step(checkpoint) >= step:
            for child in psutil.Process(launcher.pid).children(recursive=True):
                try:
                    if child.environ().get("RANK") == rank and child.environ().get("TORCHELASTIC_RESTART_COUNT") == "0":
                        child.kill()
                        killed.append(child.pid)
                except psutil.Error:
                    pass
        time.sleep(0.01)
    return killed


@pytest.mark.slow
@pytest.mark.parametrize("network", ["unet", "lora"])
def test_a_killed_process_is_restarted_and_the_run_ends_as_if_it_never_was(bases, tmp_path, network):
    files = json.loads(bases.read_text())
    extra = ({"vae": files["vae"], "clip": files["clip"], "latent_cache": 8} if network == "unet" else
             {"model": files["model"], "num_instance_images": 3, "rank": 2})
    config = {"network": network, "steps": 80, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 20,
              "ema_decay": 0.9 if network == "unet" else 0.0, "extra": extra,
              "model": TINY if network == "unet" else {},
              "data": DATA if network == "unet" else {"kind": "shapes", "shapes": ["star"]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    command = ["train", "unet"] if network == "unet" else ["finetune", "lora"]

    def launch(out: str, **kw):
        return torchrun("-m", "plainsd", *command, "--config", "config.json", "--out", out, "--quiet", **kw)

    run(launch("whole"), tmp_path)
    launcher = subprocess.Popen(launch("killed", restarts=1), cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    killed = []
    watcher = threading.Thread(target=lambda: killed.extend(
        _kill_rank_at(launcher, tmp_path / "killed" / "checkpoint.safetensors", 20)))
    watcher.start()
    output = launcher.communicate(timeout=900)[0]
    watcher.join()
    assert launcher.returncode == 0 and killed, output[-3000:]
    assert "restarted by torchrun; going on from the checkpoint of step" in output, output[-3000:]
    whole, again = (load_file(str(tmp_path / d / "checkpoint.safetensors")) for d in ("whole", "killed"))
    assert whole.keys() == again.keys()
    assert all(torch.equal(whole[k], again[k]) for k in whole)  # weights, optimizer moments, EMA
    made = "model.safetensors" if network == "unet" else "lora.safetensors"
    whole, again = (load_file(str(tmp_path / d / made)) for d in ("whole", "killed"))
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)


@pytest.mark.slow
def test_a_run_goes_on_with_another_number_of_processes(bases, tmp_path):
    """2 steps as one process, then 2 more under torchrun with two (--resume): the run of 4 steps one process
    trains, to float rounding (losses) and within the learning rate (weights), as above."""
    files = json.loads(bases.read_text())
    config = {"network": "unet", "steps": 4, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 2, "model": TINY,
              "data": DATA, "extra": {"vae": files["vae"], "clip": files["clip"], "latent_cache": 8}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    train = ["-m", "plainsd", "train", "unet", "--config", "config.json", "--quiet"]
    run([sys.executable, *train, "--out", "alone"], tmp_path)
    run([sys.executable, *train, "--out", "mixed", "--steps", "2"], tmp_path)
    run(torchrun(*train, "--out", "mixed", "--resume"), tmp_path)
    (alone, loss_alone), (mixed, loss_mixed) = trained(tmp_path / "alone"), trained(tmp_path / "mixed")
    assert len(loss_alone) == len(loss_mixed) == 4 and loss_alone[:2] == loss_mixed[:2]
    assert max(abs(a - b) / abs(a) for a, b in zip(loss_alone, loss_mixed)) <= 1e-5, (loss_alone, loss_mixed)
    assert max(float((a - b).abs().max()) for a, b in zip(alone.values(), mixed.values())) <= 1e-3
