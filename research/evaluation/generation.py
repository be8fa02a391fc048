"""Generation tasks: greedy answers from the sampler, scored by exact match and F1."""

from research.evaluation import metrics
from research.evaluation.tasks import GenerationItem
from research.serving import SamplingParams, complete


def evaluate_generation(
    sampler,
    tokenizer,
    items: list[GenerationItem],
    *,
    max_new_tokens: int = 32,
    stop_strings: tuple[str, ...] = ("\n",),
) -> dict:
    """{"exact_match", "f1", "items"}: greedy completions (ending at eos, a stop string or
    max_new_tokens) against each item's answers. Prompts keep their last tokens if long."""
    request = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        stop_token_ids=(tokenizer.eos_id,),
        stop_strings=stop_strings,
    )
    room = max(1, sampler.max_len - max_new_tokens)  # Long prompts keep their end.
    prompts = []
    for item in items:
        ids = tokenizer.encode_prompt(item.prompt)
        prompts.append(ids if len(ids) <= room else ids[-room:])
    completions = complete(sampler, prompts, request, tokenizer=tokenizer)
    exact = sum(
        metrics.exact_match(c.text.strip(), i.answers)
        for c, i in zip(completions, items, strict=True)
    )
    f1 = sum(metrics.f1(c.text.strip(), i.answers) for c, i in zip(completions, items, strict=True))
    count = max(len(items), 1)
    return {"exact_match": exact / count, "f1": f1 / count, "items": len(items)}
