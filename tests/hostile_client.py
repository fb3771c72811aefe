"""A hostile client process for the deployment tests: a registered client (its own credentials, TLS, signed
results) that sends what an honest `fedlearn client` never would, in the rounds it is told.

    python hostile_client.py --server HOST:PORT --credentials DIR [--central-dp] [--step X] ATTACK@ROUNDS ...

Attacks (ROUNDS: comma-separated round numbers, or "all"):
  count=N             claim N examples (e.g. 10**400 written out, or 1000000000000000)
  unclipped=X         central DP: report the adaptive-clipping indicator dp_unclipped as X
  no_c_pk             secure aggregation: leave the X25519 key c_pk out of the key advertisement
  count_text          secure aggregation: send num_examples="x" with the masked update
  corrupt_shares      secure aggregation: flip bytes of every share revealed for unmasking
  fail_training       raise in training (secure aggregation: in the masked stage), an honest dropout
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np

from fedlearn.messages import Message, from_bytes
from fedlearn.privacy.central import UNCLIPPED_KEY, CentralDPClient
from fedlearn.secagg.protocol import ADVERTISE, MASKED, UNMASK
from fedlearn.transport.certs import ClientBundle
from fedlearn.transport.client_process import run_client
from fedlearn.transport.secagg_handlers import secagg_handlers
from transport_support import ConstantClient


class Schedule:
    """Which attack runs in which round."""

    def __init__(self, specs: list[str]) -> None:
        self.attacks: dict[str, tuple[str, set[int] | None]] = {}
        for spec in specs:
            attack, _, rounds = spec.partition("@")
            name, _, value = attack.partition("=")
            self.attacks[name] = (value, None if rounds in ("", "all") else {int(r) for r in rounds.split(",")})

    def get(self, name: str, rnd: int) -> str | None:
        """The attack's value (or "") when it runs in round `rnd`, else None."""
        if name not in self.attacks:
            return None
        value, rounds = self.attacks[name]
        return value if rounds is None or rnd in rounds else None


class HostileClient(ConstantClient):
    def __init__(self, cid: str, step: float, schedule: Schedule) -> None:
        super().__init__(cid, step=step)
        self.schedule = schedule

    def fit(self, state, config):
        rnd = int(config["round"])
        if self.schedule.get("fail_training", rnd) is not None:
            raise RuntimeError(f"training failed in round {rnd}")
        update = super().fit(state, config)
        count = self.schedule.get("count", rnd)
        return dataclasses.replace(update, num_examples=int(count)) if count else update


class LyingCentralDP(CentralDPClient):
    """Clips as central DP asks, then reports a forged adaptive-clipping indicator."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def client(self, update, config):
        update = super().client(update, config)
        value = self.schedule.get("unclipped", update.round)
        if value is None:
            return update
        return dataclasses.replace(update, metrics={**update.metrics, UNCLIPPED_KEY: float(value)})


def hostile_handlers(cid: str, bundle: ClientBundle, schedule: Schedule) -> dict:
    handlers = secagg_handlers(cid, bundle.identity)
    advertise, masked, unmask = handlers[ADVERTISE], handlers[MASKED], handlers[UNMASK]

    def advertise_without_c_pk(session, message):
        reply = advertise(session, message)
        if schedule.get("no_c_pk", message.meta["round"]) is not None:
            reply.tensors.pop("c_pk")
        return reply

    def masked_with_text_count(session, message):
        reply = masked(session, message)
        if schedule.get("count_text", message.meta["round"]) is not None:
            reply.meta["num_examples"] = "x"
        return reply

    def unmask_corrupt(session, message):
        reply = unmask(session, message)
        if schedule.get("corrupt_shares", message.meta["round"]) is None:
            return reply
        flipped = {name: from_bytes(bytes(b ^ 0x5A for b in np.asarray(t, np.uint8).tobytes()))
                   for name, t in reply.tensors.items()}
        return Message(reply.kind, flipped, reply.meta)

    handlers.update({ADVERTISE: advertise_without_c_pk, MASKED: masked_with_text_count, UNMASK: unmask_corrupt})
    return handlers


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--credentials", required=True)
    parser.add_argument("--central-dp", action="store_true")
    parser.add_argument("--step", type=float, default=1.0)
    parser.add_argument("attacks", nargs="*")
    args = parser.parse_args(argv)
    schedule = Schedule(args.attacks)
    bundle = ClientBundle.load(args.credentials)
    client = HostileClient(bundle.client_id, args.step, schedule)
    reason = run_client(client, args.server, identity=bundle.identity, tls=bundle.tls,
                        transforms=[LyingCentralDP(schedule)] if args.central_dp else [],
                        handlers=hostile_handlers(bundle.client_id, bundle, schedule), retry_for=120)
    print(f"done: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
