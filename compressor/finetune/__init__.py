"""Recovering accuracy after removal: distillation training (training.py) and feature mimicking (mimic.py)."""
