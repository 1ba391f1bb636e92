"""The timing protocol of docs/measurement.md: cold start, warm-up, run/time floors, robust statistics, noise gate.

Free of torch on purpose, so a profiling bundle can take it to a device that
has only onnxruntime or openvino.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class TimingPolicy:
    """Floors for one measurement: run at least `min_runs` AND `min_time_s` seconds."""

    min_runs: int = 50
    min_time_s: float = 1.0
    warmup_runs: int = 10
    warmup_s: float = 0.5
    warn_iqr: float = 0.10  # IQR/median above this: warn
    remeasure_iqr: float = 0.25  # above this: measure again, up to `max_repeats` times
    max_repeats: int = 3
    parallel_probe: bool = True  # frame each measurement on this machine with the parallel probe (parallel_probe.py)

    @classmethod
    def from_dict(cls, d: dict) -> TimingPolicy:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


@dataclass
class LatencyStats:
    """Latency statistics in milliseconds over `n` timed runs."""

    median: float
    min: float
    p90: float
    p99: float
    iqr: float
    n: int
    cold_ms: float | None = None
    noisy: bool = False
    warning: str | None = None
    samples: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], cold_ms: float | None = None,
                     policy: TimingPolicy | None = None) -> LatencyStats:
        a = np.asarray(samples_ms, dtype=float)
        q25, q50, q75, q90, q99 = np.percentile(a, [25, 50, 75, 90, 99])
        stats = cls(float(q50), float(a.min()), float(q90), float(q99), float(q75 - q25), len(a),
                    cold_ms, samples=[float(v) for v in a])
        policy = policy or TimingPolicy()
        if stats.relative_iqr > policy.warn_iqr:
            stats.warning = f"IQR/median = {stats.relative_iqr:.0%} > {policy.warn_iqr:.0%}"
        return stats

    @property
    def relative_iqr(self) -> float:
        return self.iqr / self.median if self.median > 0 else float("inf")

    def to_dict(self, with_samples: bool = False) -> dict:
        d = asdict(self)
        if not with_samples:
            d.pop("samples")
        return d


def timed_ms(run: Callable[[], object]) -> float:
    """One run of `run`, timed with perf_counter_ns (ms)."""
    t0 = time.perf_counter_ns()
    run()
    return (time.perf_counter_ns() - t0) / 1e6


def warm_up(run: Callable[[], object], policy: TimingPolicy) -> float:
    """Time the first run as the cold start (ms), then run untimed to the warm-up floors."""
    return _warm_up_runs(run, policy)[0]


def _warm_up_runs(run: Callable[[], object], policy: TimingPolicy) -> tuple[float, int]:
    """warm_up, and how many untimed runs it made: `warmup_runs` at least, more while `warmup_s` lasts."""
    cold = timed_ms(run)
    t_end = time.perf_counter() + policy.warmup_s
    n = 0
    while n < policy.warmup_runs or time.perf_counter() < t_end:
        run()
        n += 1
    return cold, n


def _sample(run: Callable[[], object], policy: TimingPolicy) -> list[float]:
    samples: list[float] = []
    t_end = time.perf_counter() + policy.min_time_s
    while len(samples) < policy.min_runs or time.perf_counter() < t_end:
        samples.append(timed_ms(run))
    return samples


def measure(run: Callable[[], object], policy: TimingPolicy) -> LatencyStats:
    """One protocol measurement of `run`, re-measured while IQR/median stays above the gate."""
    cold = warm_up(run, policy)
    stats = LatencyStats.from_samples(_sample(run, policy), cold, policy)
    repeats = 1
    while stats.relative_iqr > policy.remeasure_iqr and repeats < policy.max_repeats:
        stats = LatencyStats.from_samples(_sample(run, policy), cold, policy)
        repeats += 1
    stats.noisy = stats.relative_iqr > policy.remeasure_iqr
    return stats


@dataclass
class Interleaved:
    """Per-model statistics from interleaved rounds, with per-round medians (ms); `burst` runs per model and
    round, `cooldown_s` of idle after each model's block (0: none was needed)."""

    stats: list[LatencyStats]
    round_medians: list[list[float]]  # [model][round]
    burst: int = 5
    cooldown_s: float = 0.0

    def speedup(self, base: int = 0, other: int = 1) -> float:
        """median(base) / median(other) over the paired rounds."""
        return self.stats[base].median / self.stats[other].median

    def speedup_spread(self, base: int = 0, other: int = 1) -> float:
        """IQR/median of the per-round speedups: how much one round's ratio wanders."""
        return ratio_spread(self.round_medians[base], self.round_medians[other])


def ratio_spread(base_rounds: Sequence[float], other_rounds: Sequence[float]) -> float:
    """IQR/median of the per-round ratios base / other of two models timed in the same rounds."""
    r = np.asarray(base_rounds) / np.asarray(other_rounds)
    q25, q50, q75 = np.percentile(r, [25, 50, 75])
    return float((q75 - q25) / q50)


BUSY_SHARE = 0.10  # a process using more than this share of one core while its caller sleeps is still busy
QUIET_S = 0.03  # ... and idle once it has used less for this long (a thread waiting for a core counts as busy)
PROBE_MAX_S = 0.3  # the longest tail of busy threads looked for (ms-scale spinning pools stay far under it)
MAX_COOLDOWN_S = 0.15  # a longer tail is not a spinning pool (another thread of the caller's is working)
BLOCK_PER_COOLDOWN = 3  # a block of timed runs lasts at least this many cool-downs (75% of the wall time timed)


def busy_after(tick_s: float = 0.001) -> float:
    """Seconds this process keeps using CPU after its caller stops running models: the tail of a runtime's
    spinning thread pool (ONNX Runtime's default keeps intra-op workers spinning ~40 ms after a run).

    Read from the process CPU clock (all threads) while the caller sleeps; 0 when nothing runs on."""
    start = last_busy = time.perf_counter()
    prev_cpu, prev_wall = time.process_time(), start
    busy = False
    while True:
        time.sleep(tick_s)
        cpu, wall = time.process_time(), time.perf_counter()
        if cpu - prev_cpu > BUSY_SHARE * (wall - prev_wall):
            last_busy, busy = wall, True
        prev_cpu, prev_wall = cpu, wall
        if wall - last_busy > QUIET_S or wall - start > PROBE_MAX_S:
            return last_busy - start if busy else 0.0


PROBE_BLOCK_RUNS = 8  # the parallel probe's timed runs per block, after one untimed run that wakes its threads
PROBE_ROUNDS = 6  # blocks of each, alternating
PROBE_WARM_RUNS = 16  # runs of each of its sessions, once, before its first probe


def parallel_speed(one: Callable[[], object], many: Callable[[], object], threads: int,
                   block_runs: int = PROBE_BLOCK_RUNS, rounds: int = PROBE_ROUNDS) -> dict:
    """How fast `threads` threads run a model against one thread, right now: `one` and `many` run the same small
    model at one thread and at `threads`, timed in alternating blocks of `block_runs` (each after one untimed
    run that wakes its threads), `rounds` blocks each, with the process idle before and after
    (compressor/latency/parallel_probe.py says why). Here so that a device's runner times it as this machine
    does. {"speedup": 1-thread median / N-thread median, "one_thread_ms", "threads_ms", "threads"}."""
    busy_after()
    times: dict[str, list[float]] = {"one": [], "many": []}
    for _ in range(rounds):
        for name, session in (("one", one), ("many", many)):
            session()
            times[name] += [timed_ms(session) for _ in range(block_runs)]
    busy_after()
    one_ms, many_ms = float(np.median(times["one"])), float(np.median(times["many"]))
    return {"speedup": round(one_ms / many_ms, 3), "one_thread_ms": round(one_ms, 4), "threads_ms": round(many_ms, 4),
            "threads": threads}


def cooldown_for(busy_s: Sequence[float]) -> float:
    """The idle time (s) after each model's block that outlasts the longest busy tail measured (with a
    quarter and 2 ms to spare); 0 when no tail was seen."""
    longest = max(busy_s, default=0.0)
    return 0.0 if longest <= 0 else round(min(MAX_COOLDOWN_S, 1.25 * longest + 0.002), 4)


def _warm(run: Callable[[], object], policy: TimingPolicy) -> tuple[float, float]:
    """warm_up's cold start (ms) and the mean warm-up run (ms), over the runs it made (a 1 ms model makes
    hundreds in `warmup_s`, not `warmup_runs`)."""
    t0 = time.perf_counter()
    cold, runs = _warm_up_runs(run, policy)
    return cold, max(1e-3, ((time.perf_counter() - t0) * 1e3 - cold) / max(1, runs))


def measure_interleaved(runs: Sequence[Callable[[], object]], policy: TimingPolicy,
                        burst: int = 5, cooldown_s: float | None = None) -> Interleaved:
    """Measure several models in rounds A, B, C, A, B, C ... so drift hits all alike (one model: measured
    in the same blocks, with no cool-down).

    Warm-up: each model's cold start and `warmup_runs` runs, then rounds of one run each until the
    session has warmed for `warmup_s` in all (a model's own first-run costs settle within its runs; the
    machine and its clocks warm once per session, not once per model).

    Each round runs every model in a block of `burst` runs back to back; rounds continue until
    every model has `min_runs` samples and the rounds took `min_time_s` x models (idle time not
    counted). While any model's IQR/median exceeds the re-measure gate, all are measured
    again (up to `max_repeats` times); those still above it are flagged noisy.

    A runtime that keeps its threads busy after a run (ONNX Runtime's spinning pool, its default)
    would steal the cores of the next model timed. So after the first two warm-ups the process is
    watched until it is idle (`busy_after`), and where it was not at once, each block is followed by a
    cool-down that outlasts that tail (`cooldown_s`; None: measured so), blocks are made long enough
    to spend most of the time timed (`BLOCK_PER_COOLDOWN`), and each block's first run, which wakes
    the model's sleeping threads, is not timed. Every model then runs as a user's inference loop
    runs it: its own pool hot, nobody else's.
    """
    colds, means, tails = [], [], []
    t_warm = time.perf_counter()
    each = replace(policy, warmup_s=0.0) if len(runs) > 1 else policy
    for i, run in enumerate(runs):
        cold, mean_ms = _warm(run, each)
        colds.append(cold)
        means.append(mean_ms)
        if cooldown_s is None and i < 2 and len(runs) > 1:
            tails.append(busy_after())
    while len(runs) > 1 and time.perf_counter() - t_warm < policy.warmup_s:
        for run in runs:  # the rest of the warm-up floor, shared: the machine warms once, not once per model
            run()
    cool = (cooldown_for(tails) if cooldown_s is None else max(0.0, cooldown_s)) if len(runs) > 1 else 0.0
    if cool > 0:
        burst = max(burst, int(np.ceil(BLOCK_PER_COOLDOWN * cool * 1e3 / float(np.median(means)))))
    for _ in range(max(1, policy.max_repeats)):
        samples: list[list[float]] = [[] for _ in runs]
        rounds: list[list[float]] = [[] for _ in runs]
        t_end = time.perf_counter() + policy.min_time_s * len(runs)
        while len(samples[0]) < policy.min_runs or time.perf_counter() < t_end:
            for i, run in enumerate(runs):
                if cool > 0:
                    run()  # wakes the model's threads: not timed
                chunk = [timed_ms(run) for _ in range(burst)]
                samples[i] += chunk
                rounds[i].append(float(np.median(chunk)))
                if cool > 0:
                    time.sleep(cool)
                    t_end += cool
        stats = [LatencyStats.from_samples(s, c, policy) for s, c in zip(samples, colds, strict=True)]
        if all(s.relative_iqr <= policy.remeasure_iqr for s in stats):
            break
    for s in stats:
        s.noisy = s.relative_iqr > policy.remeasure_iqr
    return Interleaved(stats, rounds, burst, cool)
