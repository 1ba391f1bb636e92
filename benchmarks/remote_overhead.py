"""Overhead of measuring over SSH: the same latency table and prune, here and on this machine over loopback.

The "device" is an asyncssh server on 127.0.0.1 in this process (tests/sshd.py) whose commands run in
real subprocesses, so remote runs pay everything a real device costs but the network: connecting,
uploading the runner and every artifact, starting the device's Python and runtime for each
measurement, JSON back. In order: `compressor profile` here (A), over SSH (R), here again (B);
then `compressor prune` over SSH and here, `--rounds` times, alternating. Goals: the table's savings
agree within the noise (median |R - A| per unit at most 1.5x the median |B - A| of two local tables),
and a prune's wall time over SSH is at most 1.25x the local one. Run it on an idle machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common
import numpy as np

ROOT = common.HERE.parent
sys.path.insert(0, str(ROOT))

from tests.sshd import TestDevice  # noqa: E402  (the repository's test SSH server)

NAME = "remote_overhead"


def cli(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    """Run `compressor ARGS`; its wall time (s) and result."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "compressor.cli.main", *args], capture_output=True, text=True,
                          cwd=ROOT)
    seconds = time.perf_counter() - t0
    if done.returncode not in (0, 1):
        common.log(done.stderr[-3000:])
        msg = f"compressor {args[0]} failed with exit {done.returncode}"
        raise SystemExit(msg)
    return seconds, done


def load() -> float:
    return os.getloadavg()[0]


def tables(work: Path, local: str, remote: Path, model: str, data: str) -> dict:
    """A, R, B: the latency table here, over SSH, here again; seconds and savings (ms) of each."""
    found = {}
    for tag, profile in (("A", local), ("R", str(remote)), ("B", local)):
        before = load()
        seconds, _ = cli("profile", "--model", model, "--data", data, "--profile", profile,
                         "--out", str(work / f"table_{tag}.json"))
        table = json.loads((work / f"table_{tag}.json").read_text())
        found[tag] = {"seconds": seconds, "baseline_ms": table["baseline_ms"], "savings_ms": table["savings_ms"],
                      "load_before": before, "load_after": load(), "host": table["machine"].get("host", "here")}
        common.log(f"table {tag}: {seconds:.1f} s, baseline {table['baseline_ms']:.3f} ms")
    units = list(found["A"]["savings_ms"])
    a, r, b = (np.array([found[t]["savings_ms"][u] for u in units]) for t in "ARB")
    found["agreement"] = {"median_abs_R_minus_A_ms": float(np.median(np.abs(r - a))),
                          "median_abs_B_minus_A_ms": float(np.median(np.abs(b - a))),
                          "spearman_R_A": _spearman(r, a), "spearman_B_A": _spearman(b, a)}
    return found


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def prunes(work: Path, local: str, remote: Path, args, rounds: int) -> list[dict]:
    """`rounds` pairs of prunes, over SSH first then here; wall time, measured speedup, target met."""
    runs = []
    for i in range(rounds):
        for tag, profile in (("remote", str(remote)), ("local", local)):
            before = load()
            out = work / f"prune_{tag}_{i}"
            seconds, done = cli("prune", "--model", args.model, "--data", args.data, "--profile", profile,
                                "--target-speedup", str(args.target_speedup), "--out", str(out),
                                "--finetune-epochs", str(args.finetune_epochs))
            report = json.loads((out / "report.json").read_text())
            runs.append({"where": tag, "round": i, "seconds": seconds, "exit": done.returncode,
                         "speedup_measured": report["speedup_measured"], "target_met": report["target_met"],
                         "host": report["profile"]["machine"].get("host", "here"),
                         "measurements": len(report["profile"]["machine"].get("measurements", [])),
                         "trials": len(report["search"]["trials"]),
                         "load_before": before, "load_after": load()})
            common.log(f"prune {tag} {i}: {seconds:.1f} s, {report['speedup_measured']:.2f}x")
    return runs


def _typical(tables: dict) -> str:
    """The median single-unit saving of table A (ms), formatted."""
    return f"{float(np.median(list(tables['A']['savings_ms'].values()))):.3f}"


def markdown(result: dict) -> str:
    t, ag = result["tables"], result["tables"]["agreement"]
    remote = [r["seconds"] for r in result["prunes"] if r["where"] == "remote"]
    here = [r["seconds"] for r in result["prunes"] if r["where"] == "local"]
    ratio = float(np.median(remote) / np.median(here))
    lines = [
        f"Model {result['model']} on {result['data']}, profile {result['profile']}; the device is an asyncssh server "
        "on 127.0.0.1 in the benchmark's process, running the runner in real subprocesses (tests/sshd.py).", "",
        "| latency table | where | wall time (s) | baseline (ms) | 1-min load before / after |",
        "|---|---|---:|---:|---|",
        *[f"| {k} | {t[k]['host']} | {t[k]['seconds']:.1f} | {t[k]['baseline_ms']:.3f} | "
          f"{t[k]['load_before']:.1f} / {t[k]['load_after']:.1f} |" for k in "ARB"],
        "", f"- Savings over SSH against here: median |R - A| = {ag['median_abs_R_minus_A_ms']:.4f} ms per unit; "
            f"two local tables: median |B - A| = {ag['median_abs_B_minus_A_ms']:.4f} ms (the noise). Spearman: "
            f"R-A {ag['spearman_R_A']:.2f}, B-A {ag['spearman_B_A']:.2f}. Goal (at most 1.5x the noise): "
            f"**{'met' if ag['median_abs_R_minus_A_ms'] <= 1.5 * ag['median_abs_B_minus_A_ms'] else 'MISSED'}**.",
        "", "| prune | round | wall time (s) | measured speedup | target met | candidates measured | "
            "measurements on the device | load before / after |",
        "|---|---:|---:|---:|---|---:|---:|---|",
        *[f"| {r['where']} ({r['host']}) | {r['round']} | {r['seconds']:.1f} | {r['speedup_measured']:.2f}x | "
          f"{r['target_met']} | {r['trials']} | {r['measurements'] if r['where'] == 'remote' else '-'} | "
          f"{r['load_before']:.1f} / {r['load_after']:.1f} |"
          for r in result["prunes"]],
        "", f"- Prune wall time over SSH / here (medians): **{ratio:.2f}** (goal at most 1.25: "
            f"**{'met' if ratio <= 1.25 else 'MISSED'}**). A prune's wall time also follows how many candidates "
            "its search measures (the measurement noise decides it): read each wall time with its count of candidates.",
        f"- Single-unit savings here are {_typical(t)} ms on a {t['A']['baseline_ms']:.2f} ms model: near the noise "
        "of one table, so any two tables (here and here again as well) rank the units only loosely.",
    ]
    return common.document("Remote measurement overhead (loopback SSH)", result, lines)


def main() -> int:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--data", default="digits32")
    parser.add_argument("--profile", default="ort-cpu", help="built-in profile the remote one copies")
    parser.add_argument("--target-speedup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1, help="pairs of prunes (default: 1)")
    parser.add_argument("--finetune-epochs", type=int, default=4, help="prune's (default: 4, prune's own)")
    parser.add_argument("--work", type=Path, default=Path("runs/remote_overhead"), help="new folder for the runs")
    args = parser.parse_args()
    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=False)
    device = TestDevice(args.work / "device")
    device.start()
    try:
        from importlib import resources

        text = (resources.files("compressor.builtin_profiles") / f"{args.profile}.yaml").read_text()
        remote = args.work / "remote.yaml"
        remote.write_text(text + device.remote_section())
        result = {**common.provenance(NAME), "model": args.model, "data": args.data, "profile": args.profile,
                  "tables": tables(args.work, args.profile, remote, args.model, args.data),
                  "prunes": prunes(args.work, args.profile, remote, args, args.rounds),
                  "server_commands": len(device.log)}
    finally:
        device.stop()
    text = markdown(result)
    common.write_results(args.out, NAME, result, text)
    return common.finish(args.out, NAME, text, t0)


if __name__ == "__main__":
    sys.exit(main())
