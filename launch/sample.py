"""Streams text sampled from a model: a run's latest checkpoint, a Hugging Face directory or
a GGUF file (research.checkpoint.load).

  python -m launch.sample --workdir=DIR|HF_DIR|FILE.gguf --prompt="ROMEO" \
      [--max_new_tokens=128 --temperature=0.8 --top_k=0 --top_p=1.0 --seed=0 --num_samples=1
       --json]

The prompt is tokenized as the tokenizer's own users get it (`Tokenizer.encode_prompt`: bos
first only where the tokenizer adds it, as for Cirrus-trained tokenizers); "\\n" in it means a
newline. Samples run together in one batch (sample i uses seed + i) and are printed one after
another as their text arrives, each ending at the end-of-text token or after max_new_tokens.
With --json, each sample is one JSON line instead ({"seed", "prompt_ids", "token_ids",
"text", "finish_reason"}). Of the serving settings, `--gin_bindings="serve.kv_cache_dtype='int8'"`
applies here too (an int8 KV cache, as `launch.serve` would use).
"""

import json
import sys

from absl import app, flags

from launch import cli
from launch import config as gin_config
from research.errors import RequestError, UserError
from research.serving import EngineConfig, Sampler, SamplingParams, complete
from research.serving.core.kv_cache import check_kv_dtype

PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.")
MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "New tokens per sample at most.")
TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0 = greedy; higher = more random.")
TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1 = off).")
SEED = flags.DEFINE_integer("seed", 0, "Random seed of the first sample.")
NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples of the prompt.")
MESH_SHAPE = flags.DEFINE_string(
    "mesh_shape",
    None,
    "Sample on a (data, fsdp, tensor) device mesh, e.g. 1,1,2 for two-way tensor "
    "parallelism over the first two devices; empty = one device.",
)
JSON = flags.DEFINE_bool("json", False, "Print each sample as one JSON line (token ids, text).")
_MAX_SAMPLES = 64


class _Printer:
    """Streams sample 0 live; later samples' text waits until the ones before are done."""

    def __init__(self, prompt: str, seeds: list[int], write=sys.stdout.write):
        self.prompt, self.seeds, self.write = prompt, seeds, write
        self.buffers = [""] * len(seeds)
        self.done = [None] * len(seeds)
        self.current = -1
        self._advance()

    def _advance(self):
        while True:
            self.current += 1
            if self.current >= len(self.seeds):
                return
            header = f"--- sample {self.current + 1}/{len(self.seeds)} (seed "
            self.write(f"{header}{self.seeds[self.current]}) ---\n{self.prompt}")
            self.write(self.buffers[self.current])
            if self.done[self.current] is None:
                sys.stdout.flush()
                return
            self._footer(self.done[self.current])

    def _footer(self, completion):
        reason = "end of text" if completion.finish_reason == "stop" else "token limit"
        self.write(f"\n--- {len(completion.token_ids)} tokens, {reason} ---\n")

    def text(self, index: int, text: str):
        self.buffers[index] += text
        if index == self.current:
            self.write(text)
            sys.stdout.flush()

    def finished(self, index: int, completion):
        self.done[index] = completion
        if index == self.current:
            self._footer(completion)
            self._advance()


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; use --prompt='...'.")
    workdir = cli.WORKDIR.value
    if not workdir:
        raise UserError("--workdir is required: the training run to sample from.")
    if not PROMPT.value:
        raise UserError("--prompt is empty; give some text to continue, e.g. --prompt='ROMEO'.")
    if not 1 <= NUM_SAMPLES.value <= _MAX_SAMPLES:
        raise UserError(f"--num_samples={NUM_SAMPLES.value} must be in [1, {_MAX_SAMPLES}].")
    gin_config.parse(cli.GIN_FILES.value, cli.GIN_BINDINGS.value)
    kv_dtype = gin_config.build(EngineConfig).kv_cache_dtype
    check_kv_dtype(kv_dtype, "serve.kv_cache_dtype")  # Before the model loads.
    prompt = PROMPT.value.replace("\\n", "\n").replace("\\t", "\t")
    seeds = [SEED.value + i for i in range(NUM_SAMPLES.value)]
    requests = [
        SamplingParams(
            max_new_tokens=MAX_NEW_TOKENS.value,
            temperature=TEMPERATURE.value,
            top_k=TOP_K.value,
            top_p=TOP_P.value,
            seed=seed,
        )
        for seed in seeds
    ]
    try:  # Bad flags fail before the model loads, named as flags.
        for request in requests:
            request.check(vocab_size=2**31 - 1, max_stop_tokens=1, max_logprobs=0)
    except RequestError as error:
        raise UserError(f"--{error}") from None

    mesh = cli.device_mesh(MESH_SHAPE.value)
    from research.checkpoint import load

    loaded = load(workdir, mesh=mesh, log=lambda line: print(line, file=sys.stderr))
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise UserError(f"{workdir} has no tokenizer; sampling needs the tokenizer.")
    requests = [
        SamplingParams(**{**vars(r), "stop_token_ids": (tokenizer.eos_id,)}) for r in requests
    ]
    prompt_ids = tokenizer.encode_prompt(prompt)
    context = loaded.model_config.max_seq_len
    if len(prompt_ids) >= context:
        raise UserError(
            f"--prompt has {len(prompt_ids)} tokens but the model's context is {context}; "
            "shorten it."
        )
    sampler = Sampler(
        loaded.model_config,
        loaded.graphdef,
        loaded.params,
        num_slots=len(seeds),
        max_len=min(context, len(prompt_ids) + MAX_NEW_TOKENS.value),
        steps_per_call=8,
        kv_dtype=kv_dtype,
        mesh=mesh,
    )
    loaded.params = None  # The Sampler holds them (repacked for decode on CPU).
    where = f"step {loaded.step} of {workdir}" if loaded.step is not None else workdir
    print(f"{where}: {len(prompt_ids)} prompt tokens, context {sampler.max_len}", file=sys.stderr)
    if JSON.value:
        completions = complete(sampler, [prompt_ids] * len(seeds), requests, tokenizer=tokenizer)
        for seed, completion in zip(seeds, completions, strict=True):
            line = {
                "seed": seed,
                "prompt_ids": prompt_ids,
                "token_ids": completion.token_ids,
                "text": completion.text,
                "finish_reason": completion.finish_reason,
            }
            print(json.dumps(line, ensure_ascii=False), flush=True)
        return
    printer = _Printer(prompt, seeds)
    complete(
        sampler,
        [prompt_ids] * len(seeds),
        requests,
        tokenizer=tokenizer,
        on_text=printer.text,
        on_done=printer.finished,
    )


if __name__ == "__main__":
    app.run(cli.guarded(main))
