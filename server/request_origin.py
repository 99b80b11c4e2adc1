"""Who sent a request and where the server is reachable, without trusting what a client may forge.

- `client_key`: the identity the url image store shares its bytes by: a hash of the bearer token
  when the request carries one, else of the peer address. Behind a listed proxy
  (FLASHSTEP_TRUSTED_PROXIES) the peer is the rightmost X-Forwarded-For address not itself a
  listed proxy; from any other peer X-Forwarded-* headers are ignored. Tokens are not verified
  here, so a client can split itself over several tokens; the store still never evicts another
  client's image for it.
- `public_base_url`: the scheme://host[:port][/path] urls are built from: FLASHSTEP_PUBLIC_URL
  when set, else X-Forwarded-Proto/X-Forwarded-Host from a listed proxy, else the address the
  server's socket accepted the connection on. Never the Host header: a client that sets it could
  otherwise make the server hand out urls pointing anywhere (cache poisoning, phishing links).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable

from fastapi import Request

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# host or [v6]:port as X-Forwarded-Host may carry it; anything else is ignored.
_HOST_PATTERN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")
CLIENT_KEY_HEX = 24  # 96 bits of sha256: unique enough to tell clients apart, short in file names


def parse_networks(entries: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Addresses or CIDR networks, e.g. "10.0.0.0/8"; ValueError names the bad one."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"`trusted_proxies` entries must be IP addresses or networks but one is {entry!r}") from exc
    return tuple(networks)


class RequestOrigin:
    """The public url and the proxies to believe, from the settings; one per app."""

    def __init__(self, public_url: str | None = None, trusted_proxies: Iterable[str] = ()) -> None:
        self.public_url = public_url.rstrip("/") if public_url else None
        self.trusted = parse_networks(trusted_proxies)

    def is_trusted(self, address: str | None) -> bool:
        if not address or not self.trusted:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted)

    def peer(self, request: Request) -> str:
        """The client's address: the socket peer, or past listed proxies the X-Forwarded-For hop before them."""
        peer = request.client.host if request.client else ""
        if not self.is_trusted(peer):
            return peer
        forwarded = [hop.strip() for hop in ",".join(request.headers.getlist("x-forwarded-for")).split(",")]
        for hop in reversed([h for h in forwarded if h]):
            if not self.is_trusted(hop):
                return hop
        return peer

    def client_key(self, request: Request) -> str:
        """A lowercase hex digest naming the client (bearer token, else address); never the raw value."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            source = "token:" + token.strip()
        else:
            source = "addr:" + self.peer(request)
        return hashlib.sha256(source.encode()).hexdigest()[:CLIENT_KEY_HEX]

    def public_base_url(self, request: Request) -> str:
        """scheme://host[:port][/prefix] of the server as clients should reach it; no trailing slash."""
        if self.public_url:
            return self.public_url
        peer = request.client.host if request.client else None
        if self.is_trusted(peer):
            proto = _last(request.headers.get("x-forwarded-proto")).lower()
            host = _last(request.headers.get("x-forwarded-host"))
            if proto in ("http", "https") and _HOST_PATTERN.fullmatch(host):
                return f"{proto}://{host}"
        server = request.scope.get("server")  # the local socket's (address, port) as uvicorn accepted it
        scheme = request.scope.get("scheme", "http")
        if not server:
            raise RuntimeError("no public url: set FLASHSTEP_PUBLIC_URL (the server has no socket address)")
        host, port = server[0], server[1]
        if ":" in host:
            host = f"[{host}]"
        default_port = {"http": 80, "https": 443}.get(scheme)
        return f"{scheme}://{host}" if port in (None, default_port) else f"{scheme}://{host}:{port}"

    def url_for(self, request: Request, name: str, **params: str) -> str:
        """The absolute url of route `name` under `public_base_url` (the app's root_path included)."""
        path = request.app.url_path_for(name, **params)
        root = request.scope.get("root_path", "") if not self.public_url else ""
        return self.public_base_url(request) + root.rstrip("/") + str(path)


def _last(value: str | None) -> str:
    """The last of a comma-separated forwarded header's values: the one the trusted proxy itself set
    (a proxy that appends leaves whatever the client sent in front of it)."""
    return (value or "").split(",")[-1].strip()
