"""Security descriptors for local POSIX files: the local side of BITS's ACL flags (bits-core.md §13).

POSIX files have no NT security descriptor, so backhaul keeps one *beside* the data:

* Download from SMB with ``acl_flags``: the engine asks the SMB transport for the parts of the
  remote descriptor the flags name (``SmbTransport.security``) as the file completes, and
  ``write_descriptor`` stores those self-relative bytes in the extended attribute
  ``user.backhaul.ntacl`` of the temp file. Complete renames the temp file, and the attribute
  goes with it. Nothing is chowned or chmodded: the descriptor is kept, not enforced.
* Upload to SMB with ``acl_flags``: ``source_descriptor`` gives the descriptor to copy, part by
  part: each part that ``user.backhaul.ntacl`` holds (a file downloaded earlier keeps its
  remote owner, group, DACL and SACL, so a later upload restores them), else the part built
  from the POSIX owner and mode (``posix_descriptor``):

  - owner ``S-1-22-1-<uid>``, group ``S-1-22-2-<gid>`` (Samba's "Unix User" / "Unix Group"
    SIDs; a Windows server does not know them and refuses such an owner);
  - a DACL of up to three allow entries, for the owner, the group and Everyone
    (``S-1-1-0``), from the rwx bits: r = FILE_GENERIC_READ, w = FILE_GENERIC_WRITE | DELETE,
    x = FILE_GENERIC_EXECUTE, and the owner also gets READ_CONTROL | WRITE_DAC | WRITE_OWNER;
  - no SACL (POSIX has none): with BG_COPY_FILE_SACL and no stored SACL, none is copied.

* A file system without user extended attributes (ENOTSUP, like FAT for BITS, where the ACLs
  are "not preserved") makes ``write_descriptor`` a no-op that returns False.

The SACL needs SeSecurityPrivilege on the *server*; locally a user xattr needs no privilege.
Every function here does blocking file I/O: call them in a worker thread from the engine.
"""

from __future__ import annotations

import errno
import os

from backhaul.core.vocabulary import AclFlags
from backhaul.transports.smb import ACCESS_ALLOWED_ACE_TYPE, Ace, Acl, SecurityDescriptor

XATTR_NAME = "user.backhaul.ntacl"
"""Where the self-relative security descriptor of a local file is kept."""

EVERYONE = "S-1-1-0"
UNIX_USER = "S-1-22-1-"
UNIX_GROUP = "S-1-22-2-"

FILE_GENERIC_READ = 0x00120089
FILE_GENERIC_WRITE = 0x00120116
FILE_GENERIC_EXECUTE = 0x001200A0
DELETE = 0x00010000
READ_CONTROL = 0x00020000
WRITE_DAC = 0x00040000
WRITE_OWNER = 0x00080000
_OWNER_RIGHTS = READ_CONTROL | WRITE_DAC | WRITE_OWNER

_UNSUPPORTED = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP})


def read_descriptor(path: str | os.PathLike[str]) -> bytes | None:
    """The descriptor kept with ``path``, or None if it has none (or the file system keeps no
    user extended attributes)."""
    try:
        return os.getxattr(path, XATTR_NAME)
    except OSError as exc:
        if exc.errno == errno.ENODATA or exc.errno in _UNSUPPORTED:
            return None
        raise


def write_descriptor(path: str | os.PathLike[str], descriptor: bytes) -> bool:
    """Keep ``descriptor`` (self-relative bytes) with ``path``. False when the file system cannot
    (BITS ignores the flags there, too); other failures raise OSError."""
    SecurityDescriptor.parse(descriptor)  # never store what a later upload could not send
    try:
        os.setxattr(path, XATTR_NAME, descriptor)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return False
        raise
    return True


def remove_descriptor(path: str | os.PathLike[str]) -> None:
    try:
        os.removexattr(path, XATTR_NAME)
    except OSError as exc:
        if exc.errno != errno.ENODATA and exc.errno not in _UNSUPPORTED:
            raise


def _rights(bits: int) -> int:
    mask = 0
    if bits & 4:
        mask |= FILE_GENERIC_READ
    if bits & 2:
        mask |= FILE_GENERIC_WRITE | DELETE
    if bits & 1:
        mask |= FILE_GENERIC_EXECUTE
    return mask


def posix_descriptor(st: os.stat_result) -> SecurityDescriptor:
    """Owner, group and DACL from a POSIX owner and mode (see the module docstring)."""
    owner, group = f"{UNIX_USER}{st.st_uid}", f"{UNIX_GROUP}{st.st_gid}"
    entries = [
        (owner, _rights(st.st_mode >> 6) | _OWNER_RIGHTS),
        (group, _rights(st.st_mode >> 3)),
        (EVERYONE, _rights(st.st_mode)),
    ]
    aces = tuple(Ace.of(ACCESS_ALLOWED_ACE_TYPE, sid, mask) for sid, mask in entries if mask)
    return SecurityDescriptor(owner, group, Acl(aces))


def source_descriptor(path: str | os.PathLike[str]) -> bytes:
    """The descriptor an upload of ``path`` copies: the kept parts, the rest from POSIX."""
    built = posix_descriptor(os.stat(path))
    kept_bytes = read_descriptor(path)
    if kept_bytes is None:
        return built.pack()
    kept = SecurityDescriptor.parse(kept_bytes)
    present = kept.parts
    merged = SecurityDescriptor(
        kept.owner if present & AclFlags.OWNER else built.owner,
        kept.group if present & AclFlags.GROUP else built.group,
        kept.dacl if present & AclFlags.DACL else built.dacl,
        kept.sacl,
        kept.control,
        kept.null_dacl,
    )
    return merged.pack()


__all__ = [
    "XATTR_NAME",
    "posix_descriptor",
    "read_descriptor",
    "remove_descriptor",
    "source_descriptor",
    "write_descriptor",
]
