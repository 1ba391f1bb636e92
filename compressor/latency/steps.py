"""Channel counts the runtime runs at full efficiency, measured, for width units.

A width level asks for a share of a channel group (50% of 144 = 72), but a runtime's
kernels are vectorised over channel blocks: ONNX Runtime and OpenVINO on a CPU may run
72 channels no faster than 80, or 40 slower than 48. Which counts those are depends on
the runtime, its version and the CPU, so they are timed, not assumed:

- for each structure (blocks of one module structure and input shape, one channel
  group), the candidates are the level's own count and its neighbours among the
  multiples of 8, 16 and 32 (`candidate_counts`);
- the block, repeated CHAIN times where its output has its input's shape, is exported
  on its own for each candidate (the channels kept do not change the cost) and timed in
  interleaved rounds with the unslimmed block, through the profile's device;
- a count is *dominated* when a larger candidate runs as fast, within DOMINANCE_RTOL
  (more channels for no more time); the level takes the undominated count nearest to
  what it asked for (`choose_count`).

This is one function of its own (`measure_channel_steps`) so that the latency model can
take its timings into its own designed sets.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compressor.graph.heads import head_count

STEPS = (8, 16, 32)  # the channel multiples whose neighbours are timed around each level's count
CHAIN = 4  # copies of a block timed in a row (where its output has its input's shape): more signal per run
# a larger count dominates a smaller one when its median is no more than this share slower: within the spread of
# a median of 50+ interleaved runs on a quiet machine
DOMINANCE_RTOL = 0.02
UNTIMED_STEP = 8  # where counts cannot be timed (a device that replays a table): the level rounds to a multiple


@dataclass(frozen=True)
class StepStructure:
    """Blocks that slim alike: a representative `block` (its input shape without the batch), the group rooted at
    `root` with `channels` channels; `key` identifies the structure, `where` names the blocks for a report."""

    key: str
    block: nn.Module
    input_shape: tuple[int, ...]
    root: str
    channels: int
    where: str


@dataclass
class StepChoice:
    """One level of one structure: the count asked for, the candidates' medians (ms; empty where untimed) and
    the count chosen (None: every candidate was dominated or outside 1..channels-1; `note` says why)."""

    level: float
    wanted: int
    medians_ms: dict[int, float] = field(default_factory=dict)
    full_ms: float | None = None
    chosen: int | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return {"level": self.level, "wanted": self.wanted, "chosen": self.chosen, "full_ms": self.full_ms,
                "medians_ms": {str(k): v for k, v in self.medians_ms.items()}, "note": self.note}


def wanted_count(channels: int, level: float) -> int:
    return max(1, round(channels * level))


def candidate_counts(channels: int, level: float, steps: Sequence[int] = STEPS) -> list[int]:
    """The level's own count and, for each step, the multiples just below and above it, within 1..channels-1."""
    n = wanted_count(channels, level)
    found = {n}
    for s in steps:
        found |= {(n // s) * s, -(-n // s) * s}
    return sorted(c for c in found if 0 < c < channels)


def choose_count(medians_ms: dict[int, float], wanted: int, full: tuple[int, float] | None = None,
                 rtol: float = DOMINANCE_RTOL) -> int | None:
    """The undominated count nearest to `wanted` (ties: the larger); a count is dominated when a larger one's
    median is at most (1 + rtol) times its own, the full width (`full`: channels, median) included."""
    timed = dict(medians_ms) if full is None else {**medians_ms, full[0]: full[1]}
    counts = sorted(medians_ms)
    efficient = [c for c in counts if not any(d > c and timed[d] <= timed[c] * (1 + rtol) for d in timed)]
    if not efficient:
        return None
    return min(efficient, key=lambda c: (abs(c - wanted), -c))


def _chain(block: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """CHAIN copies of `block` in a row where its output has its input's shape, else the block alone."""
    x = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = block.eval()(x)
    if isinstance(out, torch.Tensor) and out.shape == x.shape:
        return nn.Sequential(*[copy.deepcopy(block) for _ in range(CHAIN)]).eval()
    return copy.deepcopy(block).eval()


def slimmed_copy(structure: StepStructure, count: int) -> nn.Module:
    """A copy of the structure's block with its group slimmed to its first `count` channels."""
    from compressor.graph.slim import slim_in_place
    from compressor.graph.units import Slim

    slim = Slim((structure.root,), (structure.channels,), (tuple(range(count)),), count / structure.channels)
    return slim_in_place(copy.deepcopy(structure.block), structure.input_shape, slim)


def untimed_choices(structure: StepStructure, levels: Sequence[float], why: str) -> list[StepChoice]:
    """Each level's count rounded to the nearest multiple of UNTIMED_STEP (at least one step), not timed."""
    choices = []
    for level in levels:
        wanted = wanted_count(structure.channels, level)
        count = max(UNTIMED_STEP, round(wanted / UNTIMED_STEP) * UNTIMED_STEP)
        choices.append(StepChoice(level, wanted, chosen=count if count < structure.channels else None,
                                  note=f"not timed ({why}): rounded to a multiple of {UNTIMED_STEP}"))
    return choices


def measure_channel_steps(structures: Sequence[StepStructure], levels: Sequence[float], deployment, policy,
                          workdir: Path | None = None, log: Callable[[str], None] = lambda _: None
                          ) -> dict[str, list[StepChoice]]:
    """{structure key: one StepChoice per level}: every structure's candidate counts exported (the block, or
    CHAIN copies, on its own input at the profile's batch) and timed interleaved with the unslimmed block on
    `deployment`'s device under `policy`; each level takes choose_count's count."""
    from compressor.latency.deploy import deployable

    batch = deployment.input_shape[0]
    found: dict[str, list[StepChoice]] = {}
    for structure in structures:
        counts = sorted({c for level in levels for c in candidate_counts(structure.channels, level)})
        if not counts:
            found[structure.key] = [StepChoice(lv, wanted_count(structure.channels, lv),
                                               note=f"{structure.channels} channels leave no smaller count")
                                    for lv in levels]
            continue
        x = torch.randn(batch, *structure.input_shape, generator=torch.Generator().manual_seed(0))
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            paths = []
            for i, model in enumerate([structure.block, *(slimmed_copy(structure, c) for c in counts)]):
                chained = _chain(model, structure.input_shape)
                paths.append(deployment.backend.export_block(deployable(chained, x), x, Path(tmp) / f"step{i}"))
            result = deployment.device.time(paths, policy, x.numpy())
        medians = [s.median for s in result.stats]
        by_count = dict(zip(counts, medians[1:], strict=True))
        choices = []
        for level in levels:
            wanted = wanted_count(structure.channels, level)
            near = {c: by_count[c] for c in candidate_counts(structure.channels, level)}
            chosen = choose_count(near, wanted, (structure.channels, medians[0])) if near else None
            note = "" if chosen is not None else "no count near it runs faster than a larger one or the full width"
            choices.append(StepChoice(level, wanted, near, medians[0], chosen, note))
        what = "heads" if head_count(structure.block.get_submodule(structure.root)) is not None else "ch"
        log(f"  channel steps of {structure.where} ({structure.root}, {structure.channels} {what}): "
            + ", ".join(f"{c.level:.0%} -> {c.chosen}" for c in choices)
            + f" (timed {', '.join(f'{c}: {m:.3f}' for c, m in by_count.items())} ms; full {medians[0]:.3f} ms)")
        found[structure.key] = choices
    return found
