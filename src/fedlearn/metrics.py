"""Metric names and rules: what a round records, the classification metrics every evaluation computes, and
the rule that combines clients' evaluation metrics.

Every name a round can record (`History.metric(name)`, `metrics.csv`, `fedlearn report`):

=====================  ==============================================================================
``clients_sampled``    clients sampled for training this round
``clients_used``       updates that reached the aggregator
``clients_failed``     sampled clients without a usable update (crash, timeout, rejected, flagged, ...)
``clients_flagged``    of those, updates the anomaly checks flagged
``train_loss``         clients' training loss, weighted by their examples
``test_<m>``           the server's central evaluation (``App.central_eval``) of the new model
``fed_<m>``            clients' evaluation of the new model (``eval_clients`` > 0), combined by the app's
                       ``evaluate_metrics`` rule (default `weighted_mean_metrics`; `client_mean_metrics`
                       counts every client once)
``round_failed``       1 when too few usable updates arrived and the model was kept
``bytes_up``           bytes clients sent this round, whole messages (deployments, and simulations with
                       ``[compression]``: `WirePool`); ``bytes_down`` what the server sent them
``dp_epsilon``         central DP: privacy spent so far (also ``dp_rounds``, ``dp_clip``, ``dp_noise_std``)
``ldp_epsilon_max``    local DP: the largest epsilon any client has spent
``backdoor_success``   as ``test_backdoor_success``: share of triggered test inputs classified as the target
=====================  ==============================================================================

``<m>`` is any metric an evaluation returns; the built-in ones (`classification_metrics`) are ``loss``,
``accuracy``, ``balanced_accuracy``, ``f1`` (macro), ``auc`` (ROC AUC; one-vs-rest macro average over
classes for more than two), and ``recall_<k>`` / ``precision_<k>`` per class k (the per-class report).
So the central accuracy is ``test_accuracy`` and the clients' pooled accuracy ``fed_accuracy``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .types import EvalResult, Metrics

MetricAggregation = Callable[[Sequence[EvalResult]], Metrics]
ROUND_METRICS = ("clients_sampled", "clients_used", "clients_failed", "clients_flagged", "train_loss", "round_failed")


def weighted_mean_metrics(results: Sequence[EvalResult]) -> Metrics:
    """The default rule for clients' evaluation metrics: every metric all clients reported, averaged with
    weights `num_examples`. For accuracy and loss this is the value over all their examples pooled; for
    AUC, F1 and balanced accuracy it is the example-weighted mean of the clients' values (not the pooled
    value). Clients with no examples are left out. Replace it with `App(evaluate_metrics=...)`."""
    results = [r for r in results if r.num_examples > 0]
    if not results:
        return {}
    weights = np.array([r.num_examples for r in results], dtype=np.float64)
    keys = set.intersection(*(set(r.metrics) for r in results)) - {"num_examples"}
    return {k: float(np.average([r.metrics[k] for r in results], weights=weights)) for k in sorted(keys)}


def client_mean_metrics(results: Sequence[EvalResult]) -> Metrics:
    """A rule for clients' evaluation metrics in which every client counts once: the plain mean over the
    clients of each metric they all reported (FLamby's score: the mean of the clients' own test accuracies).
    A small site then weighs as much as a large one. Clients with no examples are left out."""
    results = [r for r in results if r.num_examples > 0]
    return weighted_mean_metrics([EvalResult(r.client_id, 1, r.metrics) for r in results])


PER_CLASS_MAX = 10  # more classes than this: no per-class entries in every round's metrics


def classification_metrics(scores: np.ndarray, labels: np.ndarray, per_class: bool | None = None) -> Metrics:
    """Accuracy, balanced accuracy, macro F1, ROC AUC and per-class recall and precision of class `scores`
    (n, k) (logits or probabilities) against integer `labels` (n,). AUC is NaN when the labels hold only
    one class (it is undefined); a class absent from the labels has no recall entry, one never predicted
    no precision entry. The per-class entries come by default only for up to `PER_CLASS_MAX` classes."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    k = scores.shape[1]
    per_class = k <= PER_CLASS_MAX if per_class is None else per_class
    if len(labels) == 0:
        return {}
    predicted = scores.argmax(axis=1)
    metrics: Metrics = {"accuracy": float(np.mean(predicted == labels))}
    recalls, f1s = [], []
    for c in range(k):
        actual, guessed = labels == c, predicted == c
        true_pos = float(np.sum(actual & guessed))
        if guessed.any() and per_class:
            metrics[f"precision_{c}"] = true_pos / float(guessed.sum())
        if actual.any():
            recalls.append(true_pos / float(actual.sum()))
            if per_class:
                metrics[f"recall_{c}"] = recalls[-1]
        if actual.any() or guessed.any():
            f1s.append(2 * true_pos / float(actual.sum() + guessed.sum()))
    metrics["balanced_accuracy"] = float(np.mean(recalls))
    metrics["f1"] = float(np.mean(f1s))
    metrics["auc"] = _auc(scores, labels, k)
    return metrics


def _auc(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """ROC AUC: of the positive class's score for two classes, else the macro one-vs-rest mean of softmax
    probabilities over the classes present. Computed from ranks (the Mann-Whitney statistic, ties counted
    half), which equals the area under the ROC curve and needs no scikit-learn import in every evaluation."""
    present = np.unique(labels)
    if len(present) < 2:
        return float("nan")
    if k == 2:
        return _binary_auc(labels == present[1], scores[:, 1] - scores[:, 0])
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    return float(np.mean([_binary_auc(labels == c, probs[:, c]) for c in present]))


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative) + P(tie) / 2, from average ranks."""
    order = np.argsort(score, kind="stable")
    ordered = score[order]
    # average rank (1-based) of each run of equal scores, given to every member of the run
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(ordered)]
    ranks = np.empty(len(score))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    n_pos = int(positive.sum())
    n_neg = len(score) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
