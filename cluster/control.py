"""WebSocket control channel: workers register with the master, get layer ranges, stay alive.

Master side: `ControlServer.handle` is mounted at /ws/worker. It challenges each connection
with a nonce (a worker proves it knows the join token by an HMAC over nonce + node id, so
the token never crosses the wire), registers it in the NodeRegistry, exchanges heartbeats
both ways and marks it LOST when it goes silent or its socket closes.

The worker side is `control_client.ControlClient`.

Limits, so that nobody who lacks the token can keep real workers out: a socket that has
not registered yet must do so within `handshake_timeout`, and the pending ones are capped
per address and in all, shedding the oldest over a cap (control_guard.PendingSockets; the
shed socket is closed with 1013, try later). Registered workers (they proved the token) are
capped at `max_workers`. A registered worker that stops heartbeating is dropped after
`heartbeat_timeout`, loading or not: a worker loads in a thread and keeps beating, so
silence after an assign means it is gone, and the plan waiting on it hears so at once.

With `ca` (app.py --tls) the challenge asks for a certificate request, and a worker's is
signed only once it has proved the token and passed every other check; a bad one is refused
with the reason (cluster.tls).

Message schemas and size limits live in control_messages.py; nothing here touches a
peer's bytes before `parse()` has validated them."""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.websockets import WebSocket, WebSocketDisconnect

from .control_guard import Pending, PendingSockets
from .control_messages import (
    CLOSE_POLICY,
    CLOSE_TRY_LATER,
    Assign,
    Challenge,
    Drain,
    Failed,
    Heartbeat,
    HeartbeatAck,
    Holding,
    Message,
    ProtocolError,
    Ready,
    Refused,
    Register,
    Registered,
    Status,
    auth_digest,
    dump,
    parse,
    tls_proof,
)
from .registry import NodeInfo, NodeRegistry, NodeState
from .worker_conn import ControlError, LoadFailed, LoadTimeout, WorkerConn, WorkerLost, settle

if TYPE_CHECKING:
    from .tls import ClusterCA

log = logging.getLogger(__name__)


class ControlServer:
    """Master side of /ws/worker. Invariants: `_conns` holds exactly the live, registered
    connections, one per node_id, in join order, at most `max_workers`; a node id is never
    served twice at once. `pending` holds the sockets still in their handshake, within its caps.
    Not thread-safe: call its methods on the event loop that runs handle()."""

    def __init__(
        self,
        registry: NodeRegistry,
        join_token: str | None,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 5.0,
        model_name: str = "",
        handshake_timeout: float = 5.0,
        max_workers: int = 256,
        max_pending: int = 64,
        max_pending_per_host: int = 8,
        on_change: Callable[[str, str], None] | None = None,
        ca: ClusterCA | None = None,
    ):
        if not 0 < heartbeat_interval < heartbeat_timeout:
            raise ValueError("need 0 < heartbeat_interval < heartbeat_timeout")
        if not (handshake_timeout > 0 and max_workers >= 1):
            raise ValueError("need handshake_timeout > 0 and max_workers >= 1")
        self.registry = registry
        self.join_token = join_token or None
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.model_name = model_name  # shown for workers that hold nothing yet
        self.handshake_timeout = handshake_timeout
        self.max_workers = max_workers
        self.ca = ca  # None: gRPC is plaintext and workers get no certificates
        # Called as on_change(node_id, event), event in {"registered", "ready", "failed", "lost"},
        # on the event loop; an exception it raises is logged, never propagated.
        self.on_change = on_change
        self._conns: dict[str, WorkerConn] = {}
        self.pending = PendingSockets(max_pending, max_pending_per_host)
        self._tasks: set[asyncio.Task] = set()  # fire-and-forget closes, kept from garbage collection
        self._janitor: asyncio.Task | None = None

    # ---- public API (the cluster manager's) ----
    def workers(self) -> list[WorkerConn]:
        return list(self._conns.values())

    def _conn(self, node_id: str) -> WorkerConn:
        conn = self._conns.get(node_id)
        if conn is None:
            raise WorkerLost(node_id, f"worker {node_id} is not connected")
        return conn

    async def assign(self, node_id: str, msg: Assign) -> None:
        conn = self._conn(node_id)
        settle(conn.outcome, error=WorkerLost(node_id, f"plan {conn.plan_id} superseded by plan {msg.plan_id}"))
        conn.outcome = asyncio.get_running_loop().create_future()
        conn.outcome.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved" noise
        conn.plan_id, conn.assigned, conn.ready, conn.state = msg.plan_id, msg, None, NodeState.LOADING
        self._update(node_id, state=NodeState.LOADING, model=msg.model, layer_start=msg.start, layer_end=msg.end)
        log.info(
            "assigning plan %d to %s: %s layers [%d, %d), next hop %s",
            msg.plan_id,
            node_id,
            msg.model,
            msg.start,
            msg.end,
            msg.next_hop or "master",
        )
        if not await self._send(conn, msg):
            raise WorkerLost(node_id, f"could not send assign to {node_id}")

    async def wait_ready(self, node_id: str, plan_id: int, timeout: float) -> Ready:
        conn = self._conn(node_id)
        if conn.plan_id != plan_id or conn.outcome is None:
            raise ControlError(node_id, f"worker {node_id} has no plan {plan_id} (current: {conn.plan_id})")
        try:
            return await asyncio.wait_for(asyncio.shield(conn.outcome), timeout)
        except TimeoutError:
            raise LoadTimeout(
                node_id, f"worker {node_id} did not report ready for plan {plan_id} within {timeout:.0f} s"
            ) from None

    async def drain(self, node_id: str, reason: str) -> None:
        conn = self._conn(node_id)
        settle(conn.outcome, error=WorkerLost(node_id, f"worker {node_id} drained: {reason}"))
        conn.plan_id = conn.assigned = conn.ready = conn.holding = None
        conn.state = NodeState.JOINING
        self._update(node_id, state=NodeState.JOINING, layer_start=0, layer_end=0, model=self.model_name)
        log.info("draining %s: %s", node_id, reason)
        if not await self._send(conn, Drain(reason=reason[:2048])):
            raise WorkerLost(node_id, f"could not send drain to {node_id}")

    def adopt(self, node_id: str, plan_id: int) -> Holding:
        """Accept the layers a re-registering worker already holds as plan `plan_id` (after a
        master restart): state READY without a reload. Raises ControlError if it holds none."""
        conn = self._conn(node_id)
        if conn.holding is None:
            raise ControlError(node_id, f"worker {node_id} holds no layers to adopt")
        h = conn.holding
        conn.plan_id, conn.state = plan_id, NodeState.READY
        self._update(node_id, state=NodeState.READY, model=h.model, layer_start=h.start, layer_end=h.end)
        log.info("adopted %s as plan %d: %s layers [%d, %d)", node_id, plan_id, h.model, h.start, h.end)
        return h

    # ---- one connection ----
    async def handle(self, ws: WebSocket) -> None:
        peer = f"{ws.client.host}:{ws.client.port}" if ws.client else "unknown peer"
        conn: WorkerConn | None = None
        why = "disconnected"
        slot = self.pending.admit(ws.client.host if ws.client else "?")
        self._start_janitor()
        try:
            await ws.accept()
            conn = await self._handshake(ws, peer, slot)
            self.pending.done(slot)
            if conn is not None:
                why = await self._serve(conn)
        except ProtocolError as e:
            who = conn.node_id if conn else "unregistered worker"
            log.error("refused %s from %s: %s", who, peer, e.reason)
            why = f"protocol error: {e.reason}"
            await self._refuse(ws, e.reason, e.close_code)
        except (WebSocketDisconnect, OSError) as e:  # the peer went away mid-send: not our error
            log.info("control connection from %s closed: %r", peer, e)
        except Exception:  # handle() must never raise into the ASGI server
            log.exception("control connection from %s failed", peer)
            why = "internal error"
        finally:
            self.pending.done(slot)
            if conn is not None:
                self._drop(conn, why)
            await self._close(ws, 1000)

    async def _first_message(self, ws: WebSocket, nonce: str) -> Message | None:
        await ws.send_text(dump(Challenge(nonce=nonce, tls=self.ca is not None)))
        return await self._recv(ws)

    async def _handshake(self, ws: WebSocket, peer: str, slot: Pending) -> WorkerConn | None:
        nonce = secrets.token_hex(32)
        first = asyncio.ensure_future(self._first_message(ws, nonce))
        first.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved" noise
        shed = asyncio.ensure_future(slot.shed.wait())
        try:
            done, _ = await asyncio.wait(
                (first, shed), timeout=self.handshake_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            first.cancel()
            shed.cancel()
        if first not in done:
            if shed in done:
                log.debug("shed pending connection from %s: %s", peer, slot.why)
                await self._refuse(ws, slot.why, CLOSE_TRY_LATER)
            else:
                log.debug("refused %s: no register within %.1f s", peer, self.handshake_timeout)
                self.pending.expired(slot, self.handshake_timeout)
                await self._refuse(ws, "no register in time", CLOSE_POLICY)
            return None
        msg = first.result()  # a ProtocolError or a disconnect propagates to handle()
        if msg is None:
            return None
        if not isinstance(msg, Register):
            raise ProtocolError(f"expected register, got {msg.type}")
        if self.join_token is not None:
            bad = (
                "no token given"
                if not msg.auth
                else (
                    None
                    if hmac.compare_digest(auth_digest(self.join_token, nonce, msg.node_id, msg.csr), msg.auth)
                    else "wrong token"
                )
            )
            if bad:
                log.warning("refused worker %s from %s: bad join token (%s)", msg.node_id, peer, bad)
                await self._refuse(ws, "bad join token", CLOSE_POLICY)
                return None
        if msg.node_id not in self._conns and len(self._conns) >= self.max_workers:
            log.warning("refused worker %s from %s: %d workers connected", msg.node_id, peer, len(self._conns))
            await self._refuse(ws, "too many workers", CLOSE_TRY_LATER)
            return None
        now = time.monotonic()
        old = self._conns.get(msg.node_id)
        if old is not None and not old.closed and now - old.last_seen <= self.heartbeat_timeout:
            log.warning("refused worker %s from %s: already connected from %s", msg.node_id, peer, old.peer)
            await self._refuse(ws, f"node id {msg.node_id} is already connected", CLOSE_POLICY)
            return None
        reply = self._registered(msg, nonce)
        if isinstance(reply, str):
            log.warning("refused worker %s from %s: %s", msg.node_id, peer, reply)
            await self._refuse(ws, reply, CLOSE_POLICY)
            return None
        if old is not None:  # its socket is dead or silent: the new connection replaces it
            self._drop(old, "replaced by a new connection")
            self._spawn(self._close(old.ws, 1000))
        conn = WorkerConn(
            node_id=msg.node_id,
            grpc_address=msg.grpc_address,
            capacity=msg.capacity,
            holding=msg.holding,
            peer=peer,
            ws=ws,
            last_seen=now,
            master_host=(ws.scope.get("server") or (None,))[0],
        )
        h, cap = msg.holding, msg.capacity
        self._conns[msg.node_id] = conn
        self.registry.prune(now)
        self.registry.add(
            NodeInfo(
                node_id=msg.node_id,
                address=msg.grpc_address,
                backend=cap.backend,
                device=cap.device,
                model=h.model if h else self.model_name,
                layer_start=h.start if h else 0,
                layer_end=h.end if h else 0,
                mem_used_bytes=cap.total_bytes - cap.free_bytes,
                mem_free_bytes=cap.free_bytes,
                state=NodeState.JOINING,
                last_heartbeat=now,
            )
        )
        await self._send(conn, reply)
        log.info(
            "worker %s registered from %s: grpc %s, %s, %.2f GiB free, %.1f GFLOP/s, holding %s",
            msg.node_id,
            peer,
            msg.grpc_address,
            cap.device,
            cap.free_bytes / 2**30,
            cap.matmul_gflops,
            f"{h.model} [{h.start}, {h.end})" if h else "nothing",
        )
        self._notify(msg.node_id, "registered")
        return conn

    def _registered(self, msg: Register, nonce: str) -> Registered | str:
        """The reply to a worker admitted in every other way, with its certificate under TLS;
        or why its certificate request is refused."""
        reply = Registered(
            node_id=msg.node_id, heartbeat_interval=self.heartbeat_interval, heartbeat_timeout=self.heartbeat_timeout
        )
        if self.ca is None:
            return reply
        if msg.csr is None:
            return "this master serves gRPC with TLS: the worker sent no certificate request (upgrade it)"
        try:
            cert = self.ca.sign(msg.csr, msg.node_id)
        except ValueError as e:
            return f"bad certificate request: {e}"
        ca = self.ca.ca_pem
        proof = tls_proof(self.join_token, nonce, msg.node_id, ca, cert) if self.join_token else ""
        return reply.model_copy(update=dict(tls_cert=cert, tls_ca=ca, tls_proof=proof))

    async def _serve(self, conn: WorkerConn) -> str:
        """Read and beat until one of them ends; returns why the connection ended."""
        reader = asyncio.create_task(self._read(conn))
        beater = asyncio.create_task(self._beat(conn))
        try:
            done, _ = await asyncio.wait((reader, beater), return_when=asyncio.FIRST_COMPLETED)
            return done.pop().result()  # a ProtocolError propagates to handle()
        finally:
            reader.cancel()
            beater.cancel()

    async def _read(self, conn: WorkerConn) -> str:
        while True:
            msg = await self._recv(conn.ws)
            if msg is None:
                return "socket closed"
            now = conn.last_seen = time.monotonic()
            if isinstance(msg, Heartbeat):
                await self._send(conn, HeartbeatAck(seq=msg.seq))
            elif isinstance(msg, HeartbeatAck):
                conn.pings.acked(msg.seq, now)
            elif isinstance(msg, Ready):
                self._on_ready(conn, msg)
            elif isinstance(msg, Failed):
                self._on_failed(conn, msg)
            elif isinstance(msg, Status):
                self._update(conn.node_id, mem_used_bytes=msg.mem_used_bytes, mem_free_bytes=msg.mem_free_bytes)
            else:
                raise ProtocolError(f"unexpected {msg.type} from a worker")
            self._update(conn.node_id, last_heartbeat=now, rtt_ms=conn.pings.rtt_ms)

    async def _beat(self, conn: WorkerConn) -> str:
        tick = min(self.heartbeat_interval, self.heartbeat_timeout / 5)
        last_sent = 0.0
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            silent = now - conn.last_seen
            if silent > self.heartbeat_timeout:
                return f"no heartbeat for {silent:.1f} s"
            if now - last_sent >= self.heartbeat_interval:
                last_sent = now
                if not await self._send(conn, Heartbeat(seq=conn.pings.sent(now), sent_at=now)):
                    return "send failed"

    def _on_ready(self, conn: WorkerConn, msg: Ready) -> None:
        a = conn.assigned
        if a is None or msg.plan_id != conn.plan_id or conn.state is not NodeState.LOADING:
            log.warning("ignored ready for plan %d from %s (current plan %s)", msg.plan_id, conn.node_id, conn.plan_id)
            return
        conn.state, conn.ready = NodeState.READY, msg
        conn.holding = Holding(**a.shard(), loads=msg.loads)
        self._update(
            conn.node_id, state=NodeState.READY, mem_used_bytes=msg.mem_used_bytes, mem_free_bytes=msg.mem_free_bytes
        )
        log.info(
            "worker %s ready with layers [%d, %d) of plan %d in %.1f s, %.2f GiB used",
            conn.node_id,
            a.start,
            a.end,
            msg.plan_id,
            msg.load_seconds,
            msg.mem_used_bytes / 2**30,
        )
        settle(conn.outcome, msg)
        self._notify(conn.node_id, "ready")

    def _on_failed(self, conn: WorkerConn, msg: Failed) -> None:
        if msg.plan_id != conn.plan_id or conn.state is not NodeState.LOADING:
            log.warning("ignored failed for plan %d from %s (current plan %s)", msg.plan_id, conn.node_id, conn.plan_id)
            return
        conn.state, conn.assigned, conn.holding = NodeState.JOINING, None, None
        self._update(conn.node_id, state=NodeState.JOINING, layer_start=0, layer_end=0)
        log.error("worker %s failed to load plan %d: %s", conn.node_id, msg.plan_id, msg.reason)
        settle(conn.outcome, error=LoadFailed(conn.node_id, f"worker {conn.node_id}: {msg.reason}"))
        self._notify(conn.node_id, "failed")

    def _drop(self, conn: WorkerConn, why: str) -> None:
        """The connection is over: if it was current, the node is LOST and on_change hears of it."""
        conn.closed = True
        settle(conn.outcome, error=WorkerLost(conn.node_id, f"worker {conn.node_id} lost: {why}"))
        if self._conns.get(conn.node_id) is not conn:
            return
        del self._conns[conn.node_id]
        conn.state = NodeState.LOST
        self._update(conn.node_id, state=NodeState.LOST)
        log.warning("worker %s (%s) lost: %s", conn.node_id, conn.peer, why)
        self._notify(conn.node_id, "lost")

    # ---- helpers ----
    def _start_janitor(self) -> None:
        if self._janitor is None or self._janitor.done():
            self._janitor = asyncio.get_running_loop().create_task(self._sweep(), name="control-janitor")

    async def _sweep(self) -> None:
        """Forget departed workers once they are older than the registry's TTL, even when
        nothing else happens on the channel (registrations prune too)."""
        while True:
            await asyncio.sleep(max(0.5, min(60.0, self.registry.departed_ttl / 4)))
            self.registry.prune(time.monotonic())

    def _update(self, node_id: str, **changes) -> None:
        try:
            self.registry.update(node_id, **changes)
        except KeyError:  # a departed row the registry already forgot: not worth the connection
            pass

    def _notify(self, node_id: str, event: str) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(node_id, event)
        except Exception:
            log.exception("on_change(%s, %s) failed", node_id, event)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _recv(self, ws: WebSocket) -> Message | None:
        frame = await ws.receive()
        if frame["type"] == "websocket.disconnect":
            return None
        raw = frame.get("text")
        return parse(raw if raw is not None else frame.get("bytes") or b"")

    async def _send(self, conn: WorkerConn, msg) -> bool:
        """False when the socket is gone or the worker stopped reading (a full TCP buffer)."""
        try:
            async with conn.send_lock:
                await asyncio.wait_for(conn.ws.send_text(dump(msg)), self.heartbeat_timeout)
            return True
        except Exception as e:  # closed socket, timeout: the reader or beater notices and drops it
            log.debug("send %s to %s failed: %r", msg.type, conn.node_id, e)
            return False

    async def _refuse(self, ws: WebSocket, reason: str, code: int) -> None:
        try:
            await asyncio.wait_for(ws.send_text(dump(Refused(reason=reason[:2048]))), self.handshake_timeout)
        except Exception:
            pass
        await self._close(ws, code, reason)

    @staticmethod
    async def _close(ws: WebSocket, code: int, reason: str = "") -> None:
        try:  # close reasons are limited to 123 bytes by the WebSocket spec
            await asyncio.wait_for(ws.close(code, reason.encode()[:120].decode(errors="ignore")), 5)
        except Exception:
            pass  # already closed
