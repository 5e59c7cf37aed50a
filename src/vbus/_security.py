"""CURVE security for network endpoints: keys, key files, and who may connect.

In-process traffic never goes through a security handshake (ZeroMQ's inproc transport has
none), so it needs no keys and pays nothing. Every tcp:// and ipc:// endpoint of a broker
with a keypair speaks CURVE, and the broker's service thread answers ZeroMQ's authentication
(ZAP) requests: only the public keys in ``authorized`` get in.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import TypeAlias

import msgspec
import zmq
from zmq.utils.z85 import decode as z85_decode
from zmq.utils.z85 import encode as z85_encode

from ._errors import SecurityError as SecurityError  # raised here; re-exported

log = logging.getLogger("vbus.security")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = "vbus"
_Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_KEY_LINE = re.compile(r'^\s*(public|secret)-key\s*=\s*"([^"]*)"\s*$', re.M)



class Keypair(msgspec.Struct, frozen=True):
    """A CURVE keypair as Z85 text (40 characters each). Keep ``secret`` secret."""

    public: str
    secret: str

    def __repr__(self) -> str:
        return f"Keypair(public={self.public!r}, secret=<hidden>)"


def generate_keypair() -> Keypair:
    """A new random CURVE keypair."""
    if not zmq.has("curve"):
        raise SecurityError("this libzmq was built without CURVE support")
    public, secret = zmq.curve_keypair()
    return Keypair(public.decode("ascii"), secret.decode("ascii"))


def check_key(key: str | bytes, what: str = "key") -> str:
    """``key`` as Z85 text, or SecurityError saying what is wrong with it."""
    text = key.decode("ascii", "replace") if isinstance(key, bytes) else key
    if not isinstance(text, str) or _Z85_KEY.fullmatch(text) is None:
        raise SecurityError(f"{what} is not a 40-character Z85 CURVE key: {str(key)[:12]!r}...")
    try:
        z85_decode(text)  # some 40-character strings are not 32 bytes of Z85
    except (ValueError, struct.error):
        raise SecurityError(f"{what} is not a valid Z85 CURVE key: {text[:12]!r}...") from None
    return text


def _check_keypair(keypair: object) -> Keypair:
    if not isinstance(keypair, Keypair):
        raise SecurityError(f"keypair must be a vbus.Keypair, not {type(keypair).__name__}")
    check_key(keypair.public, "keypair.public")
    check_key(keypair.secret, "keypair.secret")
    return keypair


# -- key files (the ZPL format of czmq and pyzmq certificates) ---------------------------------
def write_keypair(name: str | os.PathLike[str], keypair: Keypair | None = None) -> Keypair:
    """Write ``NAME.key`` (public and secret, mode 0600) and ``NAME.key.pub`` (public only)."""
    keypair = keypair or generate_keypair()
    secret_path = Path(f"{os.fspath(name)}.key")
    public_path = Path(f"{os.fspath(name)}.key.pub")
    header = "#   vbus CURVE key. {}\nmetadata\ncurve\n"
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(header.format(f"SECRET: keep it; share {public_path.name} instead."))
        f.write(f'    public-key = "{keypair.public}"\n    secret-key = "{keypair.secret}"\n')
    os.chmod(secret_path, 0o600)  # also when the file existed with a wider mode
    public_path.write_text(
        header.format("Public: give it to the peers that must trust this key.")
        + f'    public-key = "{keypair.public}"\n'
    )
    return keypair


def _read_keys(path: str | os.PathLike[str]) -> dict[str, str]:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecurityError(f"cannot read key file {os.fspath(path)!r}: {exc}") from None
    keys = {kind: value for kind, value in _KEY_LINE.findall(text)}
    if "public" not in keys:
        raise SecurityError(f"{os.fspath(path)!r} holds no public-key")
    return keys


def load_keypair(path: str | os.PathLike[str]) -> Keypair:
    """The keypair in a secret key file (``NAME.key``)."""
    keys = _read_keys(path)
    if "secret" not in keys:
        raise SecurityError(f"{os.fspath(path)!r} holds no secret-key (is it the .pub file?)")
    return Keypair(check_key(keys["public"], f"public key in {os.fspath(path)!r}"),
                   check_key(keys["secret"], f"secret key in {os.fspath(path)!r}"))


def load_public_key(path: str | os.PathLike[str]) -> str:
    """The public key in a key file (``NAME.key.pub`` or ``NAME.key``)."""
    return check_key(_read_keys(path)["public"], f"public key in {os.fspath(path)!r}")


Authorized: TypeAlias = "str | os.PathLike[str] | Iterable[str]"


class Authorizer:
    """The set of client public keys allowed in: a list, or a directory of ``*.pub`` files
    that is read again whenever its contents change (new keys work for new connections)."""

    def __init__(self, authorized: Authorized) -> None:
        self._directory: Path | None = None
        self._signature: tuple[tuple[str, int], ...] = ()
        self._keys: frozenset[bytes] = frozenset()
        if isinstance(authorized, (str, os.PathLike)):
            self._directory = Path(authorized)
            if not self._directory.is_dir():
                raise SecurityError(f"authorized key directory {os.fspath(authorized)!r} "
                                    "does not exist")
            self._reload()
        else:
            keys = [check_key(k, "authorized key") for k in authorized]
            self._keys = frozenset(z85_decode(k) for k in keys)

    def _reload(self) -> None:
        assert self._directory is not None
        try:
            files = sorted(p for p in self._directory.glob("*.pub") if p.is_file())
            signature = tuple((p.name, p.stat().st_mtime_ns) for p in files)
        except OSError as exc:
            log.warning("cannot read authorized key directory %s: %s", self._directory, exc)
            return
        if signature == self._signature:
            return
        keys = set()
        for p in files:
            try:
                keys.add(z85_decode(load_public_key(p)))
            except SecurityError as exc:
                log.warning("ignoring %s: %s", p, exc)
        self._signature, self._keys = signature, frozenset(keys)
        log.info("authorized keys: %d from %s", len(keys), self._directory)

    def allows(self, public_key: bytes) -> bool:
        if self._directory is not None:
            self._reload()
        return public_key in self._keys


class ServerSecurity:
    """A broker's keypair and authorizer; applied to its two sockets before they bind."""

    def __init__(self, keypair: Keypair, authorized: Authorized) -> None:
        self.keypair = _check_keypair(keypair)
        self.authorizer = Authorizer(authorized)

    def apply(self, sock: zmq.Socket[bytes]) -> None:
        sock.curve_server = True
        sock.curve_secretkey = self.keypair.secret.encode("ascii")
        sock.curve_publickey = self.keypair.public.encode("ascii")
        sock.zap_domain = ZAP_DOMAIN.encode()


class ClientSecurity:
    """A client's keypair and the broker's public key; applied to every socket it connects."""

    def __init__(self, keypair: Keypair, server_key: str | bytes) -> None:
        self.keypair = _check_keypair(keypair)
        self.server_key = check_key(server_key, "server_key")

    def apply(self, sock: zmq.Socket[bytes]) -> None:
        sock.curve_serverkey = self.server_key.encode("ascii")
        sock.curve_publickey = self.keypair.public.encode("ascii")
        sock.curve_secretkey = self.keypair.secret.encode("ascii")


def client_security(keypair: Keypair | None, server_key: str | bytes | None
                    ) -> ClientSecurity | None:
    if keypair is None and server_key is None:
        return None
    if keypair is None or server_key is None:
        raise SecurityError("connecting with CURVE needs both keypair= and server_key=")
    return ClientSecurity(keypair, server_key)


def server_security(keypair: Keypair | None, authorized: Authorized | None
                    ) -> ServerSecurity | None:
    if keypair is None and authorized is None:
        return None
    if keypair is None or authorized is None:
        raise SecurityError("a secure broker needs both keypair= and authorized= "
                            "(a list of public keys or a directory of .pub files)")
    return ServerSecurity(keypair, authorized)


def zap_reply(request: list[bytes], authorizer: Authorizer) -> tuple[list[bytes], str | None]:
    """The reply to a ZAP request (RFC 27) and, when denied, why (for the log). Never raises:
    whatever the request, the broker answers it."""
    try:
        return _zap_reply(request, authorizer)
    except Exception as exc:
        request_id = request[1] if len(request) > 1 else b""
        return [b"1.0", request_id, b"500", b"internal error", b"", b""], f"ZAP error {exc!r}"


def _zap_reply(request: list[bytes], authorizer: Authorizer) -> tuple[list[bytes], str | None]:
    if len(request) < 6 or request[0] != b"1.0":
        return [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"bad request", b"",
                b""], "malformed ZAP request"
    version, request_id, _domain, address, _identity, mechanism = request[:6]
    credentials = request[6:]
    if mechanism == b"CURVE" and credentials and authorizer.allows(credentials[0]):
        return [version, request_id, b"200", b"OK", z85_encode(credentials[0]), b""], None
    who = z85_encode(credentials[0]).decode() if mechanism == b"CURVE" and credentials else "-"
    peer = address.decode("ascii", "replace")
    return ([version, request_id, b"400", b"not authorized", b"", b""],
            f"denied {mechanism.decode('ascii', 'replace')} client {who} from {peer}")
