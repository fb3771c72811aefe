"""Simulated Byzantine clients for evaluating defences, chosen by name in the config (`[attack]`).

Data attacks rewrite the malicious clients' training data (label_flip; the data half of backdoor); model
attacks rewrite their updates each round (sign_flip, noise, alie, ipm; the boost of backdoor).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .backdoor import Backdoor, Trigger
from .base import Attack, choose_attackers
from .label_flip import LabelFlip
from .model import ALIE, IPM, GaussianNoise, SignFlip

ATTACKS: dict[str, type[Attack]] = {
    "label_flip": LabelFlip, "sign_flip": SignFlip, "noise": GaussianNoise, "alie": ALIE, "ipm": IPM,
    "backdoor": Backdoor,
}


def make_attack(name: str, attackers: Iterable[str], *, seed: int = 0, **params: Any) -> Attack:
    """Build an attack by its registered name for the given malicious clients (e.g. scale=4 for sign_flip)."""
    try:
        cls = ATTACKS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}") from None
    try:
        return cls(attackers, seed=seed, **params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for attack {name!r}: {exc}") from None


__all__ = ["ATTACKS", "make_attack", "choose_attackers", "Attack", "LabelFlip", "SignFlip", "GaussianNoise", "ALIE",
           "IPM", "Backdoor", "Trigger"]
