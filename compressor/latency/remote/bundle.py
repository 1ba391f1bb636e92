"""Offline bundles for boards with no network path: artifacts, the runner and a manifest in one folder.

    compressor profile --model M --profile P --bundle DIR      the latency table's designed sets (job latency-table)
    compressor bench --artifact A --against B --bundle DIR     an artifact and its reference (job bench)

Copy DIR to the device and run `python3 DIR/measure.py --out results.json` there
(Python 3.10+, numpy and the runtime only); bring results.json back to
`compressor prune --latency-table results.json` or `compressor bench ... --results results.json`.
A bundle is written to a temporary folder beside DIR and renamed into place
(compressor.fileio.staged_folder), so it is complete or absent.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import nn

from compressor.errors import InputError
from compressor.fileio import staged_folder
from compressor.graph.units import Unit
from compressor.latency.deploy import Deployment
from compressor.latency.designed import DesignOptions, bundle_design
from compressor.latency.machine import machine_info
from compressor.latency.parallel_probe import PROBE_SHAPE, probe_artifact
from compressor.latency.profiles import Profile
from compressor.latency.remote.device import RUNNER_FILES, RUNTIMES, files_key
from compressor.latency.timing import PROBE_WARM_RUNS, TimingPolicy

BUNDLE_KIND = "compressor-bundle"
RESULTS_KIND = "compressor-bundle-results"
SCRIPTS = {**RUNNER_FILES, "measure.py": Path(__file__).resolve().parent / "measure.py"}


def _check_runtime(profile: Profile) -> None:
    if profile.runtime not in RUNTIMES:
        msg = f"a bundle times {' and '.join(RUNTIMES)} artifacts; profile {profile.name} runs {profile.runtime}"
        raise InputError(msg)


def _manifest(job: str, profile: Profile, policy: TimingPolicy, artifacts: list[dict], **extra: object) -> dict:
    """What measure.py reads: the runtime and its settings, the floors, each artifact's files and sha256."""
    return {"kind": BUNDLE_KIND, "version": 1, "job": job, "id": secrets.token_hex(8),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "runtime": profile.runtime, "threads": profile.threads, "options": profile.runtime_options,
            "policy": vars(policy), "profile": {**profile.to_dict(), "threads": profile.threads},
            "input": "input.npy", "artifacts": artifacts, "made_on": machine_info(), **extra}


def _finish(tmp: Path, manifest: dict, x: np.ndarray) -> None:
    np.save(tmp / "input.npy", np.ascontiguousarray(x, np.float32))
    for name, source in SCRIPTS.items():
        shutil.copyfile(source, tmp / name)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _entry(files: Sequence[Path], root: Path, main: Path, removed: Sequence[str] | None = None) -> dict:
    return {"file": str(main.relative_to(root)), "files": [str(f.relative_to(root)) for f in files],
            "sha256": files_key(files), "removed": None if removed is None else list(removed)}


def _probe(tmp: Path, backend, profile: Profile, policy: TimingPolicy) -> dict:
    """{"probe": the parallel probe's entry} where the policy asks for it and the device may run more than one
    thread (the runner leaves it out at one, as on a live device); else {}. measure.py times it at one thread
    and at the profile's before and after the session, as runner.measure does for a connected device."""
    if not policy.parallel_probe or profile.threads == 1:
        return {}
    source = probe_artifact(backend)
    target = tmp / "probe"
    target.mkdir(parents=True)
    files = [Path(shutil.copy2(f, target / f.name)) for f in backend.exporter.artifact_files(source)]
    return {"probe": {**_entry(files, tmp, target / source.name), "shape": list(PROBE_SHAPE),
                      "warm_runs": PROBE_WARM_RUNS}}


def write_table_bundle(folder: str | Path, model: nn.Module, units: list[Unit], deployment: Deployment,
                       name: str, options: DesignOptions | None = None) -> Path:
    """The unpruned model and the latency model's designed removal sets exported for the profile (the
    baseline first), with the runner, measure.py and a manifest: measure.py on the device times them in
    one interleaved session and writes the table, whose model `prune --latency-table` fits."""
    profile = deployment.profile
    _check_runtime(profile)
    files_of = deployment.exporter.artifact_files
    with staged_folder(folder, "bundle folder") as tmp:
        design, exported = bundle_design(model, units, deployment, tmp / "artifacts", options)
        artifacts = [_entry(files_of(p), tmp, p, removed) for removed, p in exported]
        manifest = _manifest("latency-table", profile, profile.search_policy, artifacts, model=name,
                             input_shape=list(deployment.input_shape), units=design.pop("units"), design=design,
                             **_probe(tmp, deployment.backend, profile, profile.search_policy))
        _finish(tmp, manifest, deployment.example.numpy())
    return Path(folder)


def write_bench_bundle(folder: str | Path, artifacts: Sequence[Path], backend, profile: Profile,
                       policy: TimingPolicy, x: np.ndarray) -> tuple[Path, str]:
    """Copies of `artifacts` (the first is judged, a second is its reference) with the runner, measure.py
    and a manifest; the folder and what to do next."""
    _check_runtime(profile)
    with staged_folder(folder, "bundle folder") as tmp:
        entries = []
        for i, artifact in enumerate(artifacts):
            target = tmp / "artifacts" / str(i)
            target.mkdir(parents=True)
            files = [Path(shutil.copy2(f, target / f.name)) for f in backend.exporter.artifact_files(artifact)]
            entries.append(_entry(files, tmp, target / Path(artifact).name))
        _finish(tmp, _manifest("bench", profile, policy, entries, sources=[str(a) for a in artifacts],
                               **_probe(tmp, backend, profile, policy)), x)
    text = (f"bundle written to {folder}: copy it to the device, run `python3 {Path(folder).name}/measure.py "
            f"--out results.json` there, then repeat this command with --results results.json instead of --bundle")
    return Path(folder), text
