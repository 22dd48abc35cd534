"""When selection is active: a pure function of step numbers, like Composer's ``should_selective_backprop``."""

from __future__ import annotations


def selection_active(step: int, max_steps: int, start: float = 0.0, end: float = 1.0, interrupt: int = 0) -> bool:
    """Whether the step after ``step`` completed optimizer steps selects a subset.

    It depends only on step numbers, never on the data, so every process makes the same decision and none
    skips a collective.

    Args:
        step: optimizer steps completed so far (``TrainerState.global_step``).
        max_steps: the run's total optimizer steps; ``0`` (unknown) counts as training fraction 0.
        start: the training fraction ``step / max_steps`` at which selection starts (``sbp_start``).
        end: the training fraction at which it stops (``sbp_end``): active for fractions in ``[start, end)``.
        interrupt: if ``> 0``, every ``interrupt``-th step trains on the full batch (``sbp_interrupt``).
    """
    fraction = step / max_steps if max_steps > 0 else 0.0
    interrupted = interrupt > 0 and (step + 1) % interrupt == 0
    return start <= fraction < end and not interrupted
