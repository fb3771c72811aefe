"""The use-case examples in examples/ run end to end on small settings and reach what their READMEs claim.
Each needs ../shared/data (beside the checkout) and skips without it."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def example(relative: str):
    """Import examples/`relative` (a script, not a package) as a module."""
    path = EXAMPLES / relative
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def needs(folder: str) -> Path:
    path = SHARED / folder
    if not path.exists():
        pytest.skip(f"needs {path}")
    return path


def test_four_hospitals_train_over_grpc_with_secure_aggregation_and_dp(tmp_path):
    """Server and four client processes; every round goes through the SecAgg stages with distributed DP,
    the audit log verifies, and the hospitals' mean AUC is clearly above chance despite the noise."""
    data = needs("heart_disease")
    run = example("hospitals/run.py")
    rounds = 4
    assert run.main(["--rounds", str(rounds), "--data", str(data), "--work", str(tmp_path / "work"), "--timeout", "500"]) == 0
    import json

    result = json.loads((tmp_path / "work" / "result.json").read_text())
    assert result["rounds"] == rounds and result["clients_used"] == 4 and result["audit_ok"]
    # secure aggregation: each hospital answered the protocol's five exchanges in every round
    assert result["secagg_stages"] == 5 * 4 * rounds
    assert result["dp_epsilon"] > 1.0
    # the mean of the hospitals' own test AUCs (0.5 is chance; 15 simulated 4-round runs gave 0.67-0.84)
    assert result["fed_auc"] > 0.6


def test_bank_consortium_class_weights_find_fraud_that_accuracy_hides():
    """On 5% fraud, the plain model's accuracy is at least the weighted model's, yet class weights raise
    balanced accuracy and fraud recall by a wide margin; always answering "legitimate" scores 0.94."""
    table = example("bank_consortium/bank.py").main(["--small"])
    baseline, plain, weighted = (table[k] for k in ("always 'legitimate'", "FedAvg, plain loss", "FedAvg, class weights"))
    assert baseline["accuracy"] > 0.93 and baseline["balanced_accuracy"] == 0.5
    assert plain["accuracy"] >= weighted["accuracy"]
    assert weighted["balanced_accuracy"] > plain["balanced_accuracy"] + 0.15
    assert weighted["recall_1"] > plain["recall_1"] + 0.4 and weighted["recall_1"] > 0.6
    assert weighted["auc"] > 0.8


def test_keyboard_model_predicts_the_next_character_better_than_the_most_frequent_one():
    needs("tinyshakespeare")
    scores = example("keyboard/keyboard.py").main(["--small", "--finetune", "1"])
    assert scores["most_frequent_character"] == pytest.approx(0.153, abs=0.01)  # a space
    assert scores["next_char_accuracy"] > scores["most_frequent_character"] + 0.03
    # each speaker's own accuracy, before and after fine-tuning on its own lines, is a real next-character model
    assert min(scores["speaker_mean"], scores["finetuned_mean"]) > scores["most_frequent_character"] + 0.03
