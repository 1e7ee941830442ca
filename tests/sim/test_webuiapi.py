"""The third-party `webuiapi` client against the simulator: it must not notice the difference."""

from __future__ import annotations

import webuiapi
from PIL import Image



def _api(sim) -> webuiapi.WebUIApi:
    host, port = sim.url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=4)


def test_txt2img_and_img2img(fast_sim) -> None:
    api = _api(fast_sim)
    result = api.txt2img(prompt="a cat", width=64, height=64, seed=1234)
    assert result.image.size == (64, 64)
    assert result.info["all_seeds"] == [1234]
    again = api.img2img(images=[result.image], prompt="a dog", width=64, height=64, denoising_strength=0.5, seed=7)
    assert again.image.size == (64, 64) and again.info["denoising_strength"] == 0.5
    assert again.parameters["init_images"] is None


def test_adetailer_is_detected_and_its_old_key_ignored(fast_sim) -> None:
    api = _api(fast_sim)
    assert api.has_adetailer
    result = api.txt2img(prompt="a cat", width=64, height=64, adetailer=[webuiapi.ADetailer(ad_model="face_yolov8n.pt")])
    assert "ADetailer model" not in result.info["infotexts"][0]  # it sends ad_mask_k_largest, see reference §7


def test_progress_and_interrupt_from_another_thread(stepping_sim, background) -> None:
    api = _api(stepping_sim)
    call = background(api.txt2img, prompt="a cat", width=64, height=64, n_iter=2)
    assert stepping_sim.wait_for(lambda s: s.awaiting_release and s.job_count == 2)
    assert api.get_progress()["progress"] == 0.01
    stepping_sim.release(2)
    assert stepping_sim.wait_for(lambda s: s.awaiting_release and s.sampling_step == 1)
    assert api.get_progress()["state"]["sampling_step"] == 1
    assert api.interrupt() == {}
    result = call.result()
    assert len(result.images) == 1 and isinstance(result.image, Image.Image)
    assert api.get_progress()["progress"] == 0
