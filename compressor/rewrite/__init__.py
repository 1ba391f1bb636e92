"""Exact and near-exact rewrites: BatchNorm folding (fold.py), composing linear ops (compose.py), a block
merged into one conv (block.py), exact conv pairs (pairs.py), linearised blocks (linearised.py)."""
