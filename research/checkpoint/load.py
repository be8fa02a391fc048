"""Loading a model for inference: parameters only, onto any mesh.

`load(source)` is the one loader every entry point uses: a Cirrus workdir (its latest usable
checkpoint), a Hugging Face model directory, or a GGUF file, each giving the same
LoadedModel (parameters placed on the mesh by their logical axes, the tokenizer, the chat
template). `load_model(workdir)` is the workdir case.
"""

import dataclasses

import jax
from etils import epath
from flax import nnx

from research import sharding, storage
from research.checkpoint.manager import (
    CheckpointConfig,
    Checkpointer,
    abstract_with_shardings,
    restore_latest_usable,
)
from research.data import Tokenizer
from research.data.tokenizer import read_chat_template
from research.errors import UserError
from research.model import ModelConfig
from research.storage import local_copy
from research.train.state import abstract_model


@dataclasses.dataclass
class LoadedModel:
    model_config: ModelConfig
    graphdef: object
    params: object  # nnx.State of nnx.Param, sharded on the mesh it was loaded onto.
    tokenizer: Tokenizer | None
    step: int | None  # The checkpoint step of a workdir; None for HF / GGUF sources.
    data_dir: str | None
    chat_template: str | None = None  # Jinja, from tokenizer_config.json or GGUF metadata.
    source: dict = dataclasses.field(default_factory=dict)  # {"format", "path", ...}


def load(source: str, *, mesh=None, log=print) -> LoadedModel:
    """A workdir, a Hugging Face directory (config.json) or a `.gguf` file, onto `mesh`
    (default: one device)."""
    from research.checkpoint.pretrained import load_pretrained

    path = epath.Path(source)
    is_hf = not storage.is_remote(source) and (path / "config.json").exists()
    if not source.endswith(".gguf") and not is_hf:  # A workdir (load_model names what is missing).
        loaded = merge_lora(load_model(source, mesh=mesh, log=log), mesh=mesh, log=log)
        tokenizer_dir = path / "tokenizer"
        if tokenizer_dir.exists():
            loaded.chat_template = read_chat_template(local_copy(tokenizer_dir))
        loaded.source = {"format": "cirrus", "path": source, "step": loaded.step}
        return loaded
    return from_pretrained(load_pretrained(source, log=log), mesh=mesh)


def from_pretrained(pretrained, *, mesh=None) -> LoadedModel:
    """A Pretrained (research/checkpoint/pretrained.py) placed on `mesh` (default one device)."""
    if pretrained.tokenizer_dir:
        template = read_chat_template(pretrained.tokenizer_dir)
    else:
        template = pretrained.tokenizer_extra.get("chat_template")
    if mesh is None:
        mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    graphdef, abstract, shardings = param_shardings(pretrained.model_config, mesh)
    params = pretrained.params
    if isinstance(params, dict):  # A pure dict (e.g. quantized NumPy arrays): into the State.
        nnx.replace_by_pure_dict(abstract, params)
        params = abstract
    return LoadedModel(
        model_config=pretrained.model_config,
        graphdef=graphdef,
        params=jax.device_put(params, shardings),
        tokenizer=pretrained.tokenizer,
        step=None,
        data_dir=None,
        chat_template=template,
        source=pretrained.source,
    )


def merge_lora(loaded: LoadedModel, *, mesh=None, log=print) -> LoadedModel:
    """`loaded` with its LoRA adapters folded into the kernels (research/model/lora.py), for
    inference: the sampler then runs the plain model. Unchanged without adapters."""
    if not loaded.model_config.lora_rank:
        return loaded
    from research.model import lora

    config, params = lora.merge(loaded.model_config, loaded.params)
    log(
        f"merged rank-{loaded.model_config.lora_rank} LoRA adapters into the kernels"
        + (" (the quantized base is now float32)" if loaded.model_config.quant != "none" else "")
    )
    if mesh is None:
        mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    graphdef, abstract, shardings = param_shardings(config, mesh)
    nnx.replace_by_pure_dict(abstract, params)
    return dataclasses.replace(
        loaded, model_config=config, graphdef=graphdef, params=jax.device_put(abstract, shardings)
    )


BASE_ENV = "CIRRUS_LORA_BASE"


def _lora_base_params(saved: dict, model_config: ModelConfig, workdir: str, log) -> dict:
    """The frozen base of an adapter-only LoRA run, as a pure dict: read again from the source
    its metadata names (or $CIRRUS_LORA_BASE, for a base that has moved) and checked against
    the fingerprint taken when training started."""
    import os

    from research.checkpoint.pretrained import load_pretrained
    from research.model import lora

    source = os.environ.get(BASE_ENV) or saved["source"]["path"]
    if not storage.is_remote(source) and not os.path.exists(source):
        raise UserError(
            f"{workdir} holds LoRA adapters only; their base {source} is not there. Put the "
            f"base back, or name where it is now with {BASE_ENV}=PATH."
        )
    log(f"LoRA adapters only in {workdir}: reading their base from {source}")
    pretrained = load_pretrained(source, log=log)
    fingerprint = lora.base_fingerprint(pretrained.params)
    if fingerprint != saved["fingerprint"]:
        raise UserError(
            f"{workdir}: its LoRA adapters were trained on a base with fingerprint "
            f"{saved['fingerprint']}, but {source} has {fingerprint}: another or a changed "
            f"model. Name the original with {BASE_ENV}=PATH."
        )
    if pretrained.model_config.quant != model_config.quant:
        raise UserError(
            f"{workdir}: the run's weights are {model_config.quant!r} but its base {source} "
            f"is {pretrained.model_config.quant!r}."
        )
    params = pretrained.params
    return params.to_pure_dict() if hasattr(params, "to_pure_dict") else params


def param_shardings(model_config: ModelConfig, mesh):
    """NamedShardings of the parameters on `mesh` from their logical axes."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        graphdef, params = abstract_model(model_config)
        shardings = sharding.fit_shardings(nnx.get_named_sharding(params, mesh), params)
    return graphdef, params, shardings


def load_model(workdir: str, *, step: int | None = None, mesh=None, log=print) -> LoadedModel:
    """The parameters of the latest usable (or given) step of a run, plus its tokenizer.

    A step is usable when its metadata and its parameters both read back; an unusable latest
    step is skipped with a message through `log` (see restore_latest_usable).

    `mesh` defaults to one device; pass a (data, fsdp, tensor) mesh to load sharded.
    """
    checkpointer = Checkpointer(workdir, CheckpointConfig(async_save=False))
    steps = checkpointer.all_steps()
    if not steps:
        raise UserError(
            f"no checkpoint in {checkpointer.directory}; train first with "
            f"`python -m launch.train --workdir={workdir} ...`."
        )
    if step is not None and step not in steps:
        raise UserError(f"step {step} is not in {checkpointer.directory}; saved steps: {steps}.")
    if mesh is None:
        mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])

    def restore(s):
        """The step's metadata, then its parameters in the shape that the metadata names."""
        meta = checkpointer.read_meta(s)
        model_config = ModelConfig(**meta["model_config"])
        graphdef, abstract, shardings = param_shardings(model_config, mesh)
        abstract = abstract_with_shardings(abstract, shardings)
        if "lora_base" not in meta:
            return meta, model_config, graphdef, checkpointer.restore_params(s, abstract)
        from research.model import lora

        adapters = checkpointer.restore_params(s, lora.adapter_tree(abstract))
        base = _lora_base_params(meta["lora_base"], model_config, workdir, log)
        _, params, _ = param_shardings(model_config, mesh)
        nnx.replace_by_pure_dict(params, lora.with_adapters(base, adapters))
        return meta, model_config, graphdef, jax.device_put(params, shardings)

    try:
        if step is not None:
            try:
                restored = restore(step)
            except Exception as error:  # Corruption shows up as many exception types.
                raise UserError(
                    f"step {step} in {checkpointer.directory} is unreadable "
                    f"({type(error).__name__}: {str(error)[:300]}); pick another of the saved "
                    f"steps {steps}, or leave the step unset to use the latest usable one."
                ) from error
        else:
            # A step whose metadata or parameters are unreadable falls back to an older one.
            step, restored = restore_latest_usable(checkpointer, restore, log=log)
    finally:
        checkpointer.close()
    meta, model_config, graphdef, params = restored
    tokenizer_dir = epath.Path(workdir) / "tokenizer"
    tokenizer = Tokenizer.load(local_copy(tokenizer_dir)) if tokenizer_dir.exists() else None
    return LoadedModel(
        model_config=model_config,
        graphdef=graphdef,
        params=params,
        tokenizer=tokenizer,
        step=step,
        data_dir=meta.get("data_dir"),
    )
