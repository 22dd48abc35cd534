"""Plot colours shared by the benchmark's plots."""

from __future__ import annotations

from collections.abc import Iterable

from ..strategies import registered_strategies, strategy_class
from .common import parse_variant, strategy_order

FULL_BATCH_COLOR = "black"
PALETTE = (
    "tab:green",
    "tab:orange",
    "tab:blue",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
    "tab:gray",
    "navy",
    "darkgoldenrod",
    "teal",
    "magenta",
    "lime",
    "maroon",
    "coral",
    "slateblue",
    "darkgreen",
    "gold",
    "sienna",
    "deepskyblue",
    "orchid",
    "darkslategray",
)
"""Plot colours of the selective strategies, assigned in registration order (``gradmatch``, ``loss``, ``random``
first), then to unregistered names found in results; they repeat after twenty-four."""


def _selects_subset(name: str) -> bool:
    # Results of a strategy whose module is not imported are taken for a selective one.
    name = parse_variant(name)[0]
    return name not in registered_strategies() or strategy_class(name).selective


def strategy_colors(names: Iterable[str] = ()) -> dict[str, str]:
    """A plot colour for every registered strategy and every name in ``names``: black for those that select no
    subset, the :data:`PALETTE` in registration order for the others (then for unregistered names)."""
    colors = {}
    selective = 0
    for name in strategy_order([*registered_strategies(), *names]):
        if not _selects_subset(name):
            colors[name] = FULL_BATCH_COLOR
        else:
            colors[name] = PALETTE[selective % len(PALETTE)]
            selective += 1
    return colors
