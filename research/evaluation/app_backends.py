"""The two backends of the applications (applications.py): the same questions, the same
greedy answers, asked of an OpenAI-compatible server or of a model in this process.

A backend has two methods:
  chat(conversations, max_tokens) -> replies: greedy (temperature 0) chat completions; None
    for a conversation whose prompt + max_tokens does not fit the context (the server's 400
    `context_length_exceeded`; in process, the same rule), which run_app counts as skipped.
  token_logprobs(texts) -> per text, log p(token | tokens before) of every token but the first.

OpenAIBackend sends them through the official `openai` client to any base_url
(chat.completions; completions with echo=True, max_tokens=0, logprobs=1 for the text's
log-probabilities). InProcessBackend runs them on a loaded model with what `launch.serve`
uses: the tokenizer's chat template (research/data/chat.ChatTemplate, its stop tokens) and
the serving scheduler on a Sampler (`complete`); log-probabilities come from the evaluator's
packed scorer (scoring.score_spans), which equals the server's echo log-probabilities within
float rounding (tests/serving/test_fidelity.py).
"""

import concurrent.futures

import numpy as np

from research.evaluation.scoring import Span, score_spans


class OpenAIBackend:
    """Any OpenAI-compatible server.

    Args:
      base_url: e.g. http://127.0.0.1:8000/v1.
      model: the model name the server expects ('' = the first of GET /models).
      api_key: sent as the Bearer key (any string for a server without keys).
      concurrency: requests in flight at once (the server batches them).
    """

    def __init__(self, base_url: str, model: str = "", api_key: str = "unused", concurrency=8):
        import openai

        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=600)
        self.model = model or self.client.models.list().data[0].id
        self.concurrency = concurrency

    def _map(self, function, inputs) -> list:
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(function, inputs))

    def chat(self, conversations: list[list[dict]], max_tokens: int) -> list[str | None]:
        import openai

        def one(messages):
            try:
                response = self.client.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    temperature=0.0,
                    max_tokens=max_tokens,
                    seed=0,
                )
            except openai.BadRequestError as error:
                if _code(error) == "context_length_exceeded":
                    return None
                raise
            return response.choices[0].message.content or ""

        return self._map(one, conversations)

    def token_logprobs(self, texts: list[str]) -> list[list[float]]:
        def one(text):
            response = self.client.completions.create(
                model=self.model, prompt=text, max_tokens=0, echo=True, logprobs=1
            )
            values = response.choices[0].logprobs.token_logprobs
            return [float(v) for v in values[1:]]  # The first token has no log-probability.

        return self._map(one, texts)


def _code(error) -> str | None:
    """The OpenAI error object's code of a BadRequestError (None when the body has none)."""
    body = error.body if isinstance(error.body, dict) else {}
    return (body.get("error") or body).get("code") if isinstance(body, dict) else None


class InProcessBackend:
    """A research.checkpoint.LoadedModel in this process, as launch.serve would serve it.

    Args:
      loaded: research.checkpoint.load(...)'s result (needs its tokenizer).
      num_slots: requests decoded together.
      max_len: context of the Sampler (default: the model's max_seq_len).
    """

    def __init__(self, loaded, *, num_slots: int = 8, max_len: int | None = None):
        from research.data.chat import ChatTemplate
        from research.serving import Sampler

        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.template = ChatTemplate(self.tokenizer, loaded.chat_template)
        self.max_len = max_len or loaded.model_config.max_seq_len
        self.sampler = Sampler(
            loaded.model_config,
            loaded.graphdef,
            loaded.params,
            num_slots=num_slots,
            max_len=self.max_len,
        )

    def chat(self, conversations: list[list[dict]], max_tokens: int) -> list[str | None]:
        from research.serving import SamplingParams, complete

        prompts = [self.template.encode(messages) for messages in conversations]
        fits = [i for i, p in enumerate(prompts) if len(p) + max_tokens <= self.max_len]
        requests = [
            SamplingParams(
                max_new_tokens=max_tokens,
                temperature=0.0,
                stop_token_ids=self.template.stop_token_ids,
            )
            for _ in fits
        ]
        completions = complete(
            self.sampler, [prompts[i] for i in fits], requests, tokenizer=self.tokenizer
        )
        replies = [None] * len(prompts)
        for i, completion in zip(fits, completions, strict=True):
            replies[i] = completion.text
        return replies

    def token_logprobs(self, texts: list[str]) -> list[list[float]]:
        spans = [Span(tokens=np.asarray(self.tokenizer.encode_prompt(t))) for t in texts]
        longest = max(len(s.tokens) for s in spans)
        seq_len = -(-longest // 64) * 64
        scores = score_spans(
            self.loaded.graphdef, self.loaded.params, spans, seq_len=seq_len, batch_size=4
        )
        return [[float(v) for v in s.logprobs] for s in scores]
