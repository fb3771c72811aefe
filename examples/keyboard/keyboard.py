"""A keyboard's next-character model, trained where people type: one client per speaker of Shakespeare.

    python examples/keyboard/keyboard.py            # 20 speakers, 10 a round, 20 rounds
    python examples/keyboard/keyboard.py --small    # 4 speakers, 3 rounds (the CI test)

Each speaking role of tinyshakespeare is one client (`fedlearn.data.load_shakespeare`, LEAF's Shakespeare
task): it holds the first 80% of its own lines for training and the rest as its test split, cut into windows
of 40 characters whose label is the next character. The model reads the window through a character embedding
and an LSTM, as LEAF's reference model does (smaller: one layer of 128), and predicts the next character over
the 65 characters of the text. The score is next-character accuracy on the union of the speakers' test
splits, next to the accuracy of always guessing the most frequent character (a space).
Needs ../shared/data/tinyshakespeare/input.txt (or --data FILE); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fedlearn
from fedlearn.data import FederatedDataset, load_shakespeare
from fedlearn.personalization import ClientStateStore, PersonalTorchClient, compare, per_client_metric
from fedlearn.types import State

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
SEQ_LEN = 40


class KeyboardCNN(nn.Module):
    """Next character from the last `context` ones: a character embedding, a convolution over groups of
    four neighbouring characters, and a linear read-out over the vocabulary."""

    def __init__(self, vocab: int, context: int = 16, embedding: int = 16, channels: int = 96) -> None:
        super().__init__()
        self.context = context
        self.embedding = nn.Embedding(vocab, embedding)
        self.conv = nn.Conv1d(embedding, channels, kernel_size=4)
        self.out = nn.Linear(channels * (context - 3), vocab)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        seen = self.embedding(codes[:, -self.context:]).transpose(1, 2)  # (batch, embedding, context)
        return self.out(torch.relu(self.conv(seen)).flatten(1))


def speakers(path: str | Path = DATA, count: int = 20, stride: int = 16) -> FederatedDataset:
    """The `count` speakers with the most lines, as clients; windows start every `stride` characters."""
    return load_shakespeare(path, seq_len=SEQ_LEN, stride=stride, max_clients=count)


def make_app(data: FederatedDataset, lr: float = 0.3) -> fedlearn.App:
    """FedAvg of the speakers' LSTMs; the server scores each round on the union of their test splits."""
    return fedlearn.App.from_data(data, lambda: KeyboardCNN(data.num_classes),
                                  fit_config={"local_epochs": 1, "batch_size": 16, "lr": lr})


def most_frequent_character(data: FederatedDataset) -> float:
    """Test accuracy of always guessing the character most frequent among the training labels."""
    guess = np.bincount(np.concatenate([y for _, y in data.clients.values()])).argmax()
    return float(np.mean(data.test[1] == guess))


def personalized(app: fedlearn.App, data: FederatedDataset, state: State, epochs: int = 1, lr: float = 0.05):
    """Each speaker's accuracy on its own test split: of the global model, and of the global model after
    `epochs` of fine-tuning at learning rate `lr` on the speaker's own training lines
    (`fedlearn.personalization`, method "finetune")."""
    store = ClientStateStore(tempfile.mkdtemp(prefix="keyboard-"))

    def tuned(cid: str) -> PersonalTorchClient:
        x_test, y_test = data.client_test[cid]
        return PersonalTorchClient(cid, app.model_fn, *data.clients[cid], x_test=x_test, y_test=y_test, store=store,
                                   method="finetune", finetune_epochs=epochs, **{**app.fit_config, "lr": lr})

    return compare(per_client_metric(tuned, data.client_ids, state),
                   per_client_metric(app.client, data.client_ids, state))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="4 speakers, 3 rounds, sparser windows (seconds)")
    parser.add_argument("--rounds", type=int, help="rounds (default 20, 3 with --small)")
    parser.add_argument("--data", type=Path, default=DATA, help="tinyshakespeare's input.txt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune", type=int, default=0, metavar="EPOCHS",
                        help="also fine-tune the final model on each speaker's own lines for EPOCHS and compare")
    args = parser.parse_args(argv)
    count, per_round, stride, rounds = (4, 4, 48, 3) if args.small else (20, 10, 16, 20)
    rounds = args.rounds or rounds
    torch.set_num_threads(1)
    data = speakers(args.data, count, stride)
    sizes = [len(y) for _, y in data.clients.values()]
    print(f"{len(sizes)} speakers ({', '.join(data.client_ids[:4])}, ...), {sum(sizes)} training windows "
          f"({min(sizes)}-{max(sizes)} per speaker), {len(data.test[1])} test windows; {per_round} speakers a round")
    app = make_app(data)
    result = fedlearn.run_simulation(app=app, rounds=rounds, clients_per_round=per_round, seed=args.seed)
    scores = {"next_char_accuracy": result.accuracy, "most_frequent_character": most_frequent_character(data),
              "rounds": float(rounds), "seconds": result.seconds}
    print(f"next-character accuracy after {rounds} rounds: {scores['next_char_accuracy']:.3f} "
          f"(always guessing '{' '}': {scores['most_frequent_character']:.3f}); {result.seconds:.0f}s")
    if args.finetune:
        report = personalized(app, data, result.final_state, args.finetune)
        scores.update(speaker_mean=report.baseline_mean, finetuned_mean=report.mean, finetuned_hurt=report.fraction_hurt)
        print(f"mean over speakers of their own accuracy: {report.baseline_mean:.3f} with the global model, "
              f"{report.mean:.3f} after {args.finetune} epoch(s) of fine-tuning on their own lines "
              f"({report.fraction_hurt:.0%} of speakers worse)")
    return scores


if __name__ == "__main__":
    main()
