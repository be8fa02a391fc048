"""Cloud TPU slice types and per-chip figures: what launch.pod provisions, what launch.plan
prices (memory, peak FLOP/s, list price, power).

A slice type is gcloud's accelerator type (`v5p-64`, `v5litepod-16`, `v6e-8`, `v4-32`);
`v5e-N` is accepted as another name of `v5litepod-N`.
"""

import dataclasses

from research.errors import UserError


@dataclasses.dataclass(frozen=True)
class TpuType:
    name: str
    chips: int  # JAX devices of the slice (one per chip; v4 / v5p megacore).
    hosts: int  # TPU VM workers.

    @property
    def family(self) -> str:
        return self.name.rsplit("-", 1)[0]


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip's public figures (Google Cloud documentation and price list)."""

    family: str
    hbm_bytes: int
    peak_flops: float  # Dense bf16 FLOP/s.
    price_per_chip_hour: float  # On-demand US list price, USD.
    watts: float  # Typical power per chip under training load (see the sources below).


# Sources: cloud.google.com/tpu/docs/system-architecture-tpu-vm and the per-version pages
# (v4: 275 TFLOP/s bf16, 32 GiB HBM2; v5e: 197 TFLOP/s, 16 GiB HBM2; v5p: 459 TFLOP/s, 95 GB
# HBM2e; v6e (Trillium): 918 TFLOP/s, 32 GB HBM), and cloud.google.com/tpu/pricing (on-demand,
# per chip-hour, us-central regions: v4 $3.22, v5e $1.20, v5p $4.20, v6e $2.70). Prices vary by
# region and over time, and spot / committed use cost less: launch.plan takes
# --price_per_chip_hour to override.
#
# Power (research/energy.py turns it into kWh and CO2). v4: 170 W, the mean measured over
# production workloads in Jouppi et al., "TPU v4: An Optically Reconfigurable Supercomputer
# for Machine Learning with Hardware Support for Embeddings", ISCA 2023 (min / mean / max
# 90 / 170 / 192 W per chip). Google publishes no per-chip power for v5e, v5p or v6e; their
# figures are ESTIMATES: v5e and v5p at v4's measured 0.62 W per peak bf16 TFLOP/s (v5e
# 197 -> 120 W, v5p 459 -> 285 W), v6e from Google's statement that Trillium is 67% more
# energy-efficient than v5e at 4.7x its peak (918 TFLOP/s x 0.62 / 1.67 -> 340 W). launch.plan
# takes --watts_per_chip (energy.watts_per_chip) to use a measured figure instead.
CHIPS = {
    "v4": Chip("v4", 32 * 2**30, 275e12, 3.22, 170.0),
    "v5litepod": Chip("v5litepod", 16 * 2**30, 197e12, 1.20, 120.0),
    "v5p": Chip("v5p", 95 * 2**30, 459e12, 4.20, 285.0),
    "v6e": Chip("v6e", 32 * 2**30, 918e12, 2.70, 340.0),
}
ALIASES = {"v5e": "v5litepod"}


def _tpu_types() -> dict[str, TpuType]:
    types = {}
    # v4 and v5p are named by TensorCores (2 per chip), 4 chips per host.
    for family, sizes in (
        ("v4", [2**k for k in range(3, 13)]),
        ("v5p", [2**k for k in range(3, 14)] + [12288]),
    ):
        for cores in sizes:
            chips = cores // 2
            types[f"{family}-{cores}"] = TpuType(f"{family}-{cores}", chips, max(1, chips // 4))
    # v5e / v6e are named by chips: up to 8 chips on one host, then 4 per host.
    for family in ("v5litepod", "v6e"):
        for chips in (1, 4, 8, 16, 32, 64, 128, 256):
            name = f"{family}-{chips}"
            types[name] = TpuType(name, chips, 1 if chips <= 8 else chips // 4)
    return types


TPU_TYPES = _tpu_types()


def canonical_name(name: str) -> str:
    """'v5e-8' -> 'v5litepod-8'; every other name unchanged."""
    family, sep, size = name.rpartition("-")
    return f"{ALIASES[family]}-{size}" if sep and family in ALIASES else name


def lookup(name: str, flag: str = "--tpu") -> TpuType:
    """The slice type of `name`; a UserError listing the known sizes of its family if unknown."""
    canonical = canonical_name(name)
    if canonical in TPU_TYPES:
        return TPU_TYPES[canonical]
    family = canonical.split("-")[0]
    known = sorted((t for t in TPU_TYPES if t.startswith(family + "-")), key=_size)
    hint = ", ".join(known) if known else ", ".join(f"{f}-N" for f in CHIPS)
    raise UserError(f"{flag}={name} is not a known TPU type; known: {hint}.")


def chip(tpu_type: TpuType) -> Chip:
    return CHIPS[tpu_type.family]


def _size(name: str) -> int:
    return int(name.rsplit("-", 1)[1])
