"""What every benchmark script shares: logging, provenance, the result files and their
"Machine:" and "Command:" lines, comma-separated arguments, BatchNorm statistics for
random-init models, and exporting several models to time them in one interleaved measurement.

The scripts run as `python benchmarks/<script>.py` and import this as a top-level module
(`import common`), like their other siblings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shlex
import sys
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from compressor.fileio import atomic_write, atomic_write_text
from compressor.latency.deploy import Deployment
from compressor.latency.machine import machine_info, source_revision
from compressor.latency.timing import TimingPolicy

HERE = Path(__file__).resolve().parent
RESULTS = Path(__file__).parent / "results"


def log(msg: str) -> None:
    """Print `msg` at once (the scripts run for minutes to hours)."""
    print(msg, flush=True)


# ---------------------------------------------------------------------------- arguments


def comma_list(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated argument."""
    return [t.strip() for t in text.split(",") if t.strip()]


def float_list(text: str) -> list[float]:
    """argparse type: comma-separated numbers."""
    try:
        return [float(t) for t in comma_list(text)]
    except ValueError:
        msg = f"expected comma-separated numbers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def known_list(parser: argparse.ArgumentParser, option: str, text: str, known: Collection[str],
               allow_empty: bool = False) -> list[str]:
    """`comma_list(text)`, or a parser error unless every item is in `known` (and, unless
    `allow_empty`, there is one at least)."""
    items = comma_list(text)
    unknown = [i for i in items if i not in known]
    if unknown or not (items or allow_empty):
        parser.error(f"{option}: unknown {unknown or 'empty list'}; choose from {', '.join(known)}")
    return items


def zoo_models(text: str) -> list[str]:
    """argparse type: comma-separated names from compressor.models.zoo.ZOO, at least one."""
    from compressor.models.zoo import ZOO

    models = comma_list(text)
    unknown = [m for m in models if m not in ZOO]
    if not models or unknown:
        msg = f"unknown model(s) {unknown}; zoo: {', '.join(ZOO)}"
        raise argparse.ArgumentTypeError(msg)
    return models


def argument_parser(doc: str, models: str | None = None, calibration: int | None = None,
                    final_repeats: int | None = None) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of the script's docstring, with --out (the results
    folder, benchmarks/results by default); where `models` (their default) is given, --models
    (zoo_models); where `calibration` is, --calibration-size (images the criterion scores on); where
    `final_repeats` is, --final-repeats (time_paths' `steady`)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder (default: benchmarks/results)")
    if models is not None:
        parser.add_argument("--models", type=zoo_models, default=models,
                            help="comma-separated zoo names (default: %(default)s)")
    if calibration is not None:
        parser.add_argument("--calibration-size", type=int, default=calibration,
                            help="images the criterion scores on (default: %(default)s)")
    if final_repeats is not None:
        parser.add_argument("--final-repeats", type=int, default=final_repeats,
                            help="final measurements at most, while a speedup's per-round spread is beyond the "
                            "re-measure gate (default: %(default)s)")
    return parser


# ---------------------------------------------------------------------------- results


def provenance(benchmark: str) -> dict:
    """The head of every result: benchmark name, UTC date, command line, git commit, machine."""
    return {"benchmark": benchmark,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable, *sys.argv]),
            "git_commit": source_revision(HERE),
            "machine": machine_info()}


def machine_line(machine: dict, date: str, extra: str = "") -> str:
    """The results' "Machine: ..." line: CPU, cores, OS, Python and runtime versions (then `extra`); date."""
    m = machine
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return (f"Machine: {m['cpu']} ({m['logical_cores']} logical / {m['physical_cores']} physical cores), "
            f"{m['system']}, Python {m['python']}, {versions}{extra}; {date}.")


def document(title: str, result: dict, lines: list[str], machine_extra: str = "", source: bool = False) -> str:
    """A results page: `# title`, the Machine line (with `machine_extra`; the git commit when `source`),
    `lines`, and the command that produced `result`."""
    date = result["date"] + (f"; source {result['git_commit']}" if source else "")
    return "\n".join([f"# {title}", "", machine_line(result["machine"], date, machine_extra), "", *lines,
                      "", f"Command: `{result['command']}`", ""])


def write_results(out: Path, name: str, result: dict, markdown: str,
                  plot: Callable[[Path], None] | None = None) -> None:
    """`out`/`name`.json and .md, and .png when `plot` (called with the path) is given; each written
    atomically, so an interrupted run leaves the last complete files."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps(result, indent=2))
    atomic_write_text(out / f"{name}.md", markdown)
    if plot is not None:
        atomic_write(out / f"{name}.png", plot)


def finish(out: Path, name: str, markdown: str, t0: float, png: bool = False) -> int:
    """Log what was written and the run time since `t0`, print the markdown; the exit status 0."""
    log(f"wrote {out / name}.json, .md{', .png' if png else ''} in {time.perf_counter() - t0:.0f} s")
    print(markdown)
    return 0


# ---------------------------------------------------------------------------- models and timing


def failed_row(lead: Sequence[object], error: str, columns: int) -> str:
    """A markdown table row for a run that failed: the `lead` cells, `failed: error`, then empty cells to
    make `columns` in all."""
    cells = [*map(str, lead), f"failed: {error}"]
    return "| " + " | ".join(cells + [""] * (columns - len(cells))) + " |"


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters for a random-init model (in place),
    so that folding is not an identity; returns it in eval mode. Latency does not depend on the
    values, so every benchmark uses this one recipe (that of tests/helpers.py)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


@torch.no_grad()
def batchnorm_from_data(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """BatchNorm running statistics recomputed on `batches` (a cumulative mean, in place), affine parameters
    kept; returns `model` in eval mode. A random-init network whose statistics are random
    (`randomise_batchnorm`) can saturate until it gives every image the same output, and then no measure of
    agreement with it means anything: mobilenet_v2's logits on 128 photo crops differed by 1e-8 between
    images, against 0.06 with statistics from the data."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over every batch
    model.train()
    for x in batches:
        model(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return model.eval()


def time_paths(dep: Deployment, names: Sequence[str], paths: Sequence[Path], policy: TimingPolicy | None = None,
               base: int = 0, steady: int = 1) -> dict[str, dict]:
    """Time exported `paths` in one interleaved measurement (default: the profile's search policy).

    By name: latency_ms (LatencyStats.to_dict), speedup against `paths[base]` and the IQR/median
    of its per-round ratios (speedup_round_spread, 0 for the base itself).

    The timing path re-measures a model whose own samples spread beyond the policy's gate, but a
    change of the machine's state in the middle of a measurement moves every model alike and shows
    only in the per-round *ratios*. With `steady` > 1 the whole measurement is repeated, up to that
    many times in all, while any ratio spreads beyond the gate, and the steadiest one is kept. Each
    name also carries `noisy` (its ratio spread beyond the gate) and `attempts_round_spread` (the
    largest ratio spread of every measurement taken)."""
    if len(set(names)) != len(names) or len(names) != len(paths):
        msg = f"time_paths needs one distinct name per path, got {list(names)}"
        raise ValueError(msg)
    policy = policy if policy is not None else dep.profile.search_policy
    attempts: list[tuple[float, dict[str, dict]]] = []
    while len(attempts) < max(1, steady):
        timed = dep.time(paths, policy)
        rows = {name: {"latency_ms": timed.stats[i].to_dict(), "speedup": timed.speedup(base, i),
                       "speedup_round_spread": timed.speedup_spread(base, i) if i != base else 0.0}
                for i, name in enumerate(names)}
        attempts.append((max(r["speedup_round_spread"] for r in rows.values()), rows))
        if attempts[-1][0] <= policy.remeasure_iqr:
            break
    rows = min(attempts, key=lambda a: a[0])[1]
    for r in rows.values():
        r["noisy"] = r["speedup_round_spread"] > policy.remeasure_iqr
        r["attempts_round_spread"] = [a[0] for a in attempts]
    return rows


MEASURED_NOTE = ("- measured x: ± the IQR/median of the per-round speedups of the final measurement, where recorded; "
                 "(noisy): still beyond the re-measure gate after --final-repeats measurements, so the machine "
                 "changed state while it ran and the figure is not to be trusted.")  # what measured_speedup writes


def measured_speedup(v: dict) -> str:
    """A row's `speedup_measured`, ± the IQR/median of its per-round ratios where recorded (time_paths'
    speedup_round_spread), and (noisy) where that is still beyond the re-measure gate."""
    if "speedup_round_spread" not in v:  # results from before the spread was kept
        return f"{v['speedup_measured']:.2f}"
    return f"{v['speedup_measured']:.2f} ±{v['speedup_round_spread']:.0%}{' (noisy)' if v['noisy'] else ''}"


def time_models(dep: Deployment, models: Iterable[tuple[str, nn.Module]], workdir: Path,
                policy: TimingPolicy | None = None, steady: int = 1) -> dict[str, dict]:
    """Export every (name, model) with `dep.export` into `workdir` and time them all in one
    interleaved measurement (time_paths, `steady` as there); speedups against the first. `models`
    may be a generator, so that only one model at a time need be built."""
    names: list[str] = []
    paths: list[Path] = []
    for i, (name, model) in enumerate(models):
        names.append(name)
        safe = re.sub(r"[^\w.-]+", "_", name)
        paths.append(dep.export(model, workdir / f"{i:02d}-{safe}"))
    return time_paths(dep, names, paths, policy, steady=steady)
