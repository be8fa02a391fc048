"""launch.plan: per-device memory against independent counts, fit warnings, step time and cost
against a hand computation, errors, and the CLI end to end (with the compiled train step)."""

import json
import os
import subprocess
import sys

import jax
import pytest

from launch import cli
from launch import config as gin_config
from launch import plan as plan_cli
from launch.config import ROOT
from research import energy as energy_lib
from research import plan, sharding, tpu
from research.energy import EnergyConfig
from research.errors import UserError
from research.model import ModelConfig, count_params
from research.train import TrainConfig
from research.train.optimizer import make_optimizer
from research.train.state import init_train_state
from tests.xla_flags import with_devices

# configs/model/tiny.gin, spelled out: V=512, D=64, L=2, N=4, K=2, H=16, F=128, untied.
TINY = ModelConfig(
    vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128,
    max_seq_len=64,
)  # fmt: skip
TINY_PARAMS = (
    2 * (64 * 4 * 16 + 2 * 64 * 2 * 16 + 4 * 16 * 64 + 3 * 64 * 128 + 2 * 64)  # 2 blocks
    + 2 * 512 * 64  # embedding and LM head
    + 64  # final norm
)
TRAIN = TrainConfig(batch_size=8, seq_len=64)
# Meta-Llama-3-8B's parameter count as published on its Hugging Face model card (8.03 B).
LLAMA3_8B_PARAMS = 8_030_261_248


def _llama3_8b(bindings=()):
    gin_config.parse(
        ["configs/base.gin", "configs/model/llama3_8b.gin"],
        ["train.batch_size = 8", "train.seq_len = 2048", *bindings],
    )
    return gin_config.build(ModelConfig), gin_config.build(TrainConfig)


# ----------------------------------------------------------------------------- memory


def test_parameter_and_optimizer_bytes_equal_independent_counts():
    assert count_params(TINY) == TINY_PARAMS
    # (8, 1, 1): pure data parallel, every parameter replicated.
    params, optimizer = plan.state_bytes(TINY, TRAIN, (8, 1, 1))
    assert params == TINY_PARAMS * 4
    # AdamW keeps mu and nu (float32, shaped like the parameters) plus int32 step counters
    # (Adam's and the schedule's), and TrainState.step: 3 scalars.
    assert optimizer == 2 * TINY_PARAMS * 4 + 3 * 4
    # (1, 8, 1): every parameter has an "embed" (D=64) axis, so FSDP over 8 splits all of them.
    params, optimizer = plan.state_bytes(TINY, TRAIN, (1, 8, 1))
    assert params == TINY_PARAMS * 4 // 8
    assert optimizer == 2 * TINY_PARAMS * 4 // 8 + 3 * 4


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 1, 8), (2, 4, 1)])
def test_shard_bytes_equal_the_real_sharded_state(mesh_shape):
    # Tensor 8 does not divide N=4 / K=2 heads: fit_spec replicates those axes, and the plan
    # must count them the same way the born-sharded state lays them out.
    mesh = sharding.make_mesh(mesh_shape)
    config = TRAIN.replace(mesh_shape=mesh_shape)
    _, state, _ = init_train_state(mesh, TINY, make_optimizer(config), seed=0)

    def device0_bytes(tree):
        return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))

    params, optimizer = plan.state_bytes(TINY, config, mesh_shape)
    assert params == device0_bytes(state.params)
    assert optimizer == device0_bytes(state.opt_state) + device0_bytes(state.step)


def test_compiled_arguments_equal_state_plus_batch_shard():
    mesh_shape = (2, 2, 2)
    config = TRAIN.replace(mesh_shape=mesh_shape)
    compiled = plan.compiled_memory(TINY, config, sharding.make_mesh(mesh_shape))
    params, optimizer = plan.state_bytes(TINY, config, mesh_shape)
    # The batch (4 int32 features + float32 weights) is split over data x fsdp = 4.
    batch = (8 // 4) * 64 * (4 * 4 + 4)
    assert compiled["arguments"] == params + optimizer + batch
    assert compiled["platform"] == "cpu"
    assert compiled["peak"] >= compiled["arguments"] + compiled["temporaries"] - params - optimizer
    assert compiled["temporaries"] > 0


def test_activation_estimate():
    none = plan.activation_bytes(TINY, TRAIN, (8, 1, 1))
    # One row per device; doubling the batch doubles it, as does halving data parallelism.
    assert plan.activation_bytes(TINY, TRAIN.replace(batch_size=16), (8, 1, 1)) == 2 * none
    assert plan.activation_bytes(TINY, TRAIN, (4, 1, 2)) < 2 * none  # Tensor splits heads.
    # Causal query blocks of 64 for T=256: block i keeps (i + 1) x 64 keys per query.
    assert plan.attended_keys(256) == 64 * (1 + 2 + 3 + 4) / 4
    assert plan.attended_keys(64) == 64
    deep = TINY.replace(num_layers=16)
    by_remat = {
        remat: plan.activation_bytes(deep.replace(remat=remat), TRAIN, (8, 1, 1))
        for remat in ("none", "save_dots", "full")
    }
    assert by_remat["none"] > by_remat["save_dots"] > by_remat["full"]


# ----------------------------------------------------------------------------- fit


def test_llama3_8b_fits_only_where_it_should():
    model, train = _llama3_8b()
    # FSDP over the 4 chips of a v5p-8: every Llama weight has a D=4096 axis, split 4 ways.
    sharded = plan.make_plan(model, train, tpu.lookup("v5p-8"), mesh_shape=(1, -1, 1))
    assert sharded.num_params == LLAMA3_8B_PARAMS
    assert sharded.memory.params == LLAMA3_8B_PARAMS * 4 // 4
    assert sharded.fits  # ~30 GB of state + activations under 95 GiB.
    # Replicated (pure data parallel): 8 B x (4 params + 8 AdamW + 4 grads) = 128 GB > 95 GiB.
    replicated = plan.make_plan(model, train, tpu.lookup("v5p-8"), mesh_shape=(-1, 1, 1))
    assert replicated.memory.params == LLAMA3_8B_PARAMS * 4
    assert not replicated.fits
    assert "WARNING: does not fit" in plan_cli.format_plan(replicated)
    # v5e-8: 8 chips of 16 GiB; even fully sharded the state is 16 GB per chip.
    v5e = plan.make_plan(model, train, tpu.lookup("v5e-8"), mesh_shape=(1, -1, 1))
    assert v5e.tpu.name == "v5litepod-8" and v5e.memory.params == LLAMA3_8B_PARAMS * 4 // 8
    assert not v5e.fits
    # v5p-64: 32 chips, so FSDP needs a batch of (a multiple of) 32 rows.
    train = train.replace(batch_size=32)
    big = plan.make_plan(model, train, tpu.lookup("v5p-64"), mesh_shape=(1, -1, 1))
    assert big.fits and big.memory.params == LLAMA3_8B_PARAMS * 4 // 32


# ----------------------------------------------------------------------------- time and cost


def test_step_time_and_cost_match_a_hand_computation():
    result = plan.make_plan(TINY, TRAIN.replace(num_steps=500), tpu.lookup("v5p-8"), mfu=0.5)
    # 6 N + 12 L (N_heads H) T with N = all parameters but the (untied) input embedding.
    flops_per_token = 6 * (TINY_PARAMS - 512 * 64) + 12 * 2 * (4 * 16) * 64
    assert flops_per_token == 739_200
    assert result.flops_per_token == flops_per_token
    ideal = 8 * 64 * flops_per_token / (4 * 459e12)  # v5p-8: 4 chips of 459 TFLOP/s.
    assert result.step_time_ideal_s == pytest.approx(ideal, rel=1e-12)
    assert result.step_time_s == pytest.approx(ideal / 0.5, rel=1e-12)
    assert result.cost_per_hour == pytest.approx(4 * 4.20)
    tokens_per_second = 8 * 64 / (ideal / 0.5)
    assert result.tokens_per_second == pytest.approx(tokens_per_second)
    assert result.tokens_per_dollar == pytest.approx(tokens_per_second * 3600 / (4 * 4.20))
    assert result.run_hours == pytest.approx(500 * ideal / 0.5 / 3600)
    custom = plan.make_plan(TINY, TRAIN, tpu.lookup("v5p-8"), price_per_chip_hour=1.5)
    assert custom.cost_per_hour == pytest.approx(6.0)


def test_energy_and_co2_match_a_hand_computation():
    result = plan.make_plan(TINY, TRAIN.replace(num_steps=500), tpu.lookup("v5p-8"), mfu=0.5)
    hours = 500 * (8 * 64 * 739_200 / (4 * 459e12)) / 0.5 / 3600
    # v5p-8: 4 chips x 285 W (research/tpu.py) x PUE 1.10 = 1.254 kW at the defaults.
    assert result.watts_per_chip == 285.0 and result.power_kw == pytest.approx(1.254)
    assert result.run_kwh == pytest.approx(1.254 * hours, rel=1e-12)
    assert result.run_co2_kg == pytest.approx(1.254 * hours * 475 / 1000, rel=1e-12)
    # A measured power, another data center and grid: 4 x 300 W x 1.5 = 1.8 kW; 50 g/kWh.
    energy = EnergyConfig(watts_per_chip=300.0, pue=1.5, grid_gco2_per_kwh=50.0)
    custom = plan.make_plan(TINY, TRAIN, tpu.lookup("v5p-8"), energy=energy)
    assert custom.power_kw == pytest.approx(1.8)
    assert custom.run_co2_kg == pytest.approx(custom.run_hours * 1.8 * 50 / 1000)
    assert energy_lib.energy_kwh(32, 170.0, 10.0, 1.1) == pytest.approx(59.84)  # v4-64, 10 h
    assert energy_lib.co2_kg(59.84, 475.0) == pytest.approx(28.424)
    with pytest.raises(UserError, match=r"energy.pue=0.9 \(--pue\) must be >= 1"):
        EnergyConfig(pue=0.9)


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_flag():
    with pytest.raises(UserError, match="--tpu=v5p-63 is not a known TPU type; known: v5p-8, "):
        tpu.lookup("v5p-63")
    with pytest.raises(UserError, match="--tpu=v7-8 .*known: v4-N, v5litepod-N, v5p-N, v6e-N"):
        tpu.lookup("v7-8")
    with pytest.raises(UserError, match="--tpu=v5p-8 has 4 devices.*Change --mesh_shape"):
        plan.make_plan(TINY, TRAIN, tpu.lookup("v5p-8"), mesh_shape=(8, 1, 1))
    with pytest.raises(UserError, match="--tpu=v5p-8 has 4 devices.*Change train.mesh_shape"):
        plan.make_plan(TINY, TRAIN.replace(mesh_shape=(1, 3, 1)), tpu.lookup("v5p-8"))
    with pytest.raises(UserError, match="train.batch_size=8 .*data x fsdp = 16"):
        plan.make_plan(TINY, TRAIN, tpu.lookup("v5p-32"))
    with pytest.raises(UserError, match="--mfu=0"):
        plan.make_plan(TINY, TRAIN, tpu.lookup("v5p-8"), mfu=0)


# ----------------------------------------------------------------------------- CLI


def _plan_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "launch.plan", *args],
        cwd=ROOT,
        env=dict(os.environ, XLA_FLAGS=with_devices(1)),
        capture_output=True,
        text=True,
        timeout=300,
    )


TINY_FLAGS = [
    "--gin_file=configs/base.gin",
    "--gin_file=configs/model/tiny.gin",
    "--gin_bindings=train.seq_len = 64",
]


def test_cli_json_with_compiled_memory():
    result = _plan_cli(*TINY_FLAGS, "--tpu=v5p-8", "--mesh_shape=2,2,1", "--compile", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["tpu"] == "v5p-8" and report["chips"] == 4 and report["mesh_shape"] == [2, 2, 1]
    memory = report["memory_per_device"]
    assert memory["params"] == TINY_PARAMS * 4 // 2  # fsdp = 2
    parts = ("params", "optimizer", "gradients", "activations")
    assert memory["total"] == sum(memory[part] for part in parts)
    compiled = report["compiled_memory_per_device"]
    # The CLI gave itself one CPU device per chip; the batch of 8 is split over data x fsdp = 4.
    assert compiled["platform"] == "cpu"
    assert compiled["arguments"] == memory["params"] + memory["optimizer"] + 2 * 64 * 20
    assert report["fits"] is True
    assert report["flops_per_token"] == 739_200
    assert report["pue"] == 1.1 and report["watts_per_chip"] == 285.0
    assert report["run_co2_kg"] == pytest.approx(report["run_kwh"] * 475 / 1000)


def test_cli_table_warns_and_errors():
    llama = ["--gin_file=configs/base.gin", "--gin_file=configs/model/llama3_8b.gin"]
    # Energy settings: gin's energy.*, and the flags over it.
    energy = ["--gin_bindings=energy.pue = 1.5", "--watts_per_chip=100", "--grid_gco2_per_kwh=0"]
    result = _plan_cli(*llama, "--tpu=v5e-8", *energy)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "per-device memory" in result.stdout and "tokens per dollar" in result.stdout
    assert "energy: 8 chips x 100 W x PUE 1.50 = 1.20 kW;" in result.stdout
    assert " kWh, 0.0 kg CO2 at 0 g/kWh" in result.stdout
    assert "WARNING: does not fit" in result.stdout and "v5litepod-8" in result.stdout
    unknown = _plan_cli(*TINY_FLAGS, "--tpu=v5p-7")
    assert unknown.returncode == 1
    assert "error: --tpu=v5p-7 is not a known TPU type; known: v5p-8" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    mismatch = _plan_cli(*TINY_FLAGS, "--tpu=v5p-8", "--mesh_shape=8,1,1")
    assert mismatch.returncode == 1
    assert "--tpu=v5p-8 has 4 devices" in mismatch.stderr


@pytest.mark.parametrize(
    "text, shape", [("1,-1,1", (1, -1, 1)), ("(2, 1, 4)", (2, 1, 4)), ("[1 1 2]", (1, 1, 2))]
)
def test_mesh_shape_flag_parses(text, shape):
    assert cli.parse_mesh_shape(text) == shape


@pytest.mark.parametrize("text", ["1,1", "1,1,1,1", "a,b,c", "-1,-1,1", "0,1,1", "1,-2,1", ""])
def test_a_bad_mesh_shape_flag_names_the_flag_and_the_form(text):
    with pytest.raises(UserError, match=r"--mesh_shape=.*three comma-separated sizes"):
        cli.parse_mesh_shape(text)
