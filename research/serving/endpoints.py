"""POST /v1/completions and /v1/chat/completions: requests -> engine requests -> responses.

A request becomes prompts x n engine requests (choice index = prompt_index * n + j), each
with its own SamplingParams: choice j samples with seed + j (a random base seed when none is
given), max_tokens is clamped to the room left in the context (finish_reason "length"), and
generation stops at eos (chat: also at the template's end-of-turn token) unless ignore_eos.
Text prompts get bos first, as Cirrus training documents do; token id prompts are used as
they are; chat prompts are the rendered template (chat.py). `usage` counts each prompt once
(as OpenAI does), every generated token, and the prompt tokens served from the prefix cache.
"""

import asyncio
import logging
import math
import secrets

from fastapi import Request
from fastapi.responses import Response

from research.errors import UserError
from research.serving import protocol
from research.serving.chat import ChatTemplate
from research.serving.complete import encode_prompt
from research.serving.engine import EngineClosed, QueueFull
from research.serving.jobs import DONE, Choice, EventStream, Job, sse
from research.serving.protocol import APIError, ChatRequest, CompletionRequest
from research.serving.sampling import SamplingParams

logger = logging.getLogger("cirrus.serve")

_SEED_RANGE = 2**32
# Engine field names in its UserError messages -> the request field the user sent.
_ENGINE_FIELDS = {
    "max_new_tokens": "max_tokens",
    "num_logprobs": "logprobs",
    "stop_strings": "stop",
    "stop_token_ids": "stop",
}


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

    def __init__(self, engine, *, model_name, chat: ChatTemplate, limiter, log_prompts):
        self.engine, self.model_name, self.chat = engine, model_name, chat
        self.limiter, self.log_prompts = limiter, log_prompts
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
            raise APIError(400, "'logit_bias' is not supported; leave it out.", param="logit_bias")

    def _check_prompt(self, prompt_ids: list[int], param: str) -> None:
        if not prompt_ids:
            raise APIError(400, f"'{param}' has no tokens; send some text.", param=param)
        if len(prompt_ids) >= self.engine.max_len:
            raise APIError(
                400,
                f"this model's maximum context length is {self.engine.max_len} tokens, but the "
                f"{param} has {len(prompt_ids)} tokens (plus at least 1 to generate); shorten "
                f"it to at most {self.engine.max_len - 1} tokens.",
                param=param,
                code="context_length_exceeded",
            )

    def _sampling(self, body, room: int, max_tokens, num_logprobs, stop_token_ids, seed):
        stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if any(not s for s in stops):
            raise APIError(400, "'stop' must not contain empty strings.", param="stop")
        return SamplingParams(
            max_new_tokens=min(max_tokens or room, room),
            temperature=body.temperature,
            top_k=max(body.top_k, 0),
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
        num_logprobs: int,
        stop_token_ids: tuple[int, ...],
        param: str,
        prompt_logprobs: int | None = None,
        score_only: bool = False,
    ) -> Job:
        """Validates, admits (rate limit) and submits prompts x n engine requests."""
        for prompt_ids in prompts:
            self._check_prompt(prompt_ids, param)
        # Every choice enters the engine's queue at once, so more than max_waiting can never
        # be accepted together: a 400, not a 429 that no retry could pass.
        capacity = self.engine.config.max_waiting
        if body.n * len(prompts) > capacity:
            raise APIError(
                400,
                f"n x prompts = {body.n * len(prompts)} requests, but this server queues at "
                f"most {capacity} at once (serve.max_waiting); lower 'n' or send fewer prompts.",
                param="n",
            )
        seed = body.seed if body.seed is not None else secrets.randbits(32)
        prefix = protocol.new_id("req")
        choices, params = [], []
        for prompt_index, prompt_ids in enumerate(prompts):
            room = self.engine.max_len - len(prompt_ids)
            for j in range(body.n):
                index = len(choices)
                choices.append(Choice(index, prompt_index, prompt_ids, f"{prefix}-{index}"))
                params.append(
                    self._sampling(body, room, max_tokens, num_logprobs, stop_token_ids, seed + j)
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
                )
                submitted.append(choice.request_id)
        except (QueueFull, EngineClosed, UserError) as error:
            for request_id in submitted:
                self.engine.cancel(request_id)
            self.limiter.settle(ticket, 0)
            raise _submit_error(error, param) from None
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
            logger.info("prompt %r -> %r", prompt, ["".join(c.text) for c in job.choices])

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
                item = entry(choice, output)
                if item is not None:
                    yield chunk([item])
            on_end()
            if include_usage:
                yield sse(self._envelope(kind, response_id, created, [], usage=job.usage()))
            yield DONE

        return EventStream(events(), job)

    @staticmethod
    async def _wait(job: Job, request: Request) -> bool:
        """Waits for every choice; False if the client went away first (the job is closed)."""
        try:
            return await job.wait_all(request.receive)
        finally:
            job.close()

    # ---- /v1/completions ------------------------------------------------------------------

    def _completion_prompts(self, body: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        """Token ids and echo text of each prompt."""
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise APIError(
                400, "'prompt' is an empty list; send at least one prompt.", param="prompt"
            )
        vocab = self.engine.model_config.vocab_size
        ids, texts = [], []
        for item in prompt:
            if isinstance(item, str):
                ids.append(encode_prompt(self.tokenizer, item))
                texts.append(item)
                continue
            if any(not 0 <= t < vocab for t in item):
                raise APIError(
                    400,
                    f"'prompt' has token ids outside [0, {vocab}) (the model's vocabulary).",
                    param="prompt",
                )
            ids.append(list(item))
            texts.append(self.tokenizer.decode(item))
        return ids, texts

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_common(body)
        if body.suffix:
            raise APIError(400, "'suffix' is not supported; leave it out.", param="suffix")
        limit = self.engine.config.num_top_logprobs
        if body.logprobs is not None and body.logprobs > limit:
            raise APIError(
                400,
                f"'logprobs' must be at most {limit} on this server (serve.num_top_logprobs).",
                param="logprobs",
            )
        if body.max_tokens == 0 and not body.echo:
            raise APIError(
                400,
                "'max_tokens' must be >= 1 (0 only with echo=true, to score the prompt).",
                param="max_tokens",
            )
        prompts, texts = self._completion_prompts(body)
        score_only = body.max_tokens == 0
        want_logprobs = body.logprobs is not None
        job = self._start(
            request,
            prompts,
            body,
            max_tokens=1 if score_only else body.max_tokens,
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
                        raise APIError(
                            400,
                            f"'messages[{i}].content[{j}]' has type {part.type!r}; this model "
                            'reads text only: send {"type": "text", "text": ...} parts.',
                            param="messages",
                        )
                    texts.append(part.text)
                content = "\n".join(texts)
            messages.append({**message.model_dump(exclude_none=True), "content": content or ""})
        return messages

    async def chat_completions(self, body: ChatRequest, request: Request):
        self._check_common(body)
        if body.tools:
            raise APIError(400, "'tools' are not supported by this server.", param="tools")
        kind = (body.response_format or {}).get("type", "text")
        if kind != "text":
            raise APIError(
                400,
                f"'response_format' type {kind!r} is not supported; only 'text'.",
                param="response_format",
            )
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
        limit = self.engine.config.num_top_logprobs
        if (body.top_logprobs or 0) > limit:
            raise APIError(
                400,
                f"'top_logprobs' must be at most {limit} on this server (serve.num_top_logprobs).",
                param="top_logprobs",
            )
        messages = self._chat_messages(body)
        try:
            prompt_ids = self.chat.encode(messages)
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from None
        job = self._start(
            request,
            [prompt_ids],
            body,
            max_tokens=body.max_completion_tokens or body.max_tokens,
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


def _submit_error(error: Exception, param: str) -> APIError:
    """The HTTP error for an engine that refused a request."""
    if isinstance(error, QueueFull):
        retry = max(1, math.ceil(error.retry_after_s))
        return APIError(
            429,
            "the server's request queue is full; retry after Retry-After seconds.",
            code="queue_full",
            headers={"Retry-After": str(retry)},
        )
    if isinstance(error, EngineClosed):
        return APIError(
            503,
            "the server is shutting down; send the request to another replica or retry later.",
            code="shutting_down",
            headers={"Retry-After": "5"},
        )
    message = str(error)  # UserError: 'sampling.top_p=... must be ...' or about the prompt.
    if message.startswith("sampling."):
        name = message[len("sampling.") :].split("=", 1)[0].split(" ", 1)[0]
        param = _ENGINE_FIELDS.get(name, name)
    return APIError(400, message, param=param)
