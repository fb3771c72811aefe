"""gRPC endpoints with fedlearn's settings: TLS (mutual TLS optional) unless explicitly insecure, message
size limits that force large payloads into chunks, keepalive so dead peers are noticed, and a cap on
concurrent calls (the sum of `admission.Admission`'s budgets) so that no flood can grow the server's
threads without bound."""
from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from .wire import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

INSECURE_WARNING = ("TLS is OFF (--insecure): models, updates and session traffic cross the network in clear "
                    "text. Use this only on a trusted test network.")

_LIMITS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
           ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
SERVER_OPTIONS = _LIMITS + [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
]
CLIENT_OPTIONS = _LIMITS + [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass(frozen=True)
class ServerTLS:
    """Server certificate and key; with `client_ca`, clients must present a certificate it signed."""

    certificate: Path
    private_key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        pair = (_read(self.private_key, "server private key"), _read(self.certificate, "server certificate"))
        if self.client_ca is None:
            return grpc.ssl_server_credentials([pair])
        return grpc.ssl_server_credentials([pair], root_certificates=_read(self.client_ca, "client CA"),
                                           require_client_auth=True)


@dataclass(frozen=True)
class ClientTLS:
    """The CA that signed the server's certificate; a client certificate and key for mutual TLS."""

    ca: Path
    certificate: Path | None = None
    private_key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        cert = _read(self.certificate, "client certificate") if self.certificate else None
        key = _read(self.private_key, "client private key") if self.private_key else None
        return grpc.ssl_channel_credentials(_read(self.ca, "CA certificate"), private_key=key, certificate_chain=cert)


def warn_insecure() -> None:
    log.warning(INSECURE_WARNING)


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist (create it with `fedlearn certs`)") from None


def open_channel(address: str, tls: ClientTLS | None) -> grpc.Channel:
    """A channel to the server; `tls=None` means plain text (callers warn, once, with `warn_insecure`)."""
    if tls is None:
        return grpc.insecure_channel(address, options=CLIENT_OPTIONS)
    return grpc.secure_channel(address, tls.credentials(), options=CLIENT_OPTIONS)


def start_server(handlers: list[grpc.GenericRpcHandler], address: str, tls: ServerTLS | None,
                 max_calls: int) -> tuple[grpc.Server, int]:
    """Start serving on `address` (port 0 picks a free port); returns the server and its port.

    Each open stream or call holds one worker thread, so the pool has a few more threads than the cap of
    `max_calls`: a call over the cap is refused at once with RESOURCE_EXHAUSTED rather than queued.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_calls + 4, thread_name_prefix="fedlearn-rpc"),
                         handlers=handlers, options=SERVER_OPTIONS, maximum_concurrent_rpcs=max_calls)
    try:
        if tls is None:
            warn_insecure()
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, tls.credentials())
    except RuntimeError:  # newer grpcio raises instead of returning port 0
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {address}: the address is in use or not valid")
    server.start()
    return server, port
