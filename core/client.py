"""`WebUIClient`: the HTTP client for A1111, Forge and SD.Next.

One `requests.Session` per client.  Every call has a timeout; read-only GETs
retry transient failures with backoff, while the generation POSTs are never
retried (a retried txt2img is a second render).  Progress calls neither retry nor
raise: a sample that cannot be had is None, and the job goes on without it.
"""

from __future__ import annotations

import base64
import json
import logging
import reprlib
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, cast
from urllib.parse import unquote, urlsplit, urlunsplit

import attrs
import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, ReadTimeoutError
from urllib3.util.retry import Retry

from sdjobs.status import ProgressInfo, TaskProgress

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:7860"


@attrs.frozen
class Timeouts:
    """Seconds to wait, per kind of call.

    Attributes:
        connect: Time to open a connection, for every call.
        read: Time to wait for an answer to a short call (progress, interrupt, lists).
        generation: Time to wait for a generation's answer (and for setting
            options, which may load a model); None, the default, waits as long
            as the render takes (a 10-minute render is normal).  Set it to bound
            a server that takes the request and then never answers.

    A call that runs out of time raises `WebUITimeout`, which says which wait
    ran out and after how many seconds.
    """

    connect: float = 3.0
    read: float = 5.0
    generation: float | None = None

    @property
    def short(self) -> tuple[float, float]:
        return (self.connect, self.read)

    @property
    def long(self) -> tuple[float, float | None]:
        return (self.connect, self.generation)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class WebUIError(Exception):
    """A call to the WebUI failed.  The message names the URL, never credentials.

    Attributes:
        url: The URL called, without credentials.
        status: The HTTP status, or None when no answer came.
        detail: The server's own message, or what went wrong on the way.
    """

    def __init__(self, url: str, status: int | None, detail: str) -> None:
        self.url = url
        self.status = status
        self.detail = detail
        super().__init__(self._describe())

    def _describe(self) -> str:
        return f"{self.url} answered {self.status}: {self.detail}"

    @property
    def down(self) -> bool:
        """The server is not there to answer (a gateway's 502/503/504 says so for it): worth
        waiting for, and no verdict on the request."""
        return self.status in GATEWAY_DOWN


#: A gateway's answers for a server behind it that is down or restarting.
GATEWAY_DOWN = (502, 503, 504)


class WebUIUnreachable(WebUIError):
    """No answer: the connection was refused, dropped or timed out."""

    @property
    def down(self) -> bool:
        return True

    def _describe(self) -> str:
        return f"cannot reach {self.url}: {self.detail}"


class WebUITimeout(WebUIUnreachable):
    """No answer within the time allowed: the connection could not be opened, or the server went silent.

    Attributes:
        seconds: The time allowed, in seconds.
    """

    def __init__(self, url: str, seconds: float, detail: str, *, connecting: bool = False) -> None:
        self.seconds = seconds
        self.connecting = connecting
        super().__init__(url, None, detail)

    @property
    def down(self) -> bool:
        """Only a connection that could not be opened: a server that took it and went silent is hung."""
        return self.connecting

    def _describe(self) -> str:
        return f"{self.url}: {self.detail} after {self.seconds:g} s"


class WebUIAuthError(WebUIError):
    """401: credentials missing or wrong (`--api-auth`)."""

    def _describe(self) -> str:
        return f"{self.url} refused the credentials (401): {self.detail}"


class WebUINotFound(WebUIError):
    """404: no such route on this server (e.g. `--nowebui`), or a named thing is missing."""

    def _describe(self) -> str:
        return f"{self.url} not found (404): {self.detail}"


class WebUIServerError(WebUIError):
    """5xx: the server failed while handling the call."""

    def _describe(self) -> str:
        return f"{self.url} failed ({self.status}): {self.detail}"


#: What an HTML page in place of a JSON answer most likely means.
HTML_PAGE = "the answer is an HTML page, not JSON: is this a WebUI started with --api?"

#: Shows a server's value briefly; limits depth, so a deeply nested one cannot recurse.
_EXCERPT = reprlib.Repr()
_EXCERPT.maxlevel, _EXCERPT.maxstring, _EXCERPT.maxother, _EXCERPT.maxlong = 3, 300, 300, 40


def _excerpt(value: Any) -> str:
    """A server's value, at most about 300 characters, whatever its size or depth."""
    return value[:300] if isinstance(value, str) else _EXCERPT.repr(value)


def _is_html(response: requests.Response) -> bool:
    kind = response.headers.get("Content-Type", "")
    return "html" in kind or response.text.lstrip()[:15].lower().startswith(("<!doctype html", "<html"))


def _server_message(response: requests.Response) -> str:
    """The server's explanation, from whichever error shape it sent.

    A1111 puts it in `errors`, Forge in `message`, FastAPI in `detail` (a string,
    or a list of validation errors), SD.Next in `errors` or `detail`.  An HTML
    page (a proxy's, or a server without `--api`) is named, not pasted.
    """
    try:
        body = response.json()
    except (ValueError, RecursionError):
        if _is_html(response):
            return HTML_PAGE
        return response.text.strip()[:300] or response.reason or "no message"
    if not isinstance(body, Mapping):
        return _excerpt(body)
    for key in ("errors", "message"):
        if isinstance(body.get(key), str) and body[key]:
            return body[key]
    detail = body.get("detail")
    if isinstance(detail, list):
        return "; ".join(_validation_message(item) for item in detail[:10])
    if detail:
        return _excerpt(detail)
    return _excerpt(body.get("error") or body)


def _validation_message(item: Any) -> str:
    if not isinstance(item, Mapping):
        return _excerpt(item)
    loc = item.get("loc")
    parts = loc if isinstance(loc, list) else ()
    where = ".".join(_excerpt(part) for part in parts if part != "body")
    message = _excerpt(item.get("msg", ""))
    return f"{where}: {message}" if where else message


_ERRORS_BY_STATUS: dict[int, type[WebUIError]] = {401: WebUIAuthError, 404: WebUINotFound}


def _error_for(response: requests.Response, url: str) -> WebUIError:
    status = response.status_code
    cls = _ERRORS_BY_STATUS.get(status, WebUIServerError if status >= 500 else WebUIError)
    return cls(url, status, _server_message(response))


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@attrs.frozen
class GenerationResult:
    """The answer of txt2img, img2img or extra-single-image.

    Attributes:
        images: The images as encoded bytes (PNG unless the server is set otherwise).
        info: The parsed `info` (A1111 sends it as a JSON string); empty for extras.
        parameters: The request as the server echoed it, defaults filled in.
    """

    images: tuple[bytes, ...]
    info: Mapping[str, Any] = attrs.field(factory=dict, repr=False)
    parameters: Mapping[str, Any] = attrs.field(factory=dict, repr=False)

    @property
    def seeds(self) -> tuple[int, ...]:
        """The seeds the server says it used, one per image."""
        seeds = self.info.get("all_seeds") or ([self.info["seed"]] if "seed" in self.info else [])
        return tuple(int(seed) for seed in seeds)

    @property
    def infotexts(self) -> tuple[str, ...]:
        return tuple(self.info.get("infotexts") or ())


def _decode_image(data: Any) -> bytes:
    """The bytes of one base64 image, with or without a `data:` prefix; ValueError if it is not one."""
    if not isinstance(data, str):
        raise ValueError(f"expected a base64 string, got {_json_type(data)}")
    _, _, payload = data.rpartition("base64,")
    return base64.b64decode(payload, validate=True)  # binascii.Error is a ValueError


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages about an unexpected answer."""
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), (str, "a string"), ((int, float), "a number")):
        if isinstance(value, kind):
            return name
    return "an array" if isinstance(value, list) else "an object"


def _parse_info(raw: Any) -> Mapping[str, Any]:
    if isinstance(raw, Mapping):
        return raw
    if not raw:
        return {}
    text = raw if isinstance(raw, str) else _excerpt(raw)
    try:
        info = json.loads(raw)
    except (TypeError, ValueError, RecursionError):
        return {"text": text}
    return info if isinstance(info, Mapping) else {"text": text}


# ---------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------


def parse_base_url(url: str) -> tuple[str, tuple[str, str] | None]:
    """The URL without `user:pass@`, and those credentials (percent-decoded).

    The credentials end at the URL's last `@`, so a password may hold `/`, `?`,
    `#` or `@` unencoded.  Raises ValueError, naming the URL without its
    credentials, unless it is http(s) with a host and, if any, a numeric port.
    """
    scheme, sep, rest = url.partition("://") if "://" in url else ("", "", url)
    userinfo, at, hostpart = rest.rpartition("@")
    shown = f"{scheme}{sep}{hostpart}"
    try:
        parts = urlsplit(shown.rstrip("/"))
        parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        parts = urlsplit("")  # not valid either
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{shown!r} is not a WebUI URL: expected http(s)://HOST[:PORT]")
    if not at:
        return urlunsplit(parts), None
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts), (unquote(user), unquote(password))


class WebUIClient:
    """Talks to one WebUI over HTTP.

    Safe for the way sdjobs shares it between threads: one generation call at a
    time on one thread, progress polls on another, interrupts on a third.  They
    share one `requests.Session`, whose urllib3 connection pool hands each
    concurrent request its own connection; nothing else in the session changes
    after `__init__`.  Two generation calls at once are not supported.

    A read-only call (GET) that finds no connection, or a gateway's 502, 503 or 504, is asked again
    up to ``retries`` times, after 0, 0.4, 0.8, 1.6 ... s; a generation, an interrupt or a progress
    sample is never asked again.  Raises ValueError at once for a URL that is not http(s) with a host.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        auth: tuple[str, str] | None = None,
        timeouts: Timeouts = Timeouts(),
        retries: int = 3,
    ) -> None:
        self.base_url, url_auth = parse_base_url(base_url)
        self.timeouts = timeouts
        self._session = requests.Session()
        # What requests reads from the environment for every call (proxies, a CA bundle, ~/.netrc) is
        # read once, here: it costs a quarter of a millisecond a call, and a job makes dozens.
        found = self._session.merge_environment_settings(self.base_url, {}, None, None, None)
        self._session.proxies, self._session.verify = found["proxies"], found["verify"]
        self._session.auth = auth or url_auth or requests.utils.get_netrc_auth(self.base_url)
        self._session.trust_env = False
        retry = Retry(
            total=retries,
            backoff_factor=0.2,
            status_forcelist=(502, 503, 504),
            allowed_methods=frozenset({"GET"}),
            raise_on_status=False,
        )
        self._session.mount(self.base_url, HTTPAdapter(max_retries=retry))
        # A progress sample is worth nothing once the next one is due: never retry it.
        for path in ("/sdapi/v1/progress", "/internal/progress"):
            self._session.mount(self.base_url + path, HTTPAdapter(max_retries=0))
        self._task_progress: bool | None = None
        self._progress_calls = threading.local()

    def __repr__(self) -> str:
        auth = ", auth=***" if self._session.auth else ""
        return f"WebUIClient({self.base_url!r}{auth})"

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> WebUIClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        timeout: tuple[float, float | None] | None = None,
        expect: type[dict] | type[list] | None = None,
    ) -> Any:
        """The parsed JSON answer; WebUIError for anything else.

        With ``expect``, an answer of another JSON type is a WebUIError too.
        """
        url = self.base_url + path
        timeout = timeout or self.timeouts.short
        try:
            response = self._session.request(method, url, json=json_body, params=params, timeout=timeout)
        except requests.RequestException as exc:
            raise _request_error(exc, url, timeout) from exc
        if response.status_code >= 400:
            raise _error_for(response, url)
        try:
            body = response.json()
        except ValueError as exc:
            detail = HTML_PAGE if _is_html(response) else "the answer is not JSON"
            raise WebUIError(url, response.status_code, detail) from exc
        except RecursionError as exc:
            raise WebUIError(url, response.status_code, "the answer is nested too deeply to read") from exc
        if expect is not None and not isinstance(body, expect):
            wanted = _json_type(expect())
            raise WebUIError(url, response.status_code, f"expected {wanted}, got {_json_type(body)}")
        return body

    def _generate(self, route: str, payload: Mapping[str, Any], force_task_id: str | None) -> dict[str, Any]:
        body = dict(payload)
        if force_task_id is not None:
            body["force_task_id"] = force_task_id
        return self._call(
            "POST", f"/sdapi/v1/{route}", json_body=body, timeout=self.timeouts.long, expect=dict
        )

    def _decode_images(self, route: str, encoded: Any) -> tuple[bytes, ...]:
        """The images of a generation answer; WebUIError if one is not base64."""
        try:
            if not isinstance(encoded, list):
                raise ValueError(f"expected an array, got {_json_type(encoded)}")
            return tuple(_decode_image(image) for image in encoded)
        except ValueError as exc:
            url = f"{self.base_url}/sdapi/v1/{route}"
            raise WebUIError(url, 200, f"the answer has a bad image: {exc}") from exc

    def _generation_result(self, route: str, body: Mapping[str, Any]) -> GenerationResult:
        return GenerationResult(
            images=self._decode_images(route, body.get("images") or []),
            info=_parse_info(body.get("info")),
            parameters=body.get("parameters") or {},
        )

    # -- generation ---------------------------------------------------------

    def txt2img(
        self, payload: Mapping[str, Any], *, force_task_id: str | None = None
    ) -> GenerationResult:
        """Run a txt2img request; block until the server answers.

        An interrupted request still answers 200, with the images finished so far.
        """
        return self._generation_result("txt2img", self._generate("txt2img", payload, force_task_id))

    def img2img(
        self, payload: Mapping[str, Any], *, force_task_id: str | None = None
    ) -> GenerationResult:
        """Run an img2img request (ADetailer stages too); block until it answers."""
        return self._generation_result("img2img", self._generate("img2img", payload, force_task_id))

    def extra_single_image(self, payload: Mapping[str, Any]) -> GenerationResult:
        """Upscale one image through extras.  Extras take no task id."""
        body = self._generate("extra-single-image", payload, None)
        image = body.get("image")
        return GenerationResult(
            images=self._decode_images("extra-single-image", [image] if image else []),
            info={"html_info": body.get("html_info")},
        )

    def generate(
        self, endpoint: str, payload: Mapping[str, Any], *, force_task_id: str | None = None
    ) -> GenerationResult:
        """Call the generation route ``endpoint`` (`txt2img`, `img2img`, `extra-single-image`)."""
        if endpoint == "extra-single-image":
            return self.extra_single_image(payload)
        call = {"txt2img": self.txt2img, "img2img": self.img2img}[endpoint]
        return call(payload, force_task_id=force_task_id)

    # -- control ------------------------------------------------------------

    def interrupt(self, *, timeout: float | None = None) -> None:
        """Stop whatever the server is generating, whoever started it; ``timeout`` bounds the wait for
        the answer, once connected, instead of `Timeouts.read` (a frozen server takes the connection
        and answers nothing; a busy machine may be slow to take it)."""
        wait = None if timeout is None else (self.timeouts.connect, timeout)
        self._call("POST", "/sdapi/v1/interrupt", timeout=wait)

    def skip(self) -> None:
        """End the current iteration early; the request goes on with the next."""
        self._call("POST", "/sdapi/v1/skip")

    # -- progress -----------------------------------------------------------

    def get_progress(self, *, skip_current_image: bool = True) -> ProgressInfo | None:
        """The server's global progress; None when idle, and on any failure.

        Never raises, whatever the server answers (or fails to): a failed,
        timed-out or unusable sample is simply missing, so a poller or probe
        calling this cannot die of it.
        """
        try:
            body = self._call(
                "GET",
                "/sdapi/v1/progress",
                params={"skip_current_image": str(skip_current_image).lower()},
            )
            info = ProgressInfo.from_response(body)
        except Exception as exc:  # the promise above: nothing a server sends escapes
            log.debug("progress sample failed: %s", exc)
            self._progress_calls.timed_out = isinstance(exc, WebUITimeout)
            return None
        self._progress_calls.timed_out = False
        return None if info.idle else info

    def internal_progress(
        self, task_id: str, *, preview: bool = False, id_live_preview: int = -1
    ) -> TaskProgress | None:
        """Progress of the task we sent as `force_task_id`; None on any failure.

        Never raises, as `get_progress`.  Always sends the id: without one the
        server answers "active" for nothing.
        """
        body = {"id_task": task_id, "id_live_preview": id_live_preview, "live_preview": preview}
        try:
            task = TaskProgress.from_response(self._call("POST", "/internal/progress", json_body=body))
        except Exception as exc:  # never raises, as get_progress
            log.debug("task progress sample failed: %s", exc)
            self._progress_calls.timed_out = isinstance(exc, WebUITimeout)
            return None
        self._progress_calls.timed_out = False
        return task

    def progress_timed_out(self) -> bool:
        """Whether this thread's last progress call (`get_progress`, `internal_progress`) got no
        answer in time: a None sample that is evidence of a hung server, where an error answer is not."""
        return getattr(self._progress_calls, "timed_out", False)

    def ping(self) -> None:
        """Ask the server for its progress once, never retried: returns if it answered at all
        (an error status included); raises WebUIError (`WebUIError.down`, `WebUITimeout`) if not."""
        try:
            self._call("GET", "/sdapi/v1/progress", params={"skip_current_image": "true"})
        except WebUIError as exc:
            if exc.down or isinstance(exc, WebUITimeout):
                raise

    def supports_task_progress(self) -> bool:
        """Whether this server follows our `force_task_id` through `/internal/progress`.

        True on A1111 and Forge ≥ 1.8 with the UI; false with `--nowebui` (no
        route), on SD.Next (no task ids for API jobs) and on older servers (no
        `/internal/pending-tasks`).  A definite answer is remembered; after no
        answer or a 5xx this says False and asks again next time.
        """
        if self._task_progress is None:
            detected = self._detect_task_progress()
            if detected is not None:
                self._task_progress = detected
            return bool(detected)
        return self._task_progress

    @property
    def follows_task_ids(self) -> bool:
        """What `supports_task_progress` last found, without asking: False until it knows."""
        return bool(self._task_progress)

    def _detect_task_progress(self) -> bool | None:
        """Whether the server follows task ids; None when it could not tell (no answer, or 5xx)."""
        probe = f"sdjobs-probe-{uuid.uuid4().hex}"
        try:
            pending = self._call("GET", "/internal/pending-tasks")
            answer = self._call(
                "POST", "/internal/progress", json_body={"id_task": probe, "live_preview": False}
            )
        except WebUIError as exc:
            if exc.status is None or exc.status >= 500:
                log.debug("cannot tell whether the server follows task ids yet: %s", exc)
                return None
            return False
        return (
            isinstance(pending, Mapping)
            and "tasks" in pending
            and isinstance(answer, Mapping)
            and answer.get("active") is False
            and "paused" not in answer  # SD.Next answers, but never for API jobs
        )

    # -- lists and settings -------------------------------------------------

    def options(self) -> Mapping[str, Any]:
        return self._call("GET", "/sdapi/v1/options", expect=dict)

    def set_options(self, options: Mapping[str, Any]) -> None:
        self._call("POST", "/sdapi/v1/options", json_body=dict(options), timeout=self.timeouts.long)

    def samplers(self) -> Sequence[Mapping[str, Any]]:
        return self._call("GET", "/sdapi/v1/samplers", expect=list)

    def upscalers(self) -> Sequence[Mapping[str, Any]]:
        return self._call("GET", "/sdapi/v1/upscalers", expect=list)

    def sd_models(self) -> Sequence[Mapping[str, Any]]:
        return self._call("GET", "/sdapi/v1/sd-models", expect=list)

    def schedulers(self) -> Sequence[Mapping[str, Any]] | None:
        """The schedulers of A1111 1.9 and later; None for an older server (404), whose sampler names carry them."""
        return self._optional_list("/sdapi/v1/schedulers")

    def sd_vae(self) -> Sequence[Mapping[str, Any]] | None:
        """The VAEs the server can load; None when it does not list them (404)."""
        return self._optional_list("/sdapi/v1/sd-vae")

    def loras(self) -> Sequence[Mapping[str, Any]] | None:
        """The LoRAs the server has; None when it does not list them (404)."""
        return self._optional_list("/sdapi/v1/loras")

    def _optional_list(self, path: str) -> Sequence[Mapping[str, Any]] | None:
        try:
            return self._call("GET", path, expect=list)
        except WebUINotFound:
            return None

    def adetailer_models(self) -> Sequence[str] | None:
        """ADetailer's model names; None when the extension is not installed."""
        path = "/adetailer/v1/ad_model"
        try:
            models = self._call("GET", path, expect=dict).get("ad_model")
        except WebUINotFound:
            return None
        if not isinstance(models, list):
            raise WebUIError(self.base_url + path, 200, f"expected an array in 'ad_model', got {_json_type(models)}")
        return models

    def adetailer_schema(self) -> Mapping[str, Any] | None:
        """ADetailer's JSON schema of a tab's settings; None without the extension."""
        try:
            return self._call("GET", "/adetailer/v1/schema", expect=dict)
        except WebUINotFound:
            return None


def _request_error(
    exc: requests.RequestException, url: str, timeout: tuple[float, float | None]
) -> WebUIError:
    """The WebUIError for a request that got no usable answer; ``timeout`` is what it was allowed."""
    connect, read = timeout
    if isinstance(exc, requests.ConnectTimeout):
        return WebUITimeout(url, connect, "could not connect: timed out", connecting=True)
    if isinstance(exc, requests.ReadTimeout) or _read_timed_out(exc):
        return WebUITimeout(url, cast(float, read), "no answer: timed out")  # None never times out
    if isinstance(exc, requests.ConnectionError):
        return WebUIUnreachable(url, None, _connection_problem(exc))
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return WebUIUnreachable(url, None, "the connection closed in the middle of the answer")
    if isinstance(exc, requests.exceptions.ContentDecodingError):
        return WebUIError(url, None, "the answer could not be decompressed")
    if isinstance(exc, requests.TooManyRedirects):
        return WebUIError(url, None, "too many redirects")
    return WebUIError(url, None, f"the request failed ({type(exc).__name__})")


def _read_timed_out(exc: requests.RequestException) -> bool:
    """Whether a ConnectionError is a read timeout in disguise.

    requests wraps urllib3's ReadTimeoutError in a ConnectionError when the
    server goes silent in the middle of the body, or when a retried GET used up
    its retries on timeouts.
    """
    cause = exc.args[0] if exc.args else None
    if isinstance(cause, MaxRetryError):
        cause = cause.reason
    return isinstance(cause, ReadTimeoutError)


def _connection_problem(exc: requests.ConnectionError) -> str:
    text = str(exc)
    if "Connection refused" in text or "NewConnectionError" in text:
        return "connection refused (is the WebUI running, with --api?)"
    if "RemoteDisconnected" in text or "Connection aborted" in text:
        return "the server closed the connection without answering"
    return "connection failed"
