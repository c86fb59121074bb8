"""Who may reach the control channel, and how much of it a stranger can hold.

- `exposure_error`: a master on a non-loopback address without a join token is refused at
  start-up (anyone who can reach it could join as a worker, be given the layers and read
  every prompt), unless the operator says --insecure.
- `PendingSockets`: the sockets that have not registered yet. Caps per address and in all;
  over a cap the *oldest* pending socket is shed, never the new one. A real worker answers
  the challenge within one round trip, so an idle flood, however large, only ever evicts
  itself, while a cap that turned newcomers away would let it lock real workers out.

Pure bookkeeping: no I/O; the ControlServer closes what gets shed."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1, localhost."""
    h = host.strip().lower().removeprefix("[").removesuffix("]")
    if h in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:  # a hostname or a wildcard such as "": not provably loopback
        return False


def exposure_error(host: str, join_token: str | None, insecure: bool) -> str | None:
    """Why a master must not start on `host` as configured (one line), or None."""
    if join_token or insecure or is_loopback(host):
        return None
    return (
        f"--host {host or '(all interfaces)'} lets other machines join as workers and read every prompt: "
        "set --join-token (or RINGLLM_JOIN_TOKEN), or pass --insecure on a network you fully trust"
    )


def exposure_warning(host: str, port: int) -> str:
    """The warning an --insecure master on a non-loopback address logs at start-up."""
    return (
        f"INSECURE: no --join-token on {host}: anyone who can reach port {port} can join as a worker, "
        "be given the model's layers and read every prompt and reply"
    )


def address_key(host: str) -> str:
    """What the per-address cap counts by: an IPv4 address, or an IPv6 /64 (one host's share)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(slots=True, eq=False)
class Pending:
    """One socket in its handshake (hashed by identity). `shed` is set when it must go."""

    host: str  # address_key() of the peer
    shed: asyncio.Event = field(default_factory=asyncio.Event)
    why: str = ""


class PendingSockets:
    """Invariant: `_live` holds the sockets still in their handshake, oldest first, at most
    `max_total` in all and `max_per_host` per address; a shed socket has left `_live` and
    has `shed` set. `shed_total` and `expired_total` count the sockets shed, and those closed
    for not registering in time, so far. One event loop only."""

    def __init__(self, max_total: int = 64, max_per_host: int = 8):
        if max_total < 1 or max_per_host < 1:
            raise ValueError("pending-connection caps must be >= 1")
        self.max_total = max_total
        self.max_per_host = min(max_per_host, max_total)
        self.shed_total = 0
        self.expired_total = 0
        self._live: dict[Pending, None] = {}  # an ordered set
        self._logged = (-1e9, 0)  # (when, closed() then): the flood warning is rate-limited

    def __len__(self) -> int:
        return len(self._live)

    def count(self, host: str) -> int:
        return sum(p.host == host for p in self._live)

    def admit(self, peer_host: str) -> Pending:
        """Track a new socket from `peer_host`, shedding the oldest one over a cap."""
        p = Pending(address_key(peer_host))
        same = [q for q in self._live if q.host == p.host]
        if len(same) >= self.max_per_host:
            self._shed(same[0], "too many pending connections from your address; try later")
        elif len(self._live) >= self.max_total:
            self._shed(next(iter(self._live)), "too many pending connections; try later")
        self._live[p] = None
        return p

    def done(self, p: Pending) -> None:
        """The socket registered, was refused, or closed: it no longer counts."""
        self._live.pop(p, None)

    def expired(self, p: Pending, timeout: float) -> None:
        """The socket did not register within `timeout` seconds (the caller closes it)."""
        self.done(p)
        self.expired_total += 1
        self._report(f"sockets must register within {timeout:.1f} s")

    def closed(self) -> int:
        """Sockets closed for the caps or the deadline, so far."""
        return self.shed_total + self.expired_total

    def _shed(self, p: Pending, why: str) -> None:
        del self._live[p]
        p.why = why
        p.shed.set()
        self.shed_total += 1
        self._report(f"caps: {self.max_per_host} pending per address, {self.max_total} in all")

    def _report(self, rule: str) -> None:
        now = time.monotonic()
        when, before = self._logged
        if now - when >= 10.0:  # a flood must not flood the log too: one line per 10 s at most
            log.warning("closed %d control connection(s) that had not registered (%s)", self.closed() - before, rule)
            self._logged = (now, self.closed())
