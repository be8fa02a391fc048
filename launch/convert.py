"""Model interchange: Hugging Face and GGUF checkpoints in, Hugging Face out.

  python -m launch.convert --from_hf=DIR --workdir=OUT      # config.json + *.safetensors
  python -m launch.convert --from_gguf=FILE --workdir=OUT   # llama.cpp GGUF (dequantized)
  python -m launch.convert --workdir=RUN --to_hf=DIR        # a Cirrus run -> transformers

An import writes OUT/ckpt (a params-only Orbax step 0 that `load_model(OUT)` reads),
OUT/tokenizer and OUT/config.gin; fine-tune it with
`python -m launch.train ... --init_from=OUT --workdir=NEW`. The export writes config.json,
model.safetensors (float32; sharded past --max_shard_gb) and the run's tokenizer files.
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
                                      ("to_hf", TO_HF)) if flag.value]  # fmt: skip
    if len(chosen) != 1 or not workdir:
        raise UserError(
            "give --workdir and exactly one of --from_hf=DIR, --from_gguf=FILE (import into "
            f"--workdir) or --to_hf=DIR (export --workdir); got {chosen or 'none'}"
            f"{'' if workdir else ' and no --workdir'}."
        )
    if TO_HF.value:
        _export(workdir, TO_HF.value)
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


def _leaves(params):
    import jax

    return jax.tree.leaves(params)


if __name__ == "__main__":
    app.run(cli.guarded(main))
