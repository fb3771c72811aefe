"""`RoundProtocol`: how one round's results are gathered from the cohort and combined.

The default is the plain round: one fit exchange, then the strategy's aggregator on the individual updates.
A protocol of several exchanges (secure aggregation) overrides `collect` and `aggregate` and sends its
stages as generic messages through `ClientPool.exchange`, with client-side handlers from `client_handlers`.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from ..messages import Handler, Message
from ..strategies.base import Strategy
from ..transforms.base import Transform
from ..types import Config, Failure, State, Update
from .pool import ClientPool


class RoundAborted(RuntimeError):
    """A round protocol could not finish safely (secure aggregation with too few survivors or corrupt
    shares). The round loop records the round as failed with this reason and keeps the model; the run goes on."""


class RoundProtocol:
    """The plain round."""

    name = "plain"

    def client_handlers(self) -> dict[str, Handler]:
        """Handlers a client needs for this protocol's stages (message kind -> handler)."""
        return {}

    def check(self, strategy: Strategy) -> None:
        """Raise `ValueError` at configuration time if `strategy` cannot run under this protocol."""

    def collect(
        self, pool: ClientPool, state: State, instructions: Mapping[str, Config], transforms: Sequence[Transform]
    ) -> list[Update | Failure]:
        """Run the cohort's local training and bring back one result per client."""
        return pool.fit(state, instructions, transforms)

    def aggregate(self, pool: ClientPool, strategy: Strategy, updates: list[Update], rnd: int) -> np.ndarray:
        """Combine the accepted updates into the round's delta; raise `RoundAborted` if that cannot be done safely."""
        return strategy.aggregate(updates)


def exchange_stage(
    pool: ClientPool, stage: str, requests: dict[str, Message], failures: list[Failure], *, deadline: float,
    state: State | None = None, transforms: Sequence[Transform] = (),
) -> dict[str, Message]:
    """Send one stage of a multi-stage protocol; return the replies of the right kind and record every other
    client of `requests` in `failures` (crashed, dropped, timed out, or answered with another kind)."""
    replies = pool.exchange(requests, state=state, transforms=transforms, deadline=deadline)
    answered: dict[str, Message] = {}
    for cid in requests:
        reply = replies.get(cid)
        if isinstance(reply, Message) and reply.kind == stage:
            answered[cid] = reply
            continue
        failure = Failure(cid, reply.kind, f"{stage}: {reply.reason}") if isinstance(reply, Failure) else \
            Failure(cid, "timeout", f"{stage}: no answer")
        logging.getLogger(__name__).info("%s: client %s %s: %s", stage, cid, failure.kind, failure.reason)
        failures.append(failure)
    return answered
