"""What a training configuration needs on a TPU slice, before any money is spent.

Per-device memory: parameters and optimizer state from `jax.eval_shape` of the real model and
optimizer, split by the sharding RULES over the mesh (`fit_spec`, as the training loop does,
on an AbstractMesh so any slice size works on this machine); gradients like the parameters;
activations estimated from the model's shapes, the per-device batch, the sequence length and
the remat policy (`activation_bytes`); optionally the compiled train step's memory analysis
(`compiled_memory`, which needs as many devices as the mesh). Time and money: model FLOPs per
step (research.model.flops_per_token) over the slice's peak at an assumed MFU, and the chip's
price. Energy and CO2: the chips' typical power over the run's hours, times the PUE and the
grid's carbon intensity (research/energy.py).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding

from research import energy as energy_lib
from research import sharding
from research import tpu as tpu_lib
from research.errors import UserError
from research.model import ModelConfig, flops_per_token
from research.model.attention import _MAX_QUERY_BLOCKS, _QUERY_BLOCK
from research.train.config import TrainConfig
from research.train.optimizer import make_optimizer
from research.train.state import TrainState, abstract_model, state_shardings
from research.train.step import make_train_step

GIB = 2**30
_BATCH_FEATURES = {
    "inputs": jnp.int32,
    "targets": jnp.int32,
    "positions": jnp.int32,
    "segment_ids": jnp.int32,
    "weights": jnp.float32,
}


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device."""

    params: int
    optimizer: int
    gradients: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations


@dataclasses.dataclass(frozen=True)
class Plan:
    tpu: tpu_lib.TpuType
    chip: tpu_lib.Chip
    mesh_shape: tuple[int, int, int]
    num_params: int
    batch_size: int
    seq_len: int
    micro_batches: int
    num_steps: int
    remat: str
    dtype: str
    memory: Memory
    flops_per_token: float
    mfu: float
    price_per_chip_hour: float
    compiled: dict | None = None
    energy: energy_lib.EnergyConfig = energy_lib.EnergyConfig()

    @property
    def watts_per_chip(self) -> float:
        return self.energy.watts_per_chip or self.chip.watts

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def step_time_ideal_s(self) -> float:
        """Model FLOPs of one step over the slice's peak: the 100% MFU bound."""
        return step_time_s(self.flops_per_token, self.tokens_per_step, self.tpu.chips, self.chip)

    @property
    def step_time_s(self) -> float:
        return self.step_time_ideal_s / self.mfu

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.step_time_s

    @property
    def cost_per_hour(self) -> float:
        return self.tpu.chips * self.price_per_chip_hour

    @property
    def tokens_per_dollar(self) -> float:
        return self.tokens_per_second * 3600 / self.cost_per_hour

    @property
    def run_hours(self) -> float:
        return self.num_steps * self.step_time_s / 3600

    @property
    def power_kw(self) -> float:
        """The slice's facility power: chips x watts x PUE."""
        return energy_lib.energy_kwh(self.tpu.chips, self.watts_per_chip, 1.0, self.energy.pue)

    @property
    def run_kwh(self) -> float:
        return energy_lib.energy_kwh(
            self.tpu.chips, self.watts_per_chip, self.run_hours, self.energy.pue
        )

    @property
    def run_co2_kg(self) -> float:
        return energy_lib.co2_kg(self.run_kwh, self.energy.grid_gco2_per_kwh)

    @property
    def fits(self) -> bool:
        used = self.memory.total
        if self.compiled:
            used = max(used, self.compiled["peak"])
        return used <= self.chip.hbm_bytes

    def to_json(self) -> dict:
        return {
            "tpu": self.tpu.name,
            "chips": self.tpu.chips,
            "hosts": self.tpu.hosts,
            "hbm_bytes_per_chip": self.chip.hbm_bytes,
            "peak_flops_per_chip": self.chip.peak_flops,
            "price_per_chip_hour": self.price_per_chip_hour,
            "mesh_shape": list(self.mesh_shape),
            "num_params": self.num_params,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "micro_batches": self.micro_batches,
            "remat": self.remat,
            "dtype": self.dtype,
            "memory_per_device": dict(dataclasses.asdict(self.memory), total=self.memory.total),
            "compiled_memory_per_device": self.compiled,
            "fits": self.fits,
            "flops_per_token": self.flops_per_token,
            "flops_per_step": self.flops_per_token * self.tokens_per_step,
            "mfu": self.mfu,
            "step_time_ideal_s": self.step_time_ideal_s,
            "step_time_s": self.step_time_s,
            "tokens_per_second": self.tokens_per_second,
            "cost_per_hour": self.cost_per_hour,
            "tokens_per_dollar": self.tokens_per_dollar,
            "num_steps": self.num_steps,
            "run_hours": self.run_hours,
            "run_cost": self.run_hours * self.cost_per_hour,
            "watts_per_chip": self.watts_per_chip,
            "pue": self.energy.pue,
            "grid_gco2_per_kwh": self.energy.grid_gco2_per_kwh,
            "power_kw": self.power_kw,
            "run_kwh": self.run_kwh,
            "run_co2_kg": self.run_co2_kg,
        }


def step_time_s(flops_per_token: float, tokens_per_step: int, chips: int, chip) -> float:
    """Seconds per step at 100% MFU: FLOPs per step / (chips x peak FLOP/s per chip)."""
    return flops_per_token * tokens_per_step / (chips * chip.peak_flops)


def resolve_mesh(mesh_shape, tpu_type: tpu_lib.TpuType, flag: str = "train.mesh_shape"):
    """The (data, fsdp, tensor) sizes over the slice's chips; a UserError naming both if not."""
    try:
        return sharding.resolve_mesh_shape(mesh_shape, tpu_type.chips)
    except UserError as error:
        raise UserError(
            f"--tpu={tpu_type.name} has {tpu_type.chips} devices, which cannot fill the mesh: "
            f"{error} Change {flag} or --tpu."
        ) from None


def check_batch(train_config: TrainConfig, mesh_shape, hosts: int) -> None:
    """The loop's batch checks (loop.check_batch_layout) for a mesh that is not built yet."""
    shards = mesh_shape[0] * mesh_shape[1]
    micro = train_config.batch_size // train_config.micro_batches
    if train_config.batch_size % shards or micro % shards or train_config.batch_size % hosts:
        raise UserError(
            f"train.batch_size={train_config.batch_size} (micro-batches of {micro}) must be "
            f"divisible by the mesh's batch axes (data x fsdp = {shards}) and by the {hosts} "
            "hosts; change train.batch_size, train.micro_batches or the mesh shape."
        )


def abstract_state(model_config: ModelConfig, train_config: TrainConfig):
    """(abstract TrainState, its PartitionSpecs by RULES), nothing allocated."""
    tx = make_optimizer(train_config)
    with nnx.logical_axis_rules(sharding.RULES):
        _, params = abstract_model(model_config)
        state = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32),
            params=params,
            opt_state=jax.eval_shape(tx.init, params),
        )
        specs = nnx.get_partition_spec(state)
    return state, specs


def shard_bytes(abstract_tree, spec_tree, mesh_shape) -> int:
    """Bytes of one device's shard of every leaf, each spec fitted to the mesh (fit_spec)."""
    mesh = AbstractMesh(tuple(mesh_shape), sharding.MESH_AXES, axis_types=sharding.AUTO3)

    def leaf_bytes(leaf, spec):
        fitted = sharding.fit_spec(spec, leaf.shape, mesh)
        shard = NamedSharding(mesh, fitted).shard_shape(leaf.shape)
        return math.prod(shard) * jnp.dtype(leaf.dtype).itemsize

    sizes = jax.tree.map(leaf_bytes, abstract_tree, spec_tree)
    return sum(jax.tree.leaves(sizes))


def state_bytes(model_config: ModelConfig, train_config: TrainConfig, mesh_shape, abstract=None):
    """(parameter bytes, optimizer-state bytes) per device; the step counter is optimizer.

    abstract: `abstract_state(model_config, train_config)` when the caller already has it.
    """
    state, specs = abstract or abstract_state(model_config, train_config)
    params = shard_bytes(state.params, specs.params, mesh_shape)
    optimizer = shard_bytes(state.opt_state, specs.opt_state, mesh_shape)
    return params, optimizer + shard_bytes(state.step, specs.step, mesh_shape)


def _local(size: int, shards: int) -> int:
    """A dimension's per-device size: divided when the mesh axis divides it (fit_spec)."""
    return size // shards if size % shards == 0 else size


def attended_keys(seq_len: int) -> float:
    """Mean keys per query whose softmax probabilities the attention keeps for the backward
    pass: causal_attention computes query blocks, each against the keys up to its end."""
    block = max(_QUERY_BLOCK, -(-seq_len // _MAX_QUERY_BLOCKS))
    total = sum(
        (min(start + block, seq_len) - start) * min(start + block, seq_len)
        for start in range(0, seq_len, block)
    )
    return total / seq_len


def activation_bytes(model_config: ModelConfig, train_config: TrainConfig, mesh_shape) -> int:
    """Estimated bytes per device the backward pass keeps alive (an estimate, not a bound).

    Per token of one layer without remat (a = compute dtype bytes; sizes per tensor shard):
    two norms keep a float32 normalized copy and their compute-dtype output (2 (4 + a) D);
    attention keeps q, k, v and its output (a (2 N H + 2 K H)) and float32 probabilities
    (4 N x attended_keys); the MLP keeps a F per kept [.., F] array (3 SwiGLU, 2 GELU).
    remat "full" keeps each block's input (a D) instead, "save_dots" that plus the projections'
    outputs; both recompute one layer in the backward pass. Every mode adds one layer's worth
    for the gradients of the layer being differentiated. Outside the blocks: the embedding
    output, the final norm, float32 logits, their softmax and its gradient (3 x 4 V), the
    batch (20 bytes per token) and the [B, T, T] boolean mask. XLA's own fusion decides the
    real figure: `compiled_memory` measures it where the program can be compiled.
    """
    config = model_config
    _, _, tensor = mesh_shape
    a = jnp.dtype(config.dtype).itemsize
    d, h, t = config.d_model, config.resolved_head_dim, train_config.seq_len
    heads = _local(config.num_heads, tensor)
    kv_heads = _local(config.num_kv_heads, tensor)
    mlp = _local(config.mlp_dim, tensor)
    vocab = _local(config.vocab_size, tensor)
    mlp_arrays = 3 if config.mlp_activation == "swiglu" else 2
    layer = (
        2 * (4 + a) * d
        + a * (2 * heads * h + 2 * kv_heads * h)
        + 4 * heads * attended_keys(t)
        + a * mlp_arrays * mlp
    )
    if config.remat == "none":
        layers = config.num_layers * layer + layer
    elif config.remat == "full":
        layers = config.num_layers * a * d + 2 * layer
    else:  # save_dots: q, k, v, o, the MLP's input projections and down projection.
        dots = a * ((heads + 2 * kv_heads) * h + d + (mlp_arrays - 1) * mlp + d)
        layers = config.num_layers * (a * d + dots) + 2 * layer
    outside = a * d + (4 + a) * d + 3 * 4 * vocab + 20
    rows = train_config.batch_size // train_config.micro_batches
    rows //= mesh_shape[0] * mesh_shape[1]
    return int(rows * t * (layers + outside) + rows * t * t)


def compiled_memory(model_config: ModelConfig, train_config: TrainConfig, mesh) -> dict | None:
    """Per-device sizes from XLA's memory analysis of the real jitted train step on `mesh`
    (abstract inputs: nothing is allocated). None when the backend gives no analysis."""
    tx = make_optimizer(train_config)
    graphdef, _ = abstract_model(model_config)
    shardings = state_shardings(mesh, model_config, tx)
    with jax.set_mesh(mesh):  # Under the mesh: the same pytree metadata as the shardings.
        state, _ = abstract_state(model_config, train_config)
    state = jax.tree.map(
        lambda leaf, named: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=named),
        state,
        shardings,
    )
    batch_sharding = sharding.batch_sharding(mesh)
    shape = (train_config.batch_size, train_config.seq_len)
    batch = {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
        for name, dtype in _BATCH_FEATURES.items()
    }
    step = make_train_step(train_config, graphdef=graphdef, tx=tx)
    jitted = jax.jit(
        step,
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    with jax.set_mesh(mesh):
        analysis = jitted.lower(state, batch).compile().memory_analysis()
    if analysis is None:
        return None
    sizes = {
        "arguments": analysis.argument_size_in_bytes,
        "outputs": analysis.output_size_in_bytes,
        "aliased": analysis.alias_size_in_bytes,
        "temporaries": analysis.temp_size_in_bytes,
        "code": analysis.generated_code_size_in_bytes,
    }
    sizes["peak"] = sizes["arguments"] + sizes["outputs"] - sizes["aliased"] + sizes["temporaries"]
    sizes["platform"] = mesh.devices.flat[0].platform
    return sizes


def make_plan(
    model_config: ModelConfig,
    train_config: TrainConfig,
    tpu_type: tpu_lib.TpuType,
    *,
    mesh_shape=None,
    mfu: float = 0.4,
    price_per_chip_hour: float | None = None,
    compiled: dict | None = None,
    energy: energy_lib.EnergyConfig | None = None,
) -> Plan:
    """The plan of `train_config` (its mesh_shape unless `mesh_shape` is given) on a slice."""
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu={mfu} must be in (0, 1], e.g. 0.4 for 40% model FLOPs use.")
    chip = tpu_lib.chip(tpu_type)
    flag = "train.mesh_shape" if mesh_shape is None else "--mesh_shape"
    requested = train_config.mesh_shape if mesh_shape is None else mesh_shape
    shape = resolve_mesh(requested, tpu_type, flag)
    check_batch(train_config, shape, tpu_type.hosts)
    if train_config.seq_len > model_config.max_seq_len:
        raise UserError(
            f"train.seq_len={train_config.seq_len} exceeds model.max_seq_len="
            f"{model_config.max_seq_len}; lower train.seq_len or raise model.max_seq_len."
        )
    abstract = abstract_state(model_config, train_config)
    params, optimizer = state_bytes(model_config, train_config, shape, abstract)
    memory = Memory(
        params=params,
        optimizer=optimizer,
        # float32 like the parameters; the accumulated step holds a running sum as well.
        gradients=params * (2 if train_config.micro_batches > 1 else 1),
        activations=activation_bytes(model_config, train_config, shape),
    )
    num_params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract[0].params))
    return Plan(
        tpu=tpu_type,
        chip=chip,
        mesh_shape=shape,
        num_params=num_params,
        batch_size=train_config.batch_size,
        seq_len=train_config.seq_len,
        micro_batches=train_config.micro_batches,
        num_steps=train_config.num_steps,
        remat=model_config.remat,
        dtype=model_config.dtype,
        memory=memory,
        flops_per_token=flops_per_token(model_config, train_config.seq_len),
        mfu=mfu,
        price_per_chip_hour=chip.price_per_chip_hour
        if price_per_chip_hour is None
        else price_per_chip_hour,
        compiled=compiled,
        energy=energy or energy_lib.EnergyConfig(),
    )
