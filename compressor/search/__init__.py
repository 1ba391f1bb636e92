"""Choosing what to remove: targets (target.py), the knapsack (knapsack.py), greedy selection by measured KL
(greedy.py), the measured search loop (loop.py)."""
