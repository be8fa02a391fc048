"""The OpenAI-compatible HTTP server over an Engine (FastAPI; run it with uvicorn).

    app = create_app(engine, model_name="tiny", api_keys=("secret",))
    uvicorn.run(app, host="127.0.0.1", port=8000)      # launch/serve.py does this

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /tokenize,
POST /detokenize and GET /tokenizer_info (vLLM's; lm-evaluation-harness tokenizes through
them: tokenize.py), GET /health
(liveness: 200 unless the engine failed: died, or a device call hung past serve.watchdog_s),
GET /ready (readiness: 200 once the engine has compiled and warmed up, 503 before and after a
failure; both need no key),
GET /metrics (Prometheus text: the engine's vLLM-named metrics and cirrus:http_requests_total),
GET /openapi.json. The wire format (requests, errors, logprobs) is in protocol.py, the two
generation endpoints in endpoints.py, the engine <-> event loop bridge in jobs.py.

Streaming answers are Server-Sent Events, `data: {chunk}` ... `data: [DONE]`; the text of
the chunks joined is the text of the non-streamed answer. A client that disconnects cancels
its engine requests, which frees their slots. Errors are the OpenAI error object: 400 (the
field named: every RequestError, from validation or the engine, becomes one here), 401 (API
key), 404 (model or path), 413 (body too large), 429 (queue full, this key's share of it, or
a per-key rate limit, with Retry-After), 500 (the server failed on this request alone), 503
(not ready, or the engine failed), and the server keeps serving the next request.

With API keys, each key is a tenant: its prompts' cached prefixes are its own (another key's
`cached_tokens` never reveals them) and it holds at most serve.max_waiting_share of the
queue.

Rate limits are per API key (per client address when no keys are set), over a sliding minute:
requests, and tokens = prompt tokens + the most tokens a request may generate (settled to the
tokens actually used when it ends). Prompts and outputs are logged only with log_prompts.
"""

import collections
import hashlib
import hmac
import json
import logging
import math
import time

import prometheus_client
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from research.errors import RequestError, UserError
from research.serving.http import protocol
from research.serving.http.chat import ChatTemplate
from research.serving.http.endpoints import Endpoints, not_ready
from research.serving.http.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from research.serving.http.tokenize import TokenizerEndpoints

logger = logging.getLogger("cirrus.serve")

# Answered without an API key: liveness and readiness probes (a Kubernetes probe or a load
# balancer's health check cannot hold a secret); they reveal only whether the model is up.
OPEN_PATHS = ("/health", "/ready")
_WINDOW_S = 60.0


def create_app(
    engine,
    *,
    model_name: str,
    api_keys=(),
    rate_limit_rpm: int = 0,
    rate_limit_tpm: int = 0,
    max_request_bytes: int = 1 << 20,
    chat_template: str | None = None,
    log_prompts: bool = False,
) -> FastAPI:
    """The FastAPI app serving `engine` (started by the caller) as `model_name`.

    Args:
      engine: research.serving.engine.Engine (its tokenizer, max_len, config, metrics).
      model_name: the id clients pass as `model` (GET /v1/models).
      api_keys: accepted `Authorization: Bearer` keys; empty = no authentication.
      rate_limit_rpm, rate_limit_tpm: requests / tokens per minute per key (0 = unlimited).
      max_request_bytes: larger request bodies get 413.
      chat_template: Jinja chat template (e.g. chat.read_chat_template(tokenizer_dir));
        None = chat.DEFAULT_TEMPLATE (ChatML).
      log_prompts: log prompt and output text, redacted (API keys, PII, secrets: the data
        scrubber), on logger "cirrus.serve.prompts" (off: only ids and token counts).
    """
    if engine.tokenizer is None:
        raise UserError("the model has no tokenizer; the server needs one to read text.")
    chat = ChatTemplate(engine.tokenizer, chat_template)
    endpoints = Endpoints(
        engine,
        model_name=model_name,
        chat=chat,
        limiter=RateLimiter(rate_limit_rpm, rate_limit_tpm),
        log_prompts=log_prompts,
        api_keys=api_keys,
    )
    tokenizer_endpoints = TokenizerEndpoints(
        engine.tokenizer, model_name=model_name, max_len=engine.max_len, chat_template=chat.source
    )
    app = FastAPI(
        title="Cirrus OpenAI-compatible server",
        description="OpenAI completions and chat completions over a Cirrus model.",
        version="1",
    )
    registry = prometheus_client.CollectorRegistry()
    responses = prometheus_client.Counter(
        "cirrus:http_requests", "HTTP responses by status code.", ["status"], registry=registry
    )
    app.add_middleware(
        _Gate,
        api_keys=tuple(k for k in api_keys if k),
        max_request_bytes=max_request_bytes,
        responses=responses,
    )

    @app.exception_handler(APIError)
    async def _api_error(request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestError)
    async def _bad_field(request, error: RequestError):
        return JSONResponse(protocol.request_error_body(error), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, error: RequestValidationError):
        generation = request.url.path.startswith("/v1/")
        error = protocol.validation_error(list(error.errors()), union_fields=generation)
        return JSONResponse(protocol.request_error_body(error), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request, error: HTTPException):
        message = str(error.detail)
        if error.status_code == 404:
            message = (
                f"no route {request.method} {request.url.path}; the API is under /v1 "
                "(/v1/models, /v1/completions, /v1/chat/completions; the tokenizer at "
                "/tokenize, /detokenize, /tokenizer_info)."
            )
        body = protocol.error_body(error.status_code, message)
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def _crash(request, error: Exception):
        logger.exception("internal error on %s", request.url.path)
        body = protocol.error_body(500, f"internal server error ({type(error).__name__}).")
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health():
        """Liveness: 200 unless the engine failed (then 503: restart the replica)."""
        if not engine.alive:
            raise APIError(503, f"{engine.error}; restart the server.", code="engine_failed")
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Readiness: 200 once the engine has compiled and warmed up, 503 before (and after
        a failure). Smaller decode buckets keep compiling in the background after it (the
        largest one serves any request meanwhile): `decode_buckets_compiled` says how many,
        `compiling` whether any background compile (those, then the echo prefill) still runs
        and takes CPU time from serving."""
        if not engine.ready:
            raise not_ready(engine)
        stats = engine.stats()
        compiled = f"{stats.get('decode_buckets_compiled', 0)}/{stats.get('decode_buckets', 0)}"
        compiling = bool(stats.get("compiling", False))
        return {"status": "ready", "decode_buckets_compiled": compiled, "compiling": compiling}

    @app.get("/metrics")
    async def metrics():
        text = b""
        if getattr(engine, "metrics", None) is not None:
            text += prometheus_client.generate_latest(engine.metrics.registry)
        text += prometheus_client.generate_latest(registry)
        return Response(text, media_type=prometheus_client.CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [endpoints.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        protocol.check_model(model_id, model_name)
        return endpoints.model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await endpoints.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await endpoints.chat_completions(body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return tokenizer_endpoints.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return tokenizer_endpoints.detokenize(body)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return tokenizer_endpoints.info()

    app.state.endpoints = endpoints
    return app


# ---- rate limits ----------------------------------------------------------------------------


class RateLimiter:
    """Requests and tokens per minute per key, over a sliding 60 s window (0 = unlimited)."""

    def __init__(self, requests_per_minute: int = 0, tokens_per_minute: int = 0, clock=None):
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self._clock = clock or time.monotonic
        self._events: dict[str, collections.deque] = {}

    def admit(self, key: str, tokens: int) -> list | None:
        """Records a request of (at most) `tokens`; returns a ticket for `settle`.

        Raises APIError 429 with Retry-After when the key is over a limit.
        """
        if not self.rpm and not self.tpm:
            return None
        now = self._clock()
        events = self._events.setdefault(key, collections.deque())
        while events and events[0][0] <= now - _WINDOW_S:
            events.popleft()
        if self.tpm and tokens > self.tpm:
            raise APIError(
                429,
                f"this request may use {tokens} tokens (prompt + max_tokens x n) but the limit "
                f"is {self.tpm} tokens per minute; lower max_tokens or n.",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(int(_WINDOW_S))},
            )
        wait = 0.0
        if self.rpm and len(events) >= self.rpm:
            wait = events[len(events) - self.rpm][0] + _WINDOW_S - now
            what = f"{self.rpm} requests per minute"
        used = sum(event[1] for event in events)
        if self.tpm and used + tokens > self.tpm:
            freed = 0
            for event in events:  # Wait until enough of the oldest requests leave the window.
                freed += event[1]
                if used - freed + tokens <= self.tpm:
                    break
            if event[0] + _WINDOW_S - now > wait:
                wait = event[0] + _WINDOW_S - now
                what = f"{self.tpm} tokens per minute"
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise APIError(
                429,
                f"rate limit of {what} reached for this API key; retry in {seconds} s.",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(seconds)},
            )
        ticket = [now, tokens]
        events.append(ticket)
        return ticket

    def settle(self, ticket: list | None, tokens: int) -> None:
        """Replaces a request's reserved tokens by the tokens it used."""
        if ticket is not None:
            ticket[1] = tokens


# ---- the gate: API keys, body size, response counts -----------------------------------------


class _Gate:
    """ASGI middleware in front of every route: API keys (401), body size (413), and the
    cirrus:http_requests_total counter. The body is read here in full (at most
    max_request_bytes) and replayed to the app; later receives (disconnects) pass through."""

    def __init__(self, app, *, api_keys, max_request_bytes, responses):
        self.app, self.api_keys = app, api_keys
        self.max_request_bytes, self.responses = max_request_bytes, responses

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.responses.labels(str(message["status"])).inc()
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = None
        if self.api_keys and scope["path"] not in OPEN_PATHS:
            authorization = headers.get("authorization", "")
            scheme, _, key = authorization.partition(" ")
            key = key.strip() if scheme.lower() == "bearer" else ""
            if not key:
                return await _reply(
                    counted_send,
                    APIError(
                        401,
                        "missing API key: send the header 'Authorization: Bearer <key>' (the "
                        "openai client's api_key).",
                        code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"},
                    ),
                )
            if not any(hmac.compare_digest(key.encode(), k.encode()) for k in self.api_keys):
                return await _reply(
                    counted_send,
                    APIError(
                        401,
                        "incorrect API key; use one of the keys the server was started with.",
                        code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"},
                    ),
                )
        client = scope.get("client") or ("unknown", 0)
        state = scope.setdefault("state", {})
        state["rate_key"] = key or f"address:{client[0]}"
        # The key's tenant: its prefix-cache namespace and queue share (a digest: the key
        # itself is never kept or logged).
        state["tenant"] = hashlib.sha256(key.encode()).hexdigest()[:16] if key else ""
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, counted_send)
        too_large = APIError(
            413,
            f"the request body is larger than {self.max_request_bytes} bytes, this server's "
            "limit (launch.serve --max_request_kb); send a shorter prompt.",
            code="request_too_large",
        )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_request_bytes:
            return await _reply(counted_send, too_large)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_request_bytes:
                return await _reply(counted_send, too_large)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed_receive():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed_receive, counted_send)


async def _reply(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
