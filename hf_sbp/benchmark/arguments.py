"""The benchmark's command line, :class:`BenchmarkArguments` (see :mod:`hf_sbp.benchmark` for the commands)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..config import import_strategy_modules
from ..glue.arguments import DataTrainingArguments
from .common import COMMANDS, DEFAULT_OUTPUT_DIR, PEFT_MODES, parse_strategies, split_list

SIZES = {
    "repeats": (5, 15),
    "train_steps": (30, 60),
    "tta_train_examples": (640, 2560),
    "tta_min_steps": (60, 240),
    "tta_eval_samples": (500, 1000),
    "tta_eval_points": (12, 24),
}
"""The sizes an argument left at 0 takes: ``(with --quick, without)``."""


def _default(name: str) -> str:
    """How ``--help`` states :data:`SIZES`' entry for ``name``."""
    quick, full = SIZES[name]
    return f"0: {full}, --quick {quick}"


@dataclass
class BenchmarkArguments:
    """The benchmark's command line (see :mod:`hf_sbp.benchmark` for the commands)."""

    command: str = field(metadata={"help": f"One of {list(COMMANDS)}."})
    quick: bool = field(
        default=False,
        metadata={
            "help": "The short version: fewer steps, keeps, repeats and batch sizes; time-to-accuracy: the first "
            "dataset, noise 0, seeds 0 and 1, smaller runs (docs/benchmarks/README.md gives the sizes)."
        },
    )
    output_dir: str = field(default=DEFAULT_OUTPUT_DIR, metadata={"help": "Where the JSON, plots and report go."})
    readme: str | None = field(
        default=None,
        metadata={
            "help": "The README whose marked time-to-accuracy results block the report rewrites (default: README.md "
            f"when --output_dir is {DEFAULT_OUTPUT_DIR}, else none; nothing happens to a README without the block)."
        },
    )
    model_name_or_path: str = field(default="all-MiniLM-L6-v2", metadata={"help": "Model (bundled name or path)."})
    datasets: str = field(
        default="tweets,bbc-news",
        metadata={
            "help": "Comma-separated dataset names (bundled or datasets-library) of the time-to-accuracy and padding "
            "parts; the other parts time batches of the first."
        },
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Local CSV/JSON training file (replaces --datasets)."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local CSV/JSON validation file."})
    test_file: str | None = field(default=None, metadata={"help": "Local CSV/JSON test file (else validation)."})
    strategies: str = field(
        default="",
        metadata={
            "help": "Comma-separated selective strategies that the throughput, grad-match, padding and "
            "time-to-accuracy parts compare (with the full-batch baseline 'none'); default: every registered "
            "selective strategy. The dataset-level ones (infobatch, random-prune) run in time-to-accuracy only."
        },
    )
    sbp_strategy_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Python modules (space- or comma-separated) to import first, so that the strategies they register "
            "with @hf_sbp.register_strategy can be named in --strategies."
        },
    )
    device: str = field(default="auto", metadata={"help": "'cpu', 'cuda' or 'auto'."})
    omp_impls: str = field(
        default="",
        metadata={
            "help": "Overhead part: comma-separated OMP loops to time, 'numba' and/or 'torch' (sbp_omp_impl), each in "
            "rows of its own (field omp_impl); default: numba on the CPU, numba,torch on CUDA."
        },
    )
    overhead_batch_sizes: str = field(
        default="",
        metadata={"help": "Overhead part: comma-separated batch sizes (default: 16 to 2048; quick: 16, 32, 64)."},
    )
    seq_len: int = field(
        default=64,
        metadata={
            "help": "Tokens per example: overhead and throughput pad every example to it; the other parts "
            "truncate to it (dynamic padding)."
        },
    )
    batch_size: int = field(default=32, metadata={"help": "Training batch size (every part but overhead)."})
    repeats: int = field(default=0, metadata={"help": f"Timing repeats ({_default('repeats')})."})
    keeps: str = field(
        default="",
        metadata={"help": "Keep values for overhead, throughput and grad-match (default: 0.5 quick; 0.5,0.25)."},
    )
    training_keeps: str = field(
        default="0.5", metadata={"help": "Comma-separated keep values of the time-to-accuracy runs."}
    )
    noises: str = field(
        default="",
        metadata={
            "help": "Comma-separated label-noise rates of the time-to-accuracy runs (default: 0,0.2; --quick: 0)."
        },
    )
    seeds: str = field(
        default="",
        metadata={"help": "Comma-separated seeds of the time-to-accuracy runs (default: 0,1,2,3,4; --quick: 0,1)."},
    )
    train_steps: int = field(
        default=0,
        metadata={"help": f"Full-batch steps of the grad-match part ({_default('train_steps')})."},
    )
    learning_rate: float = field(
        default=1e-4,
        metadata={
            "help": "Peak learning rate of the probes' training steps, and of the time-to-accuracy runs on datasets "
            "that --tta_learning_rates does not name."
        },
    )
    peft: str = field(
        default="none",
        metadata={
            "help": "Throughput part: 'none' (full fine-tuning) or 'lora' (LoRA on the attention projections, query "
            "and value for BERT, with the classifier in modules_to_save; needs the peft package). The rows of the "
            "other mode already in throughput.json are kept."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of --peft lora (lora_alpha = 2 r)."})
    tta_train_examples: int = field(
        default=0,
        metadata={
            "help": "Time-to-accuracy: training examples per run, a fixed subset per seed "
            f"({_default('tta_train_examples')}; a smaller training split is used whole)."
        },
    )
    tta_epochs: int = field(
        default=3,
        metadata={
            "help": "Time-to-accuracy: epochs of the full-batch run, whose training time is every strategy's budget "
            "(more where --tta_min_steps needs them)."
        },
    )
    tta_min_steps: int = field(
        default=0,
        metadata={
            "help": f"Time-to-accuracy: full-batch steps at least, by adding epochs ({_default('tta_min_steps')})."
        },
    )
    tta_learning_rates: str = field(
        default="bbc-news=5e-5",
        metadata={
            "help": "Time-to-accuracy: peak learning rates per dataset, 'name=rate' comma-separated (others: "
            "--learning_rate), chosen so that the full batch's accuracy still rises over most of its budget."
        },
    )
    tta_eval_samples: int = field(
        default=0,
        metadata={"help": f"Time-to-accuracy: validation examples per evaluation ({_default('tta_eval_samples')})."},
    )
    tta_min_eval_samples: int = field(
        default=500,
        metadata={
            "help": "Time-to-accuracy: where the validation split is smaller than this, the test split and then "
            "training examples top the validation sample up to this many."
        },
    )
    tta_eval_points: int = field(
        default=0,
        metadata={
            "help": f"Time-to-accuracy: evaluation marks per run at fractions i / points of the budget "
            f"({_default('tta_eval_points')}; a multiple of 4 puts marks at 25%%, 50%% and 75%%)."
        },
    )
    tta_seed_limits: str = field(
        default="stale-gradmatch=3,infobatch=3,random-prune=3",
        metadata={
            "help": "Time-to-accuracy: strategies that run on fewer seeds, 'name=count' comma-separated (the first "
            "count seeds of --seeds)."
        },
    )
    tta_variants: str = field(
        default="rho-loss[sbp_il_model=linear_probe]",
        metadata={
            "help": "Time-to-accuracy: strategy variants that the default grid (no --strategies) runs beside every "
            "registered strategy, comma-separated, each 'name[sbp_key=value;...]': a strategy with other sbp_* "
            "settings (the default: RHO-LOSS with the linear-probe IL model). With --strategies, name them there."
        },
    )
    probe_variants: str = field(
        default="gradmatch[sbp_scoring_max_length=16],gradmatch[sbp_scoring_max_length=32]",
        metadata={
            "help": "Throughput and grad-match: strategy variants that the default grid (no --strategies) measures "
            "beside every registered strategy, comma-separated, each 'name[sbp_key=value;...]' (the default: "
            "gradmatch with its scoring pass shortened to 16 and 32 tokens, sbp_scoring_max_length: its step time "
            "and its subset's gradient error). With --strategies, name them there."
        },
    )

    def __post_init__(self) -> None:
        if self.command not in COMMANDS:
            raise ValueError(f"command={self.command!r} is invalid; choose one of {list(COMMANDS)}.")
        self.strategy_modules = [name for item in self.sbp_strategy_modules or [] for name in split_list(item)]
        import_strategy_modules(self.strategy_modules)
        self.strategy_names = parse_strategies(self.strategies)
        self.probe_strategy_names = self.strategy_names
        if not self.strategies and self.probe_variants.strip():
            variants = parse_strategies(self.probe_variants, "--probe_variants")
            self.probe_strategy_names = list(dict.fromkeys([*self.strategy_names, *variants]))
        quick = self.quick
        self.repeats = self.repeats or SIZES["repeats"][not quick]
        self.train_steps = self.train_steps or SIZES["train_steps"][not quick]
        self.keep_values = [float(k) for k in (self.keeps or ("0.5" if quick else "0.5,0.25")).split(",")]
        self.training_keep_values = [float(k) for k in self.training_keeps.split(",")]
        self.tta_noise_values = [float(v) for v in (self.noises or ("0.0" if quick else "0.0,0.2")).split(",")]
        for keep in self.keep_values + self.training_keep_values:
            if not 0 < keep <= 1:
                raise ValueError(f"keep={keep} in --keeps is invalid; each must be in (0, 1].")
        for noise in self.tta_noise_values:
            if not 0 <= noise <= 1:
                raise ValueError(f"label noise {noise} in --noises is invalid; each must be in [0, 1].")
        self.tta_learning_rate_values = {}
        for item in split_list(self.tta_learning_rates):
            name, _, rate = item.partition("=")
            try:
                self.tta_learning_rate_values[name.strip()] = float(rate)
            except ValueError:
                raise ValueError(
                    f"--tta_learning_rates item {item!r} is invalid; write 'dataset=rate', e.g. 'bbc-news=5e-5'."
                ) from None
        if self.peft not in PEFT_MODES:
            raise ValueError(f"peft={self.peft!r} is invalid; choose one of {list(PEFT_MODES)}.")
        if self.lora_r < 1:
            raise ValueError(f"lora_r={self.lora_r} is invalid; it must be at least 1.")
        self._time_to_accuracy_defaults()
        if self.readme is None and os.path.normpath(self.output_dir) == DEFAULT_OUTPUT_DIR:
            self.readme = "README.md"
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is invalid; choose 'cpu', 'cuda' or 'auto'.")
        default_impls = "numba,torch" if self.device == "cuda" else "numba"
        self.omp_impl_values = split_list(self.omp_impls or default_impls)
        for impl in self.omp_impl_values:
            if impl not in ("numba", "torch"):
                raise ValueError(f"OMP loop {impl!r} in --omp_impls is invalid; each must be 'numba' or 'torch'.")
        self.overhead_batch_size_values = [int(b) for b in split_list(self.overhead_batch_sizes)]
        if any(b < 2 for b in self.overhead_batch_size_values):
            raise ValueError("each of --overhead_batch_sizes must be at least 2.")

    def _time_to_accuracy_defaults(self) -> None:
        quick = self.quick
        self.tta_train_examples = self.tta_train_examples or SIZES["tta_train_examples"][not quick]
        self.tta_min_steps = self.tta_min_steps or SIZES["tta_min_steps"][not quick]
        self.tta_eval_samples = self.tta_eval_samples or SIZES["tta_eval_samples"][not quick]
        self.tta_eval_points = self.tta_eval_points or SIZES["tta_eval_points"][not quick]
        self.tta_seed_values = [int(s) for s in (self.seeds or ("0,1" if quick else "0,1,2,3,4")).split(",")]
        # --quick compares the paper's method with its baseline only, unless --strategies names others.
        self.tta_strategy_names = ["random", "gradmatch"] if quick and not self.strategies else self.strategy_names
        if not quick and not self.strategies and self.tta_variants.strip():
            variants = parse_strategies(self.tta_variants, "--tta_variants")
            self.tta_strategy_names = list(dict.fromkeys([*self.strategy_names, *variants]))
        for name, value in (
            ("--tta_epochs", self.tta_epochs),
            ("--tta_train_examples", self.tta_train_examples),
            ("--tta_min_steps", self.tta_min_steps),
            ("--tta_eval_samples", self.tta_eval_samples),
            ("--tta_min_eval_samples", self.tta_min_eval_samples),
            ("--tta_eval_points", self.tta_eval_points),
        ):
            if value < 1:
                raise ValueError(f"{name}={value} is invalid; it must be at least 1.")
        self.tta_seed_limit_values = {}
        for item in split_list(self.tta_seed_limits):
            name, _, count = item.partition("=")
            if not count.strip().isdigit():
                raise ValueError(
                    f"--tta_seed_limits item {item!r} is invalid; write 'strategy=count', e.g. 'infobatch=3'."
                )
            self.tta_seed_limit_values[name.strip()] = int(count)

    def tta_seed_limit(self, strategy: str) -> int:
        """How many of the time-to-accuracy seeds ``strategy`` runs on (its ``--tta_seed_limits`` entry, else all)."""
        return self.tta_seed_limit_values.get(strategy, len(self.tta_seed_values))

    def tta_learning_rate(self, dataset: str) -> float:
        """The time-to-accuracy runs' peak learning rate on ``dataset``: its ``--tta_learning_rates`` entry, else
        ``--learning_rate``."""
        return self.tta_learning_rate_values.get(dataset, self.learning_rate)

    def dataset_specs(self) -> list[tuple[str, DataTrainingArguments]]:
        """The datasets of the time-to-accuracy and padding parts, by name: the local files, else ``--datasets``
        (only the first in quick)."""
        if self.train_file is not None:
            name = os.path.splitext(os.path.basename(self.train_file))[0]
            spec = DataTrainingArguments(
                train_file=self.train_file, validation_file=self.validation_file, test_file=self.test_file
            )
            return [(name, spec)]
        names = split_list(self.datasets)
        if self.quick:
            names = names[:1]
        return [(name, DataTrainingArguments(dataset_name=name)) for name in names]
