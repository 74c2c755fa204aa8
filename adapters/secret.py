"""Secrets at rest: sealed with AES-GCM (eventsourcing's AESCipher) before any event holds them.

The key lives outside the log: ``BACKHAUL_SECRET_KEY`` (base64, 16/24/32 bytes) when set,
else a key file created with mode 0600 beside the SQLite store (``secret.key`` in the
backhaul home). The in-memory store uses a random key per process. Only ``SecretBox``
can open a ``Sealed`` value; the log, the read models and every audit output hold only
the sealed token.
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from backhaul.core import hresult
from backhaul.core.error import BitsError
from backhaul.core.url import request_url, secrets_of
from backhaul.core.value import Sealed

if TYPE_CHECKING:
    from eventsourcing.cipher import AESCipher

KEY_ENV = "BACKHAUL_SECRET_KEY"


def _aes() -> type[AESCipher]:
    # Imported when a secret is first sealed or opened: the cipher's import (pycryptodome,
    # cffi) costs a tenth of a second or more, which a `backhaul get` without credentials
    # need not pay.
    from eventsourcing.cipher import AESCipher

    return AESCipher


class SealedUnreadable(BitsError):
    """A sealed value this store's key cannot open (``SecretBox.open``). The engine records
    it as the job's error: fatal, context GENERAL_QUEUE_MANAGER."""


def new_key() -> str:
    """A random 256-bit key in the form the cipher takes (base64), without importing it."""
    return base64.b64encode(os.urandom(32)).decode("ascii")


class SecretBox:
    def __init__(self, key: str, file: Path | None = None) -> None:
        self._key = key
        self._built: AESCipher | None = None
        self.file = file  # where the key is kept, if in a file

    @property
    def _cipher(self) -> AESCipher:
        if self._built is None:
            from eventsourcing.utils import Environment

            self._built = _aes()(Environment(env={"CIPHER_KEY": self._key}))
        return self._built

    @classmethod
    def ephemeral(cls) -> SecretBox:
        return cls(new_key())

    @classmethod
    def for_home(cls, home: Path) -> SecretBox:
        key = os.environ.get(KEY_ENV)
        if key:
            return cls(key)
        return cls(_key_file(home / "secret.key"), home / "secret.key")

    def seal(self, plain: str) -> Sealed:
        return Sealed(base64.b64encode(self._cipher.encrypt(plain.encode())).decode("ascii"))

    def open(self, sealed: Sealed) -> str:
        """The plain text. A value sealed with another key (a store imported without its
        key) raises ``SealedUnreadable``, NTE_BAD_KEY: fatal, as no retry can open it."""
        try:
            return self._cipher.decrypt(base64.b64decode(sealed.token)).decode()
        except ValueError as exc:  # the MAC check failed (binascii.Error is a ValueError)
            where = f"the key in {self.file}" if self.file else f"the key in {KEY_ENV}"
            raise SealedUnreadable(
                hresult.NTE_BAD_KEY,
                f"a sealed secret cannot be opened with {where}: it was sealed with another "
                "key (a store imported without its secret.key?). Put that key in place, or "
                "give the job its credentials, headers or URL again",
            ) from exc

    def seal_url(self, name: str) -> tuple[str, Sealed | None, Sealed | None]:
        """(``name`` as the log records it, its password sealed, its signed query sealed):
        ``core.url.secrets_of``, sealed (None where the URL has none)."""
        recorded, password, query = secrets_of(name)
        return recorded, self._seal_if(password), self._seal_if(query)

    def open_url(self, recorded: str, password: Sealed | None, query: Sealed | None) -> str:
        """The URL to request: ``recorded`` with the sealed password and query put back."""
        return request_url(recorded, self._open_if(password), self._open_if(query))

    def _seal_if(self, plain: str | None) -> Sealed | None:
        return None if plain is None else self.seal(plain)

    def _open_if(self, sealed: Sealed | None) -> str | None:
        return None if sealed is None else self.open(sealed)


def _key_file(path: Path) -> str:
    """The home's key, made on first use. It appears whole or not at all (written and
    synced under a temp name, then linked in place, which fails if another process was
    first: its key is then read), so a command started at the same moment never reads a
    half-written key, and no crash leaves an empty one."""
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = new_key()
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, key.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)
        except FileExistsError:
            return _read_key(path)  # another process made it first
    finally:
        os.unlink(temp)
    return key


def _read_key(path: Path) -> str:
    key = path.read_text().strip()
    if not key:
        raise BitsError(hresult.E_FAIL, f"the key file {path} is empty: restore it from a backup")
    return key
