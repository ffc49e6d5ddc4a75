"""An OpenAI-compatible HTTP API for one model: `GET /v1/models`, `POST /v1/chat/completions` (streamed or not).

A request flows: JSON body -> `ChatRequest` (types checked by pydantic) -> `parse_messages` (roles, text and image
parts; images decoded) -> `prepare_job` (chat prompt, processor, context check, generation settings; in a thread,
off the event loop) -> the `BatchingEngine`'s queue (`mllm.serve.engine`) -> a `chat.completion` object, or
`chat.completion.chunk` server-sent events. Every refusal is an OpenAI-shaped error
`{"error": {"message", "type", "param", "code"}}` with a 4xx status; the server keeps serving.

Images come as data URIs (`data:image/png;base64,...`), or as local paths / `file://` URLs when the server was
given an image root (only files inside it are read: a network client must not open arbitrary server files).
The server never fetches from the network, so http(s) URLs are refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mllm.model.generation import IMAGE_MARKER, GenerationSettings, build_chat_prompt
from mllm.model.image_processing import load_image
from mllm.serve.engine import BatchingEngine, EngineBusy, EngineClosed, Job

DEFAULT_MAX_TOKENS = 256  # when a request names no max_tokens (bounded further by the context window)
MAX_IMAGES_PER_REQUEST = 16


# ---- errors -------------------------------------------------------------------------------------------------------

class APIError(Exception):
    """A refusal with its HTTP status, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type: str = "invalid_request_error") -> JSONResponse:
    return APIError(status, message, param, code, type).response()


def field_path(loc: tuple) -> str:
    """pydantic's location ("body", "messages", 0, "role") as `messages[0].role`."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


# ---- the request ----------------------------------------------------------------------------------------------------

class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. "name": accepted, not used

    role: Literal["system", "developer", "user", "assistant"]
    content: Any = None  # a string or a list of parts; checked by `parse_messages` for clearer messages


class ChatRequest(BaseModel):
    # Fields of the API this server does not name are accepted and ignored (clients send e.g. "user",
    # "metadata"); those that would change the answer if honoured are refused in `check_unsupported`.
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None


# name -> the values meaning "off", the only ones accepted for an option this server does not implement
UNSUPPORTED = {"n": (None, 1), "stop": (None, [], ""), "logprobs": (None, False), "top_logprobs": (None, 0),
               "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "function_call": (None, "none"), "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
               "logit_bias": (None, {}), "response_format": (None, {"type": "text"})}


def check_unsupported(request: ChatRequest) -> None:
    for name, allowed in UNSUPPORTED.items():
        value = (request.model_extra or {}).get(name)
        if value not in allowed:
            raise APIError(400, f"{name}={json.dumps(value)} is not supported by this server", name,
                           "unsupported_parameter")


# ---- messages and images -------------------------------------------------------------------------------------------

def resolve_image(url: Any, image_root: Path | None, param: str) -> Image.Image:
    """The image of an `image_url.url`: a base64 data URI, or a file inside `image_root`."""
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{param} must be a non-empty string", param)
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise APIError(400, f"{param}: a data URI must look like data:image/png;base64,<data>", param,
                           "invalid_image_url")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{param}: the data URI's payload is not valid base64", param,
                           "invalid_image") from None
        return decode_image(data, param)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        raise APIError(400, f"{param}: this server does not fetch images from the network; send the image as a "
                            "data URI (data:image/png;base64,...)", param, "invalid_image_url")
    if scheme == "file":
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise APIError(400, f"{param}: file:// URLs must name a file on this machine", param,
                           "invalid_image_url")
        path = Path(unquote(parsed.path))
    elif scheme:
        raise APIError(400, f"{param}: unsupported URL scheme {scheme!r}; use a data URI", param,
                       "invalid_image_url")
    else:
        path = Path(url)
    if image_root is None:
        raise APIError(400, f"{param}: local image paths are refused: the server was started without an image "
                            "root (mllm serve --image-root DIR); send the image as a data URI", param,
                       "local_path_not_allowed")
    root = image_root.resolve()
    # resolve() follows symbolic links, so a link inside the root that points outside it is refused too
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise APIError(400, f"{param}: {url} is outside the server's image root", param, "local_path_not_allowed")
    if not resolved.is_file():
        raise APIError(400, f"{param}: no image file {url} under the server's image root", param,
                       "image_not_found")
    return decode_image(resolved.read_bytes(), param)


def decode_image(data: bytes, param: str) -> Image.Image:
    try:
        return load_image(data)  # bytes, never a str: a string could be taken for a path on this machine
    except ValueError as err:
        raise APIError(400, f"{param}: {err}", param, "invalid_image") from None


def parse_content(content: Any, image_root: Path | None, param: str, images_allowed: bool) -> list:
    """A message's content as `build_chat_prompt` parts: strings and PIL images, in order."""
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list) and content:
        parts = content
    else:
        raise APIError(400, f"{param} must be a string or a non-empty list of content parts", param)
    out = []
    for j, part in enumerate(parts):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise APIError(400, f"{where}.text must be a string", f"{where}.text")
            if IMAGE_MARKER in text:  # it would be read as an image placeholder with no image behind it
                raise APIError(400, f"{where}.text may not contain the image marker {IMAGE_MARKER}", f"{where}.text")
            out.append(text)
        elif kind == "image_url":
            if not images_allowed:
                raise APIError(400, f"{where}: only user messages may carry images", where)
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            out.append(resolve_image(url, image_root, f"{where}.image_url.url"))
        else:
            raise APIError(400, f"{where}: content parts are {{\"type\": \"text\", ...}} or "
                                f"{{\"type\": \"image_url\", ...}}, got type {json.dumps(kind)}", where)
    return out


def parse_messages(messages: list[Message], image_root: Path | None) -> tuple[list[dict], str | None]:
    """(`build_chat_prompt` messages, system prompt or None for the chat template's own). System messages may
    only open the conversation; after them it starts with a user message and ends with one (the one answered)."""
    if not messages:
        raise APIError(400, "messages must hold at least one message", "messages")
    system, i = [], 0
    while i < len(messages) and messages[i].role in ("system", "developer"):
        system.append(" ".join(p for p in parse_content(messages[i].content, None, f"messages[{i}].content", False)))
        i += 1
    turns = []
    for k in range(i, len(messages)):
        message, param = messages[k], f"messages[{k}]"
        if message.role in ("system", "developer"):
            raise APIError(400, f"{param}: a {message.role} message may only come before the conversation", param)
        content = parse_content(message.content, image_root, f"{param}.content", message.role == "user")
        turns.append({"role": message.role, "content": content})
    if not turns or turns[0]["role"] != "user":
        raise APIError(400, "the conversation must start with a user message (after any system messages)",
                       "messages")
    if turns[-1]["role"] != "user":
        raise APIError(400, "the last message must be a user message: it is the one answered", "messages")
    n_images = sum(isinstance(p, Image.Image) for t in turns for p in t["content"])
    if n_images > MAX_IMAGES_PER_REQUEST:
        raise APIError(400, f"{n_images} images in one request; at most {MAX_IMAGES_PER_REQUEST}", "messages")
    return turns, ("\n".join(system) if system else None)


# ---- a request -> a job -------------------------------------------------------------------------------------------

def generation_settings(request: ChatRequest, max_tokens: int) -> GenerationSettings:
    """temperature 0 or absent: greedy; above 0: sampling with that temperature and top_p (default 1)."""
    if request.temperature is not None and not 0 <= request.temperature <= 2:
        raise APIError(400, f"temperature must be between 0 and 2, got {request.temperature}", "temperature")
    if request.top_p is not None and not 0 < request.top_p <= 1:
        raise APIError(400, f"top_p must be above 0 and at most 1, got {request.top_p}", "top_p")
    if request.seed is not None and not -2**63 <= request.seed < 2**64:  # torch.manual_seed's range
        raise APIError(400, f"seed must lie in [-2**63, 2**64), got {request.seed}", "seed")
    if not request.temperature:
        return GenerationSettings("greedy", max_tokens)
    # OpenAI's sampling: temperature and nucleus only (the chat preset's top-k and repetition penalty are off)
    return GenerationSettings("sample", max_tokens, overrides={
        "temperature": request.temperature, "top_p": request.top_p if request.top_p is not None else 1.0,
        "top_k": 0, "repetition_penalty": 1.0})


def requested_max_tokens(request: ChatRequest) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(request, name)
        if value is not None and value < 1:
            raise APIError(400, f"{name} must be at least 1, got {value}", name)
    return request.max_completion_tokens or request.max_tokens


def prepare_job(request: ChatRequest, tokenizer, processor, image_root: Path | None, context_length: int,
                question_first: bool = False) -> Job:
    """Everything a request needs before the model: images decoded, prompt built and processed (runs in a thread).
    `question_first`: the served model's config's (its images after each user message's text)."""
    check_unsupported(request)
    max_tokens = requested_max_tokens(request)
    turns, system_prompt = parse_messages(request.messages, image_root)
    text, images = build_chat_prompt(turns, tokenizer, system_prompt=system_prompt, question_first=question_first)
    inputs = processor([text], [images])
    prompt_tokens = int(inputs["attention_mask"].sum())
    room = context_length - prompt_tokens
    if room < 1 or (max_tokens is not None and max_tokens > room):
        wanted = f"and {max_tokens} more were asked for" if max_tokens else "which leaves no room for an answer"
        raise APIError(400, f"this model's context holds {context_length} tokens; the prompt takes {prompt_tokens}, "
                            f"{wanted}", "messages", "context_length_exceeded")
    settings = generation_settings(request, max_tokens or min(DEFAULT_MAX_TOKENS, room))
    return Job(inputs=inputs, prompt_tokens=prompt_tokens, settings=settings, seed=request.seed)


# ---- responses -----------------------------------------------------------------------------------------------------

def usage(job: Job, completion_tokens: int) -> dict:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": job.prompt_tokens + completion_tokens}


def chunk(completion_id: str, created: int, model_name: str, delta: dict, finish_reason: str | None = None) -> str:
    """One server-sent event holding a `chat.completion.chunk`."""
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def failure(err: BaseException) -> APIError:
    """The API error of a failed job (the request was valid; a failure here is the server's)."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, EngineBusy):
        return APIError(503, str(err), code="server_busy", type="server_error")
    if isinstance(err, EngineClosed):
        return APIError(503, str(err), code="server_shutting_down", type="server_error")
    return APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error")


# ---- the app -------------------------------------------------------------------------------------------------------

def create_app(model, tokenizer, processor, model_name: str, max_batch: int = 8, image_root: str | Path | None = None,
               max_pending: int = 256) -> FastAPI:
    """The FastAPI app serving `model` as `model_name`. Its worker thread starts and stops with the app's
    lifespan; `app.state.engine` is the `BatchingEngine` (its `stats()` are also at `GET /stats`)."""
    image_root = Path(image_root).resolve() if image_root is not None else None
    if image_root is not None and not image_root.is_dir():
        raise ValueError(f"image root {image_root} is not a directory")
    engine = BatchingEngine(model, tokenizer, max_batch=max_batch, max_pending=max_pending)
    context_length = int(getattr(model.llm.config, "max_position_embeddings", 4096))
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="mllm OpenAI-compatible API", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError):
        # FastAPI says 422 with its own body; OpenAI clients expect 400 with an "error" object
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request", "type": "invalid"}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {first.get('msg')}", None, "invalid_json")
        param = field_path(tuple(first.get("loc", ())))
        if not param and first.get("type") == "model_attributes_type":
            return error_response(400, "the request body must be a JSON object (Content-Type: application/json)",
                                  None, "invalid_json")
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(400, message, param or None, first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return error_response(err.status_code, str(err.detail), None, code)

    @app.exception_handler(Exception)
    async def server_error(_: Request, err: Exception):
        return failure(err).response()

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "mllm"}]}

    @app.get("/stats")
    async def stats():
        return engine.stats()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        if request.model != model_name:
            raise APIError(404, f"The model {request.model!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")
        # images are decoded and sliced, the prompt tokenized, in a thread: the event loop only moves bytes
        job = await run_in_threadpool(prepare_job, request, tokenizer, processor, image_root, context_length,
                                      model.config.question_first)
        completion_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            pieces = watch_stream(job)
            submit(job)
            return StreamingResponse(stream_events(job, pieces, completion_id, now, request),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        submit(job)
        try:
            result = await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            job.cancel()
            raise
        except Exception as err:
            raise failure(err) from err
        return {"id": completion_id, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}],
                "usage": usage(job, result.completion_tokens)}

    def submit(job: Job) -> None:
        try:
            engine.submit(job)
        except Exception as err:  # a full queue or a closing server: 503, try again later
            raise failure(err) from err

    def watch_stream(job: Job) -> asyncio.Queue:
        """The queue the worker thread fills with the job's text pieces, then None when the job is done."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        job.on_text = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
        job.future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
        return pieces

    async def stream_events(job: Job, pieces: asyncio.Queue, completion_id: str, now: int, request: ChatRequest):
        """The chunks of a streamed answer: the role, the text as it grows, the finish reason, [DONE]."""
        try:
            yield chunk(completion_id, now, model_name, {"role": "assistant", "content": ""})
            while (piece := await pieces.get()) is not None:
                yield chunk(completion_id, now, model_name, {"content": piece})
            try:
                result = job.future.result()
            except Exception as err:  # the headers are sent: the error travels as an event, as OpenAI's does
                yield f"data: {json.dumps(failure(err).body())}\n\n"
                return
            yield chunk(completion_id, now, model_name, {}, result.finish_reason)
            if (request.stream_options or {}).get("include_usage"):
                body = {"id": completion_id, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "choices": [], "usage": usage(job, result.completion_tokens)}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a no-op when finished; stops the decoding when the client left mid-stream

    return app


# ---- running it ----------------------------------------------------------------------------------------------------

def listening_socket(host: str, port: int) -> socket.socket:
    """A bound socket (port 0: a free one), so the URL printed is the one really listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, reuse_port=False)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
          announce=print) -> None:
    """Run `app` with uvicorn until interrupted; `announce(url)` once it listens."""
    import uvicorn

    sock = listening_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))

    async def run():
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            announce(url_of(sock))
        await task

    asyncio.run(run())


class BackgroundServer:
    """`app` served by uvicorn in a daemon thread on a loopback port (0: a free one); for tests and benchmarks.

        with BackgroundServer(app) as server:
            httpx.get(server.url + "/v1/models")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = listening_socket(host, port)
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *_) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
