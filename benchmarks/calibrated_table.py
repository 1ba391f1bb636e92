"""The search's view of latency, for benchmarks that choose removal sets the way `prune` does:
the latency table, the most removable set timed against the baseline (interleaved), and the
table's calibration on that set (compressor.latency.predictor, kind "scale")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from compressor.data import DataBundle, load_data
from compressor.graph.surgery import remove_units
from compressor.graph.units import Unit, find_units
from compressor.latency.deploy import Deployment
from compressor.latency.predictor import Calibration, Observation, fit_calibration
from compressor.latency.profiles import Profile, load_profile
from compressor.latency.table import LatencyTable, measure_latency_table
from compressor.latency.timing import Interleaved
from compressor.models.loaded import LoadedModel
from compressor.models.sources import load_model
from compressor.search.knapsack import most_removable


@dataclass
class Setup:
    """A benchmark's model on its data and profile: the unpruned model in eval mode and its units."""

    data: DataBundle
    loaded: LoadedModel
    base: nn.Module
    profile: Profile
    dep: Deployment
    units: list[Unit]


def load_setup(model: str, data: str, profile: str) -> Setup:
    """Load `data`, then `model` fitted to it, the `profile` and its deployment; find the units."""
    bundle = load_data(data)
    loaded = load_model(model, bundle)
    base = loaded.model.eval()
    dep = Deployment(load_profile(profile), loaded.input_shape)
    return Setup(bundle, loaded, base, dep.profile, dep, find_units(base, dep.example))


@dataclass
class CalibratedTable:
    table: LatencyTable
    floor: list[str]  # the most removable set's unit names
    reach: Interleaved  # baseline (0) against the floor (1)
    calibration: Calibration


def calibrated_table(model: nn.Module, units: list[Unit], dep: Deployment, name: str, work: Path,
                     min_per_stage: int) -> CalibratedTable:
    """Measure the table and the floor in `work`, and calibrate the table on the floor."""
    table = measure_latency_table(model, units, dep, name, work)
    floor = most_removable(units, min_per_stage)
    paths = [dep.export(model, work / "baseline"), dep.export(remove_units(model, floor, dep.example), work / "floor")]
    reach = dep.time(paths, dep.profile.search_policy)
    names = [u.name for u in floor]
    calibration = fit_calibration([Observation.measured(table, names, reach.stats[0].median, reach.stats[1].median)])
    return CalibratedTable(table, names, reach, calibration)
