"""Energy and CO2 of a run: chips x power per chip x hours x PUE, then x grid carbon intensity.

    kwh = energy_kwh(chips=32, watts_per_chip=285.0, hours=10.0, pue=1.10)
    kg = co2_kg(kwh, grid_gco2_per_kwh=475.0)

An estimate of the accelerators' share, not a measurement: every chip is taken to draw its
typical power (research/tpu.py's table, or energy.watts_per_chip) for the whole run; host
CPUs, memory and networking enter only through the PUE's overhead.

Defaults and their sources:
- pue 1.10: Google's fleet-wide trailing-twelve-month power usage effectiveness
  (google.com/about/datacenters/efficiency: 1.10 for 2023).
- grid_gco2_per_kwh 475: the world's average CO2 intensity of electricity generation (IEA,
  Global Energy & CO2 Status Report 2019: 475 g/kWh in 2018), a location-based figure. A
  region's own figure is closer: Google Cloud publishes one per region
  (cloud.google.com/sustainability/region-carbon); bind energy.grid_gco2_per_kwh to it.
"""

import dataclasses

from research.errors import UserError


@dataclasses.dataclass(frozen=True)
class EnergyConfig:
    """Bound in gin as `energy.*`; launch.plan's --watts_per_chip, --pue and
    --grid_gco2_per_kwh override it."""

    watts_per_chip: float = 0.0  # 0 = the chip's typical power from research/tpu.py.
    pue: float = 1.10
    grid_gco2_per_kwh: float = 475.0

    def __post_init__(self):
        if self.watts_per_chip < 0:
            raise UserError(
                f"energy.watts_per_chip={self.watts_per_chip} (--watts_per_chip) must be >= 0 "
                "(0 = the chip table's typical power)."
            )
        if self.pue < 1:
            raise UserError(
                f"energy.pue={self.pue} (--pue) must be >= 1: facility power over IT power, "
                "e.g. 1.10."
            )
        if self.grid_gco2_per_kwh < 0:
            raise UserError(
                f"energy.grid_gco2_per_kwh={self.grid_gco2_per_kwh} (--grid_gco2_per_kwh) must "
                "be >= 0 (grams of CO2 per kWh of the grid, e.g. 475)."
            )


def energy_kwh(chips: int, watts_per_chip: float, hours: float, pue: float) -> float:
    """Facility energy in kWh: chips x watts x hours x PUE / 1000."""
    return chips * watts_per_chip * hours * pue / 1000


def co2_kg(kwh: float, grid_gco2_per_kwh: float) -> float:
    """kg of CO2 of `kwh` drawn from a grid emitting grid_gco2_per_kwh grams per kWh."""
    return kwh * grid_gco2_per_kwh / 1000
