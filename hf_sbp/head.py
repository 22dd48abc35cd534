"""Finding a model's classification head and capturing its input during the scoring pass.

The head is found generically, with no per-architecture table: it is the last ``nn.Linear`` executed
in the forward pass whose ``out_features`` equals the number of labels, and it must reproduce the
model's logits. That holds for BERT-style encoders (``classifier``, ``classifier.out_proj``) and for
decoders with a ``score`` head, whose per-token outputs are pooled at the last non-pad token.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

HEAD_OVERRIDE_OPTION = "sbp_head_module"


class HeadNotFoundError(ValueError):
    """The classification head could not be identified unambiguously."""


class HeadScores(NamedTuple):
    """The scoring pass's output: the ``(n, C)`` logits and the head's ``(n, d)`` input, both in float32 whatever the
    model's precision, and whether the head has a bias."""

    logits: torch.Tensor
    features: torch.Tensor
    head_bias: bool


def output_logits(outputs: Any) -> torch.Tensor:
    """The logits of a model's output (a ``ModelOutput``/dict with ``logits``, or a tuple whose first item they are)."""
    return outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]


def no_grad_outputs(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
    """The outputs of a forward pass without autograd and in eval mode (no dropout); the mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(**inputs)
    finally:
        model.train(was_training)


def no_grad_logits(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """The logits of :func:`no_grad_outputs`."""
    return output_logits(no_grad_outputs(model, inputs)).detach()


def head_candidates(model: nn.Module, num_labels: int) -> list[tuple[str, nn.Linear]]:
    """All ``nn.Linear`` modules of ``model`` with ``out_features == num_labels``, by name."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.out_features == num_labels
    ]


def named_head(model: nn.Module, name: str) -> nn.Linear:
    """The module called ``name`` in ``model``, which must be an ``nn.Linear``."""
    modules = dict(model.named_modules())
    if name not in modules:
        linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        raise HeadNotFoundError(
            f"{HEAD_OVERRIDE_OPTION}={name!r} is not a module of {type(model).__name__}; its nn.Linear modules "
            f"are {linear}."
        )
    if not isinstance(modules[name], nn.Linear):
        raise HeadNotFoundError(
            f"{HEAD_OVERRIDE_OPTION}={name!r} is a {type(modules[name]).__name__}, not an nn.Linear."
        )
    return modules[name]


def last_token_positions(input_ids: torch.Tensor | None, pad_token_id: int | None, seq_len: int) -> torch.Tensor:
    """Position of the last non-pad token of each row, as decoder sequence classifiers pool.

    Mirrors ``transformers``: without a pad token (or without ``input_ids``) the last position is used.
    """
    if input_ids is None or pad_token_id is None:
        n = 1 if input_ids is None else input_ids.shape[0]
        return torch.full((n,), seq_len - 1, dtype=torch.long)
    non_pad = (input_ids != pad_token_id).to(torch.int64)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int64)
    return (positions * non_pad).argmax(-1)


class _CaptureHook:
    """A forward hook that records one head module's calls while its :class:`HeadCapture` is capturing (a class, not
    a closure, so that a model carrying it can still be pickled whole)."""

    def __init__(self, capture: HeadCapture, name: str) -> None:
        self.capture, self.name = capture, name

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        if self.capture.recording:
            self.capture.calls.append((self.name, args[0].detach(), output.detach()))


class HeadCapture:
    """Records the inputs and outputs of candidate head modules during the forward passes it is capturing.

    Its hooks are registered once per module and then stay, switched off outside :meth:`capturing`, because a
    ``torch.compile``'d model runs the hooks that existed when it was traced, and only those: dynamo does not guard on
    a module's hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``), so a hook added after the first compiled
    call would never fire, and one removed later would keep firing. A hook present from the start is traced with a
    guard on its switch: one graph that records, one that does not. Eagerly, a switched-off hook costs one Python
    call per head call.
    """

    def __init__(self, modules: list[tuple[str, nn.Module]] = ()) -> None:
        self.modules = list(modules)
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self.recording = False

    def attach(self, modules: list[tuple[str, nn.Module]]) -> None:
        """Register the recording hook on each of ``modules`` (by name) that does not carry it yet. Call it before a
        compiled model's first forward (see the class docstring)."""
        for name, module in modules:
            hooks = module._forward_hooks.values()
            if not any(isinstance(h, _CaptureHook) and h.capture is self and h.name == name for h in hooks):
                module.register_forward_hook(_CaptureHook(self, name))

    @contextmanager
    def capturing(self, modules: list[tuple[str, nn.Module]] | None = None):
        """Record the calls of ``modules`` (default: those given when built) in the forward passes run inside; after,
        :attr:`calls` holds theirs only, in call order, and :attr:`modules` names them."""
        if modules is not None:
            self.modules = list(modules)
        self.attach(self.modules)
        self.calls, self.recording = [], True
        try:
            yield self
        finally:
            self.recording = False
            wanted = {name for name, _ in self.modules}
            self.calls = [call for call in self.calls if call[0] in wanted]

    def __getstate__(self) -> dict[str, Any]:
        # A model pickled whole carries the hooks, and through them this object: not its tensors or modules.
        return {"modules": [], "calls": [], "recording": False}


def pool_head_call(
    features: torch.Tensor,
    head_output: torch.Tensor,
    input_ids: torch.Tensor | None,
    pad_token_id: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce a head call to one ``(n, d)`` feature row and ``(n, C)`` output row per example, in float32.

    Encoder heads see ``(n, d)`` already. Decoder ``score`` heads see ``(n, T, d)``: keep the last
    non-pad token, the position whose logits the model returns. The selection math runs in float32 whatever the
    model's precision (a model in bfloat16, or autocast), so the rows are upcast here, once, after pooling.
    """
    if features.dim() == 2:
        return features.float(), head_output.float()
    if features.dim() != 3:
        raise HeadNotFoundError(f"the head's input has shape {tuple(features.shape)}; expected (n, d) or (n, T, d).")
    positions = last_token_positions(input_ids, pad_token_id, features.shape[1]).to(features.device)
    if positions.numel() == 1 and features.shape[0] != 1:
        positions = positions.expand(features.shape[0])
    rows = torch.arange(features.shape[0], device=features.device)
    return features[rows, positions].float(), head_output[rows, positions].float()


def resolve_head_call(
    capture: HeadCapture,
    logits: torch.Tensor,
    input_ids: torch.Tensor | None,
    pad_token_id: int | None,
) -> tuple[str, torch.Tensor]:
    """Pick the head among the captured calls and return its name and its ``(n, d)`` features.

    The head is the last executed candidate; its pooled output must equal ``logits``. When it does
    not, or when no candidate ran, raise :class:`HeadNotFoundError` naming the override option.
    """
    names = [name for name, _ in capture.modules]
    if not capture.calls:
        raise HeadNotFoundError(
            f"no nn.Linear with out_features equal to the number of labels ({logits.shape[-1]}) ran in the forward "
            f"pass (candidates: {names or 'none'}). Set {HEAD_OVERRIDE_OPTION} to the name of the classification "
            "head's final nn.Linear."
        )
    name, features, output = capture.calls[-1]
    features, output = pool_head_call(features, output, input_ids, pad_token_id)
    if output.shape != logits.shape or not torch.allclose(
        output.float(), logits.float(), rtol=1e-4, atol=1e-5, equal_nan=True
    ):
        ran = sorted({call[0] for call in capture.calls})
        raise HeadNotFoundError(
            f"the last nn.Linear with {logits.shape[-1]} outputs to run, {name!r}, does not produce the model's "
            f"logits, so the head is ambiguous (candidates that ran: {ran}). Set {HEAD_OVERRIDE_OPTION} to the name "
            "of the module whose output is the logits."
        )
    return name, features


def captured_head_call(
    capture: HeadCapture, input_ids: torch.Tensor | None, pad_token_id: int | None
) -> tuple[str, torch.Tensor, torch.Tensor]:
    """The last captured head call as ``(name, (n, d) features, (n, C) logits)``, pooled like the model's logits.

    For a forward whose logits the caller does not see (the gradient pass inside ``Trainer.training_step``): the
    head's own output is the logits. Raise :class:`HeadNotFoundError` when no candidate ran.
    """
    if not capture.calls:
        names = [name for name, _ in capture.modules]
        raise HeadNotFoundError(
            f"no classification head candidate ({names}) ran in the forward pass. Set {HEAD_OVERRIDE_OPTION} to the "
            "name of the classification head's final nn.Linear."
        )
    name, features, output = capture.calls[-1]
    features, logits = pool_head_call(features, output, input_ids, pad_token_id)
    return name, features, logits
