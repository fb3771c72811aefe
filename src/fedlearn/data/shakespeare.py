"""Shakespeare split by speaking role, LEAF style: a next-character task with one client per role.

The char-RNN "tinyshakespeare" text marks each speech with its speaker's name on a line of its own ending
in ':'. Every role's speeches, in order, form that client's text; its first `train_fraction` is training
data and the rest its own test split (cut before windowing, so no window straddles the two). Samples are
windows of `seq_len` character codes and the label is the next character.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .datasets import FederatedDataset, _with_client_test

_SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]{0,40}):$")


def speeches_by_role(text: str) -> dict[str, str]:
    """Each role's speeches joined by newlines, in order of first appearance."""
    roles: dict[str, list[str]] = {}
    speaker, lines = None, []
    for line in [*text.splitlines(), ""]:
        match = _SPEAKER.match(line.strip())
        if match:
            speaker, lines = match.group(1).upper(), []
        elif line.strip() == "" and speaker is not None:
            if lines:
                roles.setdefault(speaker, []).append("\n".join(lines))
            speaker, lines = None, []
        elif speaker is not None:
            lines.append(line)
    return {role: "\n".join(parts) for role, parts in roles.items()}


def _windows(codes: np.ndarray, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    starts = np.arange(0, max(0, len(codes) - seq_len), stride)
    x = codes[starts[:, None] + np.arange(seq_len)]
    return x.astype(np.int64), codes[starts + seq_len].astype(np.int64)


def load_shakespeare(path: str | Path, *, seq_len: int = 40, stride: int = 8, min_chars: int = 2000,
                     max_clients: int | None = None, train_fraction: float = 0.8) -> FederatedDataset:
    """Roles with at least `min_chars` characters (the `max_clients` largest when given) as clients.
    Inputs are int64 character codes of shape (n, seq_len) over the whole text's sorted alphabet."""
    if not 0 < train_fraction < 1 or seq_len < 1 or stride < 1:
        raise ValueError("need 0 < train_fraction < 1, seq_len >= 1 and stride >= 1")
    text = Path(path).read_text(encoding="utf-8")
    alphabet = sorted(set(text))
    lookup = {ch: i for i, ch in enumerate(alphabet)}
    roles = {r: t for r, t in speeches_by_role(text).items() if len(t) >= min_chars}
    chosen = sorted(roles, key=lambda r: (-len(roles[r]), r))[:max_clients]
    if not chosen:
        raise ValueError(f"{path}: no role has {min_chars} characters of speech")
    clients, client_test = {}, {}
    for role in chosen:
        codes = np.fromiter((lookup[ch] for ch in roles[role]), dtype=np.int64)
        cut = int(len(codes) * train_fraction)
        clients[role] = _windows(codes[:cut], seq_len, stride)
        client_test[role] = _windows(codes[cut:], seq_len, stride)
    return _with_client_test("shakespeare", clients, client_test, len(alphabet))
