"""Metrics beyond accuracy, pinned to scikit-learn; class weights on an imbalanced task; a replaceable rule
for clients' evaluation metrics; user metrics in metrics.csv and metrics.png."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score, roc_auc_score

from fedlearn import App, classification_metrics, run_simulation
from fedlearn.data import from_client_arrays
from fedlearn.report import plotted_metrics
from fedlearn.torch import TorchClient


def test_binary_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=(300, 2)) + np.eye(2)[labels] * 0.8
    m = classification_metrics(scores, labels)
    predicted = scores.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(np.mean(predicted == labels))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert m["f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    probs = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, probs[:, 1]))
    assert m["recall_1"] == pytest.approx(recall_score(labels, predicted))


def test_multiclass_auc_and_per_class_report_match_scikit_learn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 400)
    scores = rng.normal(size=(400, 4)) + np.eye(4)[labels]
    m = classification_metrics(scores, labels)
    probs = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    per_class = recall_score(labels, scores.argmax(axis=1), average=None)
    assert [m[f"recall_{k}"] for k in range(4)] == pytest.approx(per_class)


def test_a_model_that_always_says_good_is_exposed_by_balanced_accuracy():
    labels = np.array([0] * 955 + [1] * 45)
    scores = np.tile([1.0, 0.0], (1000, 1))  # always class 0, "good"
    m = classification_metrics(scores, labels)
    assert m["accuracy"] == pytest.approx(0.955) and m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["recall_1"] == 0.0 and m["auc"] == pytest.approx(0.5)


def _imbalanced(seed: int = 0, n: int = 400, clients: int = 4):
    """A rare positive class (about 6%) whose signal is weak: unweighted training mostly predicts 0."""
    rng = np.random.default_rng(seed)
    parts = {}
    for k in range(clients):
        y = (rng.random(n) < 0.06).astype(np.int64)
        x = rng.normal(size=(n, 5)).astype(np.float32)
        x[:, 0] += 1.2 * y
        parts[str(k)] = (x, y)
    return from_client_arrays(parts, test_fraction=0.25, seed=seed)


def test_class_weights_raise_balanced_accuracy_on_an_imbalanced_task():
    data = _imbalanced()
    results = {}
    for weights in (None, [1.0, 15.0]):
        app = App.from_data(data, lambda: torch.nn.Linear(5, 2), fit_config={"local_epochs": 2, "lr": 0.1},
                            client_kwargs={"class_weights": weights} if weights else {})
        results[weights is None] = run_simulation(app=app, rounds=5).history.last
    plain, weighted = results[True], results[False]
    assert plain["test_balanced_accuracy"] < 0.6 < weighted["test_balanced_accuracy"]
    assert weighted["test_recall_1"] > plain["test_recall_1"] + 0.3
    with pytest.raises(ValueError, match="class_weights"):
        TorchClient("0", lambda: torch.nn.Linear(5, 2), *data.clients["0"], class_weights=[1.0, -2.0])


def test_clients_evaluation_metrics_use_the_apps_rule_and_user_metrics_reach_csv_and_plot(tmp_path):
    data = _imbalanced(clients=3)
    seen = []

    def worst_client(results):  # a user's rule: the worst client's accuracy instead of the pooled one
        seen.append({r.client_id: r.metrics["accuracy"] for r in results})
        return {"worst_accuracy": min(r.metrics["accuracy"] for r in results)}

    def positives_share(state):  # a user's own central metric
        logits = data.test[0] @ state["weight"].T + state["bias"]
        return {"positive_rate": float(np.mean(logits.argmax(axis=1) == 1))}

    app = App.from_data(data, lambda: torch.nn.Linear(5, 2), evaluate_metrics=worst_client, central_eval=False)
    app.central_eval = positives_share
    result = run_simulation(app=app, rounds=2, eval_clients=3, run_dir=tmp_path)
    assert [r.metrics["fed_worst_accuracy"] for r in result.history.rounds] == [min(s.values()) for s in seen]
    assert "fed_accuracy" not in result.history.last
    header = next(csv.reader(open(tmp_path / "metrics.csv")))
    assert {"seconds", "test_positive_rate", "fed_worst_accuracy"} <= set(header)
    plotted = [k for keys in plotted_metrics(result.history.rounds).values() for k in keys]
    assert {"test_positive_rate", "fed_worst_accuracy"} <= set(plotted)


def test_client_mean_counts_every_client_once_and_a_run_without_server_data_says_so(tmp_path, capsys):
    from fedlearn import client_mean_metrics
    from fedlearn.cli import main
    from fedlearn.types import EvalResult

    results = [EvalResult("big", 900, {"accuracy": 0.9, "auc": 0.8}), EvalResult("small", 100, {"accuracy": 0.5, "auc": 0.6}),
               EvalResult("empty", 0, {"accuracy": 0.0, "auc": 0.0})]
    assert client_mean_metrics(results) == pytest.approx({"accuracy": 0.7, "auc": 0.7})  # (0.9 + 0.5) / 2
    data = _imbalanced(clients=3)
    app = App.from_data(data, lambda: torch.nn.Linear(5, 2), evaluate_metrics=client_mean_metrics, central_eval=False)
    result = run_simulation(app=app, rounds=2, eval_clients=3, run_dir=tmp_path)
    last = result.history.last
    model = torch.nn.Linear(5, 2)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in result.final_state.items()})
    own = [classification_metrics(model(torch.as_tensor(x)).detach().numpy(), y) for x, y in data.client_test.values()]
    assert last["fed_auc"] == pytest.approx(np.mean([m["auc"] for m in own]))
    assert result.summary().startswith(f"final accuracy (clients' evaluation): {np.mean([m['accuracy'] for m in own]):.4f}")
    assert main(["report", str(tmp_path)]) == 0  # the report shows the clients' AUC and balanced accuracy too
    lines = capsys.readouterr().out.splitlines()
    assert next(line for line in lines if line.startswith("final fed_auc ")).split()[-1] == f"{last['fed_auc']:.4f}"
    assert any(line.startswith("best fed_balanced_accuracy ") for line in lines)


def test_auc_with_tied_scores_matches_scikit_learn():
    """Rounded scores tie often: ties count half, as scikit-learn's ROC area does."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 500)
    scores = np.round(rng.normal(size=(500, 3)) + np.eye(3)[labels], 1)
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))  # the softmax as documented, bit for bit
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    assert classification_metrics(scores, labels)["auc"] == pytest.approx(
        roc_auc_score(labels, probs, multi_class="ovr", average="macro"), rel=1e-12)
    binary = labels[labels < 2]
    two = np.round(rng.normal(size=(len(binary), 2)), 1)
    assert classification_metrics(two, binary)["auc"] == pytest.approx(
        roc_auc_score(binary, two[:, 1] - two[:, 0]), rel=1e-12)
