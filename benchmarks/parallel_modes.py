"""How a runtime's N-thread latency moves with the machine's state, and whether the parallel probe sees it.

For `--minutes`, over and over: each model on each profile's runtime timed at the profile's threads and at
one thread (a block of runs each, alternating), the parallel probe (compressor/latency/parallel_probe.py),
and two threads hashing in parallel (coarse work: their speed over one thread's). Each round is put in the
"fast" or "slow" state by the model's own parallel speedup (1-thread over N-thread median, split at
`--split`); the results give each state's share, its latencies and its probe speedups, and the Spearman
correlation of the probe's speedup with each model's.

    .venv/bin/python benchmarks/parallel_modes.py --minutes 10

Also two threads hashing in parallel (coarse work) are timed against one, to show that the machine's cores
themselves keep their throughput; `--render FILE` summarises a results JSON again.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import common
import numpy as np
from predictor_accuracy import prepare_model
from scipy import stats as scistats

from compressor.latency.parallel_probe import ParallelProbe
from compressor.latency.profiles import load_profile
from compressor.latency.timing import timed_ms
from exporters import Backend

NAME = "parallel_modes"
TITLE = "N-thread latency against the machine's state, and the parallel probe"
HASH_BYTES = 4 << 20


def _median_ms(session, runs: int) -> float:
    """The median of `runs` timed runs, after one untimed run that wakes the session's threads."""
    session()
    return statistics.median(timed_ms(session) for _ in range(runs))


def hash_speedup(threads: int, repeats: int = 5) -> float:
    """`threads` threads each hashing HASH_BYTES (hashlib releases the GIL) against one: the best of `repeats`."""
    data = np.random.default_rng(0).integers(0, 255, HASH_BYTES, dtype=np.uint8).tobytes()

    def wall(n: int) -> float:
        workers = [threading.Thread(target=lambda: hashlib.sha256(data).digest()) for _ in range(n)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - t0

    return threads * min(wall(1) for _ in range(repeats)) / min(wall(threads) for _ in range(repeats))


def open_pairs(profiles: list[str], models: list[str], folder: Path) -> list[dict]:
    """Per profile and model (as predictor_accuracy.py times them): sessions at the profile's threads and at
    one, and the profile's probe."""
    pairs = []
    for name in profiles:
        profile = load_profile(name)
        many = Backend(profile.runtime, "fp32", profile.resolved_threads, profile.runtime_options, profile.opset)
        one = Backend(profile.runtime, "fp32", 1, profile.runtime_options, profile.opset)
        probe = ParallelProbe(many)
        for model_name in models:
            loaded, _ = prepare_model(model_name, 0)
            x = loaded.example_input(1)
            path = many.export(loaded.model.eval(), x, folder / f"{name}-{model_name}{many.suffix}")
            pairs.append({"profile": name, "model": model_name, "threads": many.threads, "probe": probe,
                          "many": many.open(path, x), "one": one.open(path, x)})
    return pairs


def stretches(times_s: list[float], fast: list[bool]) -> dict:
    """How long each state lasted (s), from the rounds' times: per state, the stretches' count, median, max."""
    lasted: dict[str, list[float]] = {"fast": [], "slow": []}
    start = 0
    for i in range(1, len(fast) + 1):
        if i == len(fast) or fast[i] != fast[start]:
            end = times_s[i] if i < len(fast) else times_s[-1]
            lasted["fast" if fast[start] else "slow"].append(end - times_s[start])
            start = i
    return {k: {"count": len(v), "median": statistics.median(v), "max": max(v)} if v else {"count": 0}
            for k, v in lasted.items()}


def summarise(rounds: list[dict], split: float) -> list[dict]:
    """Per profile and model: each state's share and medians, and the probe's correlation with the model."""
    rows = []
    for key in sorted({(r["profile"], r["model"]) for r in rounds}):
        own = [r for r in rounds if (r["profile"], r["model"]) == key]
        speedups = [r["one_ms"] / r["many_ms"] for r in own]
        row = {"profile": key[0], "model": key[1], "rounds": len(own),
               "spearman_probe_vs_model": float(scistats.spearmanr([r["probe"]["speedup"] for r in own],
                                                                   speedups).statistic)}
        fast = [s >= split for s in speedups]
        medians = [statistics.median(r["probe"]["speedup"] for r, f in zip(own, fast, strict=True) if f is state)
                   for state in (True, False) if state in fast]
        probe_split = float(np.sqrt(medians[0] * medians[-1]))
        row["probe_split"] = probe_split
        row["agreement"] = float(np.mean([(r["probe"]["speedup"] >= probe_split) == f
                                          for r, f in zip(own, fast, strict=True)]))
        row["stretches_s"] = stretches([r["t_s"] for r in own], fast)
        for state, members in (("fast", [r for r, s in zip(own, speedups, strict=True) if s >= split]),
                               ("slow", [r for r, s in zip(own, speedups, strict=True) if s < split])):
            probe = [m["probe"]["speedup"] for m in members]
            row[state] = {"share": len(members) / len(own)} | ({
                "many_ms": statistics.median(m["many_ms"] for m in members),
                "one_ms": statistics.median(m["one_ms"] for m in members),
                "probe_speedup": {"low": min(probe), "median": statistics.median(probe), "high": max(probe)},
                "hash_speedup": statistics.median(m["hash_speedup"] for m in members)} if members else {})
        rows.append(row)
    return rows


def render(result: dict) -> str:
    lines = [f"{result['minutes']} minutes, {result['rounds']} rounds; state split at a model speedup "
             f"(1 thread / {result['threads']} threads) of {result['split']}.", "",
             "| profile | model | state | share | N threads ms | 1 thread ms | probe speedup low / median / high "
             "| hash speedup | Spearman probe vs model |", "|---|---|---|---:|---:|---:|---|---:|---:|"]
    states = ["", "| profile | model | probe split | rounds the probe puts in the model's state "
              "| fast stretches: n, median / max s | slow stretches: n, median / max s |",
              "|---|---|---:|---:|---|---|"]
    for row in result["summary"]:
        for state in ("fast", "slow"):
            s = row[state]
            if not s.get("many_ms"):
                lines.append(f"| {row['profile']} | {row['model']} | {state} | 0% | | | | | |")
                continue
            p = s["probe_speedup"]
            lines.append(f"| {row['profile']} | {row['model']} | {state} | {s['share']:.0%} | {s['many_ms']:.3f} | "
                         f"{s['one_ms']:.3f} | {p['low']:.2f} / {p['median']:.2f} / {p['high']:.2f} | "
                         f"{s['hash_speedup']:.2f} | {row['spearman_probe_vs_model']:.2f} |")
        st = row["stretches_s"]
        states.append(f"| {row['profile']} | {row['model']} | {row['probe_split']:.2f} | {row['agreement']:.1%} | "
                      + " | ".join(f"{st[k]['count']}, {st[k].get('median', 0):.0f} / {st[k].get('max', 0):.0f}"
                                   for k in ("fast", "slow")) + " |")
    notes = ["", "- state: a round is fast when the model's parallel speedup (1-thread over N-thread median) is at "
             "least the split; the probe split is the geometric mean of the probe's median speedup in the two states.",
             "- The probe is timed right after the model in each round, so a round where the state flipped in between "
             "counts as a disagreement; stretches are measured between rounds (a round lasts about 2 s)."]
    return common.document(TITLE, result, lines + states + notes, source=True)


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__, models="mobilenet_v2,resnet56")
    parser.add_argument("--profiles", type=common.comma_list, default="ort-cpu,openvino-cpu",
                        help="built-in profiles (default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to watch (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=60, help="timed runs per session and round (default: %(default)s)")
    parser.add_argument("--split", type=float, default=1.5, help="model speedup between the states (default: 1.5)")
    parser.add_argument("--render", type=Path, help="summarise and render this results JSON again, timing nothing")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.render:
        result = json.loads(args.render.read_text())
        result["summary"] = summarise(result["series"], result["split"])
        common.write_results(args.out, NAME, result, render(result))
        return common.finish(args.out, NAME, render(result), t0)
    with tempfile.TemporaryDirectory() as folder:
        pairs = open_pairs(args.profiles, args.models, Path(folder))
        rounds, end = [], time.perf_counter() + 60 * args.minutes
        while time.perf_counter() < end:
            for p in pairs:
                many, one = _median_ms(p["many"], args.runs), _median_ms(p["one"], args.runs)
                rounds.append({"t_s": round(time.perf_counter() - t0, 2), "profile": p["profile"], "model": p["model"],
                               "many_ms": many, "one_ms": one, "probe": p["probe"].measure(),
                               "hash_speedup": hash_speedup(p["threads"])})
            common.log(f"{len(rounds)} rounds, last: " + ", ".join(
                f"{r['model']}@{r['profile']} {r['one_ms'] / r['many_ms']:.2f}x probe {r['probe']['speedup']:.2f}x"
                for r in rounds[-len(pairs):]))
    result = {**common.provenance(NAME), "minutes": args.minutes, "split": args.split, "rounds": len(rounds),
              "threads": pairs[0]["threads"], "summary": summarise(rounds, args.split), "series": rounds}
    common.write_results(args.out, NAME, result, render(result))
    return common.finish(args.out, NAME, render(result), t0)


if __name__ == "__main__":
    sys.exit(main())
