"""`complete`: many requests run to their end on a Sampler's slots, in the caller's thread.

The same scheduler as the server's engine (scheduler.py: admission, batched and chunked
prefill, bucketed decode, detokenization, stop strings), driven step by step until every
request is done. Evaluation, `launch.sample` and training-time samples use it.
"""

import dataclasses
from collections.abc import Callable, Sequence

from research.errors import UserError
from research.serving.core.sampling import SamplingParams
from research.serving.engine.scheduler import Output, Scheduler


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
    prefill_chunk: int = 512,
) -> list[Completion]:
    """Runs every prompt to completion, num_slots at a time (continuous batching).

    Args:
      sampler: a research.serving.Sampler (its slots, jitted calls and checks).
      prompts: token id lists (`Tokenizer.encode_prompt` for text).
      requests: one SamplingParams for all prompts, or one per prompt.
      tokenizer: research.data.Tokenizer; needed for text and stop strings.
      on_text: called as on_text(prompt_index, new_text) as text becomes final.
      on_done: called as on_done(prompt_index, completion) when a request finishes.
      prefill_chunk: prompt tokens prefilled per step.

    Returns:
      one Completion per prompt, in order.
    """
    if isinstance(requests, SamplingParams):
        requests = [requests] * len(prompts)
    if len(requests) != len(prompts):
        raise UserError(f"{len(requests)} sampling settings for {len(prompts)} prompts.")
    scheduler = Scheduler(sampler, tokenizer, prefill_chunk=prefill_chunk)
    results: list[Completion | None] = [None] * len(prompts)
    collected = [_Collected(list(p)) for p in prompts]

    def receiver(index: int):
        def on_output(output: Output) -> None:
            result = collected[index]
            result.add(output)
            if on_text is not None and output.text:
                on_text(index, output.text)
            if output.finish_reason is not None:
                results[index] = result.completion()
                if on_done is not None:
                    on_done(index, results[index])

        return on_output

    for index, (prompt, request) in enumerate(zip(prompts, requests, strict=True)):
        scheduler.waiting.append(
            scheduler.new_request(str(index), prompt, request, receiver(index))
        )
    while scheduler.busy:
        scheduler.step()
    scheduler.flush()
    return results


@dataclasses.dataclass
class _Collected:
    prompt_ids: list[int]

    def __post_init__(self):
        self.token_ids, self.logprobs, self.top_logprobs, self.text = [], [], [], ""
        self.finish_reason = None

    def add(self, output: Output) -> None:
        self.token_ids += output.token_ids
        self.logprobs += output.logprobs
        self.top_logprobs += output.top_logprobs
        self.text += output.text
        self.finish_reason = output.finish_reason

    def completion(self) -> Completion:
        return Completion(
            prompt_ids=self.prompt_ids,
            token_ids=self.token_ids,
            text=self.text,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs,
            finish_reason=self.finish_reason,
        )
