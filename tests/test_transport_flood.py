"""A connection flood against a real `fedlearn server` process on loopback: streams that never authenticate
(from another address, and from the clients' own) run in a loop, bounded in number and time, while
registered client processes join, a run completes and `fedlearn status` is answered."""
from __future__ import annotations

import threading
import time

import grpc

from fedlearn.cli import main as fedlearn_main
from fedlearn.transport import certs
from fedlearn.transport import fedlearn_pb2 as pb
from fedlearn.transport.certs import ClientBundle
from fedlearn.transport.channels import open_channel
from fedlearn.transport.wire import CONNECT_METHOD, PROTOCOL
from transport_support import Deployment, TcpProxy, wait_for

SERVER = """
operator_token = "creds/operator.token.sha256"
max_connections = 2
max_unauthenticated = 12
max_unauthenticated_per_peer = 4
handshake_timeout = 2
"""
MAX_STREAMS, MAX_SECONDS = 1500, 150  # the flood's bounds


class Flood:
    """Threads that each open a stream, send nothing (or a hello and no proof) and wait to be closed, then do
    it again, until stopped or the bounds are reached."""

    def __init__(self, creds, port: int, threads: int, *, send_hello: bool) -> None:
        self.tls, self.port, self.send_hello = ClientBundle.load(creds / "clients" / "0").tls, port, send_hello
        self.stop, self.opened, self.codes, self.lock = threading.Event(), 0, {}, threading.Lock()
        self.started = time.monotonic()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _loop(self) -> None:
        channel = open_channel(f"127.0.0.1:{self.port}", self.tls)
        try:
            while not self.stop.is_set() and time.monotonic() - self.started < MAX_SECONDS:
                with self.lock:
                    if self.opened >= MAX_STREAMS:
                        return
                    self.opened += 1
                first = ([pb.ClientMessage(hello=pb.Hello(protocol=PROTOCOL, client_id="0")).SerializeToString()]
                         if self.send_hello else [])
                done = threading.Event()
                call = channel.stream_stream(CONNECT_METHOD)(_then_wait(first, done))
                try:
                    for _ in call:
                        pass
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()
                done.set()
                with self.lock:
                    self.codes[code] = self.codes.get(code, 0) + 1
        finally:
            channel.close()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)


def _then_wait(requests, done):
    """Send `requests`, then nothing more until the call is over (no proof ever comes)."""
    yield from requests
    done.wait()


def test_registered_clients_join_and_the_run_completes_under_a_flood_of_unauthenticated_streams(tmp_path):
    creds = tmp_path / "credentials"  # the server's folder links to it as creds/
    certs.create(creds, ["0", "1"])
    run = Deployment(tmp_path, creds, rounds=3, clients=2, server=SERVER)
    floods, proxy = [], None
    try:
        wait_for(lambda: "listening on port" in run.log("server"), 90, "the server to listen")
        proxy = TcpProxy(run.port, source="127.0.0.2")  # another machine
        floods = [Flood(creds, proxy.port, 12, send_hello=False), Flood(creds, proxy.port, 4, send_hello=True),
                  Flood(creds, run.port, 2, send_hello=False)]  # and two streams at a time from the clients' address
        wait_for(lambda: sum(f.opened for f in floods) >= 60, 60, "the flood to start")
        for k in range(2):
            run.honest(k, "--client-arg", "delay=1.0")
        wait_for(lambda: all("event=registered" in run.log(f"client{k}") for k in range(2)), 90,
                 "both clients to join during the flood")
        assert fedlearn_main(["status", "--server", f"127.0.0.1:{run.port}", "--ca", str(creds / "ca.pem"),
                              "--token", str(creds / "operator.token")]) == 0
        history, _ = run.finish(120)
        during = sum(f.opened for f in floods)
    finally:
        for f in floods:
            f.close()
        run.kill()
        if proxy is not None:
            proxy.close()
    assert [r.participants for r in history] == [["0", "1"]] * 3
    assert during >= 100  # the flood really ran all along
    codes = {}
    for f in floods:
        for code, n in f.codes.items():
            codes[code] = codes.get(code, 0) + n
    assert set(codes) <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}, codes  # pushed out or timed out
    log = run.log("server")
    assert "event=unauthenticated_streams_closed" in log and "RESOURCE_EXHAUSTED" not in log
