"""Measuring on the device you deploy to: over SSH (a profile's `remote:` section) or from an offline bundle.

spec.py parses the profile section; transport.py is the SSH client (asyncssh, imported when used);
runner.py runs on the device (the runtime and numpy only); device.py and pool.py are the Device(s)
compressor/latency/device.py hands out; bundle.py and results.py are the offline way there and back.
"""
