"""The selective backprop settings: ``SelectiveBackpropArguments`` (the ``sbp_*`` fields alone, to mix into any
``TrainingArguments`` class) and ``SelectiveBackpropConfig`` (``TrainingArguments`` with them)."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from ._utils import check_int_at_least, is_int_at_least, is_number
from .core.omp import OMP_IMPLS
from .core.selection import subset_size
from .strategies import registered_strategies, strategy_class

WEIGHT_NORMALIZATIONS = ("subset_size", "none", "sum_constrained")
LOSS_VARIANTS = ("composer", "jiang")
IL_MODELS = ("double", "linear_probe")


def _strategy_help() -> str:
    built_in = "; ".join(f"'{name}': {strategy_class(name).description}" for name in registered_strategies())
    return (
        f"How to choose the examples to backpropagate in each batch. Built in: {built_in}. Any name registered with "
        "@hf_sbp.register_strategy is accepted too (see --sbp_strategy_modules)."
    )


@dataclass
class SelectiveBackpropArguments:
    """The ``sbp_*`` settings of :class:`~hf_sbp.SelectiveBackpropTrainer`: how each training batch is reduced to the
    subset that is backpropagated. The defaults select with gradient matching on every step, from the first step
    on, keeping half of each batch.

    :class:`SelectiveBackpropConfig` is ``TrainingArguments`` with these fields. To give your own arguments class
    (a ``Seq2SeqTrainingArguments``, a TRL config, a subclass of your own) the same fields, inherit from both::

        @dataclass
        class MyArguments(Seq2SeqTrainingArguments, SelectiveBackpropArguments):
            pass

    The trainer reads the ``sbp_*`` values from its arguments when they have them, and uses these defaults when
    they do not (a plain ``TrainingArguments``). They are validated when the trainer is built and again when
    ``train()`` starts.
    """

    # No argparse `choices`: strategies registered after this class is defined (in user code) are valid too.
    sbp_strategy: str = field(default="gradmatch", metadata={"help": _strategy_help()})
    sbp_strategy_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Python modules to import before sbp_strategy is looked up, so that the strategies they register "
            "with @hf_sbp.register_strategy can be named (e.g. --sbp_strategy_modules my_strategies)."
        },
    )
    sbp_keep: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of each batch to backpropagate, in (0, 1]: k = round(keep * batch size), at least 1. "
            "For --sbp_loss_variant jiang it is the expected fraction (beta = 1/keep - 1). Default: 0.5 for the "
            "strategies that select within batches; the dataset-level ones (infobatch, random-prune) train whole "
            "batches and accept only 1."
        },
    )
    sbp_start: float = field(
        default=0.0,
        metadata={"help": "Fraction of training (global_step / max_steps) at which selection starts, in [0, 1]."},
    )
    sbp_end: float = field(
        default=1.0,
        metadata={
            "help": "Fraction of training at which selection stops, in [0, 1] and > sbp_start; steps outside "
            "[start, end) train on the full batch."
        },
    )
    sbp_interrupt: int = field(
        default=0,
        metadata={
            "help": "If > 0, every sbp_interrupt-th step trains on the full batch (Composer's 'interrupt'); "
            "0 never interrupts."
        },
    )
    sbp_weight_normalization: str = field(
        default="none",
        metadata={
            "help": "Scaling of gradmatch's OMP weights: 'none' (the default: OMP's raw estimate of the mean "
            "gradient, magnitude included; its trained gradient matched the batch mean best in grad_match.json), "
            "'subset_size' (Balles et al. 2023's: they sum to the subset size, so the loss is a weighted mean; this "
            "inflates the gradient when OMP picks rows with large gradients and gives them small weights, as on "
            "regression), or 'sum_constrained' (OMP fits the mean gradient with weights whose sum is held near 1, "
            "then they are scaled to sum to the subset size).",
            "choices": list(WEIGHT_NORMALIZATIONS),
        },
    )
    sbp_omp_ridge: float = field(
        default=0.0,
        metadata={
            "help": "Ridge added to the diagonal of K_SS in OMP's refits, relative to the mean squared norm of the "
            "batch's last-layer gradients (mean of diag K), so it does not depend on the loss's scale; >= 0."
        },
    )
    sbp_omp_nonnegative: bool = field(
        default=True,
        metadata={"help": "Keep OMP's weights non-negative (a negative weight would ascend that example's loss)."},
    )
    sbp_omp_tol: float = field(
        default=1e-4,
        metadata={
            "help": "Stop OMP early once the subset's relative gradient-match error is below this (the residual is "
            "negligible); 0 never stops early."
        },
    )
    sbp_omp_batch: int = field(
        default=1,
        metadata={
            "help": "Examples OMP adds per step: 1 (the default) is OMP; b > 1 is generalized OMP, the b largest "
            "residual correlations at once and one refit, a method change: about b times fewer steps for a greedier "
            "subset, whose match error differs from OMP's (the benchmark's overhead part measures both; "
            "docs/method.md, section 2.3)."
        },
    )
    sbp_omp_impl: str = field(
        default="auto",
        metadata={
            "help": "Which loop runs OMP: 'numba' (compiled, on the CPU; the Gram matrix is copied there), 'torch' (on "
            "the Gram matrix's device, without reading the device inside the loop), or 'auto' (the default: 'torch' "
            "on CUDA and XPU, 'numba' elsewhere). The same algorithm either way; results agree to rounding.",
            "choices": list(OMP_IMPLS),
        },
    )
    sbp_loss_variant: str = field(
        default="composer",
        metadata={
            "help": "Loss-based rule: 'composer' (exactly k rows drawn with probability proportional to "
            "rank_percentile^(1/keep - 1)) or 'jiang' (keep each row with probability max(p_min, CDF(loss)^beta) "
            "over a history of recent losses; the subset size varies).",
            "choices": list(LOSS_VARIANTS),
        },
    )
    sbp_loss_beta: float | None = field(
        default=None,
        metadata={"help": "Jiang's beta (> 0); defaults to 1/keep - 1, whose expected keep fraction is sbp_keep."},
    )
    sbp_loss_history_size: int = field(
        default=1024,
        metadata={"help": "Number of recent losses in Jiang's CDF history (>= 1)."},
    )
    sbp_loss_min_prob: float = field(
        default=0.0,
        metadata={"help": "Jiang's floor p_min on each example's keep probability, in [0, 1]."},
    )
    sbp_head_module: str | None = field(
        default=None,
        metadata={
            "help": "Name of the classification head's final nn.Linear (as in model.named_modules()). By default "
            "it is the last executed nn.Linear whose out_features equals the number of labels."
        },
    )
    sbp_diagnostic_scoring: bool = field(
        default=False,
        metadata={
            "help": "With --sbp_strategy random, also run the scoring forward to log the random subset's "
            "gradient-match error. It costs the very forward pass that 'random' saves, so it is off by default."
        },
    )
    sbp_trim_padding: bool = field(
        default=True,
        metadata={
            "help": "After the subset is gathered, drop the padding columns (mask 0 in every selected row) from every "
            "per-token tensor, keeping the collator's pad_to_multiple_of, so a subset of short rows costs what short "
            "rows cost. Outputs do not change (padding is masked). Trailing padding is trimmed; leading padding "
            "(left-padded decoders) only when the batch carries position_ids, since without them the model numbers "
            "positions from the first column."
        },
    )
    sbp_scoring_max_length: int | None = field(
        default=None,
        metadata={
            "help": "If set (>= 1), the scoring forward sees each row as if tokenized with max_length=L (the first L "
            "columns when right-padded, each row's first L tokens when left-padded; a closing special token shared "
            "by all rows is kept), while the gradient forward sees whole rows: a cheaper scoring pass whose scores "
            "approximate the full rows'. Saves nothing on rows no longer than L."
        },
    )
    sbp_max_staleness: float = field(
        default=2.0,
        metadata={
            "help": "For the stale-* strategies: cached statistics of an example (loss, head residual and input, "
            "written by every forward the trainer runs on it) are used instead of scoring it again while they are "
            "younger than this many epochs; older or missing ones are scored. > 0."
        },
    )
    sbp_cache_projection_dim: int = field(
        default=0,
        metadata={
            "help": "For the stale-* strategies: store each example's head input projected to this many dimensions "
            "by a fixed random Gaussian projection (inner products, so the Gram matrix, are kept approximately), "
            "in half precision; 0 stores the head input whole (half precision). >= 0."
        },
    )
    sbp_prune_ratio: float = field(
        default=0.5,
        metadata={
            "help": "For infobatch: the probability with which each example whose last loss is below the mean is "
            "left out of an epoch (the kept ones' losses are weighted 1 / (1 - ratio)); random-prune leaves out as "
            "many, uniformly. In (0, 1)."
        },
    )
    sbp_prune_anneal: float = field(
        default=0.125,
        metadata={
            "help": "For infobatch and random-prune: the last fraction of training (of max_steps, or of "
            "num_train_epochs in an epoch-based run) whose epochs visit every example; an epoch is pruned only if "
            "it starts before it. In [0, 1)."
        },
    )
    sbp_importance_break_even: float | None = field(
        default=None,
        metadata={
            "help": "For importance: the variance reduction tau above which a step pays for its scoring forward, i.e. "
            "the cost of a step that scores over that of a uniform subset of the same size. Default (n + 3k) / (3k) "
            "(a scoring forward over n rows costs n of the 3k of the subset's forward and backward); give the ratio "
            "measured on your hardware where it differs. 0 scores and samples on every step (no switch). >= 0."
        },
    )
    sbp_il_model: str = field(
        default="double",
        metadata={
            "help": "For rho-loss: the irreducible-loss (IL) models, each trained on one half of the training set and "
            "scoring the other: 'double' (a copy of the initial model fine-tuned for sbp_il_epochs on its half; "
            "costs 2 x sbp_il_epochs x half an epoch of training plus a forward over the data, and twice the model's "
            "memory while it runs) or 'linear_probe' (logistic regression on the initial model's head inputs: one "
            "forward over the data).",
            "choices": list(IL_MODELS),
        },
    )
    sbp_il_epochs: int = field(
        default=1,
        metadata={"help": "For rho-loss with sbp_il_model double: epochs each IL model trains on its half (>= 1)."},
    )
    sbp_il_learning_rate: float | None = field(
        default=None,
        metadata={"help": "For rho-loss with sbp_il_model double: the IL models' AdamW learning rate; default "
                  "--learning_rate."},
    )  # fmt: skip
    sbp_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the selection's random draws (offset by the process index); defaults to --seed."},
    )

    def validate_sbp(self, per_device_train_batch_size: int | None = None) -> None:
        """Raise ``ValueError`` naming the first bad ``sbp_*`` value and what would be valid.

        Args:
            per_device_train_batch_size: the batch size ``sbp_keep`` is checked against (it must keep at least one
                row); by default the arguments' own ``per_device_train_batch_size``, if they have one.
        """
        import_strategy_modules(self.sbp_strategy_modules)
        strategy = strategy_class(self.sbp_strategy)
        if self.sbp_keep is not None and (not is_number(self.sbp_keep) or not (0.0 < self.sbp_keep <= 1.0)):
            raise ValueError(f"sbp_keep={self.sbp_keep!r} is invalid; it must be a number in (0, 1] or None.")
        for name in ("sbp_start", "sbp_end"):
            value = getattr(self, name)
            if not is_number(value) or not (0.0 <= value <= 1.0):
                raise ValueError(f"{name}={value!r} is invalid; it must be a number in [0, 1].")
        if not self.sbp_start < self.sbp_end:
            raise ValueError(
                f"sbp_start={self.sbp_start!r} must be smaller than sbp_end={self.sbp_end!r}; selection is active for "
                "training fractions in [sbp_start, sbp_end)."
            )
        check_int_at_least("sbp_interrupt", self.sbp_interrupt, 0)
        if self.sbp_weight_normalization not in WEIGHT_NORMALIZATIONS:
            raise ValueError(
                f"sbp_weight_normalization={self.sbp_weight_normalization!r} is invalid; choose one of "
                f"{list(WEIGHT_NORMALIZATIONS)}."
            )
        if not is_number(self.sbp_omp_ridge) or not (self.sbp_omp_ridge >= 0 and math.isfinite(self.sbp_omp_ridge)):
            raise ValueError(f"sbp_omp_ridge={self.sbp_omp_ridge!r} is invalid; it must be a finite number >= 0.")
        if not is_number(self.sbp_omp_tol) or not (0.0 <= self.sbp_omp_tol < 1.0):
            raise ValueError(f"sbp_omp_tol={self.sbp_omp_tol!r} is invalid; it must be a number in [0, 1).")
        check_int_at_least("sbp_omp_batch", self.sbp_omp_batch, 1)
        if self.sbp_omp_impl not in OMP_IMPLS:
            raise ValueError(f"sbp_omp_impl={self.sbp_omp_impl!r} is invalid; choose one of {list(OMP_IMPLS)}.")
        if self.sbp_loss_variant not in LOSS_VARIANTS:
            raise ValueError(
                f"sbp_loss_variant={self.sbp_loss_variant!r} is invalid; choose one of {list(LOSS_VARIANTS)}."
            )
        if self.sbp_loss_beta is not None and (
            not is_number(self.sbp_loss_beta) or not (self.sbp_loss_beta > 0 and math.isfinite(self.sbp_loss_beta))
        ):
            raise ValueError(
                f"sbp_loss_beta={self.sbp_loss_beta!r} is invalid; it must be a finite number > 0 or None."
            )
        check_int_at_least("sbp_loss_history_size", self.sbp_loss_history_size, 1)
        if not is_number(self.sbp_loss_min_prob) or not (0.0 <= self.sbp_loss_min_prob <= 1.0):
            raise ValueError(f"sbp_loss_min_prob={self.sbp_loss_min_prob!r} is invalid; it must be a number in [0, 1].")
        if self.sbp_scoring_max_length is not None:
            check_int_at_least("sbp_scoring_max_length", self.sbp_scoring_max_length, 1)
        staleness = self.sbp_max_staleness
        if not is_number(staleness) or not (staleness > 0 and math.isfinite(staleness)):
            raise ValueError(
                f"sbp_max_staleness={self.sbp_max_staleness!r} is invalid; it must be a finite number > 0."
            )
        check_int_at_least("sbp_cache_projection_dim", self.sbp_cache_projection_dim, 0)
        if not is_number(self.sbp_prune_ratio) or not (0.0 < self.sbp_prune_ratio < 1.0):
            raise ValueError(f"sbp_prune_ratio={self.sbp_prune_ratio!r} is invalid; it must be a number in (0, 1).")
        if not is_number(self.sbp_prune_anneal) or not (0.0 <= self.sbp_prune_anneal < 1.0):
            raise ValueError(f"sbp_prune_anneal={self.sbp_prune_anneal!r} is invalid; it must be a number in [0, 1).")
        break_even = self.sbp_importance_break_even
        if break_even is not None and (not is_number(break_even) or not (0 <= break_even < math.inf)):
            raise ValueError(
                f"sbp_importance_break_even={break_even!r} is invalid; it must be a finite number >= 0 or None."
            )
        if self.sbp_il_model not in IL_MODELS:
            raise ValueError(f"sbp_il_model={self.sbp_il_model!r} is invalid; choose one of {list(IL_MODELS)}.")
        check_int_at_least("sbp_il_epochs", self.sbp_il_epochs, 1)
        il_lr = self.sbp_il_learning_rate
        if il_lr is not None and (not is_number(il_lr) or not (0 < il_lr < math.inf)):
            raise ValueError(f"sbp_il_learning_rate={il_lr!r} is invalid; it must be a finite number > 0 or None.")
        if strategy.prunes_dataset:
            self._check_dataset_level()
        if self.sbp_seed is not None and not (is_int_at_least(self.sbp_seed, 0) and self.sbp_seed < 2**63):
            raise ValueError(f"sbp_seed={self.sbp_seed!r} is invalid; it must be an integer in [0, 2**63) or None.")
        batch = per_device_train_batch_size or getattr(self, "per_device_train_batch_size", None)
        if strategy.selective and is_int_at_least(batch, 1):
            if subset_size(batch, self.sbp_effective_keep, minimum=0) < 1:
                raise ValueError(
                    f"sbp_keep={self.sbp_keep!r} keeps no example of a batch of per_device_train_batch_size={batch} "
                    f"(k = round(keep * batch) = 0); use sbp_keep >= {0.5 / batch:.4g} or a larger batch."
                )

    def _check_dataset_level(self) -> None:
        """The per-batch settings a dataset-level strategy (``prunes_dataset``) does not combine with."""
        name = self.sbp_strategy
        if self.sbp_keep is not None and self.sbp_keep != 1.0:
            raise ValueError(
                f"sbp_keep={self.sbp_keep!r} with sbp_strategy={name!r}: {name} prunes the dataset per epoch and "
                "trains every row of each batch; it does not also select within batches (its loss weights and a "
                "per-batch rule's would have to be composed, and a per-batch rule's scoring pass would cost what "
                "pruning saves). "
                "Leave sbp_keep unset (or 1.0), or choose a per-batch strategy."
            )
        batch_schedule = {"sbp_start": (self.sbp_start, 0.0), "sbp_end": (self.sbp_end, 1.0)}
        batch_schedule["sbp_interrupt"] = (self.sbp_interrupt, 0)
        for setting, (value, default) in batch_schedule.items():
            if value != default:
                raise ValueError(
                    f"{setting}={value!r} with sbp_strategy={name!r}: the per-batch selection schedule does not apply "
                    f"to {name}, which prunes whole epochs; its loss weights must hold on every step of an epoch to "
                    f"keep the gradient unbiased. Leave {setting} at {default!r}; sbp_prune_anneal sets which part of "
                    "training is not pruned."
                )

    @property
    def sbp_effective_keep(self) -> float:
        """``sbp_keep``, or the strategy's ``default_keep`` (0.5; 1.0 for a dataset-level strategy) when unset."""
        return self.sbp_keep if self.sbp_keep is not None else self.strategy_class().default_keep

    @property
    def sbp_effective_loss_beta(self) -> float:
        """Jiang's beta: ``sbp_loss_beta`` or ``1/keep - 1``."""
        return self.sbp_loss_beta if self.sbp_loss_beta is not None else 1.0 / self.sbp_effective_keep - 1.0

    def strategy_class(self) -> type:
        """The :class:`~hf_sbp.strategies.SelectionStrategy` subclass that ``sbp_strategy`` names."""
        import_strategy_modules(self.sbp_strategy_modules)
        return strategy_class(self.sbp_strategy)


@dataclass
class SelectiveBackpropConfig(TrainingArguments, SelectiveBackpropArguments):
    """Training arguments for :class:`~hf_sbp.SelectiveBackpropTrainer`: every ``transformers.TrainingArguments``
    field with its meaning, plus the ``sbp_*`` fields of :class:`SelectiveBackpropArguments`, validated when the
    arguments are built."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_sbp()


def import_strategy_modules(modules: list[str] | str | None) -> None:
    """Import the modules named in ``sbp_strategy_modules`` (they register strategies as they are imported)."""
    for name in [modules] if isinstance(modules, str) else modules or []:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ValueError(
                f"sbp_strategy_modules names {name!r}, which cannot be imported ({error}); give the name of a module "
                "on the Python path (the current folder, PYTHONPATH or an installed package)."
            ) from error
