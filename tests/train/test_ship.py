"""The model card's facts about each training run."""

import json

import pytest
import torch

from plainsd.weights import write_safetensors
from plainsd.train.ship import run_facts


def _run(tmp_path, net, meta, logs):
    folder = tmp_path / net
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"network": net, "batch_size": 4}))
    write_safetensors({"model.w": torch.zeros(1)}, folder / "checkpoint.safetensors",
                 {"plainsd.train": json.dumps({"step": 300, "losses": [1.0, 0.5], **meta})})
    for name, text in logs.items():
        (tmp_path / name).write_text(text)


def test_time_is_the_checkpoints_cumulative_count(tmp_path):
    _run(tmp_path, "vae", {"seconds": 90.0}, {"vae.log": "trained vae to step 300 in 40 s; loss ...\n"})
    facts = run_facts(tmp_path, "vae")
    assert facts["steps"] == 300 and facts["seconds"] == 90.0 and facts["final_loss"] == 0.75


def test_segments_before_checkpoints_carried_their_time_are_counted_from_the_logs(tmp_path):
    # resumed twice; the first checkpoint had no time, so the final one counts only the last segment (50 s)
    _run(tmp_path, "vae", {"seconds": 50.0}, {
        "vae-first.log": "trained vae to step 100 in 70 s; loss\n",
        "vae.log": "trained vae to step 200 in 60 s; loss\ntrained vae to step 300 in 50 s; loss\n",
        "clip.log": "trained clip to step 100 in 1000 s; loss\n"})
    assert run_facts(tmp_path, "vae")["seconds"] == 180


def test_a_later_stage_of_the_same_network_is_its_own_run(tmp_path):
    # unet-objects trains the network "unet" too: its log must not count towards the unet run
    _run(tmp_path, "unet", {}, {"unet.log": "trained unet to step 300 in 100 s; loss\n",
                                "unet-objects.log": "trained unet to step 200 in 40 s; loss\n"})
    assert run_facts(tmp_path, "unet")["seconds"] == 100


def test_no_time_anywhere_is_said(tmp_path):
    _run(tmp_path, "unet", {}, {})
    assert run_facts(tmp_path, "unet")["seconds"] is None


def test_an_earlier_cards_vae_rows_are_carried_over_as_they_are():
    from plainsd.train.ship import carried_vae_facts

    old = ("They are kept out of the VAE's data too.\n\n| network | steps | batch | time | precision | recipe |\n"
           "|---|---|---|---|---|---|\n| vae | 6500 | 16 | 68.8 min | bf16 autocast | lr 0.001 cosine, {} |\n"
           "| clip | 1500 | 64 | 6.8 min | float32 | lr 0.001 cosine, {} |\n"
           "| vae-decoder-objects | 2000 | 16 | 9.2 min | bf16 autocast | lr 0.0002 cosine, {} |\n")
    facts = carried_vae_facts(old)
    assert set(facts) == {"vae", "vae-decoder-objects"}
    assert facts["vae"]["steps"] == 6500 and abs(facts["vae"]["seconds"] - 68.8 * 60) < 1e-6
    assert facts["vae"]["row"] == "| vae | 6500 | 16 | 68.8 min | bf16 autocast | lr 0.001 cosine, {} |"
    assert facts["vae"]["recipe"]["data"]["shapes"] is None
    with pytest.raises(ValueError, match="no training row for the vae run"):
        carried_vae_facts("| clip | 1500 | 64 | 6.8 min | float32 | lr |")


def test_vae_from_without_its_card_says_so(tmp_path):
    from plainsd.train import ship

    with pytest.raises(SystemExit, match="needs the model's card beside it"):
        ship.main(["--runs", str(tmp_path), "--vae-from", str(tmp_path / "old.safetensors")])
