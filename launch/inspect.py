"""Inspects a model on one prompt and writes one self-contained HTML page (research/inspect/).

  python -m launch.inspect --workdir=DIR|HF_DIR|FILE.gguf --prompt="The capital of France is" \
      [--compare=OTHER] [--target=POSITION[:TOKEN]] [--top_k=5] [--noattention] --out=page.html

The page shows the prompt's tokens coloured by log-probability (top alternatives on hover),
the logit lens (layers x positions), attention maps per layer and head (prompts up to
research.inspect.MAX_ATTENTION_TOKENS tokens), gradient x input attribution of a target
token to the prompt tokens, and with --compare the KL(base || other) of every position and
the most changed ones. The same data goes next to it as JSON (page.json for page.html).

The prompt is tokenized as the tokenizer's own users get it (`Tokenizer.encode_prompt`, as
launch.sample); "\\n" in it means a newline. --target=POSITION attributes the token at
that index of the prompt (1..T-1), or with POSITION = T (the default) the token after the
prompt: the model's top choice unless TOKEN names one, as an id (digits) or as text that
is exactly one token.
"""

import os
import sys
import time

from absl import app, flags

from launch import cli
from research import storage
from research.errors import UserError

PROMPT = flags.DEFINE_string("prompt", None, "Text to inspect.")
COMPARE = flags.DEFINE_string(
    "compare", None, "A second model (workdir, HF dir or .gguf) with the same tokenizer."
)
TARGET = flags.DEFINE_string(
    "target",
    None,
    "POSITION[:TOKEN] to attribute: a prompt token's index (1..T-1) or T, the token after the "
    "prompt (default: T and the model's top choice). TOKEN: an id or one token's text.",
)
TOP_K = flags.DEFINE_integer("top_k", 5, "Alternatives per token and logit-lens cell.")
ATTENTION = flags.DEFINE_bool(
    "attention", True, "Capture attention weights (prompts up to the attention limit)."
)
OUT = flags.DEFINE_string("out", None, "The HTML page to write; its JSON goes beside it.")
_MAX_TOP_K = 20


def parse_target(text: str | None, tokenizer, prompt_ids: list[int]) -> tuple[int, int | None]:
    """--target -> (position, token or None); a UserError naming the flag."""
    length = len(prompt_ids)
    if not text:
        return length, None
    position_text, _, token_text = text.partition(":")
    try:
        position = int(position_text)
    except ValueError:
        raise UserError(
            f"--target={text!r} must be POSITION or POSITION:TOKEN, e.g. --target={length} or "
            f"--target={length}:42."
        ) from None
    if not 1 <= position <= length:
        raise UserError(
            f"--target position {position} is out of range: the prompt has {length} tokens; "
            f"give 1..{length - 1} (a prompt token) or {length} (the token after the prompt)."
            if length > 1
            else f"--target position {position} is out of range: the prompt has 1 token; "
            "give 1 (the token after the prompt)."
        )
    if not token_text:
        return position, None
    if token_text.isdigit():
        token = int(token_text)
        if token >= tokenizer.vocab_size:
            raise UserError(
                f"--target token id {token} is out of range: the vocabulary has "
                f"{tokenizer.vocab_size} tokens."
            )
        return position, token
    ids = tokenizer.encode(token_text)
    if len(ids) != 1:
        raise UserError(
            f"--target token {token_text!r} is {len(ids)} tokens ({ids}); give the text of "
            "exactly one token, or its id."
        )
    return position, ids[0]


def _load(source: str, flag: str):
    """load(source) with its errors named by the flag."""
    from research.checkpoint import load

    if not storage.is_remote(source) and not os.path.exists(source):
        raise UserError(
            f"{flag}={source} does not exist; give a Cirrus workdir, a Hugging Face model "
            "directory or a .gguf file."
        )
    try:
        loaded = load(source, log=lambda line: print(line, file=sys.stderr))
    except UserError as error:
        raise UserError(f"{flag}={source}: {error}") from None
    if loaded.tokenizer is None:
        raise UserError(f"{flag}={source} has no tokenizer; inspecting a prompt needs one.")
    return loaded


def run(
    source: str,
    prompt: str,
    out: str,
    *,
    other_source: str | None = None,
    target: str | None = None,
    top_k: int = 5,
    attention: bool = True,
    log=print,
) -> dict:
    """The whole job (main without absl): returns the document written to `out`."""
    from research import inspect

    if not source:
        raise UserError("--workdir is required: the model to inspect (workdir, HF dir, .gguf).")
    if not prompt:
        raise UserError("--prompt is empty; give some text to inspect, e.g. --prompt='Hello'.")
    if not out:
        raise UserError("--out is required: the HTML page to write, e.g. --out=page.html.")
    if not 1 <= top_k <= _MAX_TOP_K:
        raise UserError(f"--top_k={top_k} must be in [1, {_MAX_TOP_K}].")
    start = time.perf_counter()
    base = _load(source, "--workdir")
    other = _load(other_source, "--compare") if other_source else None
    if other is not None:
        inspect.check_same_vocabulary(
            base, other, base_name=f"--workdir={source}", other_name=f"--compare={other_source}"
        )
    ids = base.tokenizer.encode_prompt(prompt)
    if not ids:
        raise UserError("--prompt encodes to no tokens; give some text.")
    context = base.model_config.max_seq_len
    if len(ids) > context:
        raise UserError(f"--prompt has {len(ids)} tokens but the model's context is {context}.")
    if attention and len(ids) > inspect.MAX_ATTENTION_TOKENS:
        raise UserError(
            f"--prompt has {len(ids)} tokens; attention maps take at most "
            f"{inspect.MAX_ATTENTION_TOKENS}. Shorten the prompt or pass --noattention."
        )
    position, token = parse_target(target, base.tokenizer, ids)
    loaded_s = time.perf_counter() - start
    found = inspect.inspect_prompt(
        base, ids, top_k=top_k, attention=attention, target=(position, token)
    )
    comparison = None
    if other is not None:
        other_logprobs = inspect.next_token_logprobs(other, ids)
        comparison = inspect.compare_logprobs(found.logprobs, other_logprobs)
    document = inspect.document(
        found,
        tokenizer=base.tokenizer,
        prompt=prompt,
        model=inspect.describe(base, source),
        comparison=comparison,
        other=inspect.describe(other, other_source) if other is not None else None,
    )
    json_path = inspect.write(document, out)
    total = time.perf_counter() - start
    log(
        f"{len(ids)} tokens: wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB) and {json_path} "
        f"in {total:.1f} s ({loaded_s:.1f} s loading)"
    )
    if comparison is not None:
        log(
            f"KL(base || other) mean {comparison.kl.mean():.4f} nats, top-1 changed at "
            f"{int(comparison.changed.sum())} of {len(ids)} positions"
        )
    return document


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; use --prompt='...'.")
    prompt = (PROMPT.value or "").replace("\\n", "\n").replace("\\t", "\t")
    run(
        cli.WORKDIR.value,
        prompt,
        OUT.value,
        other_source=COMPARE.value,
        target=TARGET.value,
        top_k=TOP_K.value,
        attention=ATTENTION.value,
    )


if __name__ == "__main__":
    app.run(cli.guarded(main, logs_in_workdir=False))  # The source is only read.
