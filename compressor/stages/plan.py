"""Stage `plan`: the model's removable units (and merge units) and its deployment on the profile."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.errors import InputError
from compressor.graph.merge_units import find_merge_units
from compressor.graph.units import Unit, find_units_explained
from compressor.latency.deploy import Deployment
from compressor.latency.device import Device
from compressor.latency.profiles import Profile
from compressor.models.loaded import LoadedModel

NO_UNITS_HINT = ("a removable unit is a submodule whose forward computes act(branch(x) + shortcut(x)), the shortcut "
                 "being the identity or a child module (a projection), e.g. a ResNet BasicBlock or a C2f bottleneck; "
                 "or one residual branch y = s + f(s) of a block with several, e.g. a transformer block's attention "
                 "or MLP")


def no_units_message(arch: str, rejected: dict[str, str]) -> str:
    """Why a model has no removable unit, with what would be one."""
    why = "; ".join(f"{path}: {reason}" for path, reason in list(rejected.items())[:3])
    return (f"{arch}: no removable residual units found in its captured graph"
            + (f" ({why}{' ...' if len(rejected) > 3 else ''})" if why else " (it has no residual additions)")
            + f"; {NO_UNITS_HINT}")


@dataclass
class Plan:
    """What the job works on: the unpruned model, its units, where it is deployed."""

    loaded: LoadedModel
    model: nn.Module
    deployment: Deployment
    units: list[Unit]  # residual units (removal)
    merges: list[Unit]  # merge units, when asked for
    widths: list[Unit] = field(default_factory=list)  # width units, when --moves asks for them (stages/width.py)
    moves: str = "depth"  # "depth", "width" or "depth+width"
    width_report: dict | None = None  # how the width units were found, their channel steps, what was refused

    @property
    def removals(self) -> list[Unit]:
        """The residual units the search may remove (none with --moves width)."""
        return [] if self.moves == "width" else self.units

    @property
    def candidates(self) -> list[Unit]:
        return self.removals + self.merges + self.widths

    @property
    def example(self) -> torch.Tensor:
        return self.deployment.example


def plan(loaded: LoadedModel, profile: Profile, merge: bool, log: Callable[[str], None],
         device: Device | None = None) -> Plan:
    """Find the units of `loaded.model` on the profile's input (InputError if there are none)."""
    model = loaded.model.eval()
    deployment = Deployment(profile, loaded.input_shape, device)
    units, rejected = find_units_explained(model, deployment.example)
    if not units:
        raise InputError(no_units_message(loaded.arch, rejected))
    kinds = Counter(u.kind for u in units)
    log(f"{len(units)} removable units in {loaded.arch}: " + ", ".join(f"{n} {kind}" for kind, n in kinds.items()))
    merges: list[Unit] = []
    if merge:
        merges, refused = find_merge_units(model, units)
        log(f"{len(merges)} blocks can also be linearised and merged into one conv"
            + "".join(f"; {name} cannot: {why}" for name, why in list(refused.items())[:3])
            + (f" (and {len(refused) - 3} more)" if len(refused) > 3 else ""))
    return Plan(loaded, model, deployment, units, merges)
