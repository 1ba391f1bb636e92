"""The latency model: one saving per structure group, fitted on designed removal sets, with uncertainties.

Units of identical structure (graph/signature.py) cost the same, so the model has one coefficient
per group: f_g, the fraction of the unpruned model's latency that removing one unit of g saves. A
removal set S is predicted to save

    y(S) = sum_g n_g(S) f_g + sum_t x_t(S) c_t

of the baseline latency, n_g(S) counting the units of g in S and x_t(S) interaction terms (a stage
emptied, adjacent removals in a stage), kept only where the measurements show them. Each measurement is
one removal set timed in one interleaved session with the baseline: y = 1 - median(set) /
median(baseline), taken as the median of the per-round ratios, with its standard error from their
spread.

The fit is weighted least squares, weights 1 / (se^2 + tau^2): tau^2 is the scatter between
measurements that their own rounds do not show (drift between sessions, a set that is not quite
additive), chosen so that the residuals are as large as the weights say (Paule and Mandel's estimator,
as in meta-analysis). Every coefficient's standard error comes from the fit's covariance, and so does
any set's: sd(y(S)) = sqrt(x(S)' C x(S)). Written by hand: statsmodels' WLS would give the
coefficients, not tau^2 or the forward selection of terms; numpy is all the fit needs, and it runs
where only numpy is (a device, a replayed table).

Latencies are in milliseconds, savings as fractions of the baseline latency unless named `_ms`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from compressor.errors import InputError

TAU_FLOOR = 0.002  # sd (fraction) two sessions' ratios differ by at least: repeated sessions here, 0.2-0.5%
SE_FLOOR = 1e-4  # no measurement's standard error is taken as smaller (fraction)
KEEP_T = 3.0  # an interaction term is kept when its coefficient is this many standard errors from 0
# a width group's prior (its timed share of the removal's saving) has this sd, relative: the share is timed on the
# block alone, where fixed per-run costs differ from the block inside the model
PRIOR_REL_SD = 0.3
MEDIAN_SE = 1.2533  # se of a median = this x sd / sqrt(n), for normal noise
MAD_SD = 1.4826  # sd = this x median absolute deviation, for normal noise


BLOCK_KINDS = ("identity", "projection", "block")  # graph/units.py's, repeated: this module needs no torch


@dataclass(frozen=True)
class UnitInfo:
    """What the model knows of a unit: its group (structural signature), stage, graph order and block; for a
    width unit whose channel counts were timed, the unit that removes what it slims (`share_of`) and the share
    of that removal's saving the timing says the slimming saves (`timed_share`): the fit's prior."""

    name: str
    group: str
    stage: str
    order: int
    path: str
    kind: str = "identity"
    share_of: str = ""
    timed_share: float | None = None

    @property
    def removes_block(self) -> bool:
        """Whether removing it takes its block out of its stage (graph.units.Unit.removes_block)."""
        return self.kind in BLOCK_KINDS


@dataclass(frozen=True)
class SetMeasurement:
    """One removal set timed with the baseline in one session: the fraction of the baseline latency it
    saved, that fraction's standard error, and the two medians (ms)."""

    removed: tuple[str, ...]
    saved: float
    se: float
    session: int
    median_ms: float
    baseline_ms: float
    noisy: bool = False


def ratio_se(set_rounds: Sequence[float], base_rounds: Sequence[float], ratio: float,
             relative_iqrs: tuple[float, float]) -> float:
    """Standard error (fraction) of median(set) / median(baseline) from the per-round ratios: a robust sd
    (MAD) over sqrt(rounds); with fewer than 4 rounds, the two relative IQRs combined instead."""
    r = np.asarray(set_rounds, float) / np.asarray(base_rounds, float)
    if len(r) >= 4:
        sd = MAD_SD * float(np.median(np.abs(r - np.median(r))))
        return max(SE_FLOOR, MEDIAN_SE * sd / np.sqrt(len(r)))
    spread = float(np.hypot(*relative_iqrs)) / 1.349  # IQR -> sd
    return max(SE_FLOOR, MEDIAN_SE * ratio * spread / np.sqrt(max(1, len(r))))


def paired_ratio(set_rounds: Sequence[float], base_rounds: Sequence[float], set_median: float,
                 base_median: float) -> float:
    """median(set) / median(baseline) from one session: the median of the per-round ratios (each round's
    pair timed moments apart, so a burst of load on the machine hits both) where there are 4 rounds or
    more, else the ratio of the two medians."""
    if len(set_rounds) >= 4 and len(set_rounds) == len(base_rounds):
        return float(np.median(np.asarray(set_rounds, float) / np.asarray(base_rounds, float)))
    return set_median / base_median


def measurements_of(session: dict) -> list[SetMeasurement]:
    """The measurements of one timed session: `sets` (index 0 the baseline, []), `stats` (medians,
    IQRs, noisy) and `round_medians` per artifact, `id`."""
    base, base_rounds = session["stats"][0], session["round_medians"][0]
    out = []
    for removed, stats, rounds in zip(session["sets"][1:], session["stats"][1:], session["round_medians"][1:],
                                      strict=True):
        ratio = paired_ratio(rounds, base_rounds, stats["median"], base["median"])
        iqrs = (stats["iqr"] / stats["median"], base["iqr"] / base["median"])
        out.append(SetMeasurement(tuple(removed), 1.0 - ratio, ratio_se(rounds, base_rounds, ratio, iqrs),
                                  session["id"], stats["median"], base["median"], bool(stats.get("noisy"))))
    return out


@dataclass(frozen=True)
class Term:
    """A model term: a group (counts its units in a set), a stage emptied (1 when every unit of `units`
    is removed) or adjacency in a stage (removed pairs of neighbours among `units`, in graph order)."""

    name: str
    kind: str  # "group" | "emptied" | "adjacent"
    units: tuple[str, ...]

    def value(self, removed: frozenset[str]) -> float:
        if self.kind == "group":
            return float(sum(u in removed for u in self.units))
        if self.kind == "emptied":
            return float(all(u in removed for u in self.units))
        return float(sum(a in removed and b in removed for a, b in itertools.pairwise(self.units)))


def group_terms(units: Sequence[UnitInfo]) -> list[Term]:
    """One term per group, in the order of each group's first unit."""
    members: dict[str, list[str]] = {}
    for u in sorted(units, key=lambda u: u.order):
        members.setdefault(u.group, []).append(u.name)
    return [Term(g, "group", tuple(names)) for g, names in members.items()]


def interaction_candidates(units: Sequence[UnitInfo], min_per_stage: int = 1) -> list[Term]:
    """Interactions worth testing: per stage with several removable blocks, adjacent removals (a runtime
    may fuse across the block boundary that a removal takes away), and, where the search may empty a
    stage (`min_per_stage` 0), the stage emptied."""
    stages: dict[str, list[UnitInfo]] = {}
    for u in sorted(units, key=lambda u: u.order):
        if u.removes_block:
            stages.setdefault(u.stage, []).append(u)
    out = []
    for stage, members in stages.items():
        names = tuple(u.name for u in members)
        if len(names) >= 3:
            out.append(Term(f"adjacent:{stage}", "adjacent", names))
        if min_per_stage == 0 and len(names) >= 2:
            out.append(Term(f"emptied:{stage}", "emptied", names))
    return out


@dataclass
class Fit:
    """Weighted least squares: coefficients (fractions), their covariance, tau (sd between measurements
    beyond their own rounds), chi-square and degrees of freedom."""

    coef: np.ndarray
    cov: np.ndarray
    tau: float
    chi2: float
    dof: int
    identified: np.ndarray  # per term: whether any measurement varies it


def _wls(x: np.ndarray, y: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    w = 1.0 / var
    info = x.T @ (x * w[:, None])
    cov = np.linalg.pinv(info, rcond=1e-12)
    coef = cov @ (x.T @ (w * y))
    resid = y - x @ coef
    return coef, cov, float(np.sum(w * resid ** 2))


def _tau2(x: np.ndarray, y: np.ndarray, se2: np.ndarray, dof: int) -> float:
    """Paule-Mandel: the tau^2 >= TAU_FLOOR^2 at which chi-square equals its degrees of freedom."""
    lo = TAU_FLOOR ** 2
    if dof <= 0 or _wls(x, y, se2 + lo)[2] <= dof:
        return lo
    hi = max(lo * 4, float(np.var(y)) + lo)
    while _wls(x, y, se2 + hi)[2] > dof and hi < 1.0:
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _wls(x, y, se2 + mid)[2] > dof else (lo, mid)
    return hi


@dataclass(frozen=True)
class Prior:
    """A width group's saving taken, before any measurement of it, as `share` of a removal group's (term names),
    with sd PRIOR_REL_SD of that saving: one more row of the fit, saying f_term - share x f_of = 0."""

    term: str
    of: str
    share: float


def priors_of(units: Sequence[UnitInfo]) -> list[Prior]:
    """One prior per width group whose units' channel counts were timed and whose block's removal is a unit
    (the mean share where a group's units differ)."""
    by_name = {u.name: u for u in units}
    shares: dict[tuple[str, str], list[float]] = {}
    for u in units:
        of = by_name.get(u.share_of)
        if u.timed_share is not None and of is not None and of.group != u.group:
            shares.setdefault((u.group, of.group), []).append(u.timed_share)
    return [Prior(term, of, float(np.mean(v))) for (term, of), v in shares.items()]


def _solve(x: np.ndarray, y: np.ndarray, var: np.ndarray, terms: int) -> tuple[np.ndarray, np.ndarray, float]:
    """WLS over the columns some row varies; the others get 0 and an infinite variance."""
    identified = np.any(x != 0, axis=0) if len(x) else np.zeros(terms, bool)
    coef, cov, chi2 = np.zeros(terms), np.zeros((terms, terms)), 0.0
    if identified.any():
        c, v, chi2 = _wls(x[:, identified], y, var)
        idx = np.flatnonzero(identified)
        coef[idx] = c
        cov[np.ix_(idx, idx)] = v
    cov[~identified, ~identified] = np.inf
    return coef, cov, chi2


def fit_terms(terms: Sequence[Term], measurements: Sequence[SetMeasurement], priors: Sequence[Prior] = ()) -> Fit:
    """Fit `terms` to `measurements` (see the module docstring); terms no measurement varies get 0 and an
    infinite standard error. Each of `priors` whose removal group the measurements identify then adds its row,
    with sd PRIOR_REL_SD x share x that group's measured saving (at least TAU_FLOOR): a width group measured
    by few sets, or none, is drawn to its timed share, one measured precisely keeps what it measured. tau and
    the degrees of freedom are the measurements' alone."""
    x = design_matrix(terms, [m.removed for m in measurements])
    y = np.array([m.saved for m in measurements], float)
    se2 = np.array([max(m.se, SE_FLOOR) ** 2 for m in measurements], float)
    identified = np.any(x != 0, axis=0) if len(x) else np.zeros(len(terms), bool)
    used = x[:, identified]
    rank = int(np.linalg.matrix_rank(used)) if used.size else 0
    dof = len(y) - rank
    tau2 = _tau2(used, y, se2, dof) if rank else TAU_FLOOR ** 2
    coef, cov, chi2 = _solve(x, y, se2 + tau2, len(terms))
    index = {t.name: i for i, t in enumerate(terms)}
    rows, var = [], []
    for prior in priors:
        i, j = index.get(prior.term), index.get(prior.of)
        if i is None or j is None or not identified[j]:
            continue
        row = np.zeros(len(terms))
        row[i], row[j] = 1.0, -prior.share
        rows.append(row)
        var.append(max(PRIOR_REL_SD * prior.share * abs(coef[j]), TAU_FLOOR) ** 2)
    if rows:
        x_all = np.vstack([x, np.array(rows)])
        coef, cov, _ = _solve(x_all, np.concatenate([y, np.zeros(len(rows))]),
                              np.concatenate([se2 + tau2, np.array(var)]), len(terms))
        identified = np.any(x_all != 0, axis=0)
    return Fit(coef, cov, float(np.sqrt(tau2)), chi2, dof, identified)


def design_matrix(terms: Sequence[Term], sets: Iterable[Sequence[str]]) -> np.ndarray:
    """Rows: sets; columns: each term's value on the set."""
    rows = [[t.value(frozenset(s)) for t in terms] for s in sets]
    return np.array(rows, float).reshape(len(rows), len(terms))


def select_terms(base: Sequence[Term], candidates: Sequence[Term], measurements: Sequence[SetMeasurement],
                 priors: Sequence[Prior] = ()) -> tuple[list[Term], Fit]:
    """`base` plus the candidates the measurements show to matter, added one at a time (the most
    significant first) while one is KEEP_T standard errors from 0 and lowers the unexplained scatter."""
    terms = list(base)
    best = fit_terms(terms, measurements, priors)
    remaining = list(candidates)
    while remaining:
        trials = []
        for term in remaining:
            fit = fit_terms([*terms, term], measurements, priors)
            sd = float(np.sqrt(fit.cov[-1, -1])) if np.isfinite(fit.cov[-1, -1]) else np.inf
            if fit.identified[-1] and fit.dof > 0 and sd > 0 and np.isfinite(sd):
                trials.append((abs(fit.coef[-1]) / sd, term, fit))
        trials = [t for t in trials if t[0] >= KEEP_T and t[2].tau <= best.tau]
        if not trials:
            break
        _, term, best = max(trials, key=lambda t: t[0])
        terms.append(term)
        remaining.remove(term)
    return terms, best


@dataclass
class LatencyModel:
    """Predicted latency of any removal set (ms) with its standard error, from fitted terms."""

    baseline_ms: float
    units: list[UnitInfo]
    terms: list[Term]
    coef: np.ndarray  # fraction of the baseline per unit of each term
    cov: np.ndarray
    tau: float = TAU_FLOOR
    dof: int = 0

    @classmethod
    def fit(cls, units: Sequence[UnitInfo], measurements: Sequence[SetMeasurement],
            baseline_ms: float | None = None, min_per_stage: int = 1, interactions: bool = True) -> LatencyModel:
        """Group terms and the interactions the measurements show (`interactions`), fitted with the width
        groups' timed shares as priors (priors_of); the baseline is the median of the sessions' baselines
        unless given."""
        if not measurements:
            msg = "a latency model needs at least one measured removal set"
            raise InputError(msg)
        known = {u.name for u in units}
        unknown = sorted({n for m in measurements for n in m.removed} - known)
        if unknown:
            msg = f"measured sets name units the model does not have: {', '.join(unknown[:5])}"
            raise InputError(msg)
        base = group_terms(units)
        candidates = interaction_candidates(units, min_per_stage) if interactions else []
        terms, fit = select_terms(base, candidates, measurements, priors_of(units))
        if baseline_ms is None:
            baseline_ms = float(np.median(list({m.session: m.baseline_ms for m in measurements}.values())))
        return cls(baseline_ms, list(units), terms, fit.coef, fit.cov, fit.tau, fit.dof)

    @classmethod
    def additive(cls, baseline_ms: float, savings_ms: dict[str, float]) -> LatencyModel:
        """A model of one term per unit with the given savings (ms) and no uncertainty known (a v1 table)."""
        units = [UnitInfo(name, name, "", i, name) for i, name in enumerate(savings_ms)]
        coef = np.array([savings_ms[u.name] / baseline_ms for u in units], float)
        return cls(baseline_ms, units, group_terms(units), coef, np.zeros((len(units), len(units))), 0.0, 0)

    def features(self, removed: Iterable[str]) -> np.ndarray:
        names = frozenset(removed)
        unknown = names - {u.name for u in self.units}
        if unknown:
            msg = f"the latency model has no unit(s) {', '.join(sorted(unknown)[:5])}"
            raise InputError(msg)
        return np.array([t.value(names) for t in self.terms], float)

    def saved_fraction(self, removed: Iterable[str]) -> float:
        """The fraction of the baseline latency that removing `removed` saves."""
        return float(self.features(removed) @ self.coef)

    def sd_fraction(self, removed: Iterable[str]) -> float:
        """Standard error of saved_fraction (inf where it uses a term no measurement varied)."""
        x = self.features(removed)
        used = x != 0
        if not used.any():
            return 0.0
        sub = self.cov[np.ix_(used, used)]
        if not np.all(np.isfinite(sub)):
            return float("inf")
        return float(np.sqrt(max(0.0, x[used] @ sub @ x[used])))

    def predict_ms(self, removed: Iterable[str]) -> float:
        """Predicted latency (ms) with `removed` gone."""
        return self.baseline_ms * (1.0 - self.saved_fraction(removed))

    def sd_ms(self, removed: Iterable[str]) -> float:
        """Standard error (ms) of predict_ms."""
        return self.baseline_ms * self.sd_fraction(removed)

    def sd_new_ms(self, removed: Iterable[str]) -> float:
        """Standard deviation (ms) of a new measurement of `removed` about predict_ms: the prediction's
        standard error and the scatter between measurements (tau) together."""
        return self.baseline_ms * float(np.hypot(self.sd_fraction(removed), self.tau))

    def term_sd(self) -> np.ndarray:
        """Each term's standard error (fraction)."""
        return np.sqrt(np.where(np.isfinite(np.diag(self.cov)), np.maximum(np.diag(self.cov), 0), np.inf))

    def unit_savings_ms(self) -> dict[str, float]:
        """Each unit's saving (ms) when removed alone: its group's coefficient."""
        return {u.name: self.baseline_ms * self.saved_fraction([u.name]) for u in self.units}

    def unit_sd_ms(self) -> dict[str, float]:
        return {u.name: self.sd_ms([u.name]) for u in self.units}

    def interactions_ms(self) -> list[dict]:
        """The interaction terms as sets of units that, all removed, save `saving_ms` beyond their units'
        own savings: a stage emptied is one such set, adjacency one per neighbouring pair. So baseline -
        sum of unit savings - sum of the interactions whose units are all removed = predict_ms, exactly."""
        out = []
        for term, c in zip(self.terms, self.coef, strict=True):
            ms = float(c) * self.baseline_ms
            if term.kind == "emptied":
                out.append({"units": list(term.units), "saving_ms": ms, "term": term.name})
            elif term.kind == "adjacent":
                out += [{"units": [a, b], "saving_ms": ms, "term": term.name}
                        for a, b in itertools.pairwise(term.units)]
        return out

    def to_dict(self) -> dict:
        sd = self.term_sd()
        return {"baseline_ms": self.baseline_ms, "units": [asdict(u) for u in self.units],
                "terms": [{"name": t.name, "kind": t.kind, "units": list(t.units), "fraction": float(c),
                           "sd_fraction": float(s), "saving_ms": float(c) * self.baseline_ms,
                           "sd_ms": float(s) * self.baseline_ms} for t, c, s in zip(self.terms, self.coef, sd,
                                                                                    strict=True)],
                "covariance": [[float(v) if np.isfinite(v) else None for v in row] for row in self.cov],
                "tau": self.tau, "dof": self.dof}

    @classmethod
    def from_dict(cls, d: dict) -> LatencyModel:
        terms = [Term(t["name"], t["kind"], tuple(t["units"])) for t in d["terms"]]
        cov = np.array([[np.inf if v is None else v for v in row] for row in d["covariance"]], float)
        return cls(float(d["baseline_ms"]), [UnitInfo(**u) for u in d["units"]], terms,
                   np.array([t["fraction"] for t in d["terms"]], float), cov.reshape(len(terms), len(terms)),
                   float(d.get("tau", TAU_FLOOR)), int(d.get("dof", 0)))
