"""The timing protocol: statistics, run/time floors, cold start, re-measuring, interleaving."""

import threading
import time

import numpy as np
import pytest

from compressor.latency.timing import (
    Interleaved,
    LatencyStats,
    TimingPolicy,
    busy_after,
    cooldown_for,
    measure,
    measure_interleaved,
)

pytestmark = pytest.mark.timing  # compares real latencies: run alone (make test)


def _busy(ms):
    """Spin for `ms` milliseconds: steadier than sleep, so IQR/median stays near 0."""
    end = time.perf_counter_ns() + int(ms * 1e6)
    while time.perf_counter_ns() < end:
        pass


class Counter:
    def __init__(self, durations_ms=None):
        self.calls = 0
        self.durations_ms = durations_ms

    def __call__(self):
        if self.durations_ms is not None:
            _busy(self.durations_ms[self.calls % len(self.durations_ms)])
        self.calls += 1


# exact warm-up: one cold run, then exactly `warmup_runs` (warmup_s=0 adds none)
EXACT = dict(warmup_runs=2, warmup_s=0.0)


def test_from_samples_known_values():
    stats = LatencyStats.from_samples([5, 1, 9, 3, 7, 2, 8, 4, 6], cold_ms=12.5)
    assert stats.median == 5
    assert stats.min == 1
    assert stats.p90 == pytest.approx(8.2)
    assert stats.p99 == pytest.approx(8.92)
    assert stats.iqr == pytest.approx(4.0)  # q75 7 - q25 3
    assert stats.n == 9
    assert stats.cold_ms == 12.5
    assert stats.relative_iqr == pytest.approx(0.8)
    assert stats.warning is not None and "IQR/median" in stats.warning
    assert stats.noisy is False
    assert sorted(stats.samples) == list(range(1, 10))


def test_from_samples_warning_threshold():
    quiet = LatencyStats.from_samples([100, 100, 104, 108, 108])  # IQR 8 / median 104 = 7.7%
    loud = LatencyStats.from_samples([100, 100, 106, 112, 112])  # IQR 12 / median 106 = 11.3%
    assert quiet.iqr == pytest.approx(8.0)
    assert quiet.warning is None
    assert loud.iqr == pytest.approx(12.0)
    assert loud.warning is not None
    strict = LatencyStats.from_samples([100, 100, 104, 108, 108], policy=TimingPolicy(warn_iqr=0.05))
    assert strict.warning is not None


def test_from_samples_constant():
    stats = LatencyStats.from_samples([2.0] * 4)
    assert (stats.median, stats.min, stats.p90, stats.iqr, stats.relative_iqr) == (2.0, 2.0, 2.0, 0.0, 0.0)
    assert stats.warning is None


def test_to_dict_drops_samples_unless_asked():
    stats = LatencyStats.from_samples([1.0, 2.0, 3.0])
    assert "samples" not in stats.to_dict()
    assert stats.to_dict()["median"] == 2.0
    assert stats.to_dict(with_samples=True)["samples"] == [1.0, 2.0, 3.0]


def test_policy_from_dict_ignores_unknown_keys():
    policy = TimingPolicy.from_dict({"min_runs": 3, "min_time_s": 0.5, "colour": "blue"})
    assert policy == TimingPolicy(min_runs=3, min_time_s=0.5)


def test_measure_run_floor_decides_for_slow_function():
    run = Counter([2.0])  # 30 runs x 2 ms = 60 ms > the 20 ms time floor
    policy = TimingPolicy(min_runs=30, min_time_s=0.02, remeasure_iqr=10.0, **EXACT)
    stats = measure(run, policy)
    assert stats.n == 30
    assert run.calls == 1 + 2 + 30
    assert stats.min >= 2.0  # each run spins at least 2 ms (preemption can only add)


def test_measure_time_floor_decides_for_cheap_function():
    run = Counter()
    policy = TimingPolicy(min_runs=30, min_time_s=0.05, warmup_runs=3, warmup_s=0.01, remeasure_iqr=1e9)
    t0 = time.perf_counter()
    stats = measure(run, policy)
    elapsed = time.perf_counter() - t0
    assert elapsed >= 0.05 + 0.01
    assert stats.n > 30  # a no-op runs far more than 30 times in 50 ms
    assert run.calls > stats.n + 3  # cold start + the warm-up ran too
    assert len(stats.samples) == stats.n


def test_measure_records_cold_start():
    durations = [25.0] + [0.5] * 1000  # the first call is slow, the rest are fast
    run = Counter(durations)
    stats = measure(run, TimingPolicy(min_runs=30, min_time_s=0.01, remeasure_iqr=10.0, **EXACT))
    assert stats.cold_ms >= 25.0
    assert stats.median < 5.0
    assert max(stats.samples) < 25.0  # the cold run is not among the samples


def test_measure_steady_function_is_measured_once():
    run = Counter([0.5])
    # a gate of 100% IQR/median: spinning stays far below it even on a busy machine
    policy = TimingPolicy(min_runs=30, min_time_s=0.0, max_repeats=3, remeasure_iqr=1.0, **EXACT)
    stats = measure(run, policy)
    assert run.calls == 1 + 2 + 30
    assert stats.noisy is False


def test_measure_remeasures_noisy_function_and_flags_it():
    run = Counter([0.2, 1.5])  # alternating: IQR/median ~150%, far above the 25% gate
    policy = TimingPolicy(min_runs=30, min_time_s=0.0, max_repeats=3, **EXACT)
    stats = measure(run, policy)
    assert run.calls == 1 + 2 + 3 * 30
    assert stats.n == 30
    assert stats.relative_iqr > policy.remeasure_iqr
    assert stats.noisy is True
    assert stats.warning is not None


def test_interleaved_alternates_bursts():
    log = []

    def make(tag):
        def run():
            log.append(tag)
            _busy(0.1)
        return run

    policy = TimingPolicy(min_runs=30, min_time_s=0.01, remeasure_iqr=10.0, **EXACT)
    # no cool-down: the alternation alone (a busy tail and its cool-down are test_a_busy_tail_is_measured_...);
    # measured, something left busy by an earlier test in this process read as a tail in 7 of 34 runs here
    result = measure_interleaved([make("A"), make("B")], policy, burst=5, cooldown_s=0)
    warm = 1 + 2
    assert log[:warm] == ["A"] * warm
    assert log[warm:2 * warm] == ["B"] * warm
    timed = log[2 * warm:]
    assert len(timed) % 10 == 0
    bursts = [timed[i:i + 5] for i in range(0, len(timed), 5)]
    assert bursts == [[t] * 5 for t in "AB" * (len(bursts) // 2)]
    n = len(timed) // 2
    for stats in result.stats:
        assert stats.n == n >= 30
        assert stats.cold_ms is not None
    assert [len(r) for r in result.round_medians] == [n // 5, n // 5]


def test_interleaved_meets_time_floor_times_models():
    policy = TimingPolicy(min_runs=5, min_time_s=0.03, warmup_runs=1, warmup_s=0.0)
    t0 = time.perf_counter()
    result = measure_interleaved([lambda: None, lambda: None, lambda: None], policy, burst=5)
    assert time.perf_counter() - t0 >= 0.09
    assert len(result.stats) == 3
    assert result.stats[0].n == result.stats[1].n == result.stats[2].n > 5


def test_interleaved_speedup_of_twice_slower_function():
    policy = TimingPolicy(min_runs=30, min_time_s=0.05, warmup_runs=2, warmup_s=0.01)
    result = measure_interleaved([lambda: time.sleep(0.002), lambda: time.sleep(0.001)], policy)
    assert 1.5 < result.speedup() < 2.5
    assert 0.4 < result.speedup(1, 0) < 0.67
    assert result.speedup() == pytest.approx(result.stats[0].median / result.stats[1].median)


def test_speedup_spread_known_rounds():
    stats = [LatencyStats.from_samples([1.0]), LatencyStats.from_samples([1.0])]
    result = Interleaved(stats, [[1, 2, 3, 4, 5], [1, 1, 1, 1, 1]])
    assert result.speedup_spread() == pytest.approx(2 / 3)  # (q75 4 - q25 2) / median 3
    steady = Interleaved(stats, [[2, 4, 6], [1, 2, 3]])
    assert steady.speedup_spread() == 0.0
    assert np.isfinite(steady.speedup_spread(1, 0))


class Spinning:
    """A model whose runtime keeps a thread busy for `tail_s` after each run, as ONNX Runtime's default thread
    pool spins after an inference (~40 ms here), and takes `ms` per run itself."""

    def __init__(self, ms: float, tail_s: float) -> None:
        self.ms, self.tail_s, self.until = ms, tail_s, 0.0
        self.wake = threading.Event()
        threading.Thread(target=self._pool, daemon=True).start()

    def _pool(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            while time.perf_counter() < self.until:
                pass  # spins, holding the GIL as a runtime's worker holds a core

    def __call__(self) -> None:
        _busy(self.ms)
        self.until = time.perf_counter() + self.tail_s
        self.wake.set()


def test_a_busy_tail_is_measured_and_outlasted():
    spinning = Spinning(0.5, 0.03)
    spinning()
    assert 0.025 < busy_after() < 0.1
    time.sleep(0.05)
    # nothing runs on once the tail is over: a single busy 1 ms tick (the VM, the collector) may read as a few
    # ms, as it did once in a make test here, but not as the 30 ms tail
    assert busy_after() < 0.01
    assert cooldown_for([0.0, 0.0]) == 0.0 and 0.03 < cooldown_for([0.01, 0.03]) < 0.045
    policy = TimingPolicy(min_runs=20, min_time_s=0.05, warmup_runs=3, warmup_s=0.0, remeasure_iqr=10.0)
    result = measure_interleaved([spinning, Counter([0.5])], policy)
    assert 0.03 <= result.cooldown_s <= 0.15 and result.burst > 5  # long blocks: most of the time is timed
    time.sleep(0.1)  # the spinning model's last tail (30 ms) ends before the plain measurement watches
    plain = measure_interleaved([Counter([0.5]), Counter([0.5])], policy)
    assert (plain.cooldown_s, plain.burst) == (0.0, 5)


def test_blocks_with_a_cool_down_idle_after_each_and_leave_their_first_run_untimed():
    log = []

    def make(tag):
        def run():
            log.append((tag, time.perf_counter()))
            _busy(1.0)
        return run

    policy = TimingPolicy(min_runs=20, min_time_s=0.0, remeasure_iqr=10.0, **EXACT)
    result = measure_interleaved([make("A"), make("B")], policy, burst=5, cooldown_s=0.004)
    burst = result.burst
    assert result.cooldown_s == 0.004 and burst >= 3 * 4.0 / 1.05  # a block lasts 3 cool-downs at least
    timed = log[2 * (1 + 2):]
    blocks = [timed[i:i + burst + 1] for i in range(0, len(timed), burst + 1)]
    assert all(len(b) == burst + 1 and len({tag for tag, _ in b}) == 1 for b in blocks)  # waking run + burst
    assert [b[0][0] for b in blocks] == ["A", "B"] * (len(blocks) // 2)
    for before, after in zip(blocks, blocks[1:], strict=False):
        assert after[0][1] - before[-1][1] >= 0.004  # idle for the cool-down between two models' blocks
    assert result.stats[0].n == burst * len(blocks) // 2 >= 20  # the waking runs are not among the samples


def test_blocks_are_sized_by_the_warm_up_runs_made_not_by_the_warm_up_floor():
    """A 1 ms model makes ~100 warm-up runs in a 0.1 s warm-up floor: its mean run is 1 ms, not 0.1 s / 2
    runs, so its blocks are long enough to outlast the cool-down three times (else most of a session
    is spent idle)."""
    def run():
        _busy(1.0)

    policy = TimingPolicy(min_runs=20, min_time_s=0.0, remeasure_iqr=10.0, warmup_runs=2, warmup_s=0.1)
    result = measure_interleaved([run, run], policy, burst=5, cooldown_s=0.004)
    assert result.burst >= 3 * 4.0 / 1.05


def test_onnx_runtime_spinning_by_default_gets_a_cool_down_and_none_without(tmp_path):
    """A real ONNX Runtime pool: with its default spinning its workers stay busy after a run, so interleaved
    blocks are followed by a cool-down; with spinning off nothing stays busy and none is slept."""
    import torch
    from torch import nn

    from exporters.onnx import OnnxExporter
    from exporters.onnxruntime import OnnxRuntimeSession

    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.Flatten(),
                          nn.Linear(32 * 32 * 32, 3)).eval()  # large enough for the intra-op pool to work
    path = OnnxExporter().export(model, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx", 17)
    policy = TimingPolicy(min_runs=20, min_time_s=0.1, warmup_runs=5, warmup_s=0.05, remeasure_iqr=10.0)
    found = {}
    for label, options in (("default", {}), ("off", {"allow_spinning": False})):
        sessions = [OnnxRuntimeSession(path, 2, options) for _ in range(2)]
        for s in sessions:
            s.prepare(np.zeros((1, 3, 32, 32), np.float32))
        found[label] = measure_interleaved(sessions, policy)
    assert found["default"].cooldown_s > 0.005 and found["default"].burst > 5
    assert (found["off"].cooldown_s, found["off"].burst) == (0.0, 5)


def test_a_session_warms_the_machine_once_and_each_model_to_its_own_floor():
    """Four 1 ms models with a 0.2 s warm-up floor: each makes its cold run and `warmup_runs` runs, and the
    floor's time is spent once for the session (about 200 runs in all), not once per model (800)."""
    calls: list[list[float]] = [[] for _ in range(4)]

    def model(i):
        def run():
            calls[i].append(time.perf_counter())
            _busy(1.0)
        return run

    policy = TimingPolicy(min_runs=10, min_time_s=0.0, remeasure_iqr=10.0, warmup_runs=3, warmup_s=0.2)
    result = measure_interleaved([model(i) for i in range(4)], policy, burst=5, cooldown_s=0.0)
    warm = [len(c) - s.n for c, s in zip(calls, result.stats, strict=True)]
    assert all(w >= 1 + 3 for w in warm)  # the cold start and the model's own warm-up runs
    last_warm_start = max(c[w - 1] for c, w in zip(calls, warm, strict=True))
    assert last_warm_start - calls[0][0] >= 0.2 - 0.005  # the floor is kept (its last run starts within it)
    assert sum(warm) <= 1.5 * 0.2 / 1e-3  # the floor once (at most 1 ms a run), not four times
    assert min(warm) >= 0.8 * max(warm) - 5  # shared in turn: the last model warms as long as the first
