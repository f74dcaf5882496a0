"""The one check for every URL a request can make a plane reach: a `context_uri` and the HTTP
tools infer calls, and the callback URL execute posts a cell's sub-calls to.

An operator lists URL prefixes (`scheme://host[:port][/path]`). A URL is allowed when its scheme,
host and port equal a prefix's and its path is the prefix's path or below it at a segment
boundary. Nothing is compared as a raw string: the URL is parsed, and refused outright when it
carries userinfo, a dot-segment (`.`, `..`: plain or percent-encoded at any depth, with a
`;parameter`, or in full-width dots), an encoded `/` or `\\`, a backslash, whitespace or a
control character, a fragment, or a host in any but its plain form (trailing dot, numeric IPv4
other than dotted-quad, IPv6 zone).

A host that is a name must resolve only to public addresses, unless the prefix names a private
destination: an IP literal, `localhost`, or a cluster Service (`name.namespace.svc[...]`). The
request then goes to the address that was checked (`Target`), never to a second lookup, and is
never sent past a redirect. A prefix may give its port as `*` (any port of that host): for tests
and a machine of one's own, never needed in a cluster.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from functions.config import ConfigError
from functions.errors import Unprocessable

MAX_URL_CHARS = 4096
_DEFAULT_PORTS = {"http": 80, "https": 443}
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)(?P<path>[^?#]*)"
                  r"(?P<query>\?[^#]*)?(?P<fragment>#.*)?", re.S)  # fmt: skip
_PRINTABLE = re.compile(r"[!-~]+")  # ASCII without space and controls
_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")  # one label of a host name
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")
_ANY_PORT = -1
_DECODE_ROUNDS = 4
_RESOLVED_FOR_S = 10.0


class UrlRefused(Unprocessable):
    """A URL no prefix allows, or that is malformed: the message says what to send instead."""


@dataclass(frozen=True)
class Parsed:
    """A URL broken into the parts the check compares; `host` lowercased, IPv6 without [ ]."""

    scheme: str
    host: str
    port: int
    path: str
    query: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None  # the host, when a literal

    def authority(self) -> str:
        host = f"[{self.host}]" if isinstance(self.address, ipaddress.IPv6Address) else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


@dataclass(frozen=True)
class Prefix:
    text: str
    parsed: Parsed

    @property
    def names_private(self) -> bool:
        """The prefix names a private destination itself, so its addresses are not checked."""
        host = self.parsed.host
        service = host.split(".")[2:3] == ["svc"]  # name.namespace.svc[.cluster domain]
        return self.parsed.address is not None or host == "localhost" or service

    def covers(self, url: Parsed) -> bool:
        p = self.parsed
        if (url.scheme, url.host) != (p.scheme, p.host):
            return False
        if p.port != _ANY_PORT and url.port != p.port:
            return False
        if p.path.endswith("/"):
            return url.path.startswith(p.path)
        return url.path == p.path or url.path.startswith(p.path + "/")


@dataclass(frozen=True)
class Target:
    """Where to send a request for an allowed URL: the checked address, with the URL's host in
    the Host header and (https) as the TLS server name, so no second lookup can change it."""

    connect_url: str  # the URL with the checked address in place of its host
    headers: dict[str, str]
    extensions: dict[str, Any]

    def options(self) -> dict[str, Any]:
        """Keyword arguments for an httpx request method (`client.post(t.connect_url, ...)`)."""
        return {"headers": self.headers, "extensions": self.extensions, "follow_redirects": False}


def parse(url: str, what: str = "URL", any_port: bool = False) -> Parsed:
    """The parts of an http(s) URL; `UrlRefused` naming the first thing wrong with it.
    `any_port`: a prefix, whose port may be `*`."""
    if not isinstance(url, str) or not url:
        raise UrlRefused(f"{what} is empty")
    shown = url if len(url) <= 200 else url[:200] + "..."
    if len(url) > MAX_URL_CHARS:
        raise UrlRefused(f"{what} is over {MAX_URL_CHARS} characters")
    if not _PRINTABLE.fullmatch(url):
        raise UrlRefused(f"{what} {shown!r} has a space, a control or a non-ASCII character: "
                         "percent-encode them (and give a host name in its IDNA form)")  # fmt: skip
    if "\\" in url:
        raise UrlRefused(f"{what} {shown!r} has a backslash")
    m = _URL.fullmatch(url)
    if not m:
        raise UrlRefused(f"{what} {shown!r} is not an absolute http(s) URL")
    scheme = m["scheme"].lower()
    if scheme not in _DEFAULT_PORTS:
        raise UrlRefused(f"{what} {shown!r}: only http and https URLs are fetched")
    if m["fragment"] is not None:
        raise UrlRefused(f"{what} {shown!r} has a #fragment: leave it out")
    host, port_text, address = _authority(m["authority"], what, shown)
    port = _port(port_text, scheme, any_port, what, shown)
    path = m["path"] or "/"
    _check_path(path, what, shown)
    return Parsed(scheme, host, port, path, m["query"] or "", address)


def _authority(
    authority: str, what: str, shown: str
) -> tuple[str, str | None, ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
    if "@" in authority:
        raise UrlRefused(f"{what} {shown!r} has userinfo (a name before @): leave it out")
    if authority.startswith("["):
        end = authority.find("]")
        literal, rest = authority[1:end], authority[end + 1 :]
        if end < 0 or "%" in literal:
            raise UrlRefused(f"{what} {shown!r}: malformed IPv6 host (no zone ids)")
        try:
            address: Any = ipaddress.IPv6Address(literal)
        except ValueError:
            raise UrlRefused(f"{what} {shown!r}: {literal!r} is not an IPv6 address") from None
        host = address.compressed
        if rest and not rest.startswith(":"):
            raise UrlRefused(f"{what} {shown!r}: malformed host")
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text = authority.partition(":")
        port_text = port_text if colon else None
        host = host.lower()
        address = _host(host, what, shown)
    return host, port_text, address


def _host(host: str, what: str, shown: str) -> ipaddress.IPv4Address | None:
    if not host:
        raise UrlRefused(f"{what} {shown!r} has no host")
    if host.endswith("."):
        raise UrlRefused(f"{what} {shown!r}: write the host without its trailing dot")
    labels = host.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):  # no top-level domain is numeric: an IPv4 form
        try:
            return ipaddress.IPv4Address(host)
        except ValueError:
            raise UrlRefused(f"{what} {shown!r}: write an IPv4 host as four decimal numbers "
                             "(no decimal, octal, hex or shortened forms)") from None  # fmt: skip
    if len(host) > 253 or not all(_NAME.fullmatch(label) for label in labels):
        raise UrlRefused(f"{what} {shown!r}: {host!r} is not a host name")
    return None


def _port(text: str | None, scheme: str, any_port: bool, what: str, shown: str) -> int:
    if text is None:
        return _DEFAULT_PORTS[scheme]
    if text == "*" and any_port:
        return _ANY_PORT
    if not re.fullmatch(r"[1-9][0-9]{0,4}", text) or int(text) > 65535:
        raise UrlRefused(f"{what} {shown!r}: the port must be a number from 1 to 65535")
    return int(text)


def _check_path(path: str, what: str, shown: str) -> None:
    if not path.startswith("/"):
        raise UrlRefused(f"{what} {shown!r}: malformed path")
    for segment in path.split("/"):
        decoded = segment
        for _ in range(_DECODE_ROUNDS):
            try:
                once = unquote(decoded, errors="strict")
            except UnicodeDecodeError:
                raise UrlRefused(
                    f"{what} {shown!r} percent-encodes bytes that are not UTF-8"
                ) from None
            if once == decoded:
                break
            decoded = once
        else:
            raise UrlRefused(f"{what} {shown!r} is percent-encoded too many times")
        # "..;x" is ".." to servers that drop path parameters; a full-width dot is a dot once
        # a server normalizes Unicode
        bare = unicodedata.normalize("NFKC", decoded).split(";")[0]
        if bare in (".", ".."):
            raise UrlRefused(f"{what} {shown!r} has a dot-segment ({segment!r}) in its path")
        if "/" in decoded or "\\" in decoded:
            raise UrlRefused(f"{what} {shown!r} has an encoded / or \\ in its path")
        if any(ord(c) < 32 or ord(c) == 127 for c in decoded):
            raise UrlRefused(f"{what} {shown!r} has an encoded control character in its path")


def parse_prefixes(text: str | Iterable[str], setting: str) -> tuple[Prefix, ...]:
    """A setting's comma-separated prefixes; `ConfigError` naming the setting for a bad one."""
    items = text.split(",") if isinstance(text, str) else list(text)
    prefixes = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        try:
            parsed = parse(item, f"{setting}: prefix", any_port=True)
        except UrlRefused as e:
            raise ConfigError(e.message) from None
        if parsed.query:
            raise ConfigError(f"{setting}: prefix {item!r} has a query: give scheme://host/path")
        prefixes.append(Prefix(item, parsed))
    return tuple(prefixes)


@dataclass
class Allowlist:
    """The prefixes one setting allows; `check` a URL's form, `target` it with its address."""

    setting: str
    prefixes: tuple[Prefix, ...]
    _resolved: dict[tuple[str, int], tuple[float, str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def of(cls, setting: str, text: str | Iterable[str]) -> Allowlist:
        return cls(setting, parse_prefixes(text, setting))

    def __bool__(self) -> bool:
        return bool(self.prefixes)

    def check(self, url: str, what: str = "URL") -> tuple[Parsed, Prefix]:
        """The URL's parts and the prefix that allows it; `UrlRefused` otherwise (no lookup)."""
        parsed = parse(url, what)
        for prefix in self.prefixes:
            if prefix.covers(parsed):
                return parsed, prefix
        shown = url if len(url) <= 200 else url[:200] + "..."
        raise UrlRefused(f"{what} {shown} is not under {self.setting}")

    def target(self, url: str, what: str = "URL") -> Target:
        """Check `url`, resolve its host and check the addresses; where to send the request."""
        parsed, prefix = self.check(url, what)
        if parsed.address is not None:
            address = parsed.address
        else:
            address = ipaddress.ip_address(self._resolve(parsed, prefix, what))
        host = f"[{address.compressed}]" if address.version == 6 else str(address)
        connect = f"{parsed.scheme}://{host}:{parsed.port}{parsed.path}{parsed.query}"
        extensions = {"sni_hostname": parsed.host} if parsed.scheme == "https" else {}
        return Target(connect, {"Host": parsed.authority()}, extensions)

    def _resolve(self, parsed: Parsed, prefix: Prefix, what: str) -> str:
        key = (parsed.host, parsed.port)
        with self._lock:
            cached = self._resolved.get(key)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        try:
            infos = socket.getaddrinfo(parsed.host, parsed.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            raise UrlRefused(f"{what}: cannot resolve {parsed.host}: {e}") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise UrlRefused(f"{what}: {parsed.host} has no address")
        if not prefix.names_private:
            for text in addresses:
                if not is_public(ipaddress.ip_address(text)):
                    raise UrlRefused(
                        f"{what}: {parsed.host} resolves to {text}, a loopback, link-local or "
                        f"private address, which {self.setting} does not name"
                    )
        with self._lock:
            if len(self._resolved) > 1024:
                self._resolved.clear()
            self._resolved[key] = (time.monotonic() + _RESOLVED_FOR_S, addresses[0])
        return addresses[0]


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A global unicast address: not loopback, link-local, private, shared (100.64/10),
    multicast, reserved or unspecified, also when written as IPv4 inside IPv6."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return is_public(embedded)
    return address.is_global and not address.is_multicast
