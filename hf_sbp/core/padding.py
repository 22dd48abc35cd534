"""Padding-aware batch surgery: drop the padding columns a subset does not need, and cut rows short for scoring.

Both functions work on a collated batch, a mapping of names to tensors as a data collator builds it (for example
``DataCollatorWithPadding``), and return a new ``dict`` (or the batch itself when there is nothing to do). A tensor
is *per-token* when its first two dimensions are those of ``attention_mask`` (rows x columns): ``input_ids``,
``attention_mask``, ``token_type_ids``, ``position_ids``, ``inputs_embeds``, ``special_tokens_mask`` and token-level
(integer) labels are; everything else (sequence labels, scalars, other shapes) passes through untouched.

Why trimming leaves every row's output unchanged
    A padding column is one whose ``attention_mask`` is 0 in every row. Attention adds a large negative bias to such
    keys, so after the softmax they weigh exactly 0 in every real token's attention (``exp`` underflows to 0), and a
    padded query's output is never read: sequence classifiers pool the first token (BERT's ``[CLS]``) or the last
    non-pad token (decoders). So removing *trailing* padding columns changes no real token's computation, up to the
    rounding of matrix products of another shape. Removing *leading* columns (left padding, as decoders use) is
    different: models that are not given ``position_ids`` number the columns ``0 .. T-1`` (``torch.arange`` in
    GPT-2's and Llama's forward, ``transformers`` 5), so every real token of a left-padded row would move to a lower
    position. That changes the outputs of a model with absolute position embeddings (GPT-2, BERT); a rotary model
    (Llama) is invariant to the shift only in exact arithmetic (and not under every ``rope_scaling``), and a batch
    does not say which kind of model it is for. Leading columns are therefore only trimmed when the batch carries
    ``position_ids``, which are sliced with the rest and keep every token at its position.

Rows made only of padding are not trimmed around: their attention is uniform over masked keys, so their (meaningless)
output depends on how many columns there are; a batch with such a row is returned unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100
"""The label of token positions that no loss counts (``CrossEntropyLoss``'s default ``ignore_index``)."""
LABEL_NAMES = ("labels",)
KEEP_WHOLE = ("attention_mask", "position_ids")
"""Per-token tensors whose value at a row's last position is not copied by :func:`truncate_for_scoring`."""


def _mask(inputs: Mapping[str, Any]) -> torch.Tensor | None:
    mask = inputs.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _columns(inputs: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(rows, columns)`` of the tokens: from ``attention_mask``, else ``input_ids``, else ``inputs_embeds``."""
    for key in ("attention_mask", "input_ids", "inputs_embeds"):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[0], value.shape[1]
    return None


def _token_keys(
    inputs: Mapping[str, Any], rows: int, columns: int, label_names: Sequence[str]
) -> tuple[list[str], list[str]]:
    """``(per_token, ambiguous)`` keys. Ambiguous: a tensor with ``columns`` in dim 1 that may not be aligned with the
    tokens: a floating-point label (multi-label targets of ``num_labels == columns`` classes, or token regression
    targets: they cannot be told apart) or a tensor of another row count."""
    per_token, ambiguous = [], []
    for key, value in inputs.items():
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[1] != columns:
            continue
        if value.shape[0] != rows or (key in label_names and value.is_floating_point()):
            ambiguous.append(key)
        else:
            per_token.append(key)
    return per_token, ambiguous


def token_span(attention_mask: torch.Tensor) -> tuple[int, int] | None:
    """``(start, stop)``: the columns from the first to the last that some row attends to (``stop`` exclusive);
    ``None`` when no row attends to any column."""
    used = (attention_mask != 0).any(dim=0).nonzero().flatten()
    if used.numel() == 0:
        return None
    return int(used[0]), int(used[-1]) + 1


def trim_padding(
    inputs: Mapping[str, Any],
    *,
    pad_to_multiple_of: int | None = None,
    pad_token_id: int | None = None,
    label_names: Sequence[str] = LABEL_NAMES,
) -> Mapping[str, Any]:
    """``inputs`` without the padding columns that no row needs (see the module's docstring for why the rows'
    outputs do not change).

    Trailing columns that every row masks are dropped from every per-token tensor. Leading ones (left padding) are
    dropped only when ``position_ids`` are in the batch: without them, the model numbers the columns from 0, and
    dropping leading columns would shift every token's position.

    Args:
        inputs: a collated batch with a 2-D ``attention_mask``.
        pad_to_multiple_of: keep the number of columns a multiple of it (as the collator's ``pad_to_multiple_of``
            does, e.g. for tensor cores), never more than the batch has.
        pad_token_id: if given, a column is padding only where ``input_ids`` also holds it: decoder classifiers pool
            the last token that is not ``pad_token_id``, whatever the mask says.
        label_names: the keys of labels; token-level labels (integer, one per column) are trimmed too, but only where
            every dropped label is ``-100`` (ignored by the loss).

    Returns:
        A new ``dict`` with the per-token tensors sliced (views), or ``inputs`` itself when nothing can be dropped
        or when the batch is one this function does not trim: no 2-D ``attention_mask``, list or tuple entries
        (possibly ragged per-token data), tensors with the column count but another row count, floating-point
        labels with the column count (multi-label or per-token targets: ambiguous), or a row of only padding.
    """
    if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool) or pad_to_multiple_of < 1):
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of!r} is invalid; it must be an integer >= 1 or None.")
    mask = _mask(inputs)
    if mask is None or any(isinstance(value, (list, tuple)) for value in inputs.values()):
        return inputs
    rows, columns = mask.shape
    per_token, ambiguous = _token_keys(inputs, rows, columns, label_names)
    needed = mask != 0
    if ambiguous or rows == 0 or not bool(needed.any(dim=1).all()):
        return inputs
    ids = inputs.get("input_ids")
    if pad_token_id is not None and isinstance(ids, torch.Tensor) and ids.shape == mask.shape:
        needed = needed | (ids != pad_token_id)
    start, stop = token_span(needed)
    if "position_ids" not in per_token:
        start = 0  # leading padding stays: see above
    if pad_to_multiple_of is not None:  # widen to the multiple, on the right first (where the padding was trimmed)
        width = min(columns, -(-(stop - start) // pad_to_multiple_of) * pad_to_multiple_of)
        stop = min(columns, start + width)
        start = stop - width
    if (start, stop) == (0, columns):
        return inputs
    for key in per_token:
        if key in label_names:
            value = inputs[key]
            dropped = torch.cat([value[:, :start], value[:, stop:]], dim=1)
            if not bool((dropped == IGNORE_INDEX).all()):
                return inputs  # a dropped position has a label the loss counts: it is not padding
    out = dict(inputs)
    for key in per_token:
        out[key] = inputs[key][:, start:stop]
    return out


def _right_padded(used: torch.Tensor, lengths: torch.Tensor) -> bool:
    """Whether the ``(rows, columns)`` mask of used positions is right-padded (``False``: left-padded); a
    ``ValueError`` if it is neither."""
    positions = torch.arange(used.shape[1])
    right = bool((used == (positions[None, :] < lengths[:, None])).all())
    left = bool((used == (positions[None, :] >= used.shape[1] - lengths[:, None])).all())
    if not (right or left):
        raise ValueError(
            "truncate_for_scoring (sbp_scoring_max_length) needs a right- or left-padded batch, but its "
            "attention_mask has padding between tokens in some row; unset sbp_scoring_max_length for such batches."
        )
    return right


def _rows_end_alike(ids: Any, lengths: torch.Tensor, last_source: torch.Tensor) -> bool:
    """Whether every row with tokens ends with the same ``input_ids`` value (at ``last_source``), as rows closed by
    a tokenizer's special token do; ``False`` without ``ids`` or tokens."""
    if not isinstance(ids, torch.Tensor) or not bool(lengths.any()):
        return False
    nonempty = lengths > 0
    last = ids.cpu()[torch.arange(ids.shape[0])[nonempty], last_source[nonempty]]
    return bool((last == last[0]).all())


def truncate_for_scoring(
    inputs: Mapping[str, Any],
    max_length: int,
    *,
    keep_last_token: bool | None = None,
    label_names: Sequence[str] = LABEL_NAMES,
) -> Mapping[str, Any]:
    """The scoring forward's inputs: each row cut to its first ``max_length`` tokens, as if it had been tokenized
    with ``truncation=True, max_length=max_length`` and collated with the same padding side.

    Right-padded batches (and batches without padding or without ``attention_mask``) keep their first
    ``max_length`` columns. Left-padded batches keep each row's first ``max_length`` real tokens, left-padded to the
    longest kept row (a per-row gather: the first columns of a left-padded batch are mostly padding). A decoder
    classifier that pools the last non-pad token then pools the last kept one, so pass the truncated ``input_ids``
    to whatever locates that token (:func:`hf_sbp.head.resolve_head_call`).

    A tokenizer that truncates keeps its closing special token (BERT's ``[SEP]``, RoBERTa's ``</s>``): with
    ``keep_last_token``, a row longer than ``max_length`` gets its last token (every per-token value but the mask and
    the positions) at its last kept position. ``None`` decides from the batch: it is done when every row with tokens
    ends with the same ``input_ids`` value, as rows closed by a special token do (for a single row this always
    holds). Sentence pairs are cut from the end, so the second sentence goes first; a tokenizer's ``longest_first``
    strategy would shorten both.

    Args:
        inputs: a collated batch (labels may be in it; they are not needed by the scoring pass and are cut like any
            per-token tensor or passed through).
        max_length: tokens to keep per row, >= 1.
        keep_last_token: see above.
        label_names: the keys of labels: floating-point ones pass through whole (they may be per-class targets).

    Returns:
        A new ``dict``, or ``inputs`` itself when no row is longer than ``max_length`` (or there are no token tensors).

    Raises:
        ValueError: ``max_length`` is not an integer >= 1, or ``attention_mask`` has padding between tokens (neither
            right- nor left-padded), so that "the first tokens" of a row are not defined.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length={max_length!r} is invalid; it must be an integer >= 1.")
    shape = _columns(inputs)
    if shape is None or shape[1] <= max_length:
        return inputs
    rows, columns = shape
    per_token, _ = _token_keys(inputs, rows, columns, label_names)
    mask = _mask(inputs)
    positions = torch.arange(columns)
    if mask is None:
        used = torch.ones(rows, columns, dtype=torch.bool)
    else:
        used = (mask != 0).cpu()
    lengths = used.sum(dim=1)
    right = _right_padded(used, lengths)
    kept = lengths.clamp(max=max_length)
    width = max(1, int(kept.max()))  # as dynamic padding of rows tokenized with max_length would make it
    if right:
        source = positions[:width].expand(rows, width)
        last_source, last_target = lengths - 1, kept - 1
    else:
        # Row i's tokens sit in columns [columns - len_i, columns); keep the first kept_i, left-padded to `width`.
        target = torch.arange(width)[None, :]
        offset = (width - kept)[:, None]
        source = torch.where(target >= offset, columns - lengths[:, None] + target - offset, 0)
        last_source, last_target = torch.full((rows,), columns - 1), torch.full((rows,), width - 1)
    if keep_last_token is None:
        ids = inputs.get("input_ids") if "input_ids" in per_token and mask is not None else None
        keep_last_token = _rows_end_alike(ids, lengths, last_source)
    cut = lengths > max_length
    out = dict(inputs)
    for key in per_token:
        value = inputs[key]
        index = source.to(value.device).reshape(rows, -1, *([1] * (value.dim() - 2))).expand(-1, -1, *value.shape[2:])
        new = value.gather(1, index)
        if keep_last_token and key not in KEEP_WHOLE and key not in label_names and bool(cut.any()):
            which = torch.arange(rows)[cut].to(value.device)
            new[which, last_target[cut].to(value.device)] = value[which, last_source[cut].to(value.device)]
        out[key] = new
    return out
