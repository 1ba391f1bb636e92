"""The search's view of latency, for benchmarks that choose removal sets the way `prune` does:
their common arguments and setup, the latency table, the most removable set timed against the
baseline (interleaved), the table's calibration on that set (compressor.latency.predictor, kind
"scale"), and the measured speedup of chosen removal sets."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import common
from common import log
from torch import nn

from compressor.data import DataBundle, load_data
from compressor.graph.surgery import remove_units
from compressor.graph.units import Unit, find_units
from compressor.latency.deploy import Deployment
from compressor.latency.designed import measure_latency_table
from compressor.latency.predictor import Calibration, Observation, fit_calibration
from compressor.latency.profiles import Profile, load_profile
from compressor.latency.table import LatencyTable
from compressor.latency.timing import Interleaved
from compressor.models.loaded import LoadedModel
from compressor.models.sources import load_model
from compressor.search.knapsack import most_removable


def setup_parser(doc: str, speedups: str) -> argparse.ArgumentParser:
    """common.argument_parser with --model, --data and --profile (load_setup's) and --speedups
    (comma-separated levels, `speedups` by default; parsed to floats)."""
    parser = common.argument_parser(doc)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--data", default="photos")
    parser.add_argument("--profile", default="ort-cpu")
    parser.add_argument("--speedups", type=common.float_list, default=speedups)
    return parser


@dataclass
class Setup:
    """A benchmark's model on its data and profile: the unpruned model in eval mode and its units."""

    data: DataBundle
    loaded: LoadedModel
    base: nn.Module
    profile: Profile
    dep: Deployment
    units: list[Unit]

    def measure_table(self, name: str, work: Path, min_per_stage: int) -> CalibratedTable:
        """calibrated_table() of the unpruned model, logged."""
        log(f"{name}: {len(self.units)} units; measuring the latency table on {self.profile.name}")
        measured = calibrated_table(self.base, self.units, self.dep, name, work, min_per_stage)
        log(f"floor ({len(measured.floor)} units removed): {measured.reach.speedup():.2f}x; "
            f"calibration scale {measured.calibration.scale:.2f}")
        return measured

    def pruned(self, removed: Sequence[str]) -> nn.Module:
        """The unpruned model without the units named in `removed`."""
        return remove_units(self.base, [u for u in self.units if u.name in removed], self.dep.example)

    def measured_speedups(self, sets: Sequence[Sequence[str]], work: Path) -> list[float]:
        """The speedup of each removal set (unit names) against the baseline, all exported into `work`
        and timed in one interleaved measurement (search policy), one pruned model built at a time."""
        log(f"timing {len(sets)} removal sets against the baseline, interleaved")
        models = itertools.chain([("baseline", self.base)], ((f"set {i}", self.pruned(s)) for i, s in enumerate(sets)))
        timed = common.time_models(self.dep, models, work)
        return [timed[f"set {i}"]["speedup"] for i in range(len(sets))]


def load_setup(model: str, data: str, profile: str) -> Setup:
    """Load `data`, then `model` fitted to it, the `profile` and its deployment; find the units."""
    bundle = load_data(data)
    loaded = load_model(model, bundle)
    base = loaded.model.eval()
    dep = Deployment(load_profile(profile), loaded.input_shape)
    return Setup(bundle, loaded, base, dep.profile, dep, find_units(base, dep.example))


def setup_provenance(benchmark: str, args: argparse.Namespace, setup: Setup) -> dict:
    """common.provenance(benchmark), then the model, its weights' source, the data and the profile."""
    return {**common.provenance(benchmark), "model": args.model, "source": setup.loaded.source, "data": args.data,
            "profile": setup.profile.to_dict()}


def setup_title(what: str, result: dict) -> str:
    """The results page's title: `what` at a measured speedup, and the model, data and profile."""
    return f"{what} at a measured speedup: {result['model']} on {result['data']} ({result['profile']['name']})"


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
