"""Measuring a latency table by designed experiments (latency/designed.py)."""

from __future__ import annotations

from compressor.graph.units import find_units
from compressor.latency.deploy import Deployment
from compressor.latency.designed import DesignOptions, measure_latency_table
from compressor.latency.device import LocalDevice
from compressor.latency.profiles import parse_profile
from tests.helpers import FAST_PROFILE
from tests.random_nets import random_net


class CountingBackend:
    """The profile's real backend, with every run of every session it opens counted."""

    def __init__(self, backend) -> None:
        self.backend, self.runs = backend, 0

    def open(self, artifact, example_input=None):
        session = self.backend.open(artifact, example_input)

        def run():
            self.runs += 1
            return session()

        return run


def test_a_session_over_the_noise_gate_is_kept_for_the_fit_not_measured_again(tmp_path):
    """Every session here spreads beyond the gate (remeasure_iqr 0). A search candidate's would be measured
    again; a design's rounds are kept, its sets weighed by their standard errors, so each session's
    models run about once the samples they report (a re-measure would run them three times)."""
    text = FAST_PROFILE.replace("  parallel_probe: false", "  remeasure_iqr: 0.0\n  max_repeats: 3\n"
                                "  parallel_probe: false")
    deployment = Deployment(parse_profile(text, "fast"), (3, 32, 32))
    counting = CountingBackend(deployment.backend)
    deployment.device = LocalDevice(counting)
    model = random_net(0).model
    units = find_units(model, deployment.example)
    table = measure_latency_table(model, units, deployment, "random_net(0)", workdir=tmp_path,
                                  options=DesignOptions(target_sd=1.0))
    sessions = table.to_dict()["design"]["sessions"]
    reported = sum(s["n"] for session in sessions for s in session["stats"])
    assert sessions and all(s["noisy"] for session in sessions for s in session["stats"])
    assert reported <= counting.runs < 1.5 * reported
