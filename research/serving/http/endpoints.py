"""POST /v1/completions and /v1/chat/completions: requests -> engine requests -> responses.

A request becomes prompts x n engine requests (choice index = prompt_index * n + j), each
with its own SamplingParams: choice j samples with seed + j (a random base seed when none is
given); max_tokens past the room left in the context is a 400 (as vLLM answers), an absent
max_tokens (chat) is that room; generation stops at eos (chat: also at the template's
end-of-turn token) unless ignore_eos. Text prompts get the tokenizer's own special tokens
(`Tokenizer.encode_prompt`: bos only where the tokenizer adds it, as transformers and vLLM
do); token id prompts are used as they are; chat prompts are the rendered template
(chat.py). `usage` counts each prompt once (as OpenAI does), every generated token, and the
prompt tokens served from the prefix cache (per API key: prompts of other keys never count).

Errors: a bad field is a RequestError (400, mapped in server.py); an engine that fails one
request answers 500 (streaming: an error event, then [DONE]); an engine that failed as a
whole answers 503, so a load balancer sends the request to another replica.
"""

import asyncio
import logging
import math
import secrets

from fastapi import Request
from fastapi.responses import Response

from research.data.scrub import Scrubber
from research.errors import RequestError
from research.serving.core.sampling import SamplingParams
from research.serving.engine.engine import EngineClosed, QueueFull
from research.serving.http import protocol
from research.serving.http.chat import ChatTemplate
from research.serving.http.jobs import DONE, Choice, EventStream, Job, sse
from research.serving.http.protocol import APIError, ChatRequest, CompletionRequest

logger = logging.getLogger("cirrus.serve")
# Prompt and completion text (log_prompts only, redacted): its own logger, so launch.serve can
# show it on the console while other INFO records go to the log file.
PROMPT_LOGGER = "cirrus.serve.prompts"
prompt_logger = logging.getLogger(PROMPT_LOGGER)

_SEED_RANGE = 2**32


def not_ready(engine) -> APIError:
    error = getattr(engine, "error", None)
    message = (
        f"{error}; restart the server."
        if error
        else "the model is still compiling and warming up; retry once GET /ready returns 200."
    )
    return APIError(503, message, code="not_ready", headers={"Retry-After": "1"})


class Endpoints:
    """The two generation endpoints over one engine (see the module docstring)."""

    def __init__(
        self, engine, *, model_name, chat: ChatTemplate, limiter, log_prompts, api_keys=()
    ):
        self.engine, self.model_name, self.chat = engine, model_name, chat
        self.limiter, self.log_prompts = limiter, log_prompts
        # Logged text loses the server's API keys and every kind data prep scrubs (scrub.py).
        self._redact = Scrubber(literals=api_keys).redact if log_prompts else None
        self.tokenizer = engine.tokenizer
        self._token_text = protocol.TokenText(engine.tokenizer)
        self._token_ids = protocol.TokenText(engine.tokenizer, as_ids=True)
        self.created = protocol.now()

    def model_card(self) -> dict:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "cirrus",
            "root": self.model_name,
            "parent": None,
            "max_model_len": self.engine.max_len,
        }

    # ---- shared ---------------------------------------------------------------------------

    def _token_strings(self, body) -> protocol.TokenText:
        return self._token_ids if body.return_tokens_as_token_ids else self._token_text

    def _check_common(self, body) -> None:
        protocol.check_model(body.model, self.model_name)
        if not self.engine.ready:
            raise not_ready(self.engine)
        if body.logit_bias:
            raise RequestError("logit_bias", None, "is not supported; leave it out")
        if body.stream_options is not None and not body.stream:
            raise RequestError("stream_options", None, "is only allowed with stream: true")

    def _check_prompt(self, prompt_ids: list[int], param: str) -> None:
        if not prompt_ids:
            raise RequestError(param, None, "has no tokens; send some text")
        if len(prompt_ids) >= self.engine.max_len:
            raise RequestError(
                param,
                None,
                f"has {len(prompt_ids)} tokens, but this model's maximum context length is "
                f"{self.engine.max_len} tokens (prompt plus at least 1 to generate); shorten "
                f"it to at most {self.engine.max_len - 1} tokens",
                code="context_length_exceeded",
            )

    def _max_new_tokens(self, max_tokens: int | None, prompt_ids: list[int], param: str) -> int:
        """The tokens to generate: max_tokens, or all the room left when it is absent; past
        the room, a 400 (vLLM's answer), not a request that runs for minutes."""
        room = self.engine.max_len - len(prompt_ids)
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise RequestError(
                param,
                max_tokens,
                f"is more than the context leaves: this model's maximum context length is "
                f"{self.engine.max_len} tokens and the prompt has {len(prompt_ids)}, so at most "
                f"{room} can be generated; lower {param} or shorten the prompt",
                code="context_length_exceeded",
            )
        return max_tokens

    def _sampling(self, body, max_new_tokens: int, num_logprobs, stop_token_ids, seed):
        stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        vocab = self.engine.model_config.vocab_size
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=body.temperature,
            top_k=body.top_k if 0 < body.top_k < vocab else 0,
            top_p=body.top_p,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            stop_token_ids=() if body.ignore_eos else stop_token_ids,
            stop_strings=stops,
            seed=seed % _SEED_RANGE,
            num_logprobs=num_logprobs,
        )

    def _start(
        self,
        request: Request,
        prompts: list[list[int]],
        body,
        *,
        max_tokens,
        max_tokens_param: str,
        num_logprobs: int,
        stop_token_ids: tuple[int, ...],
        param: str,
        prompt_logprobs: int | None = None,
        score_only: bool = False,
    ) -> Job:
        """Validates, admits (rate limit) and submits prompts x n engine requests."""
        for prompt_ids in prompts:
            self._check_prompt(prompt_ids, param)
        # Every choice enters the engine's queue at once, so more than the queue (or this
        # key's share of it) can never be accepted together: a 400, not a 429 that no retry
        # could pass.
        config = self.engine.config
        owner = request.scope["state"].get("tenant", "")
        capacity = min(config.max_waiting, protocol.BOUNDS["prompts"])
        if owner:
            capacity = min(capacity, config.max_waiting_per_owner)
        if body.n * len(prompts) > capacity:
            raise RequestError(
                "n",
                body.n,
                f"makes n x prompts = {body.n * len(prompts)} requests, but this server queues "
                f"at most {capacity} of one request at once (serve.max_waiting, per API key "
                "serve.max_waiting_share); lower n or send fewer prompts",
            )
        seed = body.seed if body.seed is not None else secrets.randbits(32)
        prefix = protocol.new_id("req")
        choices, params = [], []
        for prompt_index, prompt_ids in enumerate(prompts):
            new_tokens = self._max_new_tokens(max_tokens, prompt_ids, max_tokens_param)
            for j in range(body.n):
                index = len(choices)
                choices.append(Choice(index, prompt_index, prompt_ids, f"{prefix}-{index}"))
                params.append(
                    self._sampling(body, new_tokens, num_logprobs, stop_token_ids, seed + j)
                )
        reserved = sum(len(p) for p in prompts) + sum(p.max_new_tokens for p in params)
        ticket = self.limiter.admit(request.scope["state"]["rate_key"], reserved)
        job = Job(self.engine, self.limiter, choices, ticket, score_only=score_only)
        loop = asyncio.get_running_loop()
        submitted = []
        try:
            for choice, sampling in zip(choices, params, strict=True):
                self.engine.submit(
                    choice.prompt_ids,
                    sampling,
                    job.on_output(loop, choice.index),
                    prompt_logprobs=prompt_logprobs,
                    request_id=choice.request_id,
                    owner=owner,
                )
                submitted.append(choice.request_id)
        except (QueueFull, EngineClosed, RequestError) as error:
            for request_id in submitted:
                self.engine.cancel(request_id)
            self.limiter.settle(ticket, 0)
            if isinstance(error, RequestError):
                raise
            raise _submit_error(error) from None
        return job

    def _log(self, job: Job, kind: str, prompt) -> None:
        logger.info(
            "%s %s: %d prompt tokens (%d cached), %d completion tokens, finish %s",
            job.choices[0].request_id.rsplit("-", 1)[0],
            kind,
            job.prompt_tokens(),
            job.cached_tokens(),
            job.completion_tokens(),
            ",".join(str(c.finish_reason) for c in job.choices),
        )
        if self.log_prompts:
            prompt_logger.info(
                "%s prompt %r -> %r",
                job.choices[0].request_id.rsplit("-", 1)[0],
                self._redact(prompt),
                self._redact(["".join(c.text) for c in job.choices]),
            )

    def _envelope(self, kind: str, response_id: str, created: int, choices: list, **extra):
        return {
            "id": response_id,
            "object": kind,
            "created": created,
            "model": self.model_name,
            "choices": choices,
            **extra,
        }

    def _stream(self, job: Job, body, kind: str, response_id: str, created: int, entry, on_end):
        """The SSE response: `entry(choice, output)` -> one chunk's choice (None: skip it),
        then `on_end()`, the usage chunk when asked, and [DONE]."""
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}

        def chunk(entries) -> str:
            return sse(self._envelope(kind, response_id, created, entries, **extra))

        async def events():
            if kind == "chat.completion.chunk":  # The role comes first, in its own chunk.
                for choice in job.choices:
                    delta = {"role": "assistant", "content": ""}
                    yield chunk([{"index": choice.index, "delta": delta, "finish_reason": None}])
            while job.remaining:
                choice, output = await job.next()
                if output.finish_reason == "error":  # Headers are sent: an error event.
                    yield sse({"error": failed_error(self.engine, choice).body()["error"]})
                    yield DONE
                    return
                item = entry(choice, output)
                if item is not None:
                    yield chunk([item])
            on_end()
            if include_usage:
                yield sse(self._envelope(kind, response_id, created, [], usage=job.usage()))
            yield DONE

        return EventStream(events(), job)

    async def _wait(self, job: Job, request: Request) -> bool:
        """Waits for every choice; False if the client went away first (the job is closed).
        A choice that failed on the server raises its error (500, or 503 if the engine
        failed)."""
        try:
            done = await job.wait_all(request.receive)
        finally:
            job.close()
        for choice in job.choices:
            if choice.finish_reason == "error":
                raise failed_error(self.engine, choice)
        return done

    # ---- /v1/completions ------------------------------------------------------------------

    def _completion_prompts(self, body: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        """Token ids and echo text of each prompt."""
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise RequestError("prompt", None, "is an empty list; send at least one prompt")
        vocab = self.engine.model_config.vocab_size
        ids, texts = [], []
        for item in prompt:
            if isinstance(item, str):
                ids.append(self.tokenizer.encode_prompt(item))
                texts.append(item)
                continue
            if any(not 0 <= t < vocab for t in item):
                raise RequestError(
                    "prompt", None, f"has token ids outside [0, {vocab}) (the model's vocabulary)"
                )
            ids.append(list(item))
            texts.append(self.tokenizer.decode(item))
        return ids, texts

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_common(body)
        if body.suffix:
            raise RequestError("suffix", None, "is not supported; leave it out")
        limit = self.engine.config.num_top_logprobs
        if body.logprobs is not None and body.logprobs > limit:
            raise RequestError(
                "logprobs",
                body.logprobs,
                f"must be at most {limit} on this server (serve.num_top_logprobs)",
            )
        if body.max_tokens == 0 and not body.echo:
            raise RequestError(
                "max_tokens", 0, "must be >= 1 (0 only with echo=true, to score the prompt)"
            )
        prompts, texts = self._completion_prompts(body)
        score_only = body.max_tokens == 0
        want_logprobs = body.logprobs is not None
        job = self._start(
            request,
            prompts,
            body,
            max_tokens=1 if score_only else body.max_tokens,
            max_tokens_param="max_tokens",
            num_logprobs=body.logprobs or 0,
            prompt_logprobs=body.logprobs if body.echo and want_logprobs else None,
            stop_token_ids=(self.tokenizer.eos_id,),
            param="prompt",
            score_only=score_only,
        )
        response_id, created = protocol.new_id("cmpl"), protocol.now()
        token_text = self._token_strings(body)

        def piece(choice: Choice, text: str, ids, values, tops, first: bool, offset: int):
            """(text, logprobs) of a choice's new tokens; the first piece echoes the prompt."""
            if score_only:
                text, ids, values, tops = "", [], [], []
            echo = first and body.echo
            lead = texts[choice.prompt_index] if echo else ""
            if not want_logprobs:
                return lead + text, None
            if echo:
                count = len(choice.prompt_ids)
                tops = [None, *(choice.prompt_top_logprobs or [[]] * count)[1:], *tops]
                values = [*(choice.prompt_logprobs or [None] * count), *values]
                ids = [*choice.prompt_ids, *ids]
            logprobs = protocol.completion_logprobs(token_text, ids, values, tops, offset)
            return lead + text, logprobs

        if body.stream:
            offsets = [0] * len(job.choices)

            def entry(choice: Choice, output):
                text, logprobs = piece(
                    choice,
                    output.text,
                    output.token_ids,
                    output.logprobs,
                    output.top_logprobs,
                    not choice.started,
                    offsets[choice.index],
                )
                choice.started = True
                offsets[choice.index] += len(text)
                reason = output.finish_reason
                if not text and reason is None and not (logprobs and logprobs["tokens"]):
                    return None
                if score_only and reason is not None:
                    reason = "length"
                return {
                    "index": choice.index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": reason,
                }

            return self._stream(
                job,
                body,
                "text_completion",
                response_id,
                created,
                entry,
                lambda: self._log(job, "completion", texts),
            )

        if not await self._wait(job, request):
            return Response(status_code=499)  # Nobody reads it: the client is gone.
        choices = []
        for choice in job.choices:
            text, logprobs = piece(
                choice,
                "".join(choice.text),
                choice.token_ids,
                choice.logprobs,
                choice.top_logprobs,
                True,
                0,
            )
            reason = "length" if score_only else choice.finish_reason
            choices.append(
                {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": reason}
            )
        self._log(job, "completion", texts)
        return self._envelope(
            "text_completion",
            response_id,
            created,
            choices,
            system_fingerprint=None,
            usage=job.usage(),
        )

    # ---- /v1/chat/completions -------------------------------------------------------------

    def _chat_messages(self, body: ChatRequest) -> list[dict]:
        """The messages as template input: content parts joined into one string."""
        messages = []
        for i, message in enumerate(body.messages):
            content = message.content
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise RequestError(
                            "messages",
                            None,
                            f"[{i}].content[{j}] has type {part.type!r}; this model reads text "
                            'only: send {"type": "text", "text": ...} parts',
                        )
                    texts.append(part.text)
                content = "\n".join(texts)
            messages.append({**message.model_dump(exclude_none=True), "content": content or ""})
        return messages

    async def chat_completions(self, body: ChatRequest, request: Request):
        self._check_common(body)
        if body.tools:
            raise RequestError("tools", None, "are not supported by this server")
        kind = (body.response_format or {}).get("type", "text")
        if kind != "text":
            raise RequestError("response_format", kind, "type is not supported; only 'text'")
        if body.top_logprobs and not body.logprobs:
            raise RequestError("top_logprobs", body.top_logprobs, "needs 'logprobs': true")
        limit = self.engine.config.num_top_logprobs
        if (body.top_logprobs or 0) > limit:
            raise RequestError(
                "top_logprobs",
                body.top_logprobs,
                f"must be at most {limit} on this server (serve.num_top_logprobs)",
            )
        messages = self._chat_messages(body)
        try:
            prompt_ids = self.chat.encode(messages)
        except ValueError as error:
            raise RequestError("messages", None, str(error).rstrip(".")) from None
        job = self._start(
            request,
            [prompt_ids],
            body,
            max_tokens=body.max_completion_tokens or body.max_tokens,
            max_tokens_param=(
                "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            ),
            num_logprobs=body.top_logprobs or 0,
            stop_token_ids=self.chat.stop_token_ids,
            param="messages",
        )
        response_id, created = protocol.new_id("chatcmpl"), protocol.now()
        token_text = self._token_strings(body)

        def logprobs(token_ids, values, tops):
            if not body.logprobs:
                return None
            return {"content": protocol.chat_logprobs(token_text, token_ids, values, tops)}

        if body.stream:

            def entry(choice: Choice, output):
                reason = output.finish_reason
                if not output.text and reason is None and not (body.logprobs and output.token_ids):
                    return None
                return {
                    "index": choice.index,
                    "delta": {"content": output.text} if output.text else {},
                    "logprobs": logprobs(output.token_ids, output.logprobs, output.top_logprobs),
                    "finish_reason": reason,
                }

            return self._stream(
                job,
                body,
                "chat.completion.chunk",
                response_id,
                created,
                entry,
                lambda: self._log(job, "chat", messages),
            )

        if not await self._wait(job, request):
            return Response(status_code=499)  # Nobody reads it: the client is gone.
        self._log(job, "chat", messages)
        choices = [
            {
                "index": choice.index,
                "message": {"role": "assistant", "content": "".join(choice.text)},
                "logprobs": logprobs(choice.token_ids, choice.logprobs, choice.top_logprobs),
                "finish_reason": choice.finish_reason,
            }
            for choice in job.choices
        ]
        return self._envelope(
            "chat.completion",
            response_id,
            created,
            choices,
            system_fingerprint=None,
            usage=job.usage(),
        )


def _submit_error(error: Exception) -> APIError:
    """The HTTP error for an engine that refused a request."""
    if isinstance(error, QueueFull):
        retry = max(1, math.ceil(error.retry_after_s))
        return APIError(
            429,
            f"{error} The server's request queue is full; retry after Retry-After seconds.",
            code="queue_full",
            headers={"Retry-After": str(retry)},
        )
    return APIError(
        503,
        f"the server cannot take requests ({error}); send the request to another replica or "
        "retry later.",
        code="unavailable",
        headers={"Retry-After": "5"},
    )


def failed_error(engine, choice: Choice) -> APIError:
    """The error of a choice that ended with finish_reason "error": 503 when the whole
    engine failed or shut down before the choice finished (another replica can serve it),
    500 when only this request failed."""
    if not engine.alive:
        return APIError(503, f"{engine.error}; the replica is restarting, retry.",
                        code="engine_failed", headers={"Retry-After": "5"})  # fmt: skip
    if getattr(engine, "closing", False):
        return APIError(503, choice.error or "the server is shutting down; retry.",
                        code="shutting_down", headers={"Retry-After": "5"})  # fmt: skip
    return APIError(500, choice.error or "the server failed on this request.", code="server_error")
