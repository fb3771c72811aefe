"""`fedlearn status`: ask a running server for its round, connected clients and last round's metrics, with
credentials (`status_auth.client_metadata` or `status_auth.token_metadata`)."""
from __future__ import annotations

import json

from . import fedlearn_pb2 as pb
from .channels import ClientTLS, open_channel, warn_insecure
from .status_auth import Metadata
from .wire import STATUS_METHOD


def query_status(server: str, tls: ClientTLS | None, credentials: Metadata, timeout: float = 10.0) -> pb.StatusReply:
    """One Status call to `server` (HOST:PORT) with `credentials`."""
    if tls is None:
        warn_insecure()
    with open_channel(server, tls) as channel:
        call = channel.unary_unary(STATUS_METHOD, request_serializer=pb.StatusRequest.SerializeToString,
                                   response_deserializer=pb.StatusReply.FromString)
        return call(pb.StatusRequest(), timeout=timeout, metadata=credentials)


def status_dict(reply: pb.StatusReply) -> dict:
    return {"run_id": reply.run_id, "state": reply.state, "round": reply.round, "total_rounds": reply.total_rounds,
            "connected_clients": list(reply.connected_clients), "last_metrics": dict(reply.last_metrics),
            "rejected_results": reply.rejected_results}


def format_status(reply: pb.StatusReply, as_json: bool = False) -> str:
    """Readable (or JSON) text of a status reply."""
    info = status_dict(reply)
    if as_json:
        return json.dumps(info, indent=2, sort_keys=True)
    metrics = "  ".join(f"{k} {v:.4g}" for k, v in sorted(info["last_metrics"].items())) or "-"
    clients = ", ".join(info["connected_clients"]) or "none"
    return (f"run {info['run_id']}: {info['state']}, round {info['round']} of {info['total_rounds']}\n"
            f"connected clients ({len(info['connected_clients'])}): {clients}\n"
            f"last round: {metrics}\n"
            f"rejected results so far: {info['rejected_results']}")

