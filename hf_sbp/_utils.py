"""Small helpers shared across the package: value checks and Markdown tables."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch


def is_number(value: Any) -> bool:
    """An ``int`` or ``float`` (``bool`` is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int_at_least(value: Any, minimum: int) -> bool:
    """An ``int`` (not a ``bool``) that is ``>= minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_int_at_least(name: str, value: Any, minimum: int = 1) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer ``>= minimum``."""
    if not is_int_at_least(value, minimum):
        raise ValueError(f"{name}={value!r} is invalid; it must be an integer >= {minimum}.")


def format_number(value: Any) -> str:
    """A compact, readable rendering of numbers for tables (others via ``str``; ``None`` as ``-``)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3g}"
        return f"{value:.4f}".rstrip("0").rstrip(".") if value != int(value) else f"{value:.1f}"
    return str(value)


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], fmt: Callable[[Any], str] = format_number
) -> str:
    """A GitHub Markdown table; cells are rendered with ``fmt`` and pipes and newlines escaped."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [fmt(cell).replace("|", "\\|").replace("\n", " ") for cell in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: timings of asynchronous devices (CUDA) need a barrier to mean anything."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every entry of every tensor is finite (one host sync per tensor)."""
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors)
