"""The client API: what a data owner implements, and the one wrapper every client pool calls."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .types import Config, Metrics, State, Update

if TYPE_CHECKING:
    import numpy as np

    from .params import Layout
    from .transforms.base import Transform


class Client(ABC):
    """A participant holding private data. The same object runs in every client pool.

    `fit` trains from the given global state and returns only the change (an `Update`);
    `evaluate` returns metrics of the given state on local data, including ``num_examples``.
    Standard config keys: ``round``, ``seed`` (for local shuffling), ``work_fraction`` (a straggler does only
    that fraction of its local steps), ``proximal_mu`` (FedProx), plus whatever a strategy adds.
    """

    def __init__(self, cid: str) -> None:
        self.cid = str(cid)

    @abstractmethod
    def fit(self, state: State, config: Config) -> Update:
        """Train locally starting from `state`; return the update."""

    def evaluate(self, state: State, config: Config) -> Metrics:
        """Evaluate `state` on local data. Clients without evaluation data need not override this."""
        raise NotImplementedError(f"client {self.cid!r} does not implement evaluate()")

    def local_features(self) -> "np.ndarray":
        """This client's feature rows (rows, features) for federated statistics (`fedlearn.analytics`): only
        summaries of them leave the client. Clients that take no part in statistics need not override this."""
        raise NotImplementedError(f"client {self.cid!r} does not implement local_features(), so it cannot take "
                                  "part in federated statistics")

    def model_layout(self) -> "Layout | None":
        """The names, shapes and dtypes of this client's model, if it knows them (None: unknown). A client
        process sends it when connecting, and a server with another model refuses it at once."""
        return None


def run_fit(client: Client, state: State, config: Config, transforms: Sequence["Transform"] = ()) -> Update:
    """Run one fit task as a pool does: call `fit`, check what came back, apply client-side transforms. A
    statistics task (its config carries ``statistics``, see `fedlearn.analytics`) is answered with the client's
    summary of its features instead: nothing is trained and no transform touches the summary."""
    if "statistics" in config:
        from .analytics.summary import statistics_update  # analytics builds on the client API: import late

        return statistics_update(client, config)
    return finish_fit(client.cid, client.fit(state, config), config, transforms)


def finish_fit(cid: str, update: Update, config: Config, transforms: Sequence["Transform"] = ()) -> Update:
    """The end of a fit task: check what client `cid` returned, then apply the client-side transforms.
    Pools that train clients elsewhere or together (processes, Ray, a vectorised cohort) call it on each
    raw update, in the cohort's order, so stateful transforms see what the sequential pool shows them."""
    if not isinstance(update, Update):
        raise TypeError(f"client {cid!r}: fit() must return an Update, got {type(update).__name__}")
    if update.client_id != cid:
        raise ValueError(f"client {cid!r} returned an update claiming to be {update.client_id!r}")
    for transform in transforms:
        update = transform.client(update, config)
    return update
