"""Deployment: a real server and client processes over gRPC, TLS by default, authenticated clients.

Follow one round: `RemotePool.fit` (remote_pool.py) puts a task per sampled client on its session; the
stream handler (service.py) sends the task header and the model in chunks (wire.py); the client process
(client_process.py) trains the same `Client` a simulation uses and sends its update, signed with its
Ed25519 identity key (identity.py); `RemotePool.deliver` checks run id, client, signature and the task's
nonce, and the `Server` round loop takes the update from there. Before a stream authenticates it lives in
the small budget of admission.py; `fedlearn status` and the Audit call (audit_rpc.py: consistency proofs of
the audit log on demand) need the credentials of status_auth.py.

The wire schema is fedlearn.proto; after editing it, regenerate fedlearn_pb2.py and fedlearn_pb2.pyi from
the repository root with::

    pip install "grpcio-tools>=1.72,<1.73"
    python -m grpc_tools.protoc -I src --python_out=src --pyi_out=src src/fedlearn/transport/fedlearn.proto
"""
from .audit_rpc import fetch_consistency
from .certs import ClientBundle
from .channels import ClientTLS, ServerTLS
from .client_process import ClientRejected, Connection, run_client
from .identity import AllowList, Identity
from .remote_pool import NotEnoughClientsError, RemotePool
from .server_process import DeploymentServer, ServerSettings, load_server_config, serve_app
from .status import query_status
from .status_auth import client_metadata, token_metadata

__all__ = [
    "DeploymentServer", "ServerSettings", "load_server_config", "serve_app", "RemotePool", "NotEnoughClientsError",
    "run_client", "Connection", "ClientRejected", "ClientBundle", "ClientTLS", "ServerTLS", "Identity", "AllowList",
    "query_status", "client_metadata", "token_metadata", "fetch_consistency",
]
