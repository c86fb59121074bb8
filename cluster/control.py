"""WebSocket control channel: workers register with the master, get layer ranges, stay alive.

Master side: `ControlServer.handle` is mounted at /ws/worker. It challenges each connection
with a nonce (a worker proves it knows the join token by an HMAC over nonce + node id, so
the token never crosses the wire), registers it in the NodeRegistry, exchanges heartbeats
both ways and marks it LOST when it goes silent or its socket closes.

Worker side: `ControlClient.run` connects, registers, answers heartbeats and runs the
master's assign/drain commands as a background task, so a shard that takes minutes to
load never stops the heartbeats. On any disconnect it retries forever with capped
exponential backoff, rotating through the master URLs (DNS is resolved on every connect).

Message schemas and size limits live in control_messages.py; nothing here touches a
peer's bytes before `parse()` has validated them."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pydantic import ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from .control_messages import (MAX_MESSAGE_BYTES, Assign, Capacity, Challenge, Drain, Failed, Heartbeat,
                               HeartbeatAck, Holding, Message, ProtocolError, Ready, Refused, Register,
                               Registered, Status, dump, parse)
from .registry import NodeInfo, NodeRegistry, NodeState

log = logging.getLogger(__name__)

CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_TRY_LATER = 1008, 1009, 1013
_MAX_PINGS = 32  # unanswered heartbeats remembered for RTT; older ones are forgotten


def auth_digest(join_token: str, nonce: str, node_id: str) -> str:
    """What a worker sends instead of the token: HMAC-SHA256(token, nonce + node_id), hex."""
    return hmac.new(join_token.encode(), (nonce + node_id).encode(), hashlib.sha256).hexdigest()


def control_url(url: str) -> str:
    """http(s)://HOST:PORT[/prefix] → ws(s)://HOST:PORT[/prefix]/ws/worker; ws(s) URLs with a
    path are used as given; a bare HOST:PORT means http."""
    u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(u.scheme.lower())
    if scheme is None or not u.hostname:
        raise ValueError(f"master URL must be http(s)://HOST:PORT, got {url!r}")
    path = u.path if scheme == u.scheme.lower() and u.path not in ("", "/") else u.path.rstrip("/") + "/ws/worker"
    return urllib.parse.urlunsplit((scheme, u.netloc, path, u.query, ""))


class ControlError(RuntimeError):
    """A worker could not do what the master asked. `node_id` names it."""

    def __init__(self, node_id: str, message: str):
        super().__init__(message)
        self.node_id = node_id


class WorkerLost(ControlError):
    """The worker disconnected, went silent, or was drained before answering."""


class LoadFailed(ControlError):
    """The worker answered `failed` to an assign."""


class LoadTimeout(ControlError):
    """The worker did not report ready within the caller's timeout (it may still be loading)."""


@dataclass(slots=True, eq=False)
class WorkerConn:
    """One registered worker connection. Invariant: while it is the current connection for
    its node_id, `state` equals the state of that node in the registry; `closed` is set once,
    when the socket is gone, and a closed connection never becomes current again."""

    node_id: str
    grpc_address: str
    capacity: Capacity
    holding: Holding | None  # what the worker held when it registered; updated when it reports ready
    peer: str
    ws: WebSocket = field(repr=False)
    last_seen: float  # time.monotonic() of the last message from the worker
    state: NodeState = NodeState.JOINING
    rtt_ms: float | None = None
    plan_id: int | None = None  # the assign being loaded or served
    assigned: Assign | None = None
    ready: Ready | None = None
    status: Status | None = None
    closed: bool = False
    outcome: asyncio.Future | None = field(default=None, repr=False)  # Ready, or an exception, for plan_id
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    pings: dict[int, float] = field(default_factory=dict, repr=False)
    seq: int = 0
    # The master address this worker's control connection reached: an address the worker can
    # route to, so the ring's last stage can send results back to it (see --advertise-host).
    master_host: str | None = None


def _settle(fut: asyncio.Future | None, result: Ready | None = None, error: Exception | None = None) -> None:
    if fut is None or fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class ControlServer:
    """Master side of /ws/worker. Invariant: `_conns` holds exactly the live, registered
    connections, one per node_id, in join order; a node id is never served twice at once.
    Not thread-safe: call its methods on the event loop that runs handle()."""

    def __init__(self, registry: NodeRegistry, join_token: str | None, heartbeat_interval: float = 1.0,
                 heartbeat_timeout: float = 5.0, loading_timeout: float = 600.0, model_name: str = "",
                 handshake_timeout: float = 10.0, max_connections: int = 256):
        if not 0 < heartbeat_interval < heartbeat_timeout:
            raise ValueError("need 0 < heartbeat_interval < heartbeat_timeout")
        self.registry = registry
        self.join_token = join_token or None
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.loading_timeout = max(loading_timeout, heartbeat_timeout)
        self.model_name = model_name  # shown for workers that hold nothing yet
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        # Called as on_change(node_id, event), event in {"registered", "ready", "failed", "lost"}.
        self.on_change: Callable[[str, str], None] | None = None
        self._conns: dict[str, WorkerConn] = {}
        self._open = 0  # sockets accepted, registered or not (the cap counts both)

    # ---- public API for the lead ----
    def workers(self) -> list[WorkerConn]:
        return list(self._conns.values())

    def _conn(self, node_id: str) -> WorkerConn:
        conn = self._conns.get(node_id)
        if conn is None:
            raise WorkerLost(node_id, f"worker {node_id} is not connected")
        return conn

    async def assign(self, node_id: str, msg: Assign) -> None:
        conn = self._conn(node_id)
        _settle(conn.outcome, error=WorkerLost(node_id, f"plan {conn.plan_id} superseded by plan {msg.plan_id}"))
        conn.outcome = asyncio.get_running_loop().create_future()
        conn.outcome.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved" noise
        conn.plan_id, conn.assigned, conn.ready, conn.state = msg.plan_id, msg, None, NodeState.LOADING
        self._update(node_id, state=NodeState.LOADING, model=msg.model, layer_start=msg.start, layer_end=msg.end)
        log.info("assigning plan %d to %s: %s layers [%d, %d), next hop %s",
                 msg.plan_id, node_id, msg.model, msg.start, msg.end, msg.next_hop or "master")
        if not await self._send(conn, msg):
            raise WorkerLost(node_id, f"could not send assign to {node_id}")

    async def wait_ready(self, node_id: str, plan_id: int, timeout: float) -> Ready:
        conn = self._conn(node_id)
        if conn.plan_id != plan_id or conn.outcome is None:
            raise ControlError(node_id, f"worker {node_id} has no plan {plan_id} (current: {conn.plan_id})")
        try:
            return await asyncio.wait_for(asyncio.shield(conn.outcome), timeout)
        except TimeoutError:
            raise LoadTimeout(node_id, f"worker {node_id} did not report ready for plan {plan_id} "
                                       f"within {timeout:.0f} s") from None

    async def drain(self, node_id: str, reason: str) -> None:
        conn = self._conn(node_id)
        _settle(conn.outcome, error=WorkerLost(node_id, f"worker {node_id} drained: {reason}"))
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
        self._open += 1
        try:
            await ws.accept()
            if self._open > self.max_connections:
                log.warning("refused control connection from %s: %d connections open", peer, self._open - 1)
                await self._refuse(ws, "too many connections", CLOSE_TRY_LATER)
                return
            conn = await self._handshake(ws, peer)
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
            self._open -= 1
            if conn is not None:
                self._drop(conn, why)
            await self._close(ws, 1000)

    async def _handshake(self, ws: WebSocket, peer: str) -> WorkerConn | None:
        nonce = secrets.token_hex(32)
        await ws.send_text(dump(Challenge(nonce=nonce)))
        try:
            msg = await asyncio.wait_for(self._recv(ws), self.handshake_timeout)
        except TimeoutError:
            log.warning("refused %s: no register within %.0f s", peer, self.handshake_timeout)
            await self._refuse(ws, "no register in time", CLOSE_POLICY)
            return None
        if msg is None:
            return None
        if not isinstance(msg, Register):
            raise ProtocolError(f"expected register, got {msg.type}")
        if self.join_token is not None:
            bad = "no token given" if not msg.auth else (
                None if hmac.compare_digest(auth_digest(self.join_token, nonce, msg.node_id), msg.auth)
                else "wrong token")
            if bad:
                log.warning("refused worker %s from %s: bad join token (%s)", msg.node_id, peer, bad)
                await self._refuse(ws, "bad join token", CLOSE_POLICY)
                return None
        now = time.monotonic()
        old = self._conns.get(msg.node_id)
        if old is not None and not old.closed and now - old.last_seen <= self._limit(old):
            log.warning("refused worker %s from %s: already connected from %s", msg.node_id, peer, old.peer)
            await self._refuse(ws, f"node id {msg.node_id} is already connected", CLOSE_POLICY)
            return None
        if old is not None:  # its socket is dead or silent: the new connection replaces it
            self._drop(old, "replaced by a new connection")
            asyncio.create_task(self._close(old.ws, 1000))
        conn = WorkerConn(node_id=msg.node_id, grpc_address=msg.grpc_address, capacity=msg.capacity,
                          holding=msg.holding, peer=peer, ws=ws, last_seen=now,
                          master_host=(ws.scope.get("server") or (None,))[0])
        h, cap = msg.holding, msg.capacity
        self._conns[msg.node_id] = conn
        self.registry.add(NodeInfo(
            node_id=msg.node_id, address=msg.grpc_address, backend="torch", device=cap.device,
            model=h.model if h else self.model_name, layer_start=h.start if h else 0, layer_end=h.end if h else 0,
            mem_used_bytes=cap.total_bytes - cap.free_bytes, mem_free_bytes=cap.free_bytes,
            state=NodeState.JOINING, last_heartbeat=now))
        await self._send(conn, Registered(node_id=msg.node_id, heartbeat_interval=self.heartbeat_interval,
                                          heartbeat_timeout=self.heartbeat_timeout))
        log.info("worker %s registered from %s: grpc %s, %s, %.2f GiB free, %.1f GFLOP/s, holding %s",
                 msg.node_id, peer, msg.grpc_address, cap.device, cap.free_bytes / 2**30, cap.matmul_gflops,
                 f"{h.model} [{h.start}, {h.end})" if h else "nothing")
        self._notify(msg.node_id, "registered")
        return conn

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
                sent = conn.pings.pop(msg.seq, None)
                if sent is not None:
                    conn.rtt_ms = (now - sent) * 1000
            elif isinstance(msg, Ready):
                self._on_ready(conn, msg)
            elif isinstance(msg, Failed):
                self._on_failed(conn, msg)
            elif isinstance(msg, Status):
                conn.status = msg
                self._update(conn.node_id, mem_used_bytes=msg.mem_used_bytes, mem_free_bytes=msg.mem_free_bytes)
            else:
                raise ProtocolError(f"unexpected {msg.type} from a worker")
            self._update(conn.node_id, last_heartbeat=now, rtt_ms=conn.rtt_ms)

    async def _beat(self, conn: WorkerConn) -> str:
        tick = min(self.heartbeat_interval, self.heartbeat_timeout / 5)
        last_sent = 0.0
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            silent = now - conn.last_seen
            if silent > self._limit(conn):
                return f"no heartbeat for {silent:.1f} s"
            if now - last_sent >= self.heartbeat_interval:
                conn.seq += 1
                conn.pings[conn.seq] = last_sent = now
                if len(conn.pings) > _MAX_PINGS:
                    del conn.pings[min(conn.pings)]
                if not await self._send(conn, Heartbeat(seq=conn.seq, sent_at=now)):
                    return "send failed"

    def _on_ready(self, conn: WorkerConn, msg: Ready) -> None:
        a = conn.assigned
        if a is None or msg.plan_id != conn.plan_id or conn.state is not NodeState.LOADING:
            log.warning("ignored ready for plan %d from %s (current plan %s)", msg.plan_id, conn.node_id, conn.plan_id)
            return
        conn.state, conn.ready = NodeState.READY, msg
        conn.holding = Holding(model=a.model, start=a.start, end=a.end, num_layers=a.num_layers,
                               num_blocks=a.num_blocks, block_size=a.block_size, dtype=a.dtype, loads=msg.loads)
        self._update(conn.node_id, state=NodeState.READY, mem_used_bytes=msg.mem_used_bytes,
                     mem_free_bytes=msg.mem_free_bytes)
        log.info("worker %s ready with layers [%d, %d) of plan %d in %.1f s, %.2f GiB used",
                 conn.node_id, a.start, a.end, msg.plan_id, msg.load_seconds, msg.mem_used_bytes / 2**30)
        _settle(conn.outcome, msg)
        self._notify(conn.node_id, "ready")

    def _on_failed(self, conn: WorkerConn, msg: Failed) -> None:
        if msg.plan_id != conn.plan_id or conn.state is not NodeState.LOADING:
            log.warning("ignored failed for plan %d from %s (current plan %s)", msg.plan_id, conn.node_id, conn.plan_id)
            return
        conn.state, conn.assigned, conn.holding = NodeState.JOINING, None, None
        self._update(conn.node_id, state=NodeState.JOINING, layer_start=0, layer_end=0)
        log.error("worker %s failed to load plan %d: %s", conn.node_id, msg.plan_id, msg.reason)
        _settle(conn.outcome, error=LoadFailed(conn.node_id, f"worker {conn.node_id}: {msg.reason}"))
        self._notify(conn.node_id, "failed")

    def _drop(self, conn: WorkerConn, why: str) -> None:
        """The connection is over: if it was current, the node is LOST and the lead hears of it."""
        conn.closed = True
        _settle(conn.outcome, error=WorkerLost(conn.node_id, f"worker {conn.node_id} lost: {why}"))
        if self._conns.get(conn.node_id) is not conn:
            return
        del self._conns[conn.node_id]
        conn.state = NodeState.LOST
        self._update(conn.node_id, state=NodeState.LOST)
        log.warning("worker %s (%s) lost: %s", conn.node_id, conn.peer, why)
        self._notify(conn.node_id, "lost")

    # ---- helpers ----
    def _limit(self, conn: WorkerConn) -> float:
        # A loading worker normally keeps acking (it loads in a thread), but a loader that holds
        # the GIL for long stretches may not: give it loading_timeout before calling it dead.
        return self.loading_timeout if conn.state is NodeState.LOADING else self.heartbeat_timeout

    def _update(self, node_id: str, **changes) -> None:
        try:
            self.registry.update(node_id, **changes)
        except KeyError:  # the lead removed the node; the connection's state is all we keep
            pass

    def _notify(self, node_id: str, event: str) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(node_id, event)
        except Exception:
            log.exception("on_change(%s, %s) failed", node_id, event)

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


class ControlClient:
    """Worker side of /ws/worker. Invariant: at most one session (connection) at a time;
    commands (assign, drain) run one after another in arrival order, and a result is sent
    only on the session that issued the command: a restarted master reuses plan ids, so a
    late answer to the old master's plan must never reach the new one (the next register
    reports the finished load as `holding` instead)."""

    def __init__(self, master_urls: list[str], node_id: str, join_token: str | None,
                 register_payload: Callable[[], dict],
                 on_assign: Callable[[Assign], Awaitable[Ready | Failed]],
                 on_drain: Callable[[str], Awaitable[None]],
                 status_payload: Callable[[], dict] | None = None,
                 backoff_initial: float = 1.0, backoff_max: float = 30.0, handshake_timeout: float = 10.0):
        if not master_urls:
            raise ValueError("at least one master URL is needed")
        if not 0 < backoff_initial <= backoff_max:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        self.urls = [control_url(u) for u in master_urls]
        self.node_id = node_id
        self.join_token = join_token or None
        self.register_payload, self.status_payload = register_payload, status_payload
        self.on_assign, self.on_drain = on_assign, on_drain
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.handshake_timeout = handshake_timeout
        self.connected = asyncio.Event()  # set while registered with a master
        self.last_refusal: str | None = None
        self.master_url: str | None = None  # the URL of the current (or last) session
        self.rtt_ms: float | None = None
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session = 0  # generation of the current connection attempt
        self._registered_in = -1  # generation of the last session that got registered
        self._commands: asyncio.Queue[tuple[int, Assign | Drain]] = asyncio.Queue(maxsize=16)
        self._ws: ClientConnection | None = None  # set while registered
        self._last_seen = 0.0  # monotonic time of the last message from the master
        self._pings: dict[int, float] = {}  # heartbeat seq -> monotonic send time

    def stop(self) -> None:
        """Close the session and make run() return; safe from any thread."""
        if self._loop is None:
            self._stop.set()
        else:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        commands = asyncio.create_task(self._run_commands())
        failures, first = 0, 0
        try:
            while not self._stop.is_set():
                registered = False
                for i in range(len(self.urls)):  # one round: every URL once, no wait in between
                    url = self.urls[(first + i) % len(self.urls)]
                    registered = await self._attempt(url)
                    if registered or self._stop.is_set():
                        first = (first + i) % len(self.urls)  # start the next round where we last got in
                        break
                if self._stop.is_set():
                    break
                failures = 0 if registered else min(failures + 1, 32)
                delay = self.backoff_initial * 2 ** max(failures - 1, 0)
                # Jitter, so the workers of a restarted master don't all reconnect in lockstep.
                delay = min(self.backoff_max, delay * random.uniform(0.8, 1.2))
                log.info("reconnecting to the master in %.2f s", delay)
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                except TimeoutError:
                    pass
        finally:
            commands.cancel()
            self.connected.clear()

    async def _attempt(self, url: str) -> bool:
        """One connection: handshake, then serve until it ends. True if it got registered."""
        self._session += 1
        gen = self._session
        self.master_url = url
        try:
            async with connect(url, max_size=MAX_MESSAGE_BYTES, ping_interval=None, compression=None,
                               proxy=None, open_timeout=self.handshake_timeout, close_timeout=2) as ws:
                try:
                    await self._session_loop(ws, url, gen)
                except ProtocolError as e:
                    log.error("master %s sent a bad message: %s", url, e.reason)
                    await ws.close(e.close_code, e.reason[:120])
        except (OSError, TimeoutError, InvalidURI, InvalidHandshake) as e:
            log.warning("cannot reach master %s: %s", url, e or type(e).__name__)
        except ConnectionClosed as e:
            if e.sent is not None and e.sent.code == CLOSE_TOO_BIG:  # websockets enforced max_size for us
                log.error("master %s sent a message over %d bytes; reconnecting", url, MAX_MESSAGE_BYTES)
            else:
                log.warning("master %s closed the connection: %s", url, e)
        finally:
            self.connected.clear()
            self._ws = None
            self._session += 1  # commands of this session are void from here on
        return self._registered_in == gen

    async def _session_loop(self, ws: ClientConnection, url: str, gen: int) -> None:
        challenge = parse(await asyncio.wait_for(ws.recv(), self.handshake_timeout))
        if not isinstance(challenge, Challenge):
            raise ProtocolError(f"expected challenge, got {challenge.type}")
        auth = auth_digest(self.join_token, challenge.nonce, self.node_id) if self.join_token else ""
        try:
            reg = Register(node_id=self.node_id, auth=auth, **self.register_payload())
        except (ValidationError, TypeError) as e:  # our own bug, not the master's: say so and retry later
            log.error("cannot build register for %s: %s", self.node_id, e)
            return
        await ws.send(dump(reg))
        reply = parse(await asyncio.wait_for(ws.recv(), self.handshake_timeout))
        if isinstance(reply, Refused):
            self._refused(url, reply.reason)
            return
        if not isinstance(reply, Registered):
            raise ProtocolError(f"expected registered, got {reply.type}")
        self._registered_in, self.last_refusal = gen, None
        self._ws, self._pings = ws, {}
        self.connected.set()
        log.info("registered as %s with master %s (heartbeat every %.1f s)", self.node_id, url,
                 reply.heartbeat_interval)
        self._last_seen = time.monotonic()
        tasks = [asyncio.create_task(self._read(ws, url, gen)),
                 asyncio.create_task(self._beat(ws, url, reply.heartbeat_interval, reply.heartbeat_timeout)),
                 asyncio.create_task(self._stop.wait())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()  # re-raise ProtocolError / ConnectionClosed for _attempt
        finally:
            for t in tasks:
                t.cancel()

    def _refused(self, url: str, reason: str) -> None:
        self.last_refusal = reason
        hint = " (this worker has no --join-token)" if reason == "bad join token" and not self.join_token else ""
        log.error("master %s refused %s: %s%s", url, self.node_id, reason, hint)

    async def _read(self, ws: ClientConnection, url: str, gen: int) -> None:
        async for raw in ws:
            msg = parse(raw)
            self._last_seen = now = time.monotonic()
            if isinstance(msg, Heartbeat):
                await ws.send(dump(HeartbeatAck(seq=msg.seq)))
            elif isinstance(msg, HeartbeatAck):
                sent = self._pings.pop(msg.seq, None)
                if sent is not None:
                    self.rtt_ms = (now - sent) * 1000
            elif isinstance(msg, (Assign, Drain)):
                try:
                    self._commands.put_nowait((gen, msg))
                except asyncio.QueueFull:
                    raise ProtocolError("too many pending commands") from None
            elif isinstance(msg, Refused):
                self._refused(url, msg.reason)
                return
            else:
                raise ProtocolError(f"unexpected {msg.type} from the master")

    async def _beat(self, ws: ClientConnection, url: str, interval: float, timeout: float) -> None:
        seq, last_sent, status_broken = 0, 0.0, False
        tick = min(interval, timeout / 5)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - self._last_seen > timeout:
                log.warning("master %s silent for %.1f s; reconnecting", url, now - self._last_seen)
                return
            if now - last_sent < interval:
                continue
            seq, last_sent = seq + 1, now
            self._pings[seq] = now
            if len(self._pings) > _MAX_PINGS:
                del self._pings[min(self._pings)]
            await ws.send(dump(Heartbeat(seq=seq, sent_at=now)))
            if self.status_payload is not None and not status_broken:
                try:
                    status = Status(**self.status_payload())
                except Exception as e:  # a bad status must not cost the connection; say it once
                    log.error("status_payload failed, not sending status this session: %s", e)
                    status_broken = True
                    continue
                await ws.send(dump(status))

    async def _run_commands(self) -> None:
        while True:
            gen, cmd = await self._commands.get()
            if gen != self._session:
                log.info("dropped %s from a closed session", cmd.type)
                continue
            if isinstance(cmd, Drain):
                log.info("master drained %s: %s", self.node_id, cmd.reason)
                try:
                    await self.on_drain(cmd.reason)
                except Exception:
                    log.exception("on_drain failed")
                continue
            log.info("loading plan %d: %s layers [%d, %d)", cmd.plan_id, cmd.model, cmd.start, cmd.end)
            try:
                result = await self.on_assign(cmd)
                if not isinstance(result, (Ready, Failed)) or result.plan_id != cmd.plan_id:
                    raise TypeError(f"on_assign returned {result!r}, not Ready/Failed for plan {cmd.plan_id}")
            except Exception as e:
                log.exception("loading plan %d failed", cmd.plan_id)
                result = Failed(plan_id=cmd.plan_id, reason=(str(e) or type(e).__name__)[:2048])
            ws = self._ws if gen == self._session else None
            if ws is None:
                log.info("plan %d finished after its session closed; the next register reports it", cmd.plan_id)
                continue
            try:
                await ws.send(dump(result))
            except ConnectionClosed:
                log.info("plan %d finished but the connection closed first", cmd.plan_id)
