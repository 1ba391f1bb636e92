"""A recipe: which units a prune removed or merged, as plain JSON, to redo on a fresh model.

`apply_recipe(model, recipe)` finds the units of a new instance of the same
architecture by tracing it, checks that every unit the recipe names is there
and of the same kind, and removes (or linearises) them: the same structure,
ready for the pruned model's state_dict.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from compressor.errors import InputError
from compressor.graph.units import MERGE_SUFFIX, Unit

RECIPE_FORMAT = "compressor-recipe"
RECIPE_VERSION = 1


def make_recipe(removed: Iterable[Unit], input_shape: Sequence[int]) -> dict:
    """The JSON-ready recipe of `removed` units; `input_shape` (C, H, W) is the traced input."""
    return {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "input_shape": list(input_shape),
            "units": [{"name": u.name, "kind": u.kind, "action": "merge" if u.kind == "merge" else "remove",
                       "becomes": u.removable_to, "shortcut": u.shortcut, "post_add": list(u.post_add),
                       "stage": u.stage} for u in removed]}


def recipe_units(recipe: dict) -> list[str]:
    """The unit names a recipe removes or merges; InputError if it is not a recipe."""
    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
        msg = f"not a compressor recipe (no {RECIPE_FORMAT!r} format field)"
        raise InputError(msg)
    if recipe.get("version") != RECIPE_VERSION:
        msg = f"recipe version {recipe.get('version')!r} is not supported (this compressor reads {RECIPE_VERSION})"
        raise InputError(msg)
    units = recipe.get("units")
    if not isinstance(units, list) or not all(isinstance(u, dict) and isinstance(u.get("name"), str)
                                              for u in units):
        msg = "recipe 'units' must be a list of {name, kind, ...} entries"
        raise InputError(msg)
    return [u["name"] for u in units]


def apply_recipe(model: nn.Module, recipe: dict, example_input: torch.Tensor | None = None) -> nn.Module:
    """A copy of `model` (a fresh instance of the architecture the recipe was made on) with the
    recipe's units removed or merged. `example_input` defaults to a random tensor of the recipe's
    input shape; InputError names any unit the model does not have, or has of another kind."""
    from compressor.graph.surgery import remove_units
    from compressor.graph.units import find_units

    names = recipe_units(recipe)
    if example_input is None:
        shape = recipe.get("input_shape")
        example_input = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    if not names:
        return remove_units(model, [])
    units = find_units(model, example_input)
    if any(name.endswith(MERGE_SUFFIX) for name in names):
        from compressor.graph.merge_units import with_merge_units

        units = with_merge_units(model, units)
    by_name = {u.name: u for u in units}
    missing = [n for n in names if n not in by_name]
    if missing:
        msg = (f"the model has no removable unit {', '.join(missing)} that the recipe names; "
               f"its units: {', '.join(u.name for u in units) or 'none'}")
        raise InputError(msg)
    kinds = [f"{u['name']} is {by_name[u['name']].kind}, the recipe says {u['kind']}"
             for u in recipe["units"] if u.get("kind", by_name[u["name"]].kind) != by_name[u["name"]].kind]
    if kinds:
        msg = f"the model does not match the recipe: {'; '.join(kinds)}"
        raise InputError(msg)
    return remove_units(model, [by_name[n] for n in names], example_input)
