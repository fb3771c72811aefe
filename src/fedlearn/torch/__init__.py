"""PyTorch adapters: model <-> state, local training loops, reference models, `TorchClient`."""
from .adapters import load_state, state_of, trainable_names
from .client import TorchClient
from .models import MLP, LogisticRegression
from .train import central_evaluator, evaluate_model, train_local

__all__ = ["TorchClient", "MLP", "LogisticRegression", "state_of", "load_state", "trainable_names", "train_local", "evaluate_model",
           "central_evaluator"]
