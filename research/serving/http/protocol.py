"""The OpenAI wire format: request models, error objects and response pieces.

Every field is validated here, once, at the edge, before anything reaches the engine:
OpenAI's ranges where OpenAI defines them (temperature [0, 2], top_p (0, 1], presence and
frequency penalties [-2, 2], logprobs and top_logprobs <= 20), and documented bounds
elsewhere (BOUNDS below): every integer fits the engine's int32 arrays, every float is
finite, every string is valid UTF-8 (no lone surrogates). A value out of range is a 400
naming the field (`validation_error`).

Requests are pydantic models with `extra="allow"`: fields of other servers (`best_of`,
`guided_json`, ...) are accepted and ignored, except the vLLM extensions honoured here
(`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `return_tokens_as_token_ids`). `model`
may be left out (the served model, as in vLLM). /tokenize and /detokenize take vLLM's
fields (tokenize.py).
"""

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from research.errors import RequestError

INT32 = 2**31 - 1
INT64 = 2**63 - 1
# The documented bounds of fields OpenAI leaves open (README "Serving: bad input").
BOUNDS = {
    "top_k": (-1, INT32),  # -1 or 0 = all; past the vocabulary = all.
    "n": (1, 128),  # Choices per prompt.
    "prompts": 256,  # Prompts in one completions request (and prompts x n choices).
    "seed": (-INT64 - 1, INT64),  # Reduced modulo 2**32.
    "repetition_penalty": (0.01, 10.0),
    "min_p": (0.0, 1.0),
    "stop": 16,  # Stop strings per request.
    "stop_length": 256,  # Characters per stop string.
    "messages": 1024,  # Chat messages per request.
    "max_tokens": (0, INT32),  # Then at most the context left (a 400 past it).
}


def _utf8(text: str) -> str:
    """Text that encodes as UTF-8: JSON escapes can carry lone surrogates ("\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"is not valid UTF-8 text (a lone surrogate at character {error.start}); send "
            "real characters"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=INT32)]], Field(min_length=1)]
StopText = Annotated[Text, Field(min_length=1, max_length=BOUNDS["stop_length"])]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: Text | None = Field(None, description="The served model's id (GET /v1/models).")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(
        0, ge=BOUNDS["top_k"][0], le=BOUNDS["top_k"][1], description="0 or -1 = all tokens."
    )
    min_p: float = Field(0.0, ge=0, lt=BOUNDS["min_p"][1])
    n: int = Field(1, ge=BOUNDS["n"][0], le=BOUNDS["n"][1])
    seed: int | None = Field(None, ge=BOUNDS["seed"][0], le=BOUNDS["seed"][1])
    stop: StopText | Annotated[list[StopText], Field(max_length=BOUNDS["stop"])] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(
        1.0,
        ge=BOUNDS["repetition_penalty"][0],
        le=BOUNDS["repetition_penalty"][1],
        description="vLLM extension; 1 = off.",
    )
    ignore_eos: bool = Field(False, description="vLLM extension: do not stop at eos.")
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    return_tokens_as_token_ids: bool = Field(
        False, description="vLLM extension: logprob tokens as 'token_id:<id>' strings."
    )


class CompletionRequest(_Sampling):
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=BOUNDS["prompts"])]
        | TokenIds
        | Annotated[list[TokenIds], Field(max_length=BOUNDS["prompts"])]
    ) = Field(description="Text, texts, token ids, or lists of token ids (one choice set each).")
    max_tokens: int | None = Field(
        16, ge=0, le=INT32, description="0 only with echo (prompt scoring)."
    )
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: Text | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Text
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=BOUNDS["messages"])
    max_tokens: int | None = Field(None, ge=1, le=INT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    response_format: dict | None = None


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's fields; `messages` is not supported)."""

    model_config = ConfigDict(extra="allow")
    model: Text | None = None
    prompt: Text
    add_special_tokens: bool = Field(True, description="What the tokenizer adds (bos, ...).")
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    """POST /detokenize."""

    model_config = ConfigDict(extra="allow")
    model: Text | None = None
    tokens: list[Annotated[int, Field(ge=0, le=INT32)]]


# ---- errors ---------------------------------------------------------------------------------

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}

# What a field accepts, for validation messages where pydantic lists one error per union arm.
_EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token id lists",
    "stop": "a string or a list of strings",
    "messages": 'a non-empty list of {"role": ..., "content": ...} objects',
}


class APIError(Exception):
    """An error the client caused or can retry: the OpenAI error object with its status."""

    def __init__(self, status: int, message: str, *, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param=None, code=None) -> dict:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# Sampler / engine field names -> the request parameter a client sent.
API_FIELDS = {
    "max_new_tokens": "max_tokens",
    "num_logprobs": "logprobs",
    "prompt_logprobs": "logprobs",
    "stop_strings": "stop",
    "stop_token_ids": "stop",
}


def request_error_body(error: RequestError) -> dict:
    """The 400 body of a RequestError: the one place a bad field becomes a response."""
    param = API_FIELDS.get(error.field, error.field)
    message = f"'{param}' {error.rule}"
    if error.value is not None:
        message += f" (got {_short(error.value)})"
    return error_body(400, message + ".", param=param, code=getattr(error, "code", None))


def validation_error(errors: list[dict], *, union_fields: bool = True) -> RequestError:
    """The RequestError of pydantic / FastAPI validation errors: the first bad field.

    union_fields: say what the generation endpoints' union fields (prompt, stop, messages)
    accept, in place of pydantic's one error per union arm.
    """
    expected = _EXPECTED if union_fields else {}
    if not errors:
        return RequestError("body", None, "is not a valid request")
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid" or not location:
        detail = first.get("msg", "")
        return RequestError(
            "body",
            None,
            f"is not a valid JSON object ({detail}); send Content-Type: application/json with "
            'an object such as {"model": ..., "prompt": "Hello"}',
        )
    field = location[0]
    if field in expected:
        same = [e for e in errors if [str(p) for p in e.get("loc", ())][1:2] == [field]]
        if first.get("type") == "missing":
            return RequestError(field, None, f"is required: {expected[field]}")
        # The right kind of value past a bound (17 stop strings, a 300-character one, a lone
        # surrogate deep inside): say that, not "must be a string or a list of strings".
        detail = [e for e in same if not str(e.get("type", "")).endswith("_type")]
        if detail:
            path = _path([str(p) for p in detail[0].get("loc", ()) if p != "body"])
            rule = str(detail[0].get("msg", "")).removeprefix("Value error, ")
            rule = rule[:1].lower() + rule[1:]
            if isinstance(detail[0].get("input"), str):  # Pydantic counts a str's "items".
                rule = rule.replace(" items ", " characters ").replace(" item ", " character ")
            return RequestError(field, None, rule if path == field else f"{path}: {rule}")
        return RequestError(field, same[0].get("input"), f"must be {expected[field]}")
    rule = first.get("msg", "invalid value")
    rule = rule.split(", ", 1)[1] if rule.startswith("Value error, ") else rule
    path = _path(location)
    if path != field:
        rule = f"{path}: {rule}"
    value = None if first.get("type") == "missing" else first.get("input")
    return RequestError(field, value, rule[:1].lower() + rule[1:])


def _path(location: list[str]) -> str:
    """messages.0.content.str -> messages[0].content (drops pydantic's union-arm tags)."""
    path = ""
    for part in location:
        if part.isdigit():
            path += f"[{part}]"
        elif part in ("str", "int", "float", "bool") or "[" in part or part[:1].isupper():
            continue
        else:
            path += f".{part}" if path else part
    return path


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---- responses ------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class TokenText:
    """Token strings for log-probability reports: each token decoded alone, or
    'token_id:<id>' with as_ids (vLLM's return_tokens_as_token_ids)."""

    def __init__(self, tokenizer, *, as_ids: bool = False):
        self._tokenizer = tokenizer
        self._as_ids = as_ids
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        if self._as_ids:
            return f"token_id:{token_id}"
        if token_id not in self._cache:
            self._cache[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return self._cache[token_id]

    def visible(self, token_id: int) -> str:
        """The token's text as it appears in the output (special tokens are skipped)."""
        return self._tokenizer.decode([int(token_id)], skip_special_tokens=True)


def completion_logprobs(token_text, token_ids, logprobs, top_logprobs, text_offset: int) -> dict:
    """The legacy completions `logprobs` object for some tokens.

    logprobs: one float (or None, the first prompt token) per token; top_logprobs: per token
    a list of (id, logprob) or None. text_offset: where the first token starts in the text.
    """
    tokens, offsets, tops = [], [], []
    for token_id, alternatives in zip(token_ids, top_logprobs, strict=True):
        tokens.append(token_text(token_id))
        offsets.append(text_offset)
        text_offset += len(token_text.visible(token_id))
        if alternatives is None:
            tops.append(None)
        else:
            top = {}
            for alternative, logprob in alternatives:
                top.setdefault(token_text(alternative), float(logprob))
            tops.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": [None if p is None else float(p) for p in logprobs],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(token_text, token_ids, logprobs, top_logprobs) -> list[dict]:
    """The chat `logprobs.content` entries for some tokens."""

    def entry(token_id, logprob):
        text = token_text(token_id)
        return {"token": text, "logprob": float(logprob), "bytes": list(text.encode("utf-8"))}

    return [
        {**entry(t, p), "top_logprobs": [entry(i, q) for i, q in alternatives]}
        for t, p, alternatives in zip(token_ids, logprobs, top_logprobs, strict=True)
    ]


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(
            404,
            f"the model '{requested}' does not exist; this server serves '{served}' "
            "(GET /v1/models lists it).",
            param="model",
            code="model_not_found",
        )
