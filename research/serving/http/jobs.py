"""The bridge between one HTTP request and its engine requests (one per prompt and choice).

The engine calls `on_output` on its own thread; `Job` moves every Output onto the event
loop's queue (`call_soon_threadsafe`) so handlers simply `await job.next()`. `Job.close`
cancels what is still running (a client that went away frees its slots) and settles the
rate limiter with the tokens actually used. `EventStream` closes its job however the
response ends, so a streaming client's disconnect cancels the generation too.
"""

import asyncio
import contextlib
import json

from fastapi.responses import StreamingResponse

from research.serving.http import protocol


class Choice:
    """One engine request (one prompt, one of n samples) and the Outputs received so far."""

    def __init__(self, index: int, prompt_index: int, prompt_ids: list[int], request_id: str):
        self.index, self.prompt_index, self.prompt_ids = index, prompt_index, prompt_ids
        self.request_id = request_id
        self.text, self.token_ids, self.logprobs, self.top_logprobs = [], [], [], []
        self.finish_reason = None
        self.error = None  # With finish_reason "error": the server's message.
        self.cached_tokens = self.completion_tokens = 0
        self.prompt_logprobs = self.prompt_top_logprobs = None
        self.started = False  # Streaming: the choice's first chunk (echo) was sent.

    def add(self, output) -> None:
        self.text.append(output.text)
        self.token_ids += output.token_ids
        self.logprobs += output.logprobs
        self.top_logprobs += output.top_logprobs
        self.cached_tokens = output.cached_tokens
        self.completion_tokens = output.completion_tokens
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
            self.prompt_top_logprobs = output.prompt_top_logprobs
        self.finish_reason = output.finish_reason
        self.error = output.error


class Job:
    """The engine requests of one HTTP request, their Outputs and its usage.

    score_only: echo with max_tokens=0; the one token generated to get there is dropped.
    """

    def __init__(self, engine, limiter, choices: list[Choice], ticket, *, score_only=False):
        self.engine, self.limiter, self.ticket = engine, limiter, ticket
        self.choices, self.score_only = choices, score_only
        self.queue: asyncio.Queue = asyncio.Queue()
        self.remaining = len(choices)
        self.closed = False

    def on_output(self, loop, index: int):
        """The engine callback of choice `index` (runs on the engine thread)."""

        def deliver(output):
            with contextlib.suppress(RuntimeError):  # The event loop is gone (shutdown).
                loop.call_soon_threadsafe(self.queue.put_nowait, (index, output))

        return deliver

    async def next(self) -> tuple[Choice, object]:
        """The next Output of any choice, recorded in its Choice."""
        index, output = await self.queue.get()
        choice = self.choices[index]
        choice.add(output)
        if output.finish_reason is not None:
            self.remaining -= 1
        return choice, output

    async def wait_all(self, receive) -> bool:
        """Collects every Output (True), unless the client disconnects first (False)."""
        collect = asyncio.ensure_future(self._collect())
        disconnect = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({collect, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
            if not collect.done():
                collect.cancel()
        if collect.cancelled():
            return False
        collect.result()
        return True

    async def _collect(self):
        while self.remaining:
            await self.next()

    def close(self) -> None:
        """Cancels unfinished engine requests and settles the rate limit (once)."""
        if self.closed:
            return
        self.closed = True
        for choice in self.choices:
            if choice.finish_reason is None:
                self.engine.cancel(choice.request_id)
        self.limiter.settle(self.ticket, self.prompt_tokens() + self.completion_tokens())

    def firsts(self) -> list[Choice]:
        """The first choice of every prompt: usage counts each prompt once, as OpenAI does."""
        seen = set()
        firsts = []
        for choice in self.choices:
            if choice.prompt_index not in seen:
                seen.add(choice.prompt_index)
                firsts.append(choice)
        return firsts

    def prompt_tokens(self) -> int:
        return sum(len(c.prompt_ids) for c in self.firsts())

    def cached_tokens(self) -> int:
        return sum(c.cached_tokens for c in self.firsts())

    def completion_tokens(self) -> int:
        return 0 if self.score_only else sum(c.completion_tokens for c in self.choices)

    def usage(self) -> dict:
        return protocol.usage(self.prompt_tokens(), self.completion_tokens(), self.cached_tokens())


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """Server-Sent Events whose end, complete or not (client gone), closes the job."""

    def __init__(self, content, job: Job):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._job.close()


def sse(data) -> str:
    """One Server-Sent Event carrying `data` as JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"
