"""What the client's errors say: never a credential, how long a timeout waited, no HTML pasted.

Each server here is real, on 127.0.0.1: the simulated WebUI, a canned answer,
or a socket that takes a connection and never answers.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from sdjobs.client import (
    Timeouts,
    WebUIClient,
    WebUIError,
    WebUINotFound,
    WebUIServerError,
    WebUITimeout,
    parse_base_url,
)
from sdjobs.sim import SimSettings

#: A password a user types as it is, unencoded, into `--webui`.
SECRET = "s3cr/t@#?x"

TXT2IMG = {"prompt": "a lighthouse", "seed": 1234, "steps": 2, "width": 64, "height": 64}

HTML_404 = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>"


# -- credentials ----------------------------------------------------------------------


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.001, api_auth=f"alice:{SECRET}")])
def test_a_password_with_unencoded_delimiters_is_sent_and_never_shown(webui_sim):
    url = webui_sim.url.replace("http://", f"http://alice:{SECRET}@")
    with WebUIClient(url) as client:
        assert client.base_url == webui_sim.url
        assert client.samplers()  # the server took the credentials
        assert SECRET not in repr(client)


def test_percent_encoded_credentials_are_decoded():
    with WebUIClient("http://alice:s3cr%2Ft@127.0.0.1:7860") as client:
        assert client._session.auth == ("alice", "s3cr/t")
        assert client.base_url == "http://127.0.0.1:7860"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"ftp://alice:{SECRET}@host", "ftp://host"),
        (f"alice:{SECRET}@host:7860", "host:7860"),
        (f"http://alice:{SECRET}@", "http://"),
        (f"http://alice:{SECRET}@host:port", "http://host:port"),
    ],
)
def test_a_malformed_url_is_named_without_its_credentials(url, shown):
    with pytest.raises(ValueError) as caught:
        WebUIClient(url)
    assert str(caught.value) == f"{shown!r} is not a WebUI URL: expected http(s)://HOST[:PORT]"
    for text in (str(caught.value), repr(caught.value)):
        assert "s3cr" not in text and "alice" not in text


def test_the_usage_error_of_a_malformed_webui_never_shows_the_password(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('name = "x"\nprompt = "p"\n[[stages]]\ntype = "txt2img"\n')
    url = f"ftp://alice:{SECRET}@127.0.0.1:7860"
    ran = subprocess.run(
        [sys.executable, "-m", "sdjobs", "run", str(job), "--webui", url, "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ran.returncode == 2
    assert "s3cr" not in ran.stderr + ran.stdout
    assert "'ftp://127.0.0.1:7860' is not a WebUI URL" in ran.stderr


# -- timeouts -------------------------------------------------------------------------


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A server that takes the connection (the kernel's backlog does) and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture
def full_url() -> Iterator[str]:
    """A server whose backlog is full: a new connection is never accepted."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        with socket.create_connection(server.getsockname(), timeout=5):  # takes the one place
            yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture
def stalled_url() -> Iterator[str]:
    """A server that sends its headers and the start of the body, then nothing until the test ends."""
    done = threading.Event()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def answer() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"images\":")
            done.wait(30)

    answering = threading.Thread(target=answer, daemon=True)
    answering.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    done.set()
    answering.join(timeout=5)
    server.close()


def test_a_generation_that_gets_no_answer_times_out_after_the_generation_timeout(silent_url):
    with WebUIClient(silent_url, timeouts=Timeouts(generation=0.2)) as client:
        with pytest.raises(WebUITimeout) as caught:
            client.txt2img(TXT2IMG)
    assert caught.value.seconds == 0.2
    assert str(caught.value) == f"{silent_url}/sdapi/v1/txt2img: no answer: timed out after 0.2 s"


def test_a_short_call_says_how_long_it_waited(silent_url):
    with WebUIClient(silent_url, timeouts=Timeouts(read=0.1), retries=0) as client:
        with pytest.raises(WebUITimeout, match=r"no answer: timed out after 0\.1 s$"):
            client.samplers()


def test_an_answer_that_stops_midway_times_out_too(stalled_url):
    with WebUIClient(stalled_url, timeouts=Timeouts(generation=0.2)) as client:
        with pytest.raises(WebUITimeout, match=r"no answer: timed out after 0\.2 s$"):
            client.txt2img(TXT2IMG)


def test_a_connection_that_cannot_be_opened_says_so_and_how_long_it_waited(full_url):
    with WebUIClient(full_url, timeouts=Timeouts(connect=0.2), retries=0) as client:
        with pytest.raises(WebUITimeout) as caught:
            client.samplers()
    assert str(caught.value) == f"{full_url}/sdapi/v1/samplers: could not connect: timed out after 0.2 s"
    assert "connection failed" not in str(caught.value)
    assert caught.value.down  # no server there yet: worth waiting for, unlike one that went silent


def test_setting_options_waits_as_long_as_a_generation(silent_url):
    """Setting options may load a model: it waits the generation timeout, not the short calls' one."""
    with WebUIClient(silent_url, timeouts=Timeouts(read=2.0, generation=0.1), retries=0) as client:
        with pytest.raises(WebUITimeout) as caught:
            client.set_options({"sd_model_checkpoint": "other.safetensors"})
    assert str(caught.value) == f"{silent_url}/sdapi/v1/options: no answer: timed out after 0.1 s"


# -- answers that are not what a WebUI sends -------------------------------------------------


def test_an_html_error_page_is_summarised_not_pasted(canned_server):
    with pytest.raises(WebUINotFound) as caught:
        WebUIClient(canned_server(404, HTML_404), retries=0).samplers()
    assert "HTML page" in str(caught.value) and "--api" in str(caught.value)
    assert "<" not in str(caught.value)


def test_an_html_page_instead_of_json_is_named(canned_server):
    with pytest.raises(WebUIError, match="the answer is an HTML page, not JSON: is this a WebUI started with --api"):
        WebUIClient(canned_server(200, HTML_404), retries=0).samplers()


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    "body",
    [
        DEEP,
        b'{"detail": %s}' % (b"[" * 500 + b"]" * 500),
        b'{"detail": [{"loc": ["body", %s], "msg": "bad"}]}' % (b"[" * 500 + b"]" * 500),
        b'{"error": {"a": %s}}' % (b'{"a": ' * 500 + b"1" + b"}" * 500),
    ],
    ids=["deep-body", "deep-detail", "deep-loc", "deep-error"],
)
def test_a_deeply_nested_error_is_a_short_message(canned_server, body):
    with pytest.raises(WebUIServerError) as caught:
        WebUIClient(canned_server(500, body), retries=0).options()
    assert len(str(caught.value)) < 700


def test_a_deeply_nested_answer_is_a_webui_error(canned_server):
    url = canned_server(200, DEEP)
    with pytest.raises(WebUIError) as caught:
        WebUIClient(url, retries=0).options()
    assert str(caught.value) == f"{url}/sdapi/v1/options answered 200: the answer is nested too deeply to read"


# -- base URLs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "base", "auth"),
    [
        ("http://127.0.0.1:7860/", "http://127.0.0.1:7860", None),
        ("https://GPU-BOX/", "https://GPU-BOX", None),
        ("http://alice:pa:ss@host:7860", "http://host:7860", ("alice", "pa:ss")),
        ("https://alice:pa://ss@host", "https://host", ("alice", "pa://ss")),
    ],
    ids=["trailing slash", "https", "password with a colon", "password with a scheme's delimiter"],
)
def test_a_base_url_is_split_into_the_url_called_and_the_credentials(url, base, auth):
    assert parse_base_url(url) == (base, auth)
