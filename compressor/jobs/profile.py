"""The profile job: a model's latency table on a profile (`compressor profile`), and how it is printed."""

from __future__ import annotations

from collections.abc import Callable

from compressor.latency.designed import DesignOptions
from compressor.latency.profiles import Profile
from compressor.latency.table import LatencyTable
from compressor.models.loaded import LoadedModel


def measure_table(loaded: LoadedModel, profile: Profile, options: DesignOptions | None = None,
                  log: Callable[[str], None] = print) -> LatencyTable:
    """Find the model's units and measure their latency model on `profile` (its device is closed after)."""
    from compressor.graph.units import find_units
    from compressor.latency.deploy import Deployment
    from compressor.latency.designed import measure_latency_table
    from compressor.latency.device import close_device

    deployment = Deployment(profile, loaded.input_shape)
    try:
        units = find_units(loaded.model, deployment.example)
        return measure_latency_table(loaded.model, units, deployment, loaded.arch, options=options, log=log)
    finally:
        close_device(deployment.device)


def _members(units: list[str]) -> str:
    return ", ".join(units) if len(units) <= 3 else f"{units[0]} ... {units[-1]}"


def describe(table: LatencyTable) -> list[str]:
    """One line per structure group (and interaction term): its units and saving per unit, +- 1 sd (ms),
    then the baseline and how the table was measured, and the parallel probe's speedups where it ran."""
    lines = []
    for g in table.groups():
        sd = f" +- {g['sd_ms']:.4f}" if g.get("sd_ms") is not None else ""
        if g["kind"] in ("group", "unit"):
            what = f"{len(g['units'])} unit{'s' if len(g['units']) > 1 else ''} ({_members(g['units'])})"
            lines.append(f"  {what:<44} save {g['saving_ms']:7.4f}{sd} ms each")
        else:
            lines.append(f"  {g['kind']} {g['name']:<35} adds {-g['saving_ms']:+7.4f}{sd} ms")
    design = table.design or {}
    how = (f"; {design.get('sets')} removal sets in {len(design.get('sessions', []))} sessions, stopped: "
           f"{design.get('stopped')}" if design else " (version-1 table: single-unit savings)")
    took = f" in {table.seconds:.0f} s" if table.seconds is not None else ""
    speed = table.machine.get("parallel_speedup")
    one = ((speed or {}).get("one_thread_ms") or {}).get("low")
    state = [f"the runtime's {table.profile.get('threads')} threads ran at {speed['median']:.2f}x one thread's "
             f"speed (parallel probe, {speed['low']:.2f}-{speed['high']:.2f}x over {speed['probes']} probes"
             + (f"; one thread {one:.3f} ms at best" if one else "")
             + "): its milliseconds hold while this machine runs them so"] if speed else []
    return [*lines, f"baseline {table.baseline_ms:.4f} ms{how}{took}", *state]
