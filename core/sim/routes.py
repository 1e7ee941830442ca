"""The HTTP API of A1111 (`modules/api/api.py`, `modules/progress.py`) over the simulated state.

`Api.handle` takes a parsed request and gives a status and a JSON body; it knows
nothing of sockets.  Routing, body decoding, authentication and error shapes follow
FastAPI and A1111's middleware in that order: unknown path 404, wrong method 405,
malformed JSON 422, missing credentials 401, invalid fields 422, then the route.
"""

from __future__ import annotations

import base64
import binascii
import random
import secrets
import string
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from . import images
from .adetailer import adetailer_run
from .catalog import Catalog
from .engine import ConnectionDropped, Engine, Generated, Generation
from .errors import ApiError
from .settings import SimSettings
from .state import SharedState, SimulatorClosed, StateSnapshot, sdapi_progress, task_progress
from .validation import RequestValidationError, parse_json, validate

_SEED_RANGE = 4294967294  # A1111's get_fixed_seed: random.randrange(4294967294)
_PREVIEW_SIZE = 64


@attrs.frozen
class Request:
    """One HTTP request, as the server read it."""

    method: str
    path: str
    query: Mapping[str, str] = attrs.field(factory=dict)
    headers: Mapping[str, str] = attrs.field(factory=dict)
    body: bytes = b""


@attrs.frozen
class Response:
    status: int
    body: Any


@attrs.frozen
class _Route:
    handler: Callable[[Request, Any], Any]
    protected: bool  # behind --api-auth
    takes_body: bool


def _query_bool(query: Mapping[str, str], name: str) -> bool:
    value = query.get(name, "false").lower()
    if value in {"1", "true", "on", "yes", "t", "y"}:
        return True
    if value in {"0", "false", "off", "no", "f", "n"}:
        return False
    raise RequestValidationError(
        [{"loc": ["query", name], "msg": "value could not be parsed to a boolean", "type": "type_error.bool"}]
    )


def _task_id(kind: str) -> str:
    """`create_task_id`: what A1111 uses when a request brings no `force_task_id`."""
    suffix = "".join(random.choices(string.ascii_uppercase + string.digits, k=7))
    return f"task({kind}-{suffix})"


class Api:
    """Every route of the simulated WebUI."""

    def __init__(
        self,
        settings: SimSettings,
        catalog: Catalog,
        state: SharedState,
        engine: Engine,
        port: int,
    ) -> None:
        self._settings = settings
        self._catalog = catalog
        self._state = state
        self._engine = engine
        self._port = port
        self._options = catalog.default_options()
        self._lock = threading.Lock()
        self._preview: tuple[str, int, str] | None = None  # job_timestamp, id, base64 PNG
        self._fault_rng = random.Random(settings.fault_seed)
        self._routes: dict[str, dict[str, _Route]] = {}
        self._register_routes()

    # -- dispatch --------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        """Answer one request; `SimulatorClosed` and `ConnectionDropped` pass through."""
        methods = self._routes.get(request.path)
        if methods is None:
            return Response(404, {"detail": "Not Found"})
        route = methods.get(request.method)
        if route is None:
            return Response(405, {"detail": "Method Not Allowed"})
        try:
            body = self._body(request) if route.takes_body else None
            if route.protected:
                self._authenticate(request.headers)
            return Response(200, route.handler(request, body))
        except (SimulatorClosed, ConnectionDropped):
            raise
        except RequestValidationError as exc:
            return Response(422, {"detail": exc.errors})
        except ApiError as exc:
            return Response(exc.status, exc.body())
        except Exception as exc:  # noqa: BLE001 - A1111's middleware answers any exception with 500
            return Response(500, ApiError.from_exception(exc).body())

    @staticmethod
    def _body(request: Request) -> Any:
        if not request.body:
            raise RequestValidationError(
                [{"loc": ["body"], "msg": "field required", "type": "value_error.missing"}]
            )
        return parse_json(request.body)

    def _authenticate(self, headers: Mapping[str, str]) -> None:
        """FastAPI's `HTTPBasic` plus A1111's check; A1111 sends no WWW-Authenticate."""
        accepted = self._settings.credentials
        if not accepted:
            return
        scheme, _, param = (headers.get("Authorization") or "").partition(" ")
        if not (scheme and param):
            raise ApiError.http(401, "Not authenticated")
        try:
            user, sep, password = base64.b64decode(param, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            sep = ""
        if scheme.lower() != "basic" or not sep:
            raise ApiError.http(401, "Invalid authentication credentials")
        if not any(
            secrets.compare_digest(user.encode(), u.encode())
            and secrets.compare_digest(password.encode(), p.encode())
            for u, p in accepted
        ):
            raise ApiError.http(401, "Incorrect username or password")

    def _register_routes(self) -> None:
        def add(method: str, path: str, handler: Callable[..., Any], *, body: bool = False) -> None:
            protected = path.startswith("/sdapi/")
            self._routes.setdefault(path, {})[method] = _Route(handler, protected, body)

        def listing(key: str) -> Callable[[Request, Any], Any]:
            return lambda request, body: self._catalog[key]

        sdapi = "/sdapi/v1"
        add("POST", f"{sdapi}/txt2img", self.txt2img, body=True)
        add("POST", f"{sdapi}/img2img", self.img2img, body=True)
        add("POST", f"{sdapi}/extra-single-image", self.extra_single_image, body=True)
        add("GET", f"{sdapi}/progress", self.progress)
        add("POST", f"{sdapi}/interrupt", self.interrupt)
        add("POST", f"{sdapi}/skip", self.skip)
        add("GET", f"{sdapi}/options", self.get_options)
        add("POST", f"{sdapi}/options", self.set_options, body=True)
        add("GET", f"{sdapi}/cmd-flags", self.cmd_flags)
        add("GET", f"{sdapi}/scripts", self.scripts)
        for path, key in {
            "samplers": "samplers",
            "upscalers": "upscalers",
            "latent-upscale-modes": "latent_upscale_modes",
            "sd-models": "sd_models",
            "sd-vae": "sd_vae",
            "hypernetworks": "hypernetworks",
            "face-restorers": "face_restorers",
            "realesrgan-models": "realesrgan_models",
            "prompt-styles": "prompt_styles",
            "embeddings": "embeddings",
            "script-info": "script_info",
            "memory": "memory",
            "extensions": "extensions",
        }.items():
            add("GET", f"{sdapi}/{path}", listing(key))
        add("GET", f"{sdapi}/loras", lambda request, body: [])  # the recorded server had none
        if self._catalog.splits_samplers:
            add("GET", f"{sdapi}/schedulers", listing("schedulers"))
        if self._catalog.adetailer:
            add("GET", "/adetailer/v1/version", listing("adetailer_version"))
            add("GET", "/adetailer/v1/schema", listing("adetailer_schema"))
            add("GET", "/adetailer/v1/ad_model", listing("adetailer_models"))
        if self._settings.ui:
            add("POST", "/internal/progress", self.internal_progress, body=True)
            add("GET", "/internal/pending-tasks", self.pending_tasks)
            add("GET", "/internal/ping", lambda request, body: {})

    # -- generation ------------------------------------------------------------

    def txt2img(self, request: Request, body: Any) -> dict[str, Any]:
        params = validate(body, self._catalog.request_fields["txt2img"])
        generation = self._generation("txt2img", params, ())
        return self._generate("txt2img", params, generation)

    def img2img(self, request: Request, body: Any) -> dict[str, Any]:
        params = validate(body, self._catalog.request_fields["img2img"])
        if params["init_images"] is None:
            raise ApiError.http(404, "Init image not found")
        if params["mask"]:
            images.decode_image(params["mask"])
        generation = self._generation("img2img", params, params["init_images"])
        response = self._generate("img2img", params, generation)
        if not params["include_init_images"]:
            response["parameters"].update(init_images=None, mask=None)
        return response

    def _generation(self, kind: str, params: dict[str, Any], init_images: list[str]) -> Generation:
        """The checks A1111 makes before queueing, in its order."""
        script = params["script_name"]
        if script and not self._catalog.is_selectable_script(kind, script):
            raise ApiError.http(422, f"Script '{script}' not found")
        resolved = self._catalog.sampler_and_scheduler(
            params["sampler_name"] or params["sampler_index"], params.get("scheduler")
        )
        if resolved is None:  # 400 since 1.10 (#16140)
            raise ApiError.http(400 if self._catalog.splits_samplers else 404, "Sampler not found")
        sampler, scheduler = resolved
        for name in params["alwayson_scripts"] or {}:
            if self._catalog.is_selectable_script(kind, name):
                raise ApiError.http(422, "Cannot have a selectable script in the always on scripts params")
            if not self._catalog.is_alwayson_script(kind, name):
                raise ApiError.http(422, f"always on script {name} not found")
        return Generation(
            kind=kind,
            params=params,
            sampler=sampler,
            scheduler=scheduler,
            seed=params["seed"] if params["seed"] != -1 else random.randrange(_SEED_RANGE),
            subseed=params["subseed"] if params["subseed"] != -1 else random.randrange(_SEED_RANGE),
            init_images=[images.decode_image(encoded) for encoded in init_images],
            adetailer=adetailer_run(params["alwayson_scripts"] or {}, self._catalog),
        )

    def _generate(self, kind: str, params: dict[str, Any], generation: Generation) -> dict[str, Any]:
        task_id = params["force_task_id"] or _task_id(kind)
        generated: Generated = self._engine.run_task(
            f"scripts_{kind}", task_id, lambda: self._engine.generate(generation)
        )
        encoded = [
            images.encode_png(picture, {"parameters": generated.info.infotext(index)})
            for index, picture in enumerate(generated.pictures)
        ]
        return {
            "images": encoded if params["send_images"] else [],
            "parameters": dict(params),
            "info": generated.info.as_json(len(generated.pictures)),
        }

    def extra_single_image(self, request: Request, body: Any) -> dict[str, Any]:
        params = validate(body, self._catalog.request_fields["extras"])
        picture = images.decode_image(params["image"])
        upscaled = self._engine.upscale(picture, params)
        text = {k: v for k, v in upscaled.picture.info.items() if isinstance(v, str)}
        return {"image": images.encode_png(upscaled.picture, text), "html_info": upscaled.html_info}

    # -- progress and control --------------------------------------------------

    def progress(self, request: Request, body: Any) -> dict[str, Any]:
        skip_current_image = _query_bool(request.query, "skip_current_image")
        if self._settings.progress_latency and self._state.wait_closing(self._settings.progress_latency):
            raise SimulatorClosed
        if self._fault_roll():
            raise ApiError.from_exception(RuntimeError("simulated progress failure"))
        state = self._refresh_preview()
        if self._settings.progress_stuck and state.job_count != 0:
            state = attrs.evolve(state, job_no=0, sampling_step=0)
        progress, eta_relative = sdapi_progress(state, time.time())
        current_image = None
        if state.job_count != 0 and not skip_current_image:
            current_image = self._current_image(state)
        return {
            "progress": progress,
            "eta_relative": eta_relative,
            "state": state.as_dict(),
            "current_image": current_image,
            "textinfo": state.textinfo,
        }

    def _fault_roll(self) -> bool:
        with self._lock:
            return self._fault_rng.random() < self._settings.progress_error_rate

    def interrupt(self, request: Request, body: Any) -> dict[str, Any]:
        self._state.interrupt()
        return {}

    def skip(self, request: Request, body: Any) -> None:
        self._state.skip()

    def internal_progress(self, request: Request, body: Any) -> dict[str, Any]:
        req = validate(body, self._catalog.request_fields["internal_progress"])
        status = self._state.task_status(req["id_task"])
        if not status.active:
            textinfo = "Waiting..."
            if status.queued:
                textinfo = f"In queue: {status.queue_position}/{status.queue_length}"
            return {
                "active": False,
                "queued": status.queued,
                "completed": status.completed,
                "progress": None,
                "eta": None,
                "live_preview": None,
                "id_live_preview": -1,
                "textinfo": textinfo,
            }
        state = self._state.snapshot()
        progress, eta = task_progress(state, time.time())
        live_preview, id_live_preview = None, req["id_live_preview"]
        with self._lock:
            previews = self._options["live_previews_enable"]
        if previews and req["live_preview"]:
            state = self._refresh_preview()
            image = self._current_image(state)
            if state.id_live_preview != req["id_live_preview"] and image is not None:
                live_preview = f"data:image/png;base64,{image}"
                id_live_preview = state.id_live_preview
        return {
            "active": True,
            "queued": status.queued,
            "completed": status.completed,
            "progress": progress,
            "eta": eta,
            "live_preview": live_preview,
            "id_live_preview": id_live_preview,
            "textinfo": state.textinfo,
        }

    def pending_tasks(self, request: Request, body: Any) -> dict[str, Any]:
        tasks = list(self._state.snapshot().pending_tasks)
        return {"size": len(tasks), "tasks": tasks}

    def _refresh_preview(self) -> StateSnapshot:
        """`State.set_current_image`: a new preview every `show_progress_every_n_steps` steps."""
        with self._lock:
            enabled = self._options["live_previews_enable"]
            every = self._options["show_progress_every_n_steps"] or 0
            state = self._state.snapshot()
            if not (enabled and every > 0 and state.job_count != 0):
                return state
            if state.sampling_step - state.current_image_sampling_step < every:
                return state
            preview_id = state.id_live_preview + 1
            picture = images.render(preview_id, state.job_timestamp, _PREVIEW_SIZE, _PREVIEW_SIZE)
            self._preview = (state.job_timestamp, preview_id, images.encode_png(picture, {}))
            self._state.update(current_image_sampling_step=state.sampling_step, id_live_preview=preview_id)
            return self._state.snapshot()

    def _current_image(self, state: StateSnapshot) -> str | None:
        with self._lock:
            preview = self._preview
        if preview is None or preview[:2] != (state.job_timestamp, state.id_live_preview):
            return None
        return preview[2]

    # -- settings and lists ----------------------------------------------------

    def get_options(self, request: Request, body: Any) -> dict[str, Any]:
        with self._lock:
            return dict(self._options)

    def set_options(self, request: Request, body: Any) -> None:
        """`set_config`: an unknown checkpoint or key fails with 500; a model change waits for the queue."""
        if not isinstance(body, dict):
            raise RequestValidationError(
                [{"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}]
            )
        checkpoint = body.get("sd_model_checkpoint")
        if checkpoint is not None and not self._catalog.checkpoint_exists(checkpoint):
            raise RuntimeError(f"model {checkpoint!r} not found")
        with self._lock:
            unknown = [key for key in body if key not in self._options]
            if unknown:
                raise KeyError(unknown[0])
        if checkpoint is not None:
            self._engine.wait_for_queue()
        with self._lock:
            self._options.update(body)

    def cmd_flags(self, request: Request, body: Any) -> dict[str, Any]:
        return {
            **self._catalog["cmd_flags"],
            "nowebui": not self._settings.ui,
            "api_auth": self._settings.api_auth,
            "port": str(self._port),
        }

    def scripts(self, request: Request, body: Any) -> dict[str, list[str]]:
        return {kind: self._catalog.scripts(kind) for kind in ("txt2img", "img2img")}
