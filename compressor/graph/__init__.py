"""The model as a traced graph: activations and additions (activations.py), removable units (units.py),
surgery (surgery.py), the prefix cache (prefix.py), merge units (merge_units.py) and recipes (recipe.py)."""
