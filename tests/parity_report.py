"""Session summary of the parity tests: the worst max-abs difference per component.

The parity tests (``tests/test_parity_model.py``) call :func:`record` for every output they compare;
at the end of the session this plugin prints one table in pytest's terminal summary (shown with or
without ``-s``)::

    ==================== parity: worst max |ours - reference| per component ====================
    component                         worst       tol      max|ref|  where
    forward_image/backbone_fpn[0]     0.00e+00    1e-04    ...

Registration: the parity test module registers this plugin itself (``register(config)``), so nothing
has to be added to ``conftest.py``. Registering it up front instead also works (add
``pytest_plugins = ["parity_report"]`` to ``tests/conftest.py``); registering twice is harmless.
"""

from __future__ import annotations

import math

PLUGIN_NAME = "napari_sam2_parity_report"

#: component -> {"err": worst max-abs difference, "tol": its tolerance, "scale": max |reference| of
#: that comparison, "where": which test / case / step produced it, "n": how many comparisons}
FIGURES: dict[str, dict] = {}


def record(component: str, err: float, tol: float, scale: float, where: str) -> None:
    """Keep the worst ``err`` seen for ``component`` (NaN counts as worst)."""
    entry = FIGURES.get(component)
    worse = entry is None or math.isnan(err) or (not math.isnan(entry["err"]) and err > entry["err"])
    if worse:
        FIGURES[component] = {"err": err, "tol": tol, "scale": scale, "where": where,
                              "n": 0 if entry is None else entry["n"]}
    FIGURES[component]["n"] += 1


def register(config) -> None:
    """Register this module as a pytest plugin once (from a fixture or conftest)."""
    import sys

    module = sys.modules[__name__]
    pm = config.pluginmanager
    if not pm.is_registered(module) and pm.get_plugin(PLUGIN_NAME) is None:
        pm.register(module, PLUGIN_NAME)


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001 (pytest hook)
    if not FIGURES:
        return
    tr = terminalreporter
    tr.write_sep("=", "parity: worst max |ours - reference| per component")
    width = max(len("component"), *(len(k) for k in FIGURES))
    tr.write_line(f"{'component':<{width}}  {'worst':>9}  {'tol':>7}  {'max|ref|':>9}  {'n':>4}  where")
    for name in sorted(FIGURES):
        f = FIGURES[name]
        flag = "" if f["err"] <= f["tol"] else "  <-- OVER TOLERANCE"
        tr.write_line(
            f"{name:<{width}}  {f['err']:9.2e}  {f['tol']:7.0e}  {f['scale']:9.3g}  {f['n']:>4}  "
            f"{f['where']}{flag}"
        )
