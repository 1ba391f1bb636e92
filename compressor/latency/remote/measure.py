"""Time an offline bundle on this device: `python3 measure.py --out results.json`.

Written into a bundle by `compressor profile --bundle DIR` or `compressor bench --bundle DIR`, beside
runner.py, timing.py, records.py, manifest.json and the artifacts. It needs only Python 3.10+, numpy and the
runtime the manifest names (onnxruntime or openvino): like runner.py it imports nothing of compressor,
which the device does not have. It checks every artifact's sha256, times them all in interleaved
rounds by the protocol of timing.py (framed by the parallel probe where the bundle carries one, as on a
connected device), and writes (atomically) the figures with this device's provenance and conditions
(records.py):
a latency table for `compressor prune --latency-table`, or a bench results file for
`compressor bench --results`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import records  # noqa: E402  (beside this file in the bundle)
import runner  # noqa: E402

BUNDLE_KIND = "compressor-bundle"
RESULTS_KIND = "compressor-bundle-results"


def files_key(paths: list[str]) -> str:
    """sha256 over an artifact's files (names and bytes), as compressor computes it."""
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.basename(p).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def fail(message: str) -> int:
    print(f"measure.py: {message}", file=sys.stderr)
    return 2


def checked_manifest() -> dict:
    """The manifest, with every artifact's files present and unchanged (RunnerError otherwise)."""
    try:
        with open(os.path.join(HERE, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise runner.RunnerError("other", f"cannot read {HERE}/manifest.json: {e}") from e
    if manifest.get("kind") != BUNDLE_KIND or manifest.get("version") != 1:
        raise runner.RunnerError("other", f"{HERE} is not a compressor bundle (version 1)")
    for artifact in [*manifest["artifacts"], *([manifest["probe"]] if manifest.get("probe") else [])]:
        files = [os.path.join(HERE, f) for f in artifact["files"]]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing or files_key(files) != artifact["sha256"]:
            problem = f"{missing[0]} is missing" if missing else f"{artifact['file']} does not match its sha256"
            raise runner.RunnerError("bad-artifact", f"{problem}: copy the bundle to the device again")
    return manifest


def figures(manifest: dict, machine: dict, result: dict) -> dict:
    """A latency table (job "latency-table": version 2, its design timed in one session, the model left to
    compressor to fit) or a bench results file (job "bench")."""
    profile = {**manifest["profile"], "threads": result["threads"]}
    stats = result["stats"]
    if manifest["job"] == "latency-table":
        session = {"id": 0, "device": machine["hostname"], "sets": [a["removed"] or [] for a in manifest["artifacts"]],
                   "stats": [{k: v for k, v in s.items() if k != "samples"} for s in stats],
                   "round_medians": result["round_medians"], "burst": result.get("burst"),
                   "cooldown_s": result.get("cooldown_s"), "policy": manifest["policy"]}
        return {"version": 2, "model": manifest["model"], "input_shape": manifest["input_shape"], "profile": profile,
                "machine": machine, "baseline_ms": stats[0]["median"], "savings_ms": {}, "latency_model": None,
                "units": manifest["units"], "design": {**manifest["design"], "sessions": [session]}}
    return {"kind": RESULTS_KIND, "version": 1, "bundle": manifest["id"], "profile": profile,
            "policy": manifest["policy"], "machine": machine, "round_medians": result["round_medians"],
            "artifacts": [{"file": a["file"], "sha256": a["sha256"], "stats": s}
                          for a, s in zip(manifest["artifacts"], stats, strict=True)]}


def write_atomically(path: str, text: str) -> None:
    """`text` to a temporary file beside `path`, renamed over it: compressor.fileio's way, written again here
    because the device has no compressor (like the runner's copies)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="time this compressor bundle on this device")
    p.add_argument("--out", required=True, help="results JSON to write (refused if it exists)")
    p.add_argument("--cool-above-c", type=float, default=75.0,
                   help="first wait while the hottest thermal zone is above this (C; default 75)")
    p.add_argument("--cool-max-s", type=float, default=120.0, help="... at most this long (s; default 120)")
    args = p.parse_args(argv)
    if os.path.exists(args.out):
        return fail(f"{args.out} already exists; choose another path")
    try:
        manifest = checked_manifest()
        machine = {k: v for k, v in runner.probe(manifest["runtime"], HERE).items() if k != "free_bytes"}
        job = {"runtime": manifest["runtime"], "threads": manifest["threads"], "options": manifest["options"],
               "artifacts": [os.path.join(HERE, a["file"]) for a in manifest["artifacts"]],
               "input": os.path.join(HERE, manifest["input"]), "policy": manifest["policy"], "burst": 5,
               "cool_above_c": args.cool_above_c, "cool_max_s": args.cool_max_s}
        if manifest.get("probe"):
            probe = manifest["probe"]
            job["probe"] = {"artifact": os.path.join(HERE, probe["file"]), "shape": probe["shape"],
                            "warm_runs": probe["warm_runs"]}
        print(f"timing {len(job['artifacts'])} artifacts on {machine['hostname']} ({machine['model']}), "
              f"{manifest['runtime']} {machine['runtime_version']}", file=sys.stderr, flush=True)
        result = runner.measure(job)
    except runner.RunnerError as e:
        return fail(str(e))
    except OSError as e:
        return fail(f"{type(e).__name__}: {e}")
    record = records.log_entry(machine["hostname"], [a["file"] for a in manifest["artifacts"]], manifest["policy"],
                               result, None)
    speed = records.probe_summary([record])
    machine = {**machine, "threads": result["threads"], "measurements": [record],
               **({"parallel_speedup": speed} if speed else {}),
               "throttled": record["throttled"], "changing_conditions": bool(record["changing"]),
               "drifted": False, "warnings": record["warnings"], "bundle": manifest["id"],
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        write_atomically(args.out, json.dumps(figures(manifest, machine, result), indent=2) + "\n")
    except OSError as e:
        return fail(f"cannot write {args.out}: {e}")
    for warning in record["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"results written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
