"""GLUE metrics computed locally with scikit-learn and SciPy: an ``evaluate`` module that needs no Hub.

It keeps the interface of the Hub's ``glue`` metric (``evaluate.load("glue", "mrpc")``): load it by path with a
GLUE task name as the configuration and call ``compute(predictions=..., references=...)``::

    import evaluate
    from hf_sbp.glue.metric import GLUE_OFFLINE_PATH

    metric = evaluate.load(GLUE_OFFLINE_PATH, "mrpc")
    metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])  # {'accuracy': ..., 'f1': ...}

Configurations and what they return:

- ``cola``: ``matthews_correlation``.
- ``stsb``: ``pearson`` and ``spearmanr`` (float predictions and references).
- ``mrpc``, ``qqp``: ``accuracy`` and ``f1`` (binary F1 of class 1).
- ``sst2``, ``mnli``, ``mnli_matched``, ``mnli_mismatched``, ``qnli``, ``rte``, ``wnli``, ``hans``: ``accuracy``.
- Beyond GLUE, for other data sets: ``accuracy`` (``accuracy``), ``multiclass`` (``accuracy`` and ``macro_f1``, the
  unweighted mean of the per-class F1 scores over the classes present in references or predictions) and
  ``regression`` (``pearson``, ``spearmanr`` and ``mse``).
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}
"""

_DESCRIPTION = """\
The GLUE benchmark's per-task metrics (accuracy, F1, Matthews correlation, Pearson and Spearman correlations),
computed offline with scikit-learn and SciPy, plus macro-F1 for multi-class and MSE for regression data sets.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted labels (class ids), or predicted scores for ``stsb`` and ``regression``.
    references: gold labels, or gold scores for ``stsb`` and ``regression``.
Returns: a dict of floats, depending on the configuration:
    "accuracy": fraction of predictions equal to the references;
    "f1": binary F1 of class 1 (``mrpc``, ``qqp``);
    "macro_f1": unweighted mean of the per-class F1 scores (``multiclass``);
    "matthews_correlation": Matthews correlation coefficient (``cola``);
    "pearson", "spearmanr": correlation coefficients (``stsb``, ``regression``);
    "mse": mean squared error (``regression``).
Examples:
    >>> metric = evaluate.load(GLUE_OFFLINE_PATH, "mrpc")
    >>> metric.compute(predictions=[0, 1], references=[0, 1])
    {'accuracy': 1.0, 'f1': 1.0}
"""

GLUE_CONFIGS = (
    "cola",
    "sst2",
    "mrpc",
    "qqp",
    "stsb",
    "mnli",
    "mnli_mismatched",
    "mnli_matched",
    "qnli",
    "rte",
    "wnli",
    "hans",
)
EXTRA_CONFIGS = ("accuracy", "multiclass", "regression")
REGRESSION_CONFIGS = ("stsb", "regression")


def _accuracy(predictions, references):
    return float((np.asarray(predictions) == np.asarray(references)).mean())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GlueOffline(evaluate.Metric):
    """GLUE per-task metrics, offline."""

    def _info(self):
        if self.config_name not in GLUE_CONFIGS + EXTRA_CONFIGS:
            raise KeyError(
                f"config_name={self.config_name!r} is not a configuration of the offline GLUE metric; choose one of "
                f"{list(GLUE_CONFIGS + EXTRA_CONFIGS)}."
            )
        dtype = "float32" if self.config_name in REGRESSION_CONFIGS else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
            format="numpy",
        )

    def _compute(self, predictions, references):
        name = self.config_name
        if len(references) == 0:
            raise ValueError("the metric needs at least one prediction and reference; got none.")
        if name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if name in REGRESSION_CONFIGS:
            predictions = np.asarray(predictions, dtype=np.float64)
            references = np.asarray(references, dtype=np.float64)
            result = {
                "pearson": float(pearsonr(predictions, references)[0]),
                "spearmanr": float(spearmanr(predictions, references)[0]),
            }
            if name == "regression":
                result["mse"] = float(np.mean((predictions - references) ** 2))
            return result
        if name in ("mrpc", "qqp"):
            return {
                "accuracy": _accuracy(predictions, references),
                "f1": float(f1_score(references, predictions, zero_division=0.0)),
            }
        if name == "multiclass":
            return {
                "accuracy": _accuracy(predictions, references),
                "macro_f1": float(f1_score(references, predictions, average="macro", zero_division=0.0)),
            }
        return {"accuracy": _accuracy(predictions, references)}
