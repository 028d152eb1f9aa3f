"""The decision log's keys: HMAC keys that chain the records, Ed25519 keys that sign checkpoints.

Keys come from configuration (files named by BINDPOLICY_LOG_MAC_KEY_FILE and
BINDPOLICY_CHECKPOINT_KEY_FILE) and are never stored with the log. A MAC key file holds one
hex key per line: the first writes, every line verifies, so a key is rotated by putting a new
line first and keeping the old ones for as long as the records they made are kept. Each record
names the id of its key (a hash of the key, not the key).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MAC_PREFIX = "hmac-sha256:"
MIN_KEY_BYTES = 32


class KeyFileError(ValueError):
    """A key file that cannot be used: named, with why."""


def key_id(material: bytes) -> str:
    """A short public name for a key: never enough to find the key."""
    return hashlib.sha256(b"bindpolicy key id\0" + material).hexdigest()[:16]


@dataclass(frozen=True)
class MacKey:
    secret: bytes

    @cached_property
    def id(self) -> str:
        return key_id(self.secret)

    @cached_property
    def _prefix(self) -> str:
        return f"{MAC_PREFIX}{self.id}:"

    def mac(self, text: str) -> str:
        # (hmac.digest: OpenSSL's one-shot HMAC, the same digest as hmac.new(...).hexdigest() at
        # about a third of its cost: a record's MAC is taken once written and once by each watch)
        return self._prefix + hmac.digest(self.secret, text.encode("utf-8"), "sha256").hex()


@dataclass(frozen=True)
class MacKeyring:
    """The first key writes; all of them verify."""

    keys: tuple[MacKey, ...]

    @property
    def current(self) -> MacKey:
        return self.keys[0]

    def get(self, kid: str) -> MacKey | None:
        return next((k for k in self.keys if k.id == kid), None)


def read_mac_keys(path: Path | str) -> MacKeyring:
    """Hex keys, one a line (# comments and blank lines allowed), each at least 32 bytes."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read the log MAC key file {path}: {exc}") from exc
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            secret = bytes.fromhex(line)
        except ValueError as exc:
            raise KeyFileError(f"{path}:{number}: a MAC key is written in hex") from exc
        if len(secret) < MIN_KEY_BYTES:
            raise KeyFileError(f"{path}:{number}: a MAC key has at least {MIN_KEY_BYTES} bytes "
                               f"({2 * MIN_KEY_BYTES} hex digits), this one {len(secret)}")
        keys.append(MacKey(secret))
    if not keys:
        raise KeyFileError(f"{path}: no key in the file")
    return MacKeyring(tuple(keys))


def public_key_id(key: Ed25519PublicKey) -> str:
    return key_id(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def read_signing_key(path: Path | str) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"cannot read the checkpoint signing key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: the checkpoint signing key must be an Ed25519 key (PEM, PKCS#8)")
    return key


def read_public_keys(paths: Iterable[Path | str]) -> dict[str, Ed25519PublicKey]:
    """Public keys (PEM) by id; a private key file gives its public half."""
    found: dict[str, Ed25519PublicKey] = {}
    for path in map(Path, paths):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"cannot read the checkpoint public key {path}: {exc}") from exc
        try:
            key: object = serialization.load_pem_public_key(data)
        except ValueError:
            try:
                key = serialization.load_pem_private_key(data, password=None).public_key()
            except (ValueError, TypeError) as exc:
                raise KeyFileError(f"{path}: not a PEM public or private key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{path}: checkpoint keys are Ed25519 keys")
        found[public_key_id(key)] = key
    return found


def sign(key: Ed25519PrivateKey, payload: bytes) -> str:
    return base64.b64encode(key.sign(payload)).decode("ascii")


def signature_holds(key: Ed25519PublicKey, payload: bytes, signature: str) -> bool:
    try:
        key.verify(base64.b64decode(signature, validate=True), payload)
    except (InvalidSignature, ValueError):
        return False
    return True


def generate_keys(folder: Path | str) -> Sequence[Path]:
    """A new MAC key file, signing key and its public key in `folder` (created 0700; keys 0600).
    Files already there are kept: this never overwrites a key."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    written = []
    mac, private, public = folder / "log-mac.key", folder / "checkpoint.key", folder / "checkpoint.pub"
    if not mac.exists():
        _write_secret(mac, f"# bindpolicy log MAC key (first line writes; older lines verify)\n"
                           f"{secrets.token_hex(MIN_KEY_BYTES)}\n".encode())
        written.append(mac)
    if not private.exists():
        key = Ed25519PrivateKey.generate()
        _write_secret(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
        written.append(private)
    if not public.exists():
        key = read_signing_key(private)
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
        written.append(public)
    return written


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
