"""`complete`: many requests run to their end on a Sampler's slots, the simple high-level
loop (admit into free slots, generate, detokenize, stop) that evaluation, `launch.sample` and
training-time samples use; the server has its own engine (engine.py).
"""

import dataclasses
from collections.abc import Callable, Sequence

import jax

from research.errors import UserError
from research.serving.detokenize import TextStream
from research.serving.sampling import SamplingParams


@dataclasses.dataclass
class Completion:
    """One finished request. finish_reason: "stop" (stop token or string) or "length"."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str


def complete(
    sampler,
    prompts: Sequence[Sequence[int]],
    requests: SamplingParams | Sequence[SamplingParams],
    *,
    tokenizer=None,
    on_text: Callable[[int, str], None] | None = None,
    on_done: Callable[[int, Completion], None] | None = None,
) -> list[Completion]:
    """Runs every prompt to completion, num_slots at a time (continuous batching).

    Args:
      sampler: a research.serving.Sampler (its slots, jitted calls and checks).
      prompts: token id lists (see `encode_prompt` for text).
      requests: one SamplingParams for all prompts, or one per prompt.
      tokenizer: research.data.Tokenizer; needed for text and stop strings.
      on_text: called as on_text(prompt_index, new_text) as text becomes final.
      on_done: called as on_done(prompt_index, completion) when a request finishes.

    Returns:
      one Completion per prompt, in order.
    """
    if isinstance(requests, SamplingParams):
        requests = [requests] * len(prompts)
    if len(requests) != len(prompts):
        raise UserError(f"{len(requests)} sampling settings for {len(prompts)} prompts.")
    for prompt, request in zip(prompts, requests, strict=True):
        sampler.check_prompt(prompt)
        sampler.check_request(request)
        if request.stop_strings and tokenizer is None:
            raise UserError("stop_strings need a tokenizer to detokenize the output.")
    results: list[Completion | None] = [None] * len(prompts)
    pending = list(range(len(prompts)))[::-1]
    active: dict[int, _Request] = {}
    state = sampler.init_state()
    while pending or active:
        prefixes = {}
        for slot in range(sampler.num_slots):
            if slot in active or not pending:
                continue
            index = pending.pop()
            key = tuple(prompts[index])
            if key not in prefixes:  # e.g. several samples of one prompt
                prefixes[key] = sampler.prefill([prompts[index]])
            state = sampler.insert(state, prefixes[key], 0, slot, requests[index])
            active[slot] = _Request(index, list(prompts[index]), requests[index], tokenizer)
        state, steps = sampler.generate(state)
        steps = jax.device_get(steps)
        for slot in list(active):
            state = _consume(sampler, state, active, slot, steps, results, on_text, on_done)
    return results


def _consume(sampler, state, active, slot, steps, results, on_text, on_done):
    """Hands a slot's new tokens (its row of `steps`, a host Tokens) to its request;
    finishes it on a stop or end of slot."""
    request, live = active[slot], bool(steps.live[slot])
    stopped = False
    for j, token in enumerate(steps.tokens[slot]):
        if token < 0:
            continue
        tops = steps.top_ids[slot, j], steps.top_logprobs[slot, j]
        if request.add(token, steps.logprobs[slot, j], *tops):
            stopped = True
            break
    finished = stopped or not live
    if finished:
        del active[slot]
        if live:  # A stop string: the device does not know, free the slot there.
            state = sampler.release(state, slot)
        results[request.index] = request.result()
    if on_text is not None and request.fresh_text:
        on_text(request.index, request.take_text())
    if finished and on_done is not None:
        on_done(request.index, results[request.index])
    return state


@dataclasses.dataclass
class _Request:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    tokenizer: object = None

    def __post_init__(self):
        self.token_ids, self.logprobs, self.top_logprobs = [], [], []
        self.text_stream = (
            TextStream(self.tokenizer, self.prompt_ids, self.params.stop_strings)
            if self.tokenizer is not None
            else None
        )
        self.stopped_by_string = False
        self.fresh_text = ""

    def add(self, token, logprob, top_ids, top_logprobs) -> bool:
        """Records a token; True when a stop string ends the request."""
        self.token_ids.append(int(token))
        self.logprobs.append(float(logprob))
        n = self.params.num_logprobs
        self.top_logprobs.append(
            [(int(i), float(p)) for i, p in zip(top_ids[:n], top_logprobs[:n], strict=True)]
        )
        if self.text_stream is None:
            return False
        self.fresh_text += self.text_stream.add(int(token))
        self.stopped_by_string = self.text_stream.stopped
        return self.stopped_by_string

    def take_text(self) -> str:
        text, self.fresh_text = self.fresh_text, ""
        return text

    def result(self) -> Completion:
        if self.text_stream is not None and not self.stopped_by_string:
            self.fresh_text += self.text_stream.finish()
        last = self.token_ids[-1]
        stopped = self.stopped_by_string or last in self.params.stop_token_ids
        return Completion(
            prompt_ids=self.prompt_ids,
            token_ids=self.token_ids,
            text=self.text_stream.text if self.text_stream is not None else "",
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs,
            finish_reason="stop" if stopped else "length",
        )


def encode_prompt(tokenizer, text: str, *, add_bos: bool = True) -> list[int]:
    """Token ids of a text prompt, with bos first as in training documents."""
    ids = tokenizer.encode(text)
    return [tokenizer.bos_id, *ids] if add_bos else ids
