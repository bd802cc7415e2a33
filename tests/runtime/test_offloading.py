"""A network's weights written out and read back (runtime/offloading.py): the same numbers, nothing held meanwhile."""

import builtins
import copy

import pytest
import torch

import plainsd
from plainsd import runtime
from plainsd.runtime import offloading


def _call(engine, x, t, c):
    with torch.no_grad():
        return engine.unet(x.to(engine.sd.unet.dtype), t, c.to(engine.sd.unet.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_offloaded_network_holds_nothing_and_comes_back_bit_for_bit(dtype):
    """Packed layers (bf16, float32) are packed again, fp16-stored ones keep fp16 weights, channels-last
    convolutions stay channels-last; the file is gone once read back."""
    sd = plainsd.build("tiny", seed=0).to(dtype)
    engine = runtime.prepare(sd)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, sd.config.unet.context_dim, generator=g)
    t = torch.tensor([500, 20])
    before = _call(engine, x, t, c)
    kinds = [type(m) for m in sd.unet.modules()]
    runtime.offload(sd.unet)
    assert runtime.offloaded(sd.unet) and sum(p.numel() for p in sd.unet.parameters()) == 0
    path = offloading._STORED[sd.unet].path
    assert path.is_file()
    runtime.restore(sd.unet)
    assert not runtime.offloaded(sd.unet) and not path.exists()
    assert [type(m) for m in sd.unet.modules()] == kinds
    conv = sd.unet.input_blocks[1][0].in_layers[2]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(_call(engine, x, t, c), before)
    runtime.restore(sd.unet)  # (not offloaded: nothing to do)


def test_a_failed_write_leaves_the_network_as_it_was(monkeypatch):
    sd = plainsd.build("tiny", seed=0)
    state = copy.deepcopy(sd.unet.state_dict())
    real_open = builtins.open

    def full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).endswith(".tmp"):
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk)
    with pytest.raises(OSError, match="could not write a network's weights to .*No space left on device.*keep both"):
        runtime.offload(sd.unet)
    assert not runtime.offloaded(sd.unet)
    assert all(torch.equal(v, state[k]) for k, v in sd.unet.state_dict().items())


def test_folders_of_processes_that_are_gone_are_deleted(tmp_path, monkeypatch):
    """A process killed while a network was written out leaves its folder; the next one to write deletes it."""
    import os
    import subprocess
    import sys

    monkeypatch.setenv("PLAINSD_CACHE", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / "offload" / f"{gone.stdout.strip()}-abc"
    left.mkdir(parents=True)
    (left / "weights.bin").write_bytes(b"x" * 100)
    mine = tmp_path / "offload" / f"{os.getpid()}-def"
    mine.mkdir()
    sd = plainsd.build("tiny", seed=0)
    runtime.offload(sd.unet)
    assert not left.exists() and mine.exists()
    assert offloading._STORED[sd.unet].path.parent.name.startswith(f"{os.getpid()}-")
    runtime.restore(sd.unet)
