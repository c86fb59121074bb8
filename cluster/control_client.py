"""WebSocket control channel, worker side: `ControlClient.run` connects to the master,
registers (proving the join token by HMAC, see `auth_digest`), answers heartbeats and runs
the master's assign/drain commands as a background task, so a shard that takes minutes to
load never stops the heartbeats. On any disconnect it retries forever with capped
exponential backoff, rotating through the master URLs (DNS is resolved on every connect).
When the master's challenge says it serves gRPC with TLS, the register carries the worker's
certificate request and `on_registered` gets the certificate the master signed (checked
against the join token when the worker has one)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from .control_messages import (
    CLOSE_TOO_BIG,
    MAX_MESSAGE_BYTES,
    Assign,
    Challenge,
    Drain,
    Failed,
    Heartbeat,
    HeartbeatAck,
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
from .heartbeat import PingTracker

log = logging.getLogger(__name__)
_HOSTNAME = re.compile(r"^[A-Za-z0-9_.-]{1,253}$")


def control_url(url: str) -> str:
    """http(s)://HOST:PORT[/prefix] → ws(s)://HOST:PORT[/prefix]/ws/worker; ws(s) URLs with a
    path are used as given; a bare HOST:PORT means http. ValueError (one line) for anything
    else: another scheme, no host, a bad port, a bare word."""
    want = f"master URL must be http(s)://HOST:PORT, got {url[:200]!r}"
    try:
        u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        port = u.port  # a bad or out-of-range port raises here, once, rather than on every retry
    except ValueError:
        raise ValueError(want) from None
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(u.scheme.lower())
    host = u.hostname or ""
    host_ok = _HOSTNAME.match(host) is not None or ":" in host  # a name, an IPv4 or a bracketed IPv6 address
    if scheme is None or not host_ok or port == 0 or ("://" not in url and port is None):  # a bare word is no master
        raise ValueError(want)
    path = u.path if scheme == u.scheme.lower() and u.path not in ("", "/") else u.path.rstrip("/") + "/ws/worker"
    return urllib.parse.urlunsplit((scheme, u.netloc, path, u.query, ""))


class ControlClient:
    """Worker side of /ws/worker. Invariant: at most one session (connection) at a time;
    commands (assign, drain) run one after another in arrival order, and a result is sent
    only on the session that issued the command: a restarted master reuses plan ids, so a
    late answer to the old master's plan must never reach the new one (the next register
    reports the finished load as `holding` instead)."""

    def __init__(
        self,
        master_urls: list[str],
        node_id: str,
        join_token: str | None,
        register_payload: Callable[[], dict],
        on_assign: Callable[[Assign], Awaitable[Ready | Failed]],
        on_drain: Callable[[str], Awaitable[None]],
        status_payload: Callable[[], dict] | None = None,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        handshake_timeout: float = 10.0,
        csr: str | None = None,
        on_registered: Callable[[Registered], Awaitable[None]] | None = None,
    ):
        """`csr`: the certificate request sent to a master that uses TLS (none: such a master
        cannot be joined). `on_registered` runs on each registration before any command is
        read (the worker takes up its certificate there); if it raises, the session ends."""
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
        self.csr, self.on_registered = csr, on_registered
        self.connected = asyncio.Event()  # set while registered with a master
        self.last_refusal: str | None = None
        self.master_url: str | None = None  # the URL of the current (or last) session
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session = 0  # generation of the current connection attempt
        self._registered_in = -1  # generation of the last session that got registered
        self._commands: asyncio.Queue[tuple[int, Assign | Drain]] = asyncio.Queue(maxsize=16)
        self._ws: ClientConnection | None = None  # set while registered
        self._last_seen = 0.0  # monotonic time of the last message from the master
        self._pings = PingTracker()  # our heartbeats to the master; restarted with each session

    @property
    def rtt_ms(self) -> float | None:
        """Round trip of the last acked heartbeat, in ms (kept across reconnects); None before any."""
        return self._pings.rtt_ms

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
            async with connect(
                url,
                max_size=MAX_MESSAGE_BYTES,
                ping_interval=None,
                compression=None,
                proxy=None,
                open_timeout=self.handshake_timeout,
                close_timeout=2,
            ) as ws:
                try:
                    await self._session_loop(ws, url, gen)
                except ProtocolError as e:
                    log.error("master %s sent a bad message: %s", url, e.reason)
                    await ws.close(e.close_code, e.reason[:120])
        except (OSError, TimeoutError, InvalidURI, InvalidHandshake) as e:
            log.warning("cannot reach master %s: %s", url, str(e) or type(e).__name__)
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
        csr = self.csr if challenge.tls else None
        if challenge.tls and csr is None:
            log.error("master %s serves gRPC with TLS and this client has no certificate request to send", url)
            return
        auth = auth_digest(self.join_token, challenge.nonce, self.node_id, csr) if self.join_token else ""
        try:
            reg = Register(node_id=self.node_id, auth=auth, csr=csr, **self.register_payload())
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
        self._check_tls(challenge, reply)
        if self.on_registered is not None:
            try:
                await self.on_registered(reply)
            except Exception as e:  # e.g. the stage server could not switch to TLS: try again later
                log.error("cannot take up the registration with master %s: %s", url, e)
                return
        self._registered_in, self.last_refusal = gen, None
        self._ws = ws
        self._pings.restart()
        self.connected.set()
        log.info(
            "registered as %s with master %s (heartbeat every %.1f s)", self.node_id, url, reply.heartbeat_interval
        )
        self._last_seen = time.monotonic()
        tasks = [
            asyncio.create_task(self._read(ws, url, gen)),
            asyncio.create_task(self._beat(ws, url, reply.heartbeat_interval, reply.heartbeat_timeout)),
            asyncio.create_task(self._stop.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()  # re-raise ProtocolError / ConnectionClosed for _attempt
        finally:
            for t in tasks:
                t.cancel()

    def _check_tls(self, challenge: Challenge, reply: Registered) -> None:
        if challenge.tls != (reply.tls_cert is not None):
            raise ProtocolError("registered does not match the challenge's tls")
        if reply.tls_cert is None or reply.tls_ca is None or self.join_token is None:
            return
        want = tls_proof(self.join_token, challenge.nonce, self.node_id, reply.tls_ca, reply.tls_cert)
        if not hmac.compare_digest(want, reply.tls_proof):  # not from a holder of the token
            raise ProtocolError("the certificates came without a valid join-token proof")

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
                self._pings.acked(msg.seq, now)
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
        last_sent, status_broken = 0.0, False
        tick = min(interval, timeout / 5)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - self._last_seen > timeout:
                log.warning("master %s silent for %.1f s; reconnecting", url, now - self._last_seen)
                return
            if now - last_sent < interval:
                continue
            last_sent = now
            await ws.send(dump(Heartbeat(seq=self._pings.sent(now), sent_at=now)))
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
