"""The numerical core against independent references: autograd, scipy's NNLS, scikit-learn, brute force."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import nnls
from sklearn.linear_model import orthogonal_mp_gram
from threadpoolctl import threadpool_limits

from hf_sbp.core.omp import normalize_weights, omp_gram, sum_constrained_problem
from hf_sbp.core.selection import (
    LossHistory,
    gradient_match_error,
    gram_cannot_overflow,
    head_residuals,
    last_layer_gram,
    loss_cdf_probabilities,
    loss_cdf_sample,
    loss_rank_sample,
    mean_gradient_target,
    per_example_loss,
    random_subset,
    subset_size,
)

PROBLEMS = ["single_label_classification", "multi_label_classification", "regression"]


def make_labels(problem: str, n: int, num_outputs: int, generator: torch.Generator) -> torch.Tensor:
    if problem == "single_label_classification":
        return torch.randint(0, num_outputs, (n,), generator=generator)
    if problem == "multi_label_classification":
        return torch.randint(0, 2, (n, num_outputs), generator=generator).float()
    return torch.randn(n, num_outputs, generator=generator).squeeze(-1)


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, problem: str, eps: float) -> torch.Tensor:
    """Each example's loss summed over outputs, written directly from the textbook definitions."""
    if problem == "single_label_classification":
        log_p = torch.log_softmax(logits, dim=-1)
        target = (1 - eps) * F.one_hot(labels, logits.shape[-1]).float() + eps / logits.shape[-1]
        return -(target * log_p).sum(-1)
    if problem == "multi_label_classification":
        p = torch.sigmoid(logits)
        return -(labels * torch.log(p) + (1 - labels) * torch.log(1 - p)).sum(-1)
    return (logits - labels.view(logits.shape)).pow(2).sum(-1)


@pytest.mark.parametrize(
    "problem, eps", [(PROBLEMS[0], 0.0), (PROBLEMS[0], 0.1), (PROBLEMS[1], 0.0), (PROBLEMS[2], 0.0)]
)
def test_head_residuals_are_autograd_gradients_of_the_loss(problem, eps):
    gen = torch.Generator().manual_seed(0)
    num_outputs = 1 if problem == "regression" else 4
    logits = torch.randn(7, num_outputs, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = make_labels(problem, 7, num_outputs, gen)
    if problem != "single_label_classification":
        labels = labels.double()
    (grad,) = torch.autograd.grad(summed_loss(logits, labels, problem, eps).sum(), logits)
    residuals = head_residuals(logits.detach(), labels, problem, eps)
    assert residuals.dtype == torch.float32
    torch.testing.assert_close(residuals.double(), grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("problem", PROBLEMS)
def test_per_example_loss_matches_the_transformers_model_loss(problem):
    from transformers import BertConfig, BertForSequenceClassification

    num_labels = 1 if problem == "regression" else 3
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
        num_labels=num_labels, problem_type=problem,
    )  # fmt: skip
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 50, (6, 5), generator=gen)
    labels = make_labels(problem, 6, num_labels, gen)
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels)
    ours = per_example_loss(out.logits, labels, problem).mean()
    torch.testing.assert_close(ours, out.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("bias", [True, False])
def test_gram_matches_per_example_autograd_gradients_of_a_linear_head(problem, bias):
    gen = torch.Generator().manual_seed(2)
    n, d = 6, 5
    num_outputs = 1 if problem == "regression" else 3
    head = torch.nn.Linear(d, num_outputs, bias=bias).double()
    features = torch.randn(n, d, generator=gen, dtype=torch.float64)
    labels = make_labels(problem, n, num_outputs, gen)
    if problem != "single_label_classification":
        labels = labels.double()
    rows = []
    for i in range(n):
        loss = summed_loss(head(features[i : i + 1]), labels[i : i + 1], problem, 0.0).sum()
        grads = torch.autograd.grad(loss, list(head.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    per_example = torch.stack(rows)
    with torch.no_grad():
        residuals = head_residuals(head(features), labels, problem)
    gram = last_layer_gram(residuals, features.float(), bias=bias)
    torch.testing.assert_close(gram.double(), per_example @ per_example.T, rtol=1e-4, atol=1e-5)


def test_gradient_match_error_matches_explicit_vectors():
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(9, 14, generator=gen, dtype=torch.float64)
    idx = torch.tensor([4, 1, 7])
    w = torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)
    mean = G.mean(0)
    expected = torch.linalg.norm((w[:, None] * G[idx]).sum(0) / w.sum() - mean) / torch.linalg.norm(mean)
    torch.testing.assert_close(gradient_match_error(G @ G.T, idx, w), expected)
    assert math.isnan(float(gradient_match_error(torch.zeros(3, 3), torch.tensor([0]), torch.ones(1))))


def _nnls_error(G: np.ndarray, target: np.ndarray, subset: tuple[int, ...]) -> float:
    _, residual = nnls(G[list(subset)].T, target)
    return residual


@pytest.mark.parametrize("seed", range(6))
def test_omp_weights_are_the_nnls_optimum_on_its_support(seed):
    rng = np.random.default_rng(seed)
    n, D = 7, 10
    G = rng.standard_normal((n, D))
    target = G.mean(0)
    K = torch.from_numpy(G @ G.T)
    for k in range(1, n + 1):
        result = omp_gram(K, k, tol=None)
        idx = result.indices.numpy()
        assert len(set(idx.tolist())) == len(idx) <= k
        reference, _ = nnls(G[idx].T, target)
        np.testing.assert_allclose(result.weights.numpy(), reference, atol=1e-8)
        # The last reported residual is the true distance to the target, up to the sqrt(eps) * ||t||
        # precision of a residual computed from the Gram matrix alone.
        explicit = np.linalg.norm(G[idx].T @ result.weights.numpy() - target)
        assert result.residuals[-1] == pytest.approx(explicit, abs=1e-6 * np.linalg.norm(target))


@pytest.mark.parametrize("seed", range(6))
def test_omp_with_k_equal_n_reaches_the_brute_force_optimum(seed):
    # The mean of the atoms is a non-negative combination of them, so the best subset of any size
    # matches it exactly; with k = n, OMP is Lawson-Hanson NNLS and must find an exact match too.
    rng = np.random.default_rng(seed)
    n, D = 6, 4 + seed
    G = rng.standard_normal((n, D))
    target = G.mean(0)
    best = min(_nnls_error(G, target, s) for r in range(1, n + 1) for s in itertools.combinations(range(n), r))
    assert best < 1e-9
    result = omp_gram(torch.from_numpy(G @ G.T), n, tol=None)
    assert result.residuals[-1] < 1e-7 * np.linalg.norm(target)


@pytest.mark.parametrize("seed", range(5))
def test_omp_recovers_a_planted_sparse_subset_that_brute_force_finds(seed):
    rng = np.random.default_rng(seed)
    n, D, k = 7, 12, 3
    # Orthogonal atoms: the only exact k-subsets are the planted one, by brute force.
    Q, _ = np.linalg.qr(rng.standard_normal((D, n)))
    G = (Q * rng.uniform(0.5, 2.0, size=n)).T
    planted = tuple(sorted(rng.choice(n, size=k, replace=False).tolist()))
    coefs = rng.uniform(0.5, 1.5, size=k)
    target = (coefs[:, None] * G[list(planted)]).sum(0)
    errors = {s: _nnls_error(G, target, s) for s in itertools.combinations(range(n), k)}
    assert min(errors, key=errors.get) == planted
    result = omp_gram(torch.from_numpy(G @ G.T), k, target_corr=torch.from_numpy(G @ target),
                      target_sq_norm=float(target @ target), tol=None)  # fmt: skip
    assert tuple(sorted(result.indices.tolist())) == planted
    order = np.argsort(result.indices.numpy())
    np.testing.assert_allclose(result.weights.numpy()[order], coefs, rtol=1e-8)


@pytest.mark.parametrize("seed", range(6))
def test_signed_omp_matches_scikit_learn_orthogonal_mp_gram(seed):
    rng = np.random.default_rng(seed)
    D, n, k = 20, 12, 5
    X = rng.standard_normal((D, n))
    X /= np.linalg.norm(X, axis=0)  # scikit-learn's OMP assumes normalised atoms
    y = rng.standard_normal(D)
    gram, corr = X.T @ X, X.T @ y
    expected = orthogonal_mp_gram(gram, corr, n_nonzero_coefs=k)
    result = omp_gram(torch.from_numpy(gram), k, target_corr=torch.from_numpy(corr), nonnegative=False, tol=None)
    ours = np.zeros(n)
    ours[result.indices.numpy()] = result.weights.numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-10)


def test_omp_ridge_gives_the_ridge_solution_on_its_support():
    rng = np.random.default_rng(7)
    G = rng.standard_normal((8, 6))
    K = G @ G.T
    lam = 0.3
    result = omp_gram(torch.from_numpy(K), 4, ridge=lam, tol=None)
    idx = result.indices.numpy()
    c = K.mean(1)
    expected = np.linalg.solve(K[np.ix_(idx, idx)] + lam * np.eye(len(idx)), c[idx])
    assert (expected > 0).all()
    np.testing.assert_allclose(result.weights.numpy(), expected, atol=1e-10)


def test_omp_stops_early_once_the_residual_is_negligible():
    # Every example has the same gradient: one atom matches the mean exactly.
    G = np.tile(np.array([[1.0, 2.0, -1.0]]), (5, 1))
    result = omp_gram(torch.from_numpy(G @ G.T), 4)
    assert result.indices.numel() == 1
    assert result.residuals[-1] == pytest.approx(0.0, abs=1e-9)


def test_omp_rejects_bad_arguments():
    K = torch.eye(3)
    with pytest.raises(ValueError, match="n_nonzero"):
        omp_gram(K, 0)
    with pytest.raises(ValueError, match="square"):
        omp_gram(torch.ones(2, 3), 1)
    with pytest.raises(ValueError, match="ridge"):
        omp_gram(K, 1, ridge=-1.0)
    with pytest.raises(ValueError, match="NaN"):
        omp_gram(torch.full((2, 2), float("nan")), 1)


def _reference_omp(K: np.ndarray, k: int, ridge: float, nonnegative: bool, tol: float | None, batch: int = 1):
    """OMP as :func:`omp_gram` documents it, written for clarity: every refit solves ``(K_SS + ridge I) w = c_S`` from
    scratch, with the same selection, pivot and Lawson-Hanson rules (thresholds included). With ``batch > 1``
    (generalized OMP) the ``batch`` largest residual correlations enter together, best first (lowest index among
    ties), each skipped if dependent on the atoms before it; one refit; non-negative, an atom of the step whose refit
    weight is not positive leaves again (all but the step's best, if none is positive) before Lawson-Hanson."""
    n = K.shape[0]
    corr = K.mean(axis=1)
    target_sq = float(corr.mean())
    diag = np.diagonal(K)
    corr_floor = max(1e-12 * math.sqrt(float(diag.max()) * abs(target_sq)), 1e-300)
    support: list[int] = []
    weights = np.zeros(0)
    dependent: set[int] = set()
    objective = target_sq
    residuals = [math.sqrt(max(objective, 0.0))]

    def refit(atoms: list[int]) -> np.ndarray:
        return np.linalg.solve(K[np.ix_(atoms, atoms)] + ridge * np.eye(len(atoms)), corr[atoms])

    for _ in range(2 * n + k):
        if len(support) >= k or (tol is not None and objective <= tol * tol * target_sq):
            break
        residual = corr - K[:, support] @ weights
        score = residual if nonnegative else np.abs(residual)
        score[support + sorted(dependent)] = -np.inf
        eligible = [j for j in range(n) if score[j] > corr_floor]
        chosen = sorted(eligible, key=lambda j: (-score[j], j))[: min(batch, k - len(support))]
        if not chosen:
            break
        added: list[int] = []
        for j in chosen:
            explained = K[j, support] @ np.linalg.solve(K[np.ix_(support, support)] + ridge * np.eye(len(support)),
                                                        K[support, j]) if support else 0.0  # fmt: skip
            if not diag[j] + ridge - explained > 1e-10 * (diag[j] + ridge):
                dependent.add(j)
                continue
            support.append(j)
            added.append(j)
        if not added:
            continue
        new = refit(support)
        while nonnegative and len(added) > 1:
            rejected = [a for a, w in zip(added, new[-len(added) :], strict=True) if w <= 0]
            if not rejected:
                break
            if len(rejected) == len(added):
                rejected = rejected[1:]
            support = [a for a in support if a not in rejected]
            added = [a for a in added if a not in rejected]
            new = refit(support)
        previous = np.append(weights, np.zeros(len(added)))
        while nonnegative and (new <= 0).any():
            neg = np.flatnonzero(new <= 0)
            steps = [previous[i] / (previous[i] - new[i]) if previous[i] - new[i] > 0 else 0.0 for i in neg]
            alpha = min(max(min(steps), 0.0), 1.0)
            previous = previous + alpha * (new - previous)
            previous[[i for i, step in zip(neg, steps, strict=True) if step <= alpha]] = 0.0
            support = [a for a, w in zip(support, previous, strict=True) if w > 0]
            previous = previous[previous > 0]
            new = refit(support) if support else np.zeros(0)
        weights = new
        objective = target_sq - float(weights @ corr[support]) if support else target_sq
        residuals.append(math.sqrt(max(objective, 0.0)))
    return support, weights, residuals


def _softmax_gram(seed: int, n: int, classes: int, dim: int) -> torch.Tensor:
    """The last-layer Gram matrix of a softmax head on random tanh features (a shared direction, as pooled features
    have) and random logits and labels."""
    rng = np.random.default_rng(seed)
    features = np.tanh(rng.standard_normal(dim) + rng.standard_normal((n, dim)))
    logits = rng.standard_normal((n, classes))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    residuals = probabilities - np.eye(classes)[rng.integers(0, classes, n)]
    return last_layer_gram(torch.from_numpy(residuals), torch.from_numpy(features))


@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize(("seed", "classes", "dim", "k"), [(0, 4, 64, 150), (1, 4, 64, 200), (2, 3, 32, 120),
                                                           (3, 3, 384, 150), (4, 2, 384, 75)])  # fmt: skip
def test_omp_matches_a_reference_that_refits_from_scratch(nonnegative, seed, classes, dim, k):
    # omp_gram extends a packed Cholesky factor, rotates atoms out of it in place and updates the residual
    # correlations through slots; a plain implementation of the same rules must choose the same atoms in the same
    # order, with the same weights and residuals. The low-dimensional cases are rank-deficient and drop atoms often
    # (Lawson-Hanson), the 384-dimensional ones are like the bundled model's head.
    K = _softmax_gram(seed, 300, classes, dim)
    scale = float(K.diagonal().double().mean())
    for ridge in (0.0, 1e-3 * scale):
        result = omp_gram(K, k, ridge=ridge, nonnegative=nonnegative)
        # Hundreds of small solves: on one thread, as a second BLAS thread on busy cores makes each one wait.
        with threadpool_limits(1, user_api="blas"):
            support, weights, residuals = _reference_omp(K.double().numpy(), k, ridge, nonnegative, 1e-4)
        assert result.indices.tolist() == support
        np.testing.assert_allclose(result.weights.numpy(), weights, rtol=1e-7, atol=1e-9 * np.abs(weights).max())
        np.testing.assert_allclose(result.residuals, residuals, rtol=1e-7, atol=1e-7 * residuals[0])
        if nonnegative and dim == 64:
            assert len(residuals) - 1 > len(support), "the case must drop atoms, to test the deletions"


def test_normalize_weights():
    w = torch.tensor([0.1, 0.3, 0.2], dtype=torch.float64)
    torch.testing.assert_close(normalize_weights(w, "subset_size"), w * 3 / w.sum())
    torch.testing.assert_close(normalize_weights(w, "none"), w * 3)
    with pytest.raises(ValueError, match="subset_size"):
        normalize_weights(w, "sum")


def test_subset_size_rounds_half_up_and_keeps_at_least_one():
    assert subset_size(32, 0.5) == 16
    assert subset_size(5, 0.5) == 3  # round(2.5) is 3, not banker's 2
    assert subset_size(3, 0.1) == 1
    assert subset_size(10, 1.0) == 10


def test_random_subset_is_distinct_and_uniform():
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(10)
    for _ in range(3000):
        idx = random_subset(10, 3, gen)
        assert idx.unique().numel() == 3
        counts[idx] += 1
    expected = 3000 * 3 / 10
    assert ((counts - expected).abs() < 0.1 * expected).all()


def test_composer_rank_sampling_follows_rank_percentile_probabilities():
    # With k = 1 the single draw has probability proportional to percentile ** (n/k - 1).
    losses = torch.tensor([0.3, 2.0, 0.1, 1.0])
    n, k = 4, 2
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(n)
    trials = 20000
    for _ in range(trials):
        idx = loss_rank_sample(losses, 1, gen)
        counts[idx] += 1
    ranks = torch.argsort(torch.argsort(losses))
    weights = ((ranks.double() + 0.5) / n).pow(n / 1 - 1)
    expected = weights / weights.sum()
    assert torch.allclose(counts.double() / trials, expected, atol=0.015)
    # Exactly k distinct rows, and the highest loss is picked more often than the lowest.
    picks = torch.zeros(n)
    for _ in range(2000):
        idx = loss_rank_sample(losses, k, gen)
        assert idx.unique().numel() == k
        picks[idx] += 1
    assert picks[1] > picks[0] > picks[2]


def test_jiang_probabilities_follow_the_definition():
    history = LossHistory(size=5)
    history.push(torch.tensor([0.1, 0.2, 0.3]))
    history.push(torch.tensor([0.4, 0.5, 0.6]))
    assert len(history) == 5 and history.values().tolist() == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6])
    losses = torch.tensor([0.25, 0.6, 0.05])
    probs = loss_cdf_probabilities(losses, history.values(), beta=2.0, min_prob=0.05)
    # Fraction of the history strictly below each loss, squared, floored at p_min.
    assert probs.tolist() == pytest.approx([max(0.05, (1 / 5) ** 2), (4 / 5) ** 2, 0.05])


def test_jiang_sampling_keeps_the_expected_fraction():
    gen = torch.Generator().manual_seed(1)
    history = LossHistory(size=1024)
    sizes = []
    for _ in range(300):
        losses = torch.rand(32, generator=gen)
        history.push(losses)
        idx = loss_cdf_sample(losses, history.values(), beta=1.0, generator=gen)
        assert idx.unique().numel() == idx.numel() >= 1
        sizes.append(idx.numel())
    assert np.mean(sizes) / 32 == pytest.approx(0.5, abs=0.03)  # expected keep 1/(beta + 1)


def test_sum_constrained_problem_is_omp_on_gradients_with_a_constant_coordinate():
    # Reference: the explicit gradients with sqrt(lam) appended, and their mean as the target.
    generator = torch.Generator().manual_seed(3)
    G = torch.randn(12, 5, generator=generator, dtype=torch.float64)
    K = G @ G.T
    gram, corr, target_sq = sum_constrained_problem(K, strength=10.0)
    lam = 10.0 * float(torch.diagonal(K).mean())
    augmented = torch.cat([G, torch.full((12, 1), lam**0.5, dtype=torch.float64)], dim=1)
    target = augmented.mean(0)
    torch.testing.assert_close(gram, augmented @ augmented.T)
    torch.testing.assert_close(corr, augmented @ target)
    torch.testing.assert_close(target_sq, target @ target)
    # Its weights sum to about 1, where plain OMP's shrink with few atoms.
    plain = omp_gram(K, 3, tol=None)
    held = omp_gram(gram, 3, target_corr=corr, target_sq_norm=target_sq, tol=None)
    assert abs(float(held.weights.sum()) - 1.0) < 0.1 < abs(float(plain.weights.sum()) - 1.0)


@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize(
    ("seed", "classes", "dim", "k", "batch"),
    [(0, 4, 64, 150, 2), (1, 4, 64, 200, 5), (3, 3, 384, 150, 8), (4, 2, 384, 75, 3)],
)
def test_generalized_omp_matches_a_reference_that_refits_from_scratch(nonnegative, seed, classes, dim, k, batch):
    # batch > 1 adds several atoms per step through the same factor updates, deletions and slots as OMP, plus the
    # rejection of a step's atoms that enter with a weight <= 0: a plain implementation of the rules must agree.
    K = _softmax_gram(seed, 300, classes, dim)
    scale = float(K.diagonal().double().mean())
    for ridge in (0.0, 1e-3 * scale):
        result = omp_gram(K, k, ridge=ridge, nonnegative=nonnegative, batch=batch)
        with threadpool_limits(1, user_api="blas"):
            support, weights, residuals = _reference_omp(K.double().numpy(), k, ridge, nonnegative, 1e-4, batch)
        assert result.indices.tolist() == support
        np.testing.assert_allclose(result.weights.numpy(), weights, rtol=1e-7, atol=1e-9 * np.abs(weights).max())
        np.testing.assert_allclose(result.residuals, residuals, rtol=1e-7, atol=1e-7 * residuals[0])
        assert len(residuals) - 1 < len(support), "several atoms per step: fewer steps than atoms"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("batch", [2, 3, 7])
def test_generalized_omp_with_k_equal_n_solves_nnls(seed, batch):
    # It stops only when no atom has a positive residual correlation: the KKT conditions of NNLS, whatever the batch.
    rng = np.random.default_rng(seed)
    n, D = 10, 6
    G = rng.standard_normal((n, D))
    target = G.mean(0)
    result = omp_gram(torch.from_numpy(G @ G.T), n, tol=None, batch=batch)
    _, best = nnls(G.T, target)
    explicit = np.linalg.norm(G[result.indices.numpy()].T @ result.weights.numpy() - target)
    assert bool((result.weights > 0).all())
    assert explicit == pytest.approx(best, abs=1e-9)


def test_omp_reads_any_layout_and_a_float32_gram_as_the_float64_numbers_it_holds():
    # The compiled loop keeps a float32 matrix's columns in float32 and reads them into float64; a transposed
    # (non-contiguous) or half-precision matrix is copied first. Every path must solve the same problem.
    K32 = _softmax_gram(6, 200, 3, 48)
    K32 = (K32 + K32.T) / 2  # exactly symmetric, so that its transpose is the same matrix
    expected = omp_gram(K32.double(), 100)
    assert len(expected.residuals) - 1 > expected.indices.numel(), "the case must drop atoms"
    half = K32.half()
    for gram, reference in ((K32, expected), (K32.T, expected), (K32.double().T, expected),
                            (half, omp_gram(half.double(), 100))):  # fmt: skip
        result = omp_gram(gram, 100)
        assert result.indices.tolist() == reference.indices.tolist()
        torch.testing.assert_close(result.weights, reference.weights, rtol=1e-10, atol=0.0)


def test_omp_batch_one_is_omp_and_the_batch_is_checked():
    K = _softmax_gram(5, 120, 3, 32)
    plain, one = omp_gram(K, 60), omp_gram(K, 60, batch=1)
    assert plain.indices.tolist() == one.indices.tolist() and torch.equal(plain.weights, one.weights)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch"):
            omp_gram(K, 5, batch=bad)


def test_gradient_match_error_from_a_precomputed_target():
    generator = torch.Generator().manual_seed(4)
    G = torch.randn(40, 9, generator=generator, dtype=torch.float64)
    K = (G @ G.T).float()  # as the trainer's Gram matrix
    idx = torch.tensor([3, 17, 5, 29])
    w = torch.tensor([0.02, 0.01, 0.05, 0.03], dtype=torch.float64)
    mean = G.mean(0)
    corr, target_sq = K.double() @ torch.ones(40, dtype=torch.float64) / 40, mean @ mean
    for normalize in (True, False):
        a = w / w.sum() if normalize else w
        expected = torch.linalg.norm((a[:, None] * G[idx]).sum(0) - mean) / torch.linalg.norm(mean)
        target = (corr, torch.tensor(float(corr.mean()), dtype=torch.float64))
        with_target = gradient_match_error(K, idx, w, normalize=normalize, target=target)
        torch.testing.assert_close(with_target, gradient_match_error(K, idx, w, normalize=normalize))
        torch.testing.assert_close(with_target, expected, rtol=1e-5, atol=1e-6)
    assert float(target_sq) == pytest.approx(float(corr.mean()), rel=1e-6)


def test_mean_gradient_target_is_float64_on_every_path():
    generator = torch.Generator().manual_seed(5)
    G = torch.randn(30, 7, generator=generator, dtype=torch.float64)
    K = G @ G.T
    for gram in (K, K.float(), K.float().requires_grad_(True), K.T):
        corr, target_sq = mean_gradient_target(gram)
        assert corr.dtype == target_sq.dtype == torch.float64
        torch.testing.assert_close(corr, gram.detach().double().mean(dim=1))
        torch.testing.assert_close(target_sq, G.mean(0) @ G.mean(0), rtol=1e-6, atol=0.0)


def test_gram_cannot_overflow_is_a_bound_not_a_guess():
    generator = torch.Generator().manual_seed(6)
    residuals, features = torch.randn(50, 3, generator=generator), torch.randn(50, 16, generator=generator)
    assert gram_cannot_overflow(residuals, features)
    huge = features.clone()
    huge[7] *= 1e19  # h . h is about 1e40: the Gram matrix overflows float32
    assert not bool(torch.isfinite(last_layer_gram(residuals, huge)).all())
    assert not gram_cannot_overflow(residuals, huge)
    nan = residuals.clone()
    nan[3, 1] = float("nan")
    assert not gram_cannot_overflow(nan, features)
    # Large but orthogonal rows: the bound says nothing (False) although the matrix is finite; the caller checks it.
    wide = torch.zeros(2, 2)
    wide[0, 0] = wide[1, 1] = 3e19
    assert not gram_cannot_overflow(torch.ones(2, 1), wide, bias=False)
    assert bool(torch.isfinite(last_layer_gram(torch.ones(2, 1), torch.eye(2) * 1e15, bias=False)).all())
    assert gram_cannot_overflow(torch.zeros(0, 3), torch.zeros(0, 16))
