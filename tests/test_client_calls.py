"""Each `WebUIClient` call against the simulated WebUI, and against small real servers for the
answers the simulator never gives (odd shapes, HTML pages, a 500 while we ask about task ids)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from runner_helpers import Background
from urllib3.util.retry import Retry

from sdjobs.client import Timeouts, WebUIClient, WebUIError, WebUITimeout, WebUIUnreachable
from sdjobs.sim import SimSettings

TXT2IMG = {"prompt": "a lighthouse", "seed": 1234, "steps": 3, "width": 64, "height": 64}

# -- generation, lists and settings on the simulator ---------------------------------------


def test_each_generation_route_answers_through_generate(webui_client):
    made = webui_client.generate("txt2img", TXT2IMG)
    again = webui_client.generate("img2img", {**TXT2IMG, "init_images": [_b64(made.images[0])]}, force_task_id="mine")
    upscaled = webui_client.generate("extra-single-image", {"image": _b64(made.images[0]), "upscaling_resize": 2})
    assert len(made.images) == len(again.images) == len(upscaled.images) == 1
    assert webui_client.internal_progress("mine").completed  # img2img went with our task id
    assert set(upscaled.info) == {"html_info"} and upscaled.info["html_info"]


def _b64(png: bytes) -> str:
    import base64

    return base64.b64encode(png).decode()


def test_options_are_set_and_read_back(webui_client):
    webui_client.set_options({"show_progress_every_n_steps": 3})
    assert webui_client.options()["show_progress_every_n_steps"] == 3


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.0, version="1.10")])
def test_the_lists_of_a_server_that_has_them(webui_client):
    assert {"Karras", "Automatic"} <= {scheduler["label"] for scheduler in webui_client.schedulers()}
    assert isinstance(webui_client.sd_vae(), list) and isinstance(webui_client.loras(), list)
    assert "face_yolov8n.pt" in webui_client.adetailer_models()
    assert "ad_model" in webui_client.adetailer_schema()["properties"]
    assert webui_client.upscalers() and webui_client.sd_models()


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.0, version="1.7")])
def test_a_list_an_older_server_lacks_is_none(webui_client):
    assert webui_client.schedulers() is None


def test_lists_and_answers_of_the_wrong_shape_are_webui_errors(routes):
    url, _ = routes({
        "/sdapi/v1/upscalers": (200, {"name": "Lanczos"}, "application/json"),
        "/sdapi/v1/sd-models": (200, {"title": "x"}, "application/json"),
        "/sdapi/v1/loras": (200, {"name": "x"}, "application/json"),
        "/sdapi/v1/options": (200, [1], "application/json"),
        "/adetailer/v1/ad_model": (200, ["face_yolov8n.pt"], "application/json"),
        "/adetailer/v1/schema": (200, [], "application/json"),
    })  # fmt: skip
    client = WebUIClient(url, retries=0)
    for call, wanted in (("upscalers", "an array"), ("sd_models", "an array"), ("loras", "an array"),
                         ("options", "an object"), ("adetailer_models", "an object"), ("adetailer_schema", "an object")):  # fmt: skip
        with pytest.raises(WebUIError, match=f"expected {wanted}, got "):
            getattr(client, call)()
    assert client.sd_vae() is None and client.schedulers() is None  # 404: not listed
    with pytest.raises(WebUIError) as error:
        client.options()
    assert str(error.value) == f"{url}/sdapi/v1/options answered 200: expected an object, got an array"


def test_adetailers_models_must_be_an_array(routes):
    url, _ = routes({"/adetailer/v1/ad_model": (200, {"ad_model": "face_yolov8n.pt"}, "application/json")})
    with pytest.raises(WebUIError) as error:
        WebUIClient(url, retries=0).adetailer_models()
    assert str(error.value) == f"{url}/adetailer/v1/ad_model answered 200: expected an array in 'ad_model', got a string"
    url, _ = routes({})
    assert WebUIClient(url, retries=0).adetailer_models() is None  # no ADetailer


@pytest.mark.parametrize(
    ("route", "call", "body"),
    [
        ("txt2img", lambda client: client.txt2img(TXT2IMG), {"images": ["not base64!"]}),
        ("img2img", lambda client: client.img2img(TXT2IMG), {"images": ["not base64!"]}),
        ("extra-single-image", lambda client: client.extra_single_image({}), {"image": "not base64!"}),
        ("txt2img", lambda client: client.txt2img(TXT2IMG), {"images": True}),
    ],
)
def test_a_bad_image_names_its_route(routes, route, call, body):
    url, _ = routes({f"/sdapi/v1/{route}": (200, body, "application/json")})
    with pytest.raises(WebUIError, match=f"^{url}/sdapi/v1/{route} answered 200: the answer has a bad image: ") as error:
        call(WebUIClient(url, retries=0))
    if body.get("images") is True:
        assert str(error.value).endswith("expected an array, got a boolean")


def test_an_extras_answer_without_an_image_has_none(routes):
    url, _ = routes({"/sdapi/v1/extra-single-image": (200, {"html_info": "<p>done</p>"}, "application/json")})
    result = WebUIClient(url, retries=0).extra_single_image({})
    assert result.images == () and result.info == {"html_info": "<p>done</p>"}


@pytest.mark.parametrize(
    ("info", "parsed"),
    [
        ("[1, 2]", {"text": "[1, 2]"}),  # JSON, but not an object
        (42, {"text": "42"}),  # not a string at all
        ("not json", {"text": "not json"}),
        ("Steps: 20, " * 40, {"text": "Steps: 20, " * 40}),  # not JSON, and kept whole however long
        ({"seed": 3}, {"seed": 3}),
    ],
)
def test_the_info_is_an_object_or_its_text(routes, info, parsed):
    url, _ = routes({"/sdapi/v1/txt2img": (200, {"images": [], "info": info}, "application/json")})
    assert WebUIClient(url, retries=0).txt2img(TXT2IMG).info == parsed


# -- what a failed answer says ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "kind", "detail"),
    [
        ("<html><body>Bad gateway</body></html>", "text/plain", "HTML"),  # an HTML page sent as text
        ("\n  <!DOCTYPE html><html></html>", None, "HTML"),  # after blank lines, no Content-Type
        ("Bad gateway", "text/html; charset=utf-8", "HTML"),  # said to be HTML
        ("oops", None, "the answer is not JSON"),
    ],
)
def test_an_answer_that_is_not_json_says_what_it_is(routes, body, kind, detail):
    url, _ = routes({"/sdapi/v1/samplers": (200, body, kind)})
    with pytest.raises(WebUIError) as error:
        WebUIClient(url, retries=0).samplers()
    wanted = "the answer is an HTML page, not JSON: is this a WebUI started with --api?" if detail == "HTML" else detail
    assert str(error.value) == f"{url}/sdapi/v1/samplers answered 200: {wanted}"


@pytest.mark.parametrize(
    ("detail", "message"),
    [
        ([{"loc": ["body", "override_settings", "sd_vae"], "msg": "bad"}], "override_settings.sd_vae: bad"),
        ([{"loc": ["body"], "msg": "not an object"}], "not an object"),  # the whole body: no place to name
        ([{"loc": "steps", "msg": "bad"}], "bad"),  # a place that is not a list is not spelt out
        ([{"loc": ["body", "steps"], "type": "missing"}], "steps: "),  # no message: the place alone
        (["a plain complaint"], "a plain complaint"),
        ("x" * 400, "x" * 300),
        ({"why": 1}, "{'why': 1}"),
    ],
)
def test_the_servers_detail_is_shown_briefly(routes, detail, message):
    url, _ = routes({"/sdapi/v1/txt2img": (422, {"detail": detail}, "application/json")})
    with pytest.raises(WebUIError) as error:
        WebUIClient(url, retries=0).txt2img(TXT2IMG)
    assert error.value.detail == message


def test_a_refused_connection_says_so_in_full(closed_port_url):
    with pytest.raises(WebUIUnreachable) as error:
        WebUIClient(closed_port_url, retries=0).samplers()
    assert str(error.value) == f"cannot reach {closed_port_url}/sdapi/v1/samplers: connection refused (is the WebUI running, with --api?)"


def test_a_client_shows_whether_it_has_credentials_never_them():
    assert repr(WebUIClient("http://127.0.0.1:1")) == "WebUIClient('http://127.0.0.1:1')"
    assert repr(WebUIClient("http://me:pw@127.0.0.1:1")) == "WebUIClient('http://127.0.0.1:1', auth=***)"


# -- a hung server: interrupt, ping, progress ---------------------------------------------------


@pytest.mark.parametrize("sim_settings", [SimSettings(hang=True)])
def test_an_interrupt_waits_for_its_answer_as_long_as_it_is_told(webui_sim):
    client = WebUIClient(webui_sim.url, timeouts=Timeouts(read=0.3), retries=0)
    with pytest.raises(WebUITimeout) as error:
        client.interrupt(timeout=0.1)
    assert (error.value.seconds, error.value.connecting) == (0.1, False)
    with pytest.raises(WebUITimeout) as error:
        client.interrupt()
    assert error.value.seconds == 0.3


@pytest.mark.parametrize("sim_settings", [SimSettings(hang=True)])
def test_a_progress_call_that_timed_out_says_so_until_one_is_answered(webui_sim):
    client = WebUIClient(webui_sim.url, timeouts=Timeouts(read=0.1), retries=0)
    assert client.internal_progress("ours") is None and client.progress_timed_out()
    webui_sim.hang(False)
    assert client.internal_progress("ours") is not None and not client.progress_timed_out()
    webui_sim.hang(True)
    assert client.get_progress() is None and client.progress_timed_out()
    webui_sim.hang(False)
    client.get_progress()
    assert not client.progress_timed_out()


def test_a_progress_call_that_failed_with_an_answer_did_not_time_out(routes):
    url, _ = routes({"/internal/progress": (500, {"error": "boom"}, "application/json")})
    client = WebUIClient(url, retries=0)
    assert client.internal_progress("ours") is None and not client.progress_timed_out()


def test_each_thread_knows_only_its_own_progress_calls(routes):
    url, _ = routes({})
    client = WebUIClient(url, retries=0)
    assert not client.progress_timed_out()
    assert not Background(client.progress_timed_out).join()


@pytest.mark.parametrize("sim_settings", [SimSettings(hang=True)])
def test_ping_raises_only_when_the_server_is_not_there(webui_sim, routes, closed_port_url):
    with pytest.raises(WebUITimeout):
        WebUIClient(webui_sim.url, timeouts=Timeouts(read=0.1), retries=0).ping()
    with pytest.raises(WebUIUnreachable) as error:
        WebUIClient(closed_port_url, retries=0).ping()
    assert error.value.down
    answering, _ = routes({"/sdapi/v1/progress": (500, {"error": "busy"}, "application/json")})
    WebUIClient(answering, retries=0).ping()  # an error answer is an answer
    gateway, _ = routes({"/sdapi/v1/progress": (502, "Bad Gateway", "text/plain")})
    with pytest.raises(WebUIError) as error:
        WebUIClient(gateway, retries=0).ping()
    assert error.value.status == 502 and error.value.down


# -- whether the server follows task ids ----------------------------------------------------------

A1111_PENDING = (200, {"size": 0, "tasks": []}, "application/json")
INACTIVE = (200, {"active": False, "queued": False, "completed": False}, "application/json")


@pytest.mark.parametrize(
    ("pending", "progress", "follows"),
    [
        (A1111_PENDING, INACTIVE, True),
        (A1111_PENDING, (200, {"active": False, "paused": False}, "application/json"), False),  # SD.Next
        ((200, {"size": 0}, "application/json"), INACTIVE, False),  # no task list
        ((200, [], "application/json"), INACTIVE, False),
        (A1111_PENDING, (200, {"active": True}, "application/json"), False),  # every id "active"
        (A1111_PENDING, (200, [], "application/json"), False),
        (A1111_PENDING, (422, {"detail": "no"}, "application/json"), False),
    ],
    ids=["a1111", "sdnext", "no task list", "pending not an object", "always active", "progress not an object", "refused"],
)
def test_task_ids_are_followed_only_by_a_server_that_answers_as_a1111(routes, pending, progress, follows):
    url, counts = routes({"/internal/pending-tasks": pending, "/internal/progress": progress})
    client = WebUIClient(url, retries=0)
    assert client.supports_task_progress() is follows and client.follows_task_ids is follows
    assert client.supports_task_progress() is follows
    assert counts["/internal/pending-tasks"] == 1  # a definite answer is remembered


@pytest.mark.parametrize("status", [500, 503])
def test_after_a_server_error_task_ids_are_asked_about_again(routes, status):
    url, counts = routes({"/internal/pending-tasks": (status, {"error": "starting"}, "application/json")})
    client = WebUIClient(url, retries=0)
    assert not client.supports_task_progress() and not client.supports_task_progress()
    assert counts["/internal/pending-tasks"] == 2


# -- what a request that went wrong says ----------------------------------------------------------


def test_each_way_a_request_can_go_wrong_is_named_with_its_url(routes, webui_sim):
    url, _ = routes({
        "/gzip": (200, b"not gzip at all", "application/json", None, {"Content-Encoding": "gzip"}),
        "/loop": (302, b"", None, None, {"Location": "/loop"}),
        "/sdapi/v1/txt2img": (200, {"images": []}, "application/json"),
    })  # fmt: skip
    client = WebUIClient(url, retries=0)
    for path, detail in (("/gzip", "the answer could not be decompressed"), ("/loop", "too many redirects")):
        with pytest.raises(WebUIError) as error:
            client._call("GET", path)
        assert (type(error.value), str(error.value)) == (WebUIError, f"{url}{path} answered None: {detail}")
    with pytest.raises(WebUIError) as error:
        client.txt2img({"cfg_scale": float("nan")})  # not JSON
    assert str(error.value) == f"{url}/sdapi/v1/txt2img answered None: the request failed (InvalidJSONError)"


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.001, drop_connection_at_step=2)])
def test_a_dropped_request_says_the_server_closed_it(webui_sim, webui_client):
    with pytest.raises(WebUIUnreachable) as error:
        webui_client.txt2img(TXT2IMG)
    assert str(error.value) == f"cannot reach {webui_sim.url}/sdapi/v1/txt2img: the server closed the connection without answering"


def test_a_server_that_cannot_be_found_is_a_failed_connection():
    url = "http://sdjobs-test.invalid:7860"  # a name that never resolves (RFC 2606)
    with pytest.raises(WebUIUnreachable) as error:
        WebUIClient(url, retries=0).samplers()
    assert str(error.value) == f"cannot reach {url}/sdapi/v1/samplers: connection failed"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ((500, {"detail": [{"loc": ["body", f"k{i}"], "msg": "bad"} for i in range(12)]}, "application/json"),
         "; ".join(f"k{i}: bad" for i in range(10))),  # ten at most
        ((500, {"error": {"code": 5}}, "application/json"), "{'code': 5}"),
        ((500, {"other": 1}, "application/json"), "{'other': 1}"),
        ((500, [1, 2], "application/json"), "[1, 2]"),
        ((500, "y" * 400, "text/plain"), "y" * 300),
        ((500, "", "text/plain", "Gateway Trouble"), "Gateway Trouble"),
        ((500, "", "text/plain", ""), "no message"),
        ((400, {"error": "bad request"}, "application/json"), "bad request"),
    ],
    ids=["ten validation errors", "error object", "unknown shape", "array", "long text", "reason", "nothing", "400"],
)
def test_an_error_answer_gives_the_servers_message_whatever_its_shape(routes, answer, message):
    url, _ = routes({"/sdapi/v1/samplers": answer})
    with pytest.raises(WebUIError) as error:
        WebUIClient(url, retries=0).samplers()
    assert (error.value.status, error.value.detail) == (answer[0], message)
    assert type(error.value).__name__ == ("WebUIServerError" if answer[0] >= 500 else "WebUIError")


def test_images_may_come_as_data_uris_and_must_be_strict_base64(routes):
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
    url, _ = routes({
        "/sdapi/v1/txt2img": (200, {"images": ["data:image/png;base64," + _b64(png)]}, "application/json"),
        "/sdapi/v1/img2img": (200, {"images": [_b64(png) + "$$"]}, "application/json"),
    })  # fmt: skip
    client = WebUIClient(url, retries=0)
    assert client.txt2img(TXT2IMG).images == (png,)
    with pytest.raises(WebUIError, match="bad image"):
        client.img2img(TXT2IMG)


@pytest.mark.parametrize("sim_settings", [SimSettings(stepping=True)])
def test_the_global_progress_carries_the_preview_only_when_asked(webui_sim, webui_client):
    webui_client.set_options({"show_progress_every_n_steps": 1})
    generation = Background(webui_client.txt2img, TXT2IMG)
    webui_sim.release(2)
    assert webui_sim.wait_for(lambda state: state.sampling_step >= 1)
    assert webui_client.get_progress().current_image is None  # by default: no image
    assert webui_client.get_progress(skip_current_image=False).current_image
    webui_sim.release(100)
    generation.join()


# -- which calls are asked again when the server is briefly unavailable ---------------------------

BUSY = (503, {"detail": "Service Unavailable"}, "application/json")
SAMPLERS = (200, [{"name": "Euler a"}], "application/json")


def test_a_list_asked_while_the_server_is_briefly_unavailable_is_asked_again(routes):
    url, counts = routes({"/sdapi/v1/samplers": [BUSY, BUSY, SAMPLERS]})
    assert WebUIClient(url).samplers() == [{"name": "Euler a"}]
    assert counts["/sdapi/v1/samplers"] == 3


@pytest.mark.parametrize("status", [502, 503, 504])
def test_each_answer_of_a_gateway_whose_server_is_down_is_asked_again(routes, status):
    url, counts = routes({"/sdapi/v1/samplers": [(status, "Bad Gateway", "text/plain"), SAMPLERS]})
    assert WebUIClient(url).samplers() == [{"name": "Euler a"}]
    assert counts["/sdapi/v1/samplers"] == 2


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """The waits urllib3 takes before each ask again, recorded instead of slept."""
    waited: list[float] = []
    monkeypatch.setattr(Retry, "_sleep_backoff", lambda retry: waited.append(retry.get_backoff_time()))
    return waited


def test_by_default_a_list_is_asked_four_times_in_all_waiting_longer_each_time(routes, waits):
    url, counts = routes({"/sdapi/v1/samplers": BUSY})
    with pytest.raises(WebUIError, match="503"):
        WebUIClient(url).samplers()
    assert counts["/sdapi/v1/samplers"] == 4  # the first ask and three more
    assert waits == [0, 0.4, 0.8]


def test_a_progress_sample_is_not_asked_again_even_when_no_connection_opens(closed_port_url, waits):
    """Unlike a list: a request not sent at all could be sent again, but the next sample is due anyway."""
    client = WebUIClient(closed_port_url)
    assert client.internal_progress("task(x)") is None
    assert client.get_progress() is None
    assert waits == []
    with pytest.raises(WebUIUnreachable):
        client.samplers()
    assert waits == [0, 0.4, 0.8]


def test_a_list_asked_of_a_server_that_stays_unavailable_fails_after_the_retries(routes):
    url, counts = routes({"/sdapi/v1/samplers": BUSY})
    with pytest.raises(WebUIError, match="503"):
        WebUIClient(url, retries=2).samplers()
    assert counts["/sdapi/v1/samplers"] == 3  # the first ask and two more


def test_a_generation_or_a_progress_sample_is_never_asked_again(routes):
    """A generation sent twice renders twice; a progress sample is worth nothing once the next is due."""
    url, counts = routes({"/sdapi/v1/txt2img": BUSY, "/sdapi/v1/progress": BUSY, "/internal/progress": BUSY})
    client = WebUIClient(url)
    with pytest.raises(WebUIError):
        client.generate("txt2img", TXT2IMG)
    assert client.get_progress() is None
    assert client.internal_progress("task(x)") is None
    assert counts == {"/sdapi/v1/txt2img": 1, "/sdapi/v1/progress": 1, "/internal/progress": 1}


@pytest.fixture
def dropping_server() -> Iterator[tuple[str, list[int]]]:
    """A server that reads each request and closes the connection unanswered; the list counts them."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)
    dropped = [0]
    stop = threading.Event()

    def drop() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            with connection:
                connection.recv(65536)
                dropped[0] += 1

    dropping = threading.Thread(target=drop, daemon=True)
    dropping.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", dropped
    stop.set()
    dropping.join(timeout=5)
    server.close()


def test_a_progress_sample_or_a_ping_whose_connection_drops_is_not_asked_again(dropping_server):
    url, dropped = dropping_server
    client = WebUIClient(url)
    assert client.get_progress() is None
    with pytest.raises(WebUIUnreachable, match="closed the connection without answering"):
        client.ping()
    assert dropped == [2]
    with pytest.raises(WebUIUnreachable):
        WebUIClient(url, retries=1).samplers()
    assert dropped == [4], "a list is asked again"


# -- a task's preview -------------------------------------------------------------------------------


@pytest.mark.parametrize("sim_settings", [SimSettings(stepping=True)])
def test_a_tasks_progress_carries_a_preview_only_when_asked_and_only_a_new_one(webui_sim, webui_client):
    webui_client.set_options({"show_progress_every_n_steps": 1})
    generation = Background(webui_client.txt2img, TXT2IMG, force_task_id="ours")
    webui_sim.release(2)
    assert webui_sim.wait_for(lambda state: state.sampling_step >= 1)
    assert webui_client.internal_progress("ours").live_preview is None  # by default: no preview
    first = webui_client.internal_progress("ours", preview=True)
    assert first.live_preview.startswith("data:image/png;base64,")
    again = webui_client.internal_progress("ours", preview=True, id_live_preview=first.id_live_preview)
    assert again.active and again.live_preview is None  # the one already had is not sent twice
    webui_sim.release(100)
    generation.join()
