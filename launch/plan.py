"""What a training job needs on a TPU slice, printed before any money is spent.

  python -m launch.plan --gin_file=configs/base.gin --gin_file=configs/model/llama3_8b.gin \
      --tpu=v5p-64 [--mesh_shape=1,-1,1] [--mfu=0.4] [--price_per_chip_hour=4.2] [--compile] \
      [--watts_per_chip=285] [--pue=1.1] [--grid_gco2_per_kwh=475] [--json]

Per-device memory (parameters, AdamW state, gradients, estimated activations) of the gin
configuration under its mesh (train.mesh_shape, or --mesh_shape) and the sharding rules; the
step time from model FLOPs over the slice's bf16 peak (at 100% and at --mfu); tokens per
second, dollars per hour, tokens per dollar and the cost of train.num_steps; the run's energy
(kWh: chips x typical power per chip x hours x PUE) and CO2 (kg: x the grid's gCO2/kWh), from
research/tpu.py's power table and research/energy.py's defaults, or `energy.*` in gin, or the
flags (which win). A configuration
whose per-device total exceeds the chip's HBM gets a WARNING (exit code still 0; `fits` in
--json). --compile also compiles the real train step for the mesh (one device per chip: on a
CPU machine as many CPU devices, set here) and reports XLA's memory analysis; it is slow for
big models, and CPU figures show XLA:CPU's fusion, not the TPU's. Unknown TPU types and mesh
shapes the slice cannot fill are errors (exit 1).
"""

import dataclasses
import json
import sys

from absl import app, flags

from launch import cli
from launch import config as gin_config
from research import plan as plan_lib
from research import tpu as tpu_lib
from research.energy import EnergyConfig
from research.errors import UserError
from research.model import ModelConfig
from research.plan import GIB
from research.train import TrainConfig

# Flags that override the gin-bound EnergyConfig field of the same name.
_ENERGY_FLAGS = ("watts_per_chip", "pue", "grid_gco2_per_kwh")
# Beyond this many CPU devices a compile is impractical on one machine.
MAX_COMPILE_DEVICES = 512

# Defined only when this module is the program: launch.pod and launch.sweep own a --tpu flag,
# and absl flags are global.
_FLAGS = {}


def _define_flags():
    f = flags
    _FLAGS.update(
        tpu=f.DEFINE_string("tpu", None, "TPU type, e.g. v5p-64, v5litepod-16 (v5e-16), v6e-8."),
        mesh_shape=f.DEFINE_string(
            "mesh_shape", None, "(data, fsdp, tensor) sizes, e.g. '1,-1,1'; default: gin's."
        ),
        mfu=f.DEFINE_float("mfu", 0.4, "Assumed model FLOPs utilization for the step time."),
        price_per_chip_hour=f.DEFINE_float(
            "price_per_chip_hour", None, "USD per chip-hour; default: on-demand list price."
        ),
        compile=f.DEFINE_bool("compile", False, "Also compile the train step: XLA's memory."),
        watts_per_chip=f.DEFINE_float(
            "watts_per_chip", None, "Power per chip in W; default energy.*, then the chip table."
        ),
        pue=f.DEFINE_float("pue", None, "Data-center PUE; default energy.pue (1.10)."),
        grid_gco2_per_kwh=f.DEFINE_float(
            "grid_gco2_per_kwh", None, "Grid carbon intensity; default energy.* (475 g/kWh)."
        ),
        json=f.DEFINE_bool("json", False, "Print the plan as JSON."),
    )


def compile_devices(chips: int):
    """`chips` devices to compile on: the default backend's when it has enough, else CPU."""
    import jax

    devices = jax.devices()
    if len(devices) < chips:
        devices = jax.devices("cpu")
    if len(devices) < chips:
        raise UserError(
            f"--compile needs {chips} devices but this machine has {len(devices)}; drop "
            "--compile or plan a smaller slice."
        )
    return devices[:chips]


def _bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:10.2f} {unit}"
    return f"{n:10.0f} B"


def _duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 3600:
        return f"{seconds:.2f} s"
    return f"{seconds / 3600:.1f} h"


def format_plan(plan: plan_lib.Plan) -> str:
    """The readable table launch.plan prints."""
    chip, memory = plan.chip, plan.memory
    hbm = chip.hbm_bytes
    data, fsdp, tensor = plan.mesh_shape
    lines = [
        f"plan: {plan.tpu.name}: {plan.tpu.chips} chips on {plan.tpu.hosts} host(s); per chip "
        f"{hbm / GIB:.0f} GiB HBM, {chip.peak_flops / 1e12:.0f} TFLOP/s bf16, "
        f"${plan.price_per_chip_hour:.2f}/hour",
        f"model: {plan.num_params / 1e6:,.2f} M parameters, compute {plan.dtype}, remat "
        f"{plan.remat}; batch {plan.batch_size} x seq {plan.seq_len} "
        f"({plan.micro_batches} micro-batch(es))",
        f"mesh: data={data} fsdp={fsdp} tensor={tensor}",
        "",
        "per-device memory",
        f"{'  parameters (float32)':<32}{_bytes(memory.params)}",
        f"{'  optimizer state (AdamW)':<32}{_bytes(memory.optimizer)}",
        f"{'  gradients (float32)':<32}{_bytes(memory.gradients)}",
        f"{'  activations (estimate)':<32}{_bytes(memory.activations)}",
        f"{'  total':<32}{_bytes(memory.total)}   {100 * memory.total / hbm:.0f}% of HBM",
    ]
    if plan.compiled:
        c = plan.compiled
        lines += [
            f"{'compiled train step (' + c['platform'] + ')':<32}",
            f"{'  arguments':<32}{_bytes(c['arguments'])}",
            f"{'  temporaries':<32}{_bytes(c['temporaries'])}",
            f"{'  outputs - donated':<32}{_bytes(c['outputs'] - c['aliased'])}",
            f"{'  peak':<32}{_bytes(c['peak'])}   {100 * c['peak'] / hbm:.0f}% of HBM",
        ]
    flops_per_step = plan.flops_per_token * plan.tokens_per_step
    lines += [
        "",
        f"step: {flops_per_step:.3e} model FLOPs ({plan.flops_per_token:.3e} per token); "
        f"{_duration(plan.step_time_ideal_s)} at 100% MFU, {_duration(plan.step_time_s)} at "
        f"{100 * plan.mfu:.0f}% MFU",
        f"throughput: {plan.tokens_per_second:,.0f} tokens/s; ${plan.cost_per_hour:,.2f}/hour; "
        f"{plan.tokens_per_dollar:,.0f} tokens per dollar",
        f"run: {plan.num_steps} steps = {_duration(plan.run_hours * 3600)}, "
        f"${plan.run_hours * plan.cost_per_hour:,.2f}",
        f"energy: {plan.tpu.chips} chips x {plan.watts_per_chip:.0f} W x PUE {plan.energy.pue:.2f}"
        f" = {plan.power_kw:,.2f} kW; run {plan.run_kwh:,.1f} kWh, {plan.run_co2_kg:,.1f} kg CO2 "
        f"at {plan.energy.grid_gco2_per_kwh:.0f} g/kWh (estimates: research/energy.py)",
    ]
    if not plan.fits:
        used = max(memory.total, (plan.compiled or {}).get("peak", 0))
        lines += [
            "",
            f"WARNING: does not fit: {used / GIB:.2f} GiB per device > {hbm / GIB:.0f} GiB HBM "
            f"of {plan.tpu.name}. Shard more (train.mesh_shape with fsdp / tensor > 1), "
            + ("" if plan.remat == "full" else "set model.remat='full', ")
            + "lower train.batch_size or raise train.micro_batches, or pick a larger slice.",
        ]
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; launch.plan takes flags only.")
    v = {key: flag.value for key, flag in _FLAGS.items()}
    if not v["tpu"]:
        raise UserError(
            "--tpu is required, e.g. --tpu=v5p-64; families: "
            + ", ".join(f"{family}-N" for family in tpu_lib.CHIPS)
            + "."
        )
    tpu_type = tpu_lib.lookup(v["tpu"])
    if v["compile"]:
        if tpu_type.chips > MAX_COMPILE_DEVICES:
            raise UserError(
                f"--compile on {tpu_type.chips} devices is impractical here (at most "
                f"{MAX_COMPILE_DEVICES}); drop --compile for --tpu={v['tpu']}."
            )
        import jax

        # Before any backend starts: one CPU device per chip (ignored by TPU / GPU backends).
        jax.config.update("jax_num_cpu_devices", tpu_type.chips)
    gin_config.parse(cli.GIN_FILES.value, cli.GIN_BINDINGS.value)
    model_config = gin_config.build(ModelConfig)
    train_config = gin_config.build(TrainConfig)
    energy = gin_config.build(EnergyConfig)
    overrides = {name: v[name] for name in _ENERGY_FLAGS if v[name] is not None}
    energy = dataclasses.replace(energy, **overrides)
    mesh_shape = cli.parse_mesh_shape(v["mesh_shape"]) if v["mesh_shape"] else None
    plan = plan_lib.make_plan(
        model_config,
        train_config,
        tpu_type,
        mesh_shape=mesh_shape,
        mfu=v["mfu"],
        price_per_chip_hour=v["price_per_chip_hour"],
        energy=energy,
    )
    if v["compile"]:
        import jax

        from research import sharding

        mesh = jax.make_mesh(
            plan.mesh_shape,
            sharding.MESH_AXES,
            axis_types=sharding.AUTO3,
            devices=compile_devices(tpu_type.chips),
        )
        compiled = plan_lib.compiled_memory(model_config, train_config, mesh)
        plan = dataclasses.replace(plan, compiled=compiled)
    if v["json"]:
        print(json.dumps(plan.to_json(), indent=2), flush=True)
        if not plan.fits:
            print(f"WARNING: does not fit on {plan.tpu.name}; see `fits`.", file=sys.stderr)
    else:
        print(format_plan(plan), flush=True)
    return 0


if __name__ == "__main__":
    _define_flags()
    app.run(cli.guarded(main))
