"""Do importance criteria agree? Rank correlations and k-least-important overlap of unit scores.

The pure functions work on ``{criterion: {unit: score}}`` (higher = keep), so
they are testable without models; `score_model` is the `compressor score` job.
Rank 1 is the least important unit (the first a search would remove); tied
scores share their average rank. Undefined statistics (a constant criterion has
no Spearman rho) are NaN here, null in JSON and "n/a" in text.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from compressor.errors import InputError, ValidationError
from compressor.fileio import atomic_write, refuse_existing_file
from compressor.graph.units import Unit

SR_INIT_NOTE = ("SR-init measures sensitivity to re-initialisation, not to removal: a block whose "
                "branch is zeroed (removable at no cost) can still score as important.")
Scores = Mapping[str, Mapping[str, float]]
Matrix = list[list[float]]


def parse_criteria(text: str, known: Sequence[str]) -> list[str]:
    """Comma-separated criterion names, each registered and listed once."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    # the refusals below have the shape of profiles.py's field checks (one message per problem): alike by form only
    if not names:
        msg = f"no criterion given; known: {', '.join(sorted(known))}"
        raise InputError(msg)
    unknown = [n for n in names if n not in known]
    if unknown:
        msg = f"unknown criterion {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}"
        raise InputError(msg)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        msg = f"criterion listed more than once: {', '.join(twice)}"
        raise InputError(msg)
    return names


def check_scores(scores: Scores) -> list[str]:
    """The common unit names (in the first criterion's order); refuses mismatched or non-finite scores."""
    if not scores:
        msg = "no criteria to compare"
        raise InputError(msg)
    first, *rest = scores
    units = list(scores[first])
    for name in rest:
        if set(scores[name]) != set(units):
            msg = f"criteria {first!r} and {name!r} scored different units"
            raise InputError(msg)
    for name, by_unit in scores.items():
        bad = [u for u, s in by_unit.items() if not math.isfinite(s)]
        if bad:
            msg = f"criterion {name!r} gave a non-finite score for {', '.join(bad)}"
            raise ValidationError(msg)
    return units


def rank_units(scores: Mapping[str, float]) -> dict[str, float]:
    """Rank of each unit, 1 = least important; ties get their average rank (e.g. 2.5)."""
    names = list(scores)
    ranks = stats.rankdata([scores[n] for n in names], method="average")
    return {n: float(r) for n, r in zip(names, ranks, strict=True)}


def least_important(scores: Mapping[str, float], k: int) -> list[str]:
    """The k lowest-scoring units; ties are broken by the order of `scores` (graph order)."""
    return sorted(scores, key=scores.__getitem__)[:k]  # sorted() is stable


def tied_at_k(scores: Mapping[str, float], k: int) -> bool:
    """Whether the k-th and (k+1)-th lowest scores tie, so the k-set depends on tie-breaking."""
    values = sorted(scores.values())
    return 0 < k < len(values) and values[k - 1] == values[k]


def default_k(n_units: int) -> int:
    """A third of the units, at least 1."""
    return max(1, n_units // 3)


def _pair(fn: Callable, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(statistic, p-value) from a scipy test; NaN where undefined (constant input, < 2 units)."""
    if len(a) < 2:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConstantInputWarning, degrees-of-freedom warnings
        result = fn(a, b)
    return float(result.statistic), float(result.pvalue)


@dataclass
class Agreement:
    """Pairwise agreement of criteria over the same units: matrices indexed like `criteria`."""

    criteria: list[str]
    units: list[str]
    k: int
    spearman: Matrix
    spearman_p: Matrix
    kendall: Matrix
    kendall_p: Matrix
    overlap: Matrix  # |A ∩ B| / k of the k least important units
    least: dict[str, list[str]] = field(default_factory=dict)
    tied_at_k: list[str] = field(default_factory=list)  # criteria whose k-set depends on tie-breaking

    def to_dict(self) -> dict:
        """JSON-ready: NaN becomes None."""
        return {"criteria": self.criteria, "k": self.k,
                "spearman": {"rho": _nulls(self.spearman), "p": _nulls(self.spearman_p)},
                "kendall": {"tau": _nulls(self.kendall), "p": _nulls(self.kendall_p)},
                "overlap": _nulls(self.overlap), "least_important": self.least, "tied_at_k": self.tied_at_k}


def _nulls(matrix: Matrix) -> list[list[float | None]]:
    return [[v if math.isfinite(v) else None for v in row] for row in matrix]


def agreement(scores: Scores, k: int | None = None) -> Agreement:
    """Spearman rho, Kendall tau-b (with p-values) and k-least overlap for every pair of criteria."""
    units = check_scores(scores)
    k = default_k(len(units)) if k is None else k
    if not 1 <= k <= len(units):
        msg = f"--k must be between 1 and the number of units ({len(units)}), got {k}"
        raise InputError(msg)
    names = list(scores)
    vectors = {c: np.array([scores[c][u] for u in units], dtype=np.float64) for c in names}
    least = {c: least_important({u: scores[c][u] for u in units}, k) for c in names}
    n = len(names)
    rho, rho_p, tau, tau_p, overlap = ([[math.nan] * n for _ in range(n)] for _ in range(5))
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            rho[i][j], rho_p[i][j] = _pair(stats.spearmanr, vectors[a], vectors[b])
            tau[i][j], tau_p[i][j] = _pair(stats.kendalltau, vectors[a], vectors[b])
            overlap[i][j] = len(set(least[a]) & set(least[b])) / k
    tied = [c for c in names if tied_at_k(scores[c], k)]
    return Agreement(names, units, k, rho, rho_p, tau, tau_p, overlap, least, tied)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def render_table(scores: Scores, units: Sequence[Unit], savings_ms: Mapping[str, float] | None = None) -> str:
    """One row per unit: name, kind, stage, then score and rank per criterion, then saving (ms)."""
    ranks = {c: rank_units(s) for c, s in scores.items()}
    header = ["unit", "kind", "stage"]
    for c in scores:
        header += [c, "rank"]
    if savings_ms is not None:
        header.append("saving ms")
    rows = []
    for u in units:
        row = [u.name, u.kind, u.stage]
        for c in scores:
            row += [_fmt(scores[c][u.name], ".4g"), f"{ranks[c][u.name]:g}"]
        if savings_ms is not None:
            row.append(_fmt(savings_ms.get(u.name), ".4f"))
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
             for r in [header, *rows]]
    return "\n".join(lines) + "\n(score: higher = keep; rank 1 = least important, removed first)"


def render_matrix(title: str, criteria: Sequence[str], matrix: Matrix, spec: str = ".3f") -> str:
    """A labelled square matrix; undefined entries print as n/a."""
    cells = [[_fmt(v, spec) for v in row] for row in matrix]
    width = max([len(c) for c in criteria] + [len(x) for row in cells for x in row])
    label = max(len(c) for c in criteria)
    lines = [title, " " * label + "  " + "  ".join(c.rjust(width) for c in criteria)]
    lines += [name.ljust(label) + "  " + "  ".join(x.rjust(width) for x in row)
              for name, row in zip(criteria, cells, strict=True)]
    return "\n".join(lines)


def notes_for(criteria: Sequence[str], result: Agreement | None = None) -> list[str]:
    """Caveats the report must carry for these criteria and this result."""
    notes = [SR_INIT_NOTE] if "sr_init" in criteria else []
    if result is not None and result.tied_at_k:
        notes.append(f"tied scores at the k = {result.k} boundary for {', '.join(result.tied_at_k)}: "
                     "their k-least set (and its overlap) depends on tie-breaking by graph order")
    return notes


def render_agreement(result: Agreement) -> str:
    """Spearman, Kendall (each with p-values) and overlap matrices as text."""
    c = result.criteria
    parts = [
        render_matrix("Spearman rho of unit rankings", c, result.spearman),
        render_matrix("Spearman p-value", c, result.spearman_p, ".2g"),
        render_matrix("Kendall tau-b of unit rankings", c, result.kendall),
        render_matrix("Kendall p-value", c, result.kendall_p, ".2g"),
        render_matrix(f"Overlap of the k = {result.k} least important units (|A∩B|/k)", c, result.overlap, ".2f"),
    ]
    return "\n\n".join(parts)


def plot_heatmap(result: Agreement, path: str | Path, overlap: bool = True, title: str | None = None) -> Path:
    """PNG heatmap of the Spearman matrix (and the overlap matrix), written atomically; refuses an existing file."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    path = refuse_existing_file(path)
    panels = [("Spearman rho", result.spearman, -1.0, "RdBu")]
    if overlap:
        panels.append((f"overlap of {result.k} least important", result.overlap, 0.0, "Greens"))
    n = len(result.criteria)
    size = 1.6 + 0.55 * n
    fig = Figure(figsize=(size * len(panels) + 0.8, size))
    for i, (title, matrix, vmin, cmap) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        data = np.ma.masked_invalid(np.array(matrix, dtype=np.float64))
        image = ax.imshow(data, vmin=vmin, vmax=1.0, cmap=colormaps[cmap].with_extremes(bad="#cccccc"))
        for r in range(n):
            for c in range(n):
                value = matrix[r][c]
                dark = math.isfinite(value) and (abs(value) > 0.6 if vmin < 0 else value > 0.6)
                ax.text(c, r, _fmt(value, ".2f"), ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
        ax.set_xticks(range(n), result.criteria, rotation=45, ha="right")
        ax.set_yticks(range(n), result.criteria)
        ax.set_title(title)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
