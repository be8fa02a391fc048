"""Compress a model and judge every stage against the original on the same held-out text.

  python -m launch.compress --gin_file=configs/compress/smollm2_int8.gin \
      --from=SmolLM2-135M-Instruct.Q4_1.gguf --workdir=runs/smollm2-int8

--from is a .gguf file, a Hugging Face directory or a Cirrus workdir. The stages
(`compress.stages`, research/compression/config.py) run in order; the last one's model is
saved in --workdir as a normal run (launch.sample / eval / serve / convert read it), next to
compress_report.json, compress_report.md and compress_report.png.
"""

import dataclasses
import os
import time

import jax
import numpy as np
from absl import app, flags

from launch import cli
from launch import config as gin_config
from research.checkpoint.load import from_pretrained
from research.checkpoint.pretrained import Pretrained, load_pretrained, save_as_run
from research.compression import corpus, distill, evaluate, gptq, prune, quantize, report, speed
from research.compression.config import CompressConfig
from research.errors import UserError
from research.model import count_params

FROM = flags.DEFINE_string("from", None, "The model to compress: .gguf, HF directory or workdir.")


def _log(message: str) -> None:
    print(message, flush=True)


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; see --helpfull.")
    source, workdir = FROM.value, cli.WORKDIR.value
    if not source or not workdir:
        raise UserError("give --from=<.gguf | HF directory | workdir> and --workdir=DIR.")
    gin_config.parse(cli.GIN_FILES.value, cli.GIN_BINDINGS.value)
    config = gin_config.build(CompressConfig)
    if os.path.isdir(os.path.join(workdir, "ckpt")) and os.listdir(os.path.join(workdir, "ckpt")):
        raise UserError(f"{workdir}/ckpt already holds a model; give an empty --workdir.")
    start = time.perf_counter()

    _log(f"reading {source}")
    original = load_pretrained(source, log=_log)
    if original.model_config.quant != "none":
        raise UserError(f"{source} is already quantized ({original.model_config.quant}).")
    if original.tokenizer is None:
        raise UserError(f"{source} has no tokenizer; the held-out evaluation needs one.")
    reference = from_pretrained(original)
    models, current = {}, original
    masks = {}  # Sparsity masks of a magnitude / wanda prune stage, kept through distill.
    for stage in config.stages:
        _log(f"stage {stage}")
        current = _run_stage(stage, current, config, original, workdir, masks)
        models[_stage_name(stage, config)] = current

    tokens = evaluate.heldout_tokens(original.tokenizer, max_tokens=config.eval_tokens or None)
    candidates = {name: from_pretrained(m) for name, m in models.items()}
    for kind in config.baselines:
        _log(f"baseline {kind} (the gguf package's quantizer)")
        params = evaluate.gguf_baseline(reference.model_config, reference.params, kind)
        candidates[f"llama.cpp {kind.upper()}"] = _with_params(reference, params)
    _log(f"evaluating on {len(tokens):,} held-out tokens, windows of {config.eval_window}")
    metrics = evaluate.compare(reference, candidates, tokens, window=config.eval_window, log=_log)

    fp32_bytes = quantize.weight_bytes(reference.params)
    rows = {"original (fp32)": _row(metrics["reference"], reference, fp32_bytes, ours=True)}
    for name, model in candidates.items():
        ours = name in models
        rows[name] = _row(metrics[name], model, fp32_bytes, ours=ours)
        if not ours:  # A baseline's size is its GGUF blocks' (_GGUF_BLOCK_BYTES).
            rows[name].update(_gguf_size(name, reference, fp32_bytes))
    if config.speed_tokens:
        for name, model in [("original (fp32)", reference), *candidates.items()]:
            if rows[name]["ours"]:
                _log(f"timing {name}: {config.speed_tokens} tokens at batch 1")
                rows[name]["decode_tokens_per_s"] = speed.decode_tokens_per_s(
                    model, config.speed_tokens, config.speed_reps
                )
        base = rows["original (fp32)"]["decode_tokens_per_s"]
        for row in rows.values():
            if row.get("decode_tokens_per_s"):
                row["speedup"] = row["decode_tokens_per_s"] / base

    final = Pretrained(
        model_config=current.model_config,
        params=current.params,
        source={**original.source, "compressed": list(config.stages)},
        tokenizer=original.tokenizer,
        tokenizer_dir=original.tokenizer_dir,
        tokenizer_extra=original.tokenizer_extra,
    )
    save_as_run(workdir, final, log=_log)
    summary = {
        "source": source,
        "stages": list(config.stages),
        "config": {k: v for k, v in config.__dict__.items()},
        "eval": {
            "text": "research/compression/heldout (SOURCES.md)",
            "tokens": len(tokens),
            "window": config.eval_window,
            "scored_tokens": metrics["reference"]["scored_tokens"],
        },
        "models": rows,
        "seconds": time.perf_counter() - start,
    }
    for path in report.write_report(workdir, summary):
        _log(f"report       {path}")
    _log(
        f"serve it:    python -m launch.serve --workdir={workdir}\n"
        f"sample it:   python -m launch.sample --workdir={workdir} --prompt='Hello'"
    )


def _stage_name(stage: str, config: CompressConfig) -> str:
    if stage == "prune":
        if config.prune_method == "depth":
            return f"pruned -{config.prune_layers} layers"
        if config.prune_method == "width":
            return f"pruned width (mlp {config.prune_mlp_dim}, kv heads {config.prune_kv_heads})"
        pattern = "2:4" if config.sparsity_pattern == "2:4" else f"{config.sparsity:.0%}"
        return f"{config.prune_method} {pattern} sparse"
    if stage == "distill":
        return f"distilled {config.distill_steps} steps"
    if stage == "quantize":
        group = f" g{config.quant_group}" if config.quant_group else ""
        return f"{config.quant}{group} {config.method}"
    return stage


def _run_stage(
    stage: str,
    model: Pretrained,
    config: CompressConfig,
    original: Pretrained,
    workdir: str,
    masks: dict,
) -> Pretrained:
    """One stage: a Pretrained in, a Pretrained out (params as NumPy or nnx.State)."""
    if stage == "prune":
        return _prune(model, config, masks)
    if stage == "distill":
        return _distill(model, original, config, workdir, masks)
    overrides = None
    if config.method == "gptq":
        batches = _calibration(model, config)
        current = from_pretrained(model)  # The stage's input (e.g. a pruned model).
        hessians = gptq.collect_hessians(current.graphdef, current.params, batches, log=_log)
        overrides = gptq.gptq_overrides(
            model.model_config, model.params, hessians, config.quant, config.quant_group, log=_log
        )
    qconfig, qparams = quantize.quantize_params(
        model.model_config, model.params, config.quant, config.quant_group, overrides=overrides
    )
    return Pretrained(qconfig, qparams, model.source, model.tokenizer)


def _prune(model: Pretrained, config: CompressConfig, masks: dict) -> Pretrained:
    if config.prune_method == "width":
        return _prune_width(model, config)
    if config.prune_method in ("magnitude", "wanda"):
        return _sparsify(model, config, masks)
    layers = model.model_config.num_layers
    if config.prune_layers > layers - 2:
        raise UserError(
            f"compress.prune_layers={config.prune_layers} leaves fewer than 2 of the model's "
            f"{layers} layers; use at most {layers - 2}."
        )
    current = from_pretrained(model)
    batches = _calibration(model, config)[:8]
    importance = prune.layer_importance(current.graphdef, current.params, batches)
    keep = prune.least_important(importance, config.prune_layers)
    dropped = sorted(set(range(layers)) - set(keep))
    _log(f"layer influence: {np.round(importance, 4).tolist()}; dropping layers {dropped}")
    pconfig, pparams = prune.drop_layers(model.model_config, model.params, keep)
    return Pretrained(pconfig, pparams, model.source, model.tokenizer)


def _prune_width(model: Pretrained, config: CompressConfig) -> Pretrained:
    cfg = model.model_config
    mlp_dim = config.prune_mlp_dim or cfg.mlp_dim
    kv_heads = config.prune_kv_heads or cfg.num_kv_heads
    if mlp_dim > cfg.mlp_dim or kv_heads > cfg.num_kv_heads:
        raise UserError(
            f"compress.prune_mlp_dim={mlp_dim} / compress.prune_kv_heads={kv_heads} must not "
            f"exceed the model's mlp_dim {cfg.mlp_dim} / num_kv_heads {cfg.num_kv_heads}."
        )
    current = from_pretrained(model)
    energy = prune.activation_energy(
        current.graphdef, current.params, _calibration(model, config)[:8]
    )
    mlp_scores, group_scores = prune.width_importance(cfg, energy)
    pconfig, pparams = prune.prune_width(
        cfg, model.params, mlp_scores, group_scores, mlp_dim=mlp_dim, num_kv_heads=kv_heads
    )
    _log(
        f"width: mlp {cfg.mlp_dim} -> {mlp_dim} channels, kv heads {cfg.num_kv_heads} -> "
        f"{kv_heads} ({pconfig.num_heads} query heads) per layer"
    )
    return Pretrained(pconfig, pparams, model.source, model.tokenizer)


def _sparsify(model: Pretrained, config: CompressConfig, masks: dict) -> Pretrained:
    energy = None
    if config.prune_method == "wanda":
        current = from_pretrained(model)
        energy = prune.activation_energy(
            current.graphdef, current.params, _calibration(model, config)
        )
    try:
        found = prune.sparsity_masks(
            model.model_config,
            model.params,
            config.sparsity,
            pattern=config.sparsity_pattern,
            energy=energy,
        )
    except ValueError as error:
        raise UserError(f"compress.sparsity_pattern: {error}") from None
    masks.update(found)
    params = prune.apply_sparsity(model.params, found)
    _log(
        f"{config.prune_method}: {prune.sparsity_of(params, found):.1%} of {len(found)} layer "
        "matrices zeroed (kept zero by a later distill stage; no speed-up on CPU)"
    )
    return Pretrained(model.model_config, params, model.source, model.tokenizer)


def _calibration(model: Pretrained, config: CompressConfig) -> list:
    length = min(config.calibration_len, model.model_config.max_seq_len)
    return corpus.calibration_batches(model.tokenizer, config.calibration_sequences, length)


def _distill(
    model: Pretrained, teacher: Pretrained, config: CompressConfig, workdir: str, masks: dict
):
    settings = distill.DistillConfig(
        steps=config.distill_steps,
        batch_size=config.distill_batch_size,
        seq_len=min(config.distill_seq_len, model.model_config.max_seq_len - 1),
        learning_rate=config.distill_learning_rate,
        alpha=config.distill_alpha,
        temperature=config.distill_temperature,
        teacher_topk=config.distill_teacher_topk,
        cache_dir=config.distill_cache_dir,
    )
    if settings.teacher_topk > teacher.model_config.vocab_size:
        raise UserError(
            f"compress.distill_teacher_topk={settings.teacher_topk} exceeds the teacher's "
            f"vocabulary ({teacher.model_config.vocab_size}); 64 keeps nearly all its mass."
        )
    batches = corpus.training_batches(model.tokenizer, settings.batch_size, settings.seq_len)
    params, history = distill.distill(
        (model.model_config, model.params),
        (teacher.model_config, teacher.params),
        batches,
        settings,
        masks=masks or None,
        log=_log,
    )
    distill.plot_history(history, os.path.join(workdir, "distill_loss.png"))
    return Pretrained(model.model_config, params, model.source, model.tokenizer)


def _with_params(model, params):
    """`model` (a LoadedModel) with other parameters of the same shapes, placed as its own."""
    shardings = jax.tree.map(lambda x: x.sharding, model.params)
    return dataclasses.replace(model, params=jax.device_put(params, shardings))


def _row(metrics: dict, model, fp32_bytes: int, *, ours: bool) -> dict:
    return {
        **{k: metrics.get(k) for k in ("ppl", "dppl_pct", "kl", "top1")},
        **_size(quantize.weight_bytes(model.params), model.model_config, fp32_bytes),
        "ours": ours,
    }


def _size(size: int, model_config, fp32_bytes: int) -> dict:
    """MB, ratio to fp32, and bits per weight the model stands for (an int4 byte holds two)."""
    weights = count_params(model_config.replace(quant="none"))
    return {"weight_mb": size / 1e6, "weight_ratio": size / fp32_bytes,
            "bits_per_weight": 8 * size / weights}  # fmt: skip


# Bytes of one GGUF block of 32 weights: fp16 scale (+ fp16 min for Q4_1) and the values.
_GGUF_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def _gguf_size(name: str, reference, fp32_bytes: int) -> dict:
    """A baseline's weight memory as llama.cpp stores it; 1-D tensors stay float32."""
    per_block = _GGUF_BLOCK_BYTES[name.split()[-1]]
    size = sum(
        x.size * per_block // 32 if x.ndim >= 2 else 4 * x.size
        for x in jax.tree.leaves(reference.params)
    )
    return _size(size, reference.model_config, fp32_bytes)


if __name__ == "__main__":
    app.run(cli.guarded(main))
