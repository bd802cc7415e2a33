"""A real `plainsd serve` on loopback: concurrent clients, the bounded queue, interrupt, clients that leave,
and the web page driven in headless Chromium."""

import json
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

import plainsd
from tests.server.test_controlnet import save_random_controlnet, square
from tests.test_upscale import _esrgan_old, _picture, _write

MAX_QUEUE = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    sd = plainsd.build("tiny", seed=0)
    plainsd.save(sd, folder / "tiny.safetensors")
    controlnets = tmp_path_factory.mktemp("controlnet")
    save_random_controlnet(sd, controlnets / "control_tiny_canny.safetensors")
    upscalers = tmp_path_factory.mktemp("upscalers")
    _write(_esrgan_old(seed=4, scale=2), upscalers / "ESRGAN" / "2x-test.pth")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "plainsd.cli", "serve", "--models-dir", str(folder), "--port",
                             str(port), "--max-queue", str(MAX_QUEUE), "--threads", "1",
                             "--controlnet-dir", str(controlnets), "--upscalers-dir", str(upscalers)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/sdapi/v1/samplers", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail("plainsd serve exited: " + proc.stdout.read())
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("plainsd serve did not answer within 30 s")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def _idle(url, timeout=10.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if httpx.get(url + "/sdapi/v1/progress", timeout=5).json()["state"]["job_count"] == 0:
            return True
        time.sleep(0.05)
    return False


def test_concurrent_clients_all_answered_queue_bounded(server):
    answers, refusals, depth = {}, [], []
    stop = threading.Event()

    def client(c):
        with httpx.Client(base_url=server, timeout=120) as http:
            for k in range(3):
                body = {"prompt": f"client {c} request {k}", "steps": 6, "width": 64, "height": 64, "seed": 100 * c + k}
                while True:  # a well-behaved client honours 503 + Retry-After (shortened here)
                    r = http.post("/sdapi/v1/txt2img", json=body)
                    if r.status_code != 503:
                        break
                    refusals.append(r.headers.get("Retry-After"))
                    time.sleep(0.2)
                answers[(c, k)] = r

    def watch():
        with httpx.Client(base_url=server, timeout=10) as http:
            while not stop.is_set():
                depth.append(http.get("/sdapi/v1/progress").json()["state"]["job_count"])
                time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert len(answers) == 24 and all(r.status_code == 200 for r in answers.values())
    for (c, k), r in answers.items():  # each answer is the one its client asked for
        info = json.loads(r.json()["info"])
        assert info["prompt"] == f"client {c} request {k}" and info["seed"] == 100 * c + k
    assert max(depth) <= MAX_QUEUE + 1          # one running, at most MAX_QUEUE waiting
    assert refusals and all(v and v.isdigit() for v in refusals)  # 8 clients > 3 places: some were told to retry
    assert _idle(server)


def test_interrupt_returns_what_it_has(server):
    result = {}

    def long_job():
        result["r"] = httpx.post(server + "/sdapi/v1/txt2img", timeout=120,
                                 json={"prompt": "x", "steps": 150, "width": 64, "height": 64, "n_iter": 4})
    t = threading.Thread(target=long_job)
    t.start()
    for _ in range(500):
        if httpx.get(server + "/sdapi/v1/progress").json()["state"]["sampling_step"] >= 3:
            break
        time.sleep(0.02)
    start = time.time()
    httpx.post(server + "/sdapi/v1/interrupt")
    t.join()
    assert time.time() - start < 10
    r = result["r"]
    assert r.status_code == 200 and len(r.json()["images"]) == 1 and json.loads(r.json()["info"])["interrupted"]


def test_a_client_that_leaves_does_not_leave_its_job_running(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/sdapi/v1/txt2img", timeout=1.0,
                   json={"prompt": "x", "steps": 150, "width": 64, "height": 64, "n_iter": 16})
    # 16 x 150 steps would take far longer than this if the job went on for nobody
    assert _idle(server, timeout=5.0)


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _driver(tmp_path):
    """Headless Debian Chromium through selenium."""
    if _chromium() is None or shutil.which("chromedriver") is None:
        # Not a silent skip: make test installs Debian's chromium and chromium-driver where they are missing.
        pytest.fail("this test needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def test_web_page_in_headless_chromium(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = _driver(tmp_path)
    try:
        driver.get(server + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "sampler")).options) > 5)  # lists loaded from the API
        assert driver.find_element(By.ID, "width").get_attribute("value") == "64"     # the model's own size
        driver.find_element(By.ID, "prompt").send_keys("a red circle on the left")
        for field, value in [("steps", "8"), ("seed", "42")]:
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "generate").click()
        image = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#gallery img.result")))
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
        assert driver.execute_script("return arguments[0].naturalWidth", image) == 64
        caption = driver.find_element(By.CSS_SELECTOR, "#gallery figcaption").text
        assert caption.startswith("a red circle on the left") and "Seed: 42" in caption and "Steps: 8" in caption
        assert driver.find_element(By.ID, "error").text == ""
        assert "seed 42" in driver.find_element(By.ID, "status").text
        assert "DeepCache" not in caption and "Decoder" not in caption
        # fast mode from its switch (the parameters say so); the tiny decoder, which this model lacks: one sentence
        driver.find_element(By.ID, "fast").click()
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figcaption")) == 2)
        captions = [f.text for f in driver.find_elements(By.CSS_SELECTOR, "#gallery figcaption")]
        assert any("DeepCache interval: 2" in c for c in captions), captions
        driver.find_element(By.ID, "tiny").click()
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: "no tiny decoder" in d.find_element(By.ID, "error").text)
        # token merging from its field (A1111's setting, sent as override_settings)
        driver.find_element(By.ID, "tiny").click()
        box = driver.find_element(By.ID, "tome")
        box.clear()
        box.send_keys("0.5")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figcaption")) == 3)
        captions = [f.text for f in driver.find_elements(By.CSS_SELECTOR, "#gallery figcaption")]
        assert any("Token merging ratio: 0.5" in c for c in captions), captions
        # Hires. fix from its switch, with an upscaler from the server's lists; the NV random number source
        box.clear()
        box.send_keys("0")
        driver.find_element(By.ID, "hires").click()
        Select(driver.find_element(By.ID, "hr-upscaler")).select_by_visible_text("Lanczos")
        Select(driver.find_element(By.ID, "rng")).select_by_visible_text("NV")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figcaption")) == 4)
        captions = [f.text for f in driver.find_elements(By.CSS_SELECTOR, "#gallery figcaption")]
        assert any("Hires upscale: 2, Hires upscaler: Lanczos" in c and "RNG: NV" in c for c in captions), captions
    finally:
        driver.quit()



def test_web_page_controlnet_section(server, tmp_path):
    """A control image, preprocessor, model and weight on the page: the detected map's preview, the unit the page
    sends as the extension's alwayson_scripts, and the answer's picture and detected map in the gallery."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from plainsd import detectors

    control = square((48, 40), (10, 8, 30, 28))
    control.save(tmp_path / "control.png")
    models = httpx.get(server + "/controlnet/model_list").json()["model_list"]
    driver = _driver(tmp_path)
    try:
        driver.get(server + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "cn-module")).options) > 2)
        assert [o.get_attribute("value") for o in Select(driver.find_element(By.ID, "cn-model")).options] == models
        driver.find_element(By.ID, "cn-enabled").click()
        driver.find_element(By.ID, "cn-image").send_keys(str(tmp_path / "control.png"))
        Select(driver.find_element(By.ID, "cn-module")).select_by_visible_text("canny")
        Select(driver.find_element(By.ID, "cn-model")).select_by_visible_text(
            next(m for m in models if m.startswith("control_tiny_canny [")))
        box = driver.find_element(By.ID, "cn-weight")
        box.clear()
        box.send_keys("0.8")
        wait.until(lambda d: d.execute_script("return !!document.getElementById('cn-view').naturalWidth"))
        # the preview: /controlnet/detect's map, as detectors.detect makes it at the default resolution
        driver.find_element(By.ID, "cn-preview").click()
        size = wait.until(lambda d: d.execute_script(
            "const m = document.getElementById('cn-map'); return m.complete && m.naturalWidth && "
            "[m.naturalWidth, m.naturalHeight]"))
        assert tuple(size) == detectors.detect("canny", control, 512).size
        # the request the page sends (recorded from fetch) and what comes back
        driver.execute_script("""window.sent = []; const fetch0 = window.fetch;
            window.fetch = (url, options) => { if (String(url).endsWith('/txt2img')) window.sent.push(options.body);
                                               return fetch0(url, options); };""")
        for field, value in [("steps", "4"), ("seed", "7")]:
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figcaption")) == 2)
        assert driver.find_element(By.ID, "error").text == ""
        (sent,) = [json.loads(body) for body in driver.execute_script("return window.sent")]
        (unit,) = sent["alwayson_scripts"]["controlnet"]["args"]
        assert unit["image"].startswith("data:image/png;base64,")
        assert {k: unit[k] for k in ("enabled", "module", "weight", "guidance_start", "guidance_end")} == \
            {"enabled": True, "module": "canny", "weight": 0.8, "guidance_start": 0, "guidance_end": 1}
        assert unit["model"].startswith("control_tiny_canny [") and unit["control_mode"] == "Balanced"
        captions = [f.text for f in driver.find_elements(By.CSS_SELECTOR, "#gallery figcaption")]
        # (the gallery shows the newest first: the detected map follows the picture in the answer)
        assert captions[0] == "ControlNet: detected map" and "ControlNet 0:" in captions[1], captions
        assert "Module: canny" in captions[1] and "Weight: 0.8" in captions[1]
    finally:
        driver.quit()


def test_web_page_extras_section(server, tmp_path):
    """A picture uploaded to the Extras row, upscaled by a model from the server's list: the result in the gallery,
    captioned with A1111's postprocessing text; the same models offered for the hires fix."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    _picture(40, 28).save(tmp_path / "small.png")
    driver = _driver(tmp_path)
    try:
        driver.get(server + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "extras-upscaler")).options) > 2)
        names = [o.text for o in Select(driver.find_element(By.ID, "extras-upscaler")).options]
        assert names[:2] == ["Lanczos", "Nearest"] and "2x-test" in names
        assert "2x-test" in [o.text for o in Select(driver.find_element(By.ID, "hr-upscaler")).options]
        driver.find_element(By.ID, "extras-file").send_keys(str(tmp_path / "small.png"))
        Select(driver.find_element(By.ID, "extras-upscaler")).select_by_visible_text("2x-test")
        box = driver.find_element(By.ID, "extras-scale")
        box.clear()
        box.send_keys("2")
        driver.find_element(By.ID, "extras-run").click()
        image = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery img.result"))[0]
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
        assert driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image) == [80, 56]
        caption = driver.find_element(By.CSS_SELECTOR, "#gallery figcaption").text
        assert caption == "Postprocess upscale by: 2, Postprocess upscaler: 2x-test"
        assert driver.find_element(By.ID, "error").text == ""
    finally:
        driver.quit()
