"""WebUIClient against the simulated WebUI over real HTTP on 127.0.0.1."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from sdjobs.client import (
    GenerationResult,
    Timeouts,
    WebUIAuthError,
    WebUIClient,
    WebUIError,
    WebUINotFound,
    WebUIServerError,
    WebUIUnreachable,
)
from sdjobs.sim import SimSettings, SimulatedWebUI
from sdjobs.status import ProgressInfo

TRACES = Path(__file__).parent / "data" / "traces"
SECRET = "s3cret-pass"

TXT2IMG = {"prompt": "a lighthouse", "seed": 1234, "steps": 8, "width": 64, "height": 64, "sampler_name": "Euler a"}


class Background:
    """Runs a blocking call on a thread; the test waits on its result with a timeout."""

    def __init__(self, call, *args, **kwargs):
        self.result = None
        self.error = None
        self.done = threading.Event()

        def target():
            try:
                self.result = call(*args, **kwargs)
            except BaseException as exc:  # handed to the test
                self.error = exc
            finally:
                self.done.set()

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self, timeout=10.0):
        assert self.done.wait(timeout), "the call did not return"
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.result


def stepping(**kwargs) -> SimSettings:
    return SimSettings(stepping=True, **kwargs)


# -- progress (the seed PR-PIPE-004's client tests) ---------------------------


@pytest.mark.parametrize("sim_settings", [stepping()])
def test_get_progress_returns_progress_info(webui_sim, webui_client):
    call = Background(webui_client.txt2img, TXT2IMG)
    webui_sim.release(4)  # A1111 reports the 0-based step just finished
    assert webui_sim.wait_for(lambda s: s.sampling_step == 3)
    info = webui_client.get_progress()
    webui_sim.release(100)
    call.join()
    assert isinstance(info, ProgressInfo)
    assert (info.job_count, info.job_no, info.current_step, info.total_steps) == (1, 0, 3, 8)
    assert info.progress == pytest.approx(0.01 + 3 / 8)
    assert info.job_timestamp not in (None, "0")


def test_get_progress_returns_none_when_idle(webui_client):
    assert webui_client.get_progress() is None


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.001, progress_latency=1.0)])
def test_get_progress_handles_timeout(webui_sim):
    with WebUIClient(webui_sim.url, timeouts=Timeouts(read=0.05)) as client:
        assert client.get_progress() is None


def test_get_progress_handles_connection_error(closed_port_url):
    assert WebUIClient(closed_port_url).get_progress() is None


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.001, progress_error_rate=1.0)])
def test_get_progress_handles_server_errors(webui_client):
    assert webui_client.get_progress() is None


def test_get_progress_handles_a_malformed_body(canned_server):
    assert WebUIClient(canned_server(200, {"nothing": "here"})).get_progress() is None
    assert WebUIClient(canned_server(200, b"<html>")).get_progress() is None


def test_progress_info_from_response():
    line = next(
        json.loads(line)
        for line in (TRACES / "01_txt2img_64_8steps_seed1234.jsonl").open()
        if '"sampling_step": 3' in line and '"job_count": 1' in line
    )
    info = ProgressInfo.from_response(line["body"])
    state = line["body"]["state"]
    assert info.progress == line["body"]["progress"]
    assert info.eta_relative == line["body"]["eta_relative"]
    assert (info.current_step, info.total_steps) == (3, state["sampling_steps"])
    assert (info.job_no, info.job_count) == (state["job_no"], 1)
    assert info.job_timestamp == state["job_timestamp"]
    assert not info.idle


# -- generation -----------------------------------------------------------------


def test_txt2img_returns_decoded_images_parsed_info_and_parameters(webui_client):
    result = webui_client.txt2img(TXT2IMG)
    assert isinstance(result, GenerationResult)
    assert len(result.images) == 1
    image = Image.open(io.BytesIO(result.images[0]))
    assert image.size == (64, 64)
    assert "Seed: 1234" in image.text["parameters"]
    assert result.seeds == (1234,)
    assert result.info["seed"] == 1234
    assert "Steps: 8" in result.infotexts[0]
    assert result.parameters["prompt"] == "a lighthouse"


def test_img2img_takes_an_init_image(webui_client):
    import base64

    first = webui_client.txt2img(TXT2IMG).images[0]
    payload = {**TXT2IMG, "init_images": [base64.b64encode(first).decode()], "denoising_strength": 0.5}
    result = webui_client.img2img(payload)
    assert len(result.images) == 1 and result.seeds == (1234,)


def test_extra_single_image_upscales(webui_client):
    import base64

    first = webui_client.txt2img(TXT2IMG).images[0]
    result = webui_client.extra_single_image(
        {"image": base64.b64encode(first).decode(), "upscaler_1": "Lanczos", "upscaling_resize": 2}
    )
    assert Image.open(io.BytesIO(result.images[0])).size == (128, 128)


@pytest.mark.parametrize("sim_settings", [stepping()])
def test_interrupt_makes_the_blocked_post_return_partial_images(webui_sim, webui_client):
    call = Background(webui_client.txt2img, {**TXT2IMG, "n_iter": 3})
    webui_sim.release(4)
    assert webui_sim.wait_for(lambda s: s.sampling_step == 3)
    webui_client.interrupt()
    webui_sim.release(100)
    result = call.join()
    assert len(result.images) == 1  # the first iteration, cut short; the others never ran


def test_interrupt_and_skip_while_idle_do_nothing(webui_client):
    webui_client.interrupt()
    webui_client.skip()
    assert len(webui_client.txt2img(TXT2IMG).images) == 1


# -- task progress ----------------------------------------------------------------


def test_supports_task_progress_with_the_ui(webui_client):
    assert webui_client.supports_task_progress()


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.001, ui=False)])
def test_no_task_progress_with_nowebui(webui_client):
    assert not webui_client.supports_task_progress()
    assert webui_client.internal_progress("task(x)") is None


def test_task_progress_is_asked_again_after_no_answer(closed_port_url):
    client = WebUIClient(closed_port_url, retries=0)
    assert not client.supports_task_progress()  # nothing listens yet: no answer, nothing learnt
    port = int(closed_port_url.rpartition(":")[2])
    with SimulatedWebUI(SimSettings(step_time=0.001), port=port), client:
        assert client.supports_task_progress()


@pytest.mark.parametrize("sim_settings", [stepping()])
def test_internal_progress_follows_our_task_queued_active_completed(webui_sim, webui_client):
    first = Background(webui_client.txt2img, TXT2IMG, force_task_id="task(one)")
    assert webui_sim.wait_for(lambda s: s.current_task == "task(one)")
    second = Background(webui_client.txt2img, TXT2IMG, force_task_id="task(two)")
    assert webui_sim.wait_for(lambda s: "task(two)" in s.pending_tasks)
    queued = webui_client.internal_progress("task(two)")
    assert queued.queued and not queued.active and queued.queue_position == (1, 1)
    webui_sim.release(3)
    assert webui_sim.wait_for(lambda s: s.sampling_step == 2)
    active = webui_client.internal_progress("task(one)")
    assert active.active and active.progress == pytest.approx(2 / 8)
    webui_sim.release(1000)
    first.join()
    second.join()
    assert webui_client.internal_progress("task(one)").completed
    unknown = webui_client.internal_progress("task(never)")
    assert (unknown.active, unknown.queued, unknown.completed) == (False, False, False)


# -- errors -------------------------------------------------------------------------


def test_unknown_sampler_is_a_readable_not_found(webui_client):
    with pytest.raises(WebUINotFound, match="Sampler not found"):
        webui_client.txt2img({**TXT2IMG, "sampler_name": "Nope"})


def test_unknown_hr_upscaler_is_a_server_error_with_its_message(webui_client):
    with pytest.raises(WebUIServerError, match="could not find upscaler named Nope"):
        webui_client.txt2img({**TXT2IMG, "enable_hr": True, "hr_upscaler": "Nope"})


def test_validation_errors_name_the_field(webui_client):
    with pytest.raises(WebUIError, match="steps: value is not a valid integer") as caught:
        webui_client.txt2img({**TXT2IMG, "steps": "many"})
    assert caught.value.status == 422


def test_a_missing_route_is_not_found(webui_client):
    with pytest.raises(WebUINotFound, match="/sdapi/v1/nothing"):
        webui_client._call("GET", "/sdapi/v1/nothing")


def test_refused_connection_says_so(closed_port_url):
    with pytest.raises(WebUIUnreachable, match="connection refused") as caught:
        WebUIClient(closed_port_url, retries=0).samplers()
    assert caught.value.status is None


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.001, drop_connection_at_step=2)])
def test_a_dropped_generation_is_unreachable_and_not_retried(webui_sim, webui_client):
    with pytest.raises(WebUIUnreachable, match="closed the connection"):
        webui_client.txt2img(TXT2IMG)
    posts = [path for _, method, path in webui_sim.requests if method == "POST"]
    assert posts.count("/sdapi/v1/txt2img") == 1


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.001, generation_error="CUDA out of memory")])
def test_a_failing_generation_is_a_server_error(webui_client):
    with pytest.raises(WebUIServerError, match="CUDA out of memory") as caught:
        webui_client.txt2img(TXT2IMG)
    assert caught.value.status == 500


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"error": "OutOfMemoryError", "detail": "", "body": "", "errors": "CUDA oom"}, "CUDA oom"),  # A1111
        ({"error": "RuntimeError", "detail": "", "body": "", "message": "forge says no"}, "forge says no"),  # Forge
        ({"detail": "plain detail"}, "plain detail"),  # FastAPI
        ({"error": "x", "code": 500, "detail": "", "body": "", "errors": "sdnext says no"}, "sdnext says no"),
    ],
)
def test_every_error_shape_gives_the_servers_message(canned_server, body, message):
    with pytest.raises(WebUIServerError, match=message):
        WebUIClient(canned_server(500, body), retries=0).options()


@pytest.mark.parametrize(
    ("method", "body", "message"),
    [
        ("txt2img", b'{"images": ["iVBORw0KGgo', "the answer is not JSON"),
        ("txt2img", [], "expected an object, got an array"),
        ("img2img", None, "expected an object, got null"),
        ("txt2img", {"images": "iVBORw0KGgo="}, "bad image: expected an array, got a string"),
        ("img2img", {"images": ["not base64!"]}, "bad image: .*base64"),
        ("extra_single_image", {"image": "not base64!", "html_info": ""}, "bad image: .*base64"),
        ("extra_single_image", {"image": 42}, "bad image: expected a base64 string, got a number"),
        ("options", ["a", "list"], "expected an object, got an array"),
        ("samplers", {"not": "a list"}, "expected an array, got an object"),
        ("adetailer_models", {"ad_model": None}, "expected an array in 'ad_model', got null"),
    ],
)
def test_a_malformed_answer_is_a_webui_error(canned_server, method, body, message):
    client = WebUIClient(canned_server(200, body), retries=0)
    payload = (TXT2IMG,) if method in ("txt2img", "img2img", "extra_single_image") else ()
    with pytest.raises(WebUIError, match=message) as caught:
        getattr(client, method)(*payload)
    assert caught.value.status == 200


@pytest.fixture
def cut_short_url() -> Iterator[str]:
    """A server whose answer promises 100 bytes and sends 12 before closing the connection."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b'{"samplers":')

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_answer_cut_short_is_unreachable(cut_short_url):
    with pytest.raises(WebUIUnreachable) as caught:
        WebUIClient(cut_short_url, retries=0).samplers()
    assert caught.value.status is None
    assert str(caught.value) == f"cannot reach {cut_short_url}/sdapi/v1/samplers: the connection closed in the middle of the answer"


@pytest.mark.parametrize(
    "url",
    [
        "notaurl",
        "localhost:7860",
        f"alice:{SECRET}@localhost:7860",
        f"ftp://alice:{SECRET}@host",
        f"http://alice:{SECRET}@host:port",
        "http://",
    ],
)
def test_a_url_that_is_not_http_is_refused_at_once_without_credentials(url):
    with pytest.raises(ValueError, match=r"is not a WebUI URL: expected http\(s\)://HOST\[:PORT\]") as caught:
        WebUIClient(url)
    assert SECRET not in str(caught.value)


# -- auth ---------------------------------------------------------------------------

ROUTES = ["options", "samplers", "upscalers", "sd_models", "interrupt", "skip"]


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.001, api_auth=f"alice:{SECRET}")])
@pytest.mark.parametrize("route", ROUTES)
def test_auth_is_sent_on_every_route(webui_sim, webui_client, route):
    getattr(webui_client, route)()  # the fixture's client has the credentials
    with WebUIClient(webui_sim.url) as anonymous, pytest.raises(WebUIAuthError, match="Not authenticated"):
        getattr(anonymous, route)()
    with WebUIClient(webui_sim.url, auth=("alice", "wrong")) as wrong:
        with pytest.raises(WebUIAuthError, match="Incorrect username or password") as caught:
            getattr(wrong, route)()
    assert SECRET not in str(caught.value) and "wrong" not in str(caught.value)


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.001, api_auth=f"alice:{SECRET}")])
def test_auth_covers_generation_and_progress(webui_sim, webui_client):
    assert webui_client.txt2img(TXT2IMG).images
    assert webui_client.supports_task_progress()
    with WebUIClient(webui_sim.url) as anonymous:
        with pytest.raises(WebUIAuthError):
            anonymous.txt2img(TXT2IMG)


# -- the environment: read once, when the client is made --------------------------


def test_a_proxy_from_the_environment_carries_every_call(routes, monkeypatch):
    answer = (200, [{"name": "Euler"}], "application/json")
    proxy, asked = routes({"http://webui.invalid:7860/sdapi/v1/samplers": answer})
    for name in ("no_proxy", "NO_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy)
    with WebUIClient("http://webui.invalid:7860", retries=0) as client:
        assert client.samplers() == [{"name": "Euler"}]
        assert client.samplers() == [{"name": "Euler"}]
    assert asked == {"http://webui.invalid:7860/sdapi/v1/samplers": 2}


def test_a_proxy_set_after_the_client_is_made_is_not_used(routes, closed_port_url, monkeypatch):
    url, asked = routes({"/sdapi/v1/samplers": (200, [{"name": "Euler"}], "application/json")})
    for name in ("no_proxy", "NO_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with WebUIClient(url, retries=0) as client:
        monkeypatch.setenv("HTTP_PROXY", closed_port_url)  # would refuse every call
        assert client.samplers() == [{"name": "Euler"}]
    assert asked == {"/sdapi/v1/samplers": 1}


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.001, api_auth=f"alice:{SECRET}")])
def test_credentials_from_netrc_are_sent(webui_sim, tmp_path, monkeypatch):
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login alice password {SECRET}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    with WebUIClient(webui_sim.url) as client:
        assert client.samplers()
        assert client.txt2img(TXT2IMG).images
        assert SECRET not in repr(client) and repr(client).endswith("auth=***)")
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    with WebUIClient(webui_sim.url) as anonymous, pytest.raises(WebUIAuthError):
        anonymous.samplers()


def test_credentials_in_the_url_never_show(closed_port_url):
    url = closed_port_url.replace("http://", f"http://alice:{SECRET}@")
    client = WebUIClient(url, retries=0)
    assert SECRET not in repr(client) and SECRET not in client.base_url
    assert repr(client).endswith("auth=***)")
    with pytest.raises(WebUIUnreachable) as caught:
        client.options()
    assert SECRET not in str(caught.value)


def test_generation_waits_without_a_read_timeout_by_default():
    assert Timeouts().generation is None
    assert Timeouts().short == (3.0, 5.0)
