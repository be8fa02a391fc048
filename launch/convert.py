"""Model interchange: Hugging Face and GGUF checkpoints in, Hugging Face out.

  python -m launch.convert --from_hf=DIR --workdir=OUT      # config.json + *.safetensors
  python -m launch.convert --from_gguf=FILE --workdir=OUT   # llama.cpp GGUF (dequantized)
  python -m launch.convert --workdir=RUN --to_hf=DIR        # a Cirrus run -> transformers
  python -m launch.convert --workdir=RUN --to_peft=DIR      # a LoRA run's adapters -> PEFT
  python -m launch.convert --from_peft=DIR --base=SRC --workdir=OUT  # PEFT adapters + base

An import writes OUT/ckpt (a params-only Orbax step 0 that `load_model(OUT)` reads),
OUT/tokenizer and OUT/config.gin; fine-tune it with
`python -m launch.train ... --init_from=OUT --workdir=NEW`. The export writes config.json,
model.safetensors (float32; sharded past --max_shard_gb) and the run's tokenizer files; a
LoRA run exports merged (W + (alpha / r) A B). --to_peft writes only the adapters, in HF
PEFT's layout (adapter_config.json + adapter_model.safetensors), which
`peft.PeftModel.from_pretrained(base, DIR)` loads; --from_peft reads such a directory onto
--base (any source launch.train --init_from takes) into a run that serves them merged.
"""

from absl import app, flags

from launch import cli
from research.checkpoint import hf
from research.checkpoint.pretrained import load_pretrained, read_source, save_as_run
from research.errors import UserError

FROM_HF = flags.DEFINE_string("from_hf", None, "Hugging Face model directory to import.")
FROM_GGUF = flags.DEFINE_string("from_gguf", None, "GGUF file to import.")
TO_HF = flags.DEFINE_string("to_hf", None, "Directory to export --workdir's model to.")
STEP = flags.DEFINE_integer("step", None, "With --to_hf: the step to export (default latest).")
TO_PEFT = flags.DEFINE_string("to_peft", None, "Directory to export --workdir's LoRA adapters to.")
FROM_PEFT = flags.DEFINE_string("from_peft", None, "PEFT LoRA adapter directory to import.")
BASE = flags.DEFINE_string("base", None, "With --from_peft: the base model (workdir, HF, .gguf).")
MAX_SHARD_GB = flags.DEFINE_float(
    "max_shard_gb", 5.0, "With --to_hf: largest safetensors file before sharding, in GB."
)


def _log(message: str) -> None:
    print(message, flush=True)


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; see --helpfull.")
    if cli.GIN_FILES.value or cli.GIN_BINDINGS.value:
        raise UserError(
            "launch.convert takes no gin configuration: the model's shape comes from the "
            "checkpoint being converted."
        )
    workdir = cli.WORKDIR.value
    chosen = [name for name, flag in (("from_hf", FROM_HF), ("from_gguf", FROM_GGUF),
                                      ("to_hf", TO_HF), ("to_peft", TO_PEFT),
                                      ("from_peft", FROM_PEFT)) if flag.value]  # fmt: skip
    if len(chosen) != 1 or not workdir:
        raise UserError(
            "give --workdir and exactly one of --from_hf=DIR, --from_gguf=FILE, "
            "--from_peft=DIR --base=SRC (import into --workdir), --to_hf=DIR or --to_peft=DIR "
            f"(export --workdir); got {chosen or 'none'}{'' if workdir else ' and no --workdir'}."
        )
    if bool(BASE.value) != bool(FROM_PEFT.value):
        raise UserError("--from_peft=DIR and --base=SRC (the model it adapts) go together.")
    if TO_HF.value:
        _export(workdir, TO_HF.value)
    elif TO_PEFT.value:
        _export_peft(workdir, TO_PEFT.value)
    elif FROM_PEFT.value:
        _import_peft(FROM_PEFT.value, BASE.value, workdir)
    else:
        _import(FROM_HF.value or FROM_GGUF.value, workdir)


def _import(source: str, workdir: str) -> None:
    if FROM_HF.value and source.endswith(".gguf"):
        raise UserError(f"--from_hf={source!r} is a GGUF file; use --from_gguf.")
    if FROM_GGUF.value and not source.endswith(".gguf"):
        raise UserError(f"--from_gguf={source!r} does not end in .gguf; give a GGUF file.")
    if FROM_HF.value:
        hf.read_config(source)  # A clear error for a directory that is not a HF model.
    _log(f"reading {source}")
    pretrained = load_pretrained(source, log=_log)
    config = pretrained.model_config
    num_params = sum(x.size for x in _leaves(pretrained.params))
    _log(
        f"{pretrained.source['family']}: {num_params:,} parameters, {config.num_layers} layers, "
        f"d_model {config.d_model}, heads {config.num_heads}/{config.num_kv_heads}, "
        f"vocab {config.vocab_size}, context {config.max_seq_len}"
    )
    save_as_run(workdir, pretrained, log=_log)
    _log(
        f"checkpoint   {workdir}/ckpt (step 0, parameters only)\n"
        f"config       {workdir}/config.gin\n"
        f"fine-tune:   python -m launch.train --gin_file=... --init_from={workdir} "
        "--workdir=NEW_RUN"
    )


def _export(workdir: str, directory: str) -> None:
    from research.checkpoint import load_model

    loaded = load_model(workdir, step=STEP.value, log=_log)
    tokenizer = loaded.tokenizer
    special_ids = {}
    if tokenizer is not None:
        special_ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
        if tokenizer.pad_token is not None:
            special_ids["pad_token_id"] = tokenizer.pad_id
    tokenizer_dir = None
    if tokenizer is not None:
        from etils import epath

        from research.storage import local_copy

        tokenizer_dir = local_copy(epath.Path(workdir) / "tokenizer")
    model_config, params = loaded.model_config, loaded.params
    if model_config.lora_rank:
        from research.model import lora

        _log(f"merging the rank-{model_config.lora_rank} LoRA adapters into the kernels")
        model_config, params = lora.merge(model_config, params)
    if model_config.quant != "none":  # transformers reads float weights: the ones it stands for.
        from research.compression.quantize import dequantize_params

        _log(f"dequantizing the {model_config.quant} weights to float32 for transformers")
        model_config, params = dequantize_params(model_config, params)
    family = hf.save_hf(
        directory,
        model_config,
        params,
        tokenizer_dir=tokenizer_dir,
        family=read_source(workdir, loaded.step).get("family"),
        special_ids=special_ids,
        max_shard_bytes=int(MAX_SHARD_GB.value * 1e9),
    )
    _log(
        f"exported step {loaded.step} of {workdir} to {directory} as {family} "
        f"({'with' if tokenizer_dir else 'without'} tokenizer); load it with "
        f"transformers.AutoModelForCausalLM.from_pretrained({directory!r})"
    )


def _export_peft(workdir: str, directory: str) -> None:
    from research.checkpoint import load_model
    from research.model import lora

    loaded = load_model(workdir, step=STEP.value, log=_log)
    if not loaded.model_config.lora_rank:
        raise UserError(
            f"{workdir} is not a LoRA run (model.lora_rank is 0): nothing to export as PEFT; "
            "use --to_hf for the whole model."
        )
    source = read_source(workdir, loaded.step)
    files = lora.save_peft(
        loaded.model_config, loaded.params, directory, base_model=source.get("path", "")
    )
    train, total = lora.trainable_count(loaded.params)
    _log(
        f"exported the adapters of step {loaded.step} ({train:,} of {total:,} parameters) to "
        f"{directory}: {', '.join(files)}; load them with "
        f"peft.PeftModel.from_pretrained(base_model, {directory!r})"
    )


def _import_peft(directory: str, base: str, workdir: str) -> None:
    from research.model import lora

    lora.read_peft_config(directory)  # A clear error before the base is read.
    pretrained = load_pretrained(base, log=_log)
    config, params = lora.load_peft(pretrained.model_config, pretrained.params, directory)
    pretrained.model_config, pretrained.params = config, params
    save_as_run(workdir, pretrained, log=_log)
    _log(
        f"{workdir}: {base} with the rank-{config.lora_rank} adapters of {directory} "
        f"(targets {list(config.lora_targets)}); launch.serve / launch.sample serve them merged"
    )


def _leaves(params):
    import jax

    return jax.tree.leaves(params)


if __name__ == "__main__":
    app.run(cli.guarded(main))
