"""A worker's gRPC stage server, plaintext or mutual TLS as its master says.

The worker must start its server before it registers (the Register names its address), but
learns only from the master's challenge whether the cluster's gRPC uses TLS (no worker flag
to keep in step with the master's). So the server starts plaintext, and on a registration
with a certificate it restarts on the same port with `grpc.dynamic_ssl_server_credentials`,
whose fetcher then hands each new handshake the current certificate: a later registration
with a restarted master (a new CA) only swaps the certificate, no restart. A master without
TLS after one with it gets a plaintext server back. Restarts happen only at registration,
before the new master can have given this worker a plan, so no live stream is cut."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import cast

import grpc

from .control_messages import Registered
from .stage_server import StageServicer, serve
from .tls import NodeTLS, check_issued, make_csr, new_key

log = logging.getLogger(__name__)


class StageEndpoint:
    """Invariant: `server` serves `servicer` on `host:port` (the port never changes once bound),
    with mutual TLS exactly when `serving_tls`; after a successful `on_registered` that is
    when `tls` is set, and `servicer.tls` is `tls`. The key never leaves this process; `csr`
    asks the master to certify it."""

    def __init__(self, servicer: StageServicer, host: str, port: int):
        self.servicer, self.host = servicer, host
        self._key = new_key()  # one key for the process's life: each master certifies it anew
        self.csr = make_csr(self._key, servicer.node_id)
        self.tls: NodeTLS | None = None
        self._lock = threading.Lock()
        self._fetched: NodeTLS | None = None  # the certificate the TLS server last got from _fetch
        self.server, self.port = serve(servicer, host, port)  # OSError if the port is taken
        self.serving_tls = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def on_registered(self, reply: Registered) -> None:
        """Take up the master's TLS setting (ControlClient's on_registered hook). ValueError if
        the certificate is not for our key; OSError if the port could not be bound again."""
        tls = None
        if reply.tls_cert is not None and reply.tls_ca is not None:
            tls = check_issued(self._key, reply.tls_cert, reply.tls_ca)
        with self._lock:
            self.tls = self.servicer.tls = tls
        if (tls is not None) != self.serving_tls:
            self._restart()
        elif tls is not None:
            log.info("gRPC on %s: switched to the certificate of the new master's CA", self.address)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake: the current certificate if it changed, else None."""
        with self._lock:
            if self.tls is None or self.tls is self._fetched:
                return None
            self._fetched = self.tls
            return self.tls.server_config()

    def _restart(self) -> None:
        self.server.stop(grace=0).wait()
        credentials = None
        if self.tls is not None:
            with self._lock:
                self._fetched = self.tls
                initial = self.tls.server_config()
            # The stub types the fetcher as never returning None; gRPC documents None as "no change".
            fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], self._fetch)
            credentials = grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=True)
        self.server, _ = serve(self.servicer, self.host, self.port, credentials)  # OSError: retried next time
        self.serving_tls = credentials is not None
        log.info("gRPC on %s now serves %s", self.address, "mutual TLS" if self.tls else "plaintext")

    def stop(self, grace: float = 1) -> None:
        self.server.stop(grace=grace)
