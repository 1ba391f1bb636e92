"""Where latency comes from: the timing protocol (timing.py), profiles, provenance (machine.py), devices
that time artifacts (device.py, remote/), deployments, the lookup table, its calibration, the regression gate."""
