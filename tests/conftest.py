import gc
import os
import shutil
import zlib

import pytest
import torch

import plainsd

PARITY: list[tuple[str, float]] = []


def pytest_configure(config):
    """Under pytest-xdist (make test's first part runs the quick tests two at a time, one per core) each worker
    computes with one thread, and so do the processes its tests start."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture
def record_parity(request):
    """Tests call record_parity(name, max_abs_diff); the figures are printed at the end of the run. They travel
    in the test's report, which reaches the main process from pytest-xdist's workers too."""
    return lambda name, value: request.node.user_properties.append(("parity", (name, float(value))))


def pytest_runtest_logreport(report):
    if report.when == "call":
        PARITY.extend(value for key, value in report.user_properties if key == "parity")


def pytest_terminal_summary(terminalreporter):
    if PARITY:
        terminalreporter.section("parity with reference implementations (max abs difference)")
        for name, value in sorted(PARITY):  # (xdist's workers report in no fixed order)
            terminalreporter.write_line(f"{name:60s} {value:.3e}")


@pytest.fixture(scope="session")
def tiny():
    return plainsd.build("tiny", seed=0)


_REFERENCE_CACHE: dict = {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """reference(name) -> (config, diffusers unet, diffusers vae, transformers text encoder, folder, plainsd model).

    The reference networks get random weights, are written as a diffusers folder, and plainsd loads
    that folder through its checkpoint loader. Cached per name for the module, one full-size pair at a time
    (each takes GBs of RAM). The folder is deleted once loaded (a full-size SD2 folder is 5 GB, and CI
    machines have little disk), so `folder` is None.
    """
    from tests.reference import build_diffusers, write_diffusers_folder
    from tests.test_configs import test_config

    def get(name: str):
        if name not in _REFERENCE_CACHE and not name.startswith("tiny"):
            # A full-size pair (diffusers + plainsd, float32) takes 5-10 GB of RAM: keep one at a time.
            for other in [k for k in _REFERENCE_CACHE if not k.startswith("tiny")]:
                del _REFERENCE_CACHE[other]
            gc.collect()
        if name not in _REFERENCE_CACHE:
            config = test_config(name)
            unet, vae, text = build_diffusers(config, seed=zlib.crc32(name.encode()) % 1000)  # same weights every run
            folder = write_diffusers_folder(tmp_path_factory.mktemp(name), config, unet, vae, text)
            try:
                ours = plainsd.load(folder)
                for t in [*ours.parameters(), *ours.buffers()]:
                    t.data = t.data.clone()  # plainsd.load memory-maps the files; copy so that the disk is freed
            finally:
                shutil.rmtree(folder)
            _REFERENCE_CACHE[name] = (config, unet, vae, text, None, ours)
        return _REFERENCE_CACHE[name]

    yield get
    _REFERENCE_CACHE.clear()


@pytest.fixture(scope="module")
def sdxl_reference(tmp_path_factory):
    """sdxl_reference(name) -> (config, diffusers unet, vae, transformers text_encoder (None for the refiner),
    text_encoder_2, plainsd model loaded from the diffusers folder they were written to). Tiny configs only."""
    from tests.reference import build_diffusers_sdxl, write_diffusers_sdxl_folder
    from tests.test_configs import test_config

    cache = {}

    def get(name: str):
        if name not in cache:
            config = test_config(name)
            nets = build_diffusers_sdxl(config, seed=zlib.crc32(name.encode()) % 1000)
            folder = write_diffusers_sdxl_folder(tmp_path_factory.mktemp(name), *nets)
            ours = plainsd.load(folder)
            for t in [*ours.parameters(), *ours.buffers()]:
                t.data = t.data.clone()
            shutil.rmtree(folder)
            cache[name] = (config, *nets, ours)
        return cache[name]

    return get
