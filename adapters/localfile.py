"""Local files: destination checks, temp names, atomic publication, cleanup.

- A download is written to a temp file in the destination directory (BITS's
  ``BITxxx.TMP``): ``.<name>.<job16>-<index>.bhtmp``, hidden and unique per job and file
  (a name of over 182 bytes is cut and given a hash there, so the temp name stays legal).
- Complete publishes whole files with ``os.replace`` (their bytes were synced before the
  engine recorded them transferred), then fsyncs each directory once, so a crash leaves
  either the old name or the whole new file.
- Cancel deletes every temp file; files already published by Complete are not touched.
- ``GroupSync`` makes the bytes of files that finish together durable with one call: a
  ``syncfs(2)`` of their filesystem (one journal commit) instead of an ``fdatasync`` each.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO, Final

import attrs

from backhaul.core import hresult
from backhaul.core.error import BitsError
from backhaul.core.job import FileState, Job
from backhaul.core.limit import LOCAL_NAME_MAX, LOCAL_NAME_PART_MAX, fit_name
from backhaul.core.vocabulary import JobType

TEMP_SUFFIX = ".bhtmp"
REPLY_DATA_MAX = 1024 * 1024


def temp_path(job_id: str, index: int, local_name: str, worker: str | None = None) -> Path:
    """The file's temp name. With several engines on one store (leases), each worker
    writes its own temp file, so a worker that lost its lease can never touch the bytes
    of the one that took over; ``worker`` is then part of the name."""
    return Path(temp_name(job_id, index, local_name, worker))


def temp_name(job_id: str, index: int, local_name: str, worker: str | None = None) -> str:
    """``temp_path`` as a string (no Path object: the engine's per-file path)."""
    directory, name = os.path.split(local_name)
    tag = f".{_safe(worker)}" if worker else ""
    name = fit_name(name, _TEMP_ROOM)
    return os.path.join(directory, f".{name}.{job_tag(job_id)}-{index}{tag}{TEMP_SUFFIX}")


def job_tag(job_id: str) -> str:
    """The job's part of its temp names: 16 hex digits of its id (about 60 random bits of
    a UUID4). Eight were too few: two jobs of 10,000 to one destination shared a temp file
    about once in a hundred stores, and one's Cancel deleted the other's bytes."""
    return job_id.replace("-", "")[:16]


# A temp name adds at most 73 bytes to the file's name (".", ".<job16>-", an index of up to
# 7 digits, "." and a worker tag of up to 40, ".bhtmp"); NAME_MAX is 255.
_TEMP_ROOM: Final = LOCAL_NAME_PART_MAX - 73


def file_temp(job: Job, index: int) -> Path:
    """Where file ``index``'s checkpointed bytes are: the temp of the worker that wrote them."""
    f = job.files[index]
    return temp_path(job.id, index, f.local_name, f.temp_worker)


def checkpoint_lost(temp: Path | str, length: int, *, exact: bool = False) -> str | None:
    """Why the first ``length`` bytes checkpointed into ``temp`` are no longer there (the
    file was deleted or cut short behind the engine's back), or None. Resuming after them
    would leave a hole of zeros that Complete would publish: the file starts over.
    ``exact``: a transferred file's temp, which holds ``length`` bytes and no more."""
    try:
        size = os.stat(temp).st_size
    except FileNotFoundError:
        return f"the temp file {temp} is gone; its {length} checkpointed bytes are lost"
    except OSError:
        return None  # unreadable, not lost: opening it (or Complete) fails with the error
    if size < length or (exact and size != length):
        return f"the temp file {temp} holds {size} of its {length} checkpointed bytes"
    return None


def changed_since_transferred(job: Job, indexes: Iterable[int]) -> list[tuple[int, str]]:
    """The transferred files among ``indexes`` whose temp file no longer holds exactly
    their bytes (deleted or cut short, or grown, behind the engine's back), with why.
    Complete checks them before it publishes anything: a file renamed in short would be
    wrong for good. A file an earlier Complete already published (its temp gone, the
    target of its size) is not one of them. A stat per file."""
    found: list[tuple[int, str]] = []
    for i in indexes:
        f = job.files[i]
        if not f.transferred or not f.bytes_total:
            continue  # an empty file needs no temp file (Complete makes it)
        temp = temp_name(job.id, i, f.local_name, f.temp_worker)
        try:
            if os.stat(temp).st_size == f.bytes_total:
                continue  # the usual case: one stat, nothing else
        except FileNotFoundError:
            if _already_published(f.local_name, f):
                continue
        except OSError:
            continue  # unreadable, not changed: publishing it fails with the error
        lost = checkpoint_lost(temp, f.bytes_total, exact=True)
        if lost is not None:
            found.append((i, f"{f.local_name}: {lost} (changed after it was transferred)"))
    return found


def _safe(worker: str) -> str:
    return "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "_" for c in worker)[:40]


def reply_temp_path(job: Job) -> Path:
    """Where an upload-reply job's reply is downloaded to before Complete."""
    reply = reply_path(job)
    rest = f".{job_tag(job.id)}-reply{TEMP_SUFFIX}"
    return reply.with_name(f".{fit_name(reply.name, LOCAL_NAME_PART_MAX - 1 - len(rest))}{rest}")


def reply_path(job: Job) -> Path:
    """SetReplyFileName's name, or one generated beside the uploaded file (BITS §3)."""
    if job.reply_file_name:
        return Path(job.reply_file_name)
    upload = Path(job.files[0].local_name)
    rest = f".{job.id[:8]}.reply"
    return upload.with_name(f"{fit_name(upload.name, LOCAL_NAME_PART_MAX - len(rest))}{rest}")


def check_destination(local_name: str, good_dirs: set[str] | None = None) -> None:
    """AddFile for downloads: an absolute path in an existing, writable directory, not of
    the form of a temp name, whose temp name fits in a path too.
    ``good_dirs``: the directories this AddFileSet already found good, each checked once."""
    directory, name = os.path.split(local_name)
    if _TEMP_FORM.match(name):
        raise BitsError(
            hresult.E_INVALIDARG,
            f"{name} has the form of backhaul's temp file names (.NAME.JOB-INDEX.bhtmp): "
            "the Complete or Cancel of the job it names would delete it",
        )
    longest = len(directory.encode()) + 1 + min(LOCAL_NAME_PART_MAX, len(name.encode()) + 73)
    if longest >= LOCAL_NAME_MAX:  # PATH_MAX, with its NUL
        raise BitsError(
            hresult.E_INVALIDARG,
            f"the temp file of {_shorten(local_name)} would have a path of up to {longest} "
            f"bytes; a path holds at most {LOCAL_NAME_MAX - 1}: use a shorter name",
        )
    cached = good_dirs is not None and bool(name) and directory in good_dirs
    parent = None if cached else Path(local_name).parent
    if parent is not None and not os.path.isdir(parent):
        raise BitsError(hresult.E_INVALIDARG, _not_a_directory(parent))
    kind = not_a_file(local_name)
    if kind is not None and os.path.isdir(local_name):  # a link to a directory too
        raise BitsError(hresult.E_INVALIDARG, f"{Path(local_name)} is a directory, not a file name")
    if kind is not None:  # /dev/null: Complete would replace the device with a file
        raise BitsError(
            hresult.E_INVALIDARG,
            f"{Path(local_name)} is {kind}, not a regular file: a download is written to a "
            "temp file and renamed over its destination, which would replace it",
        )
    if parent is not None:
        if not os.access(parent, os.W_OK | os.X_OK):
            raise BitsError(hresult.E_ACCESSDENIED, f"the directory {parent} is not writable")
        if good_dirs is not None and name:
            good_dirs.add(directory)


# .<name>.<job16>-<index or "reply">[.<worker>].bhtmp (temp_name, reply_temp_path)
_TEMP_FORM: Final = re.compile(
    r"\..*\.[0-9a-f]{16}-(?:[0-9]+|reply)(?:\.[A-Za-z0-9_-]+)?\.bhtmp\Z", re.S
)


def _shorten(text: str, keep: int = 60) -> str:
    return text if len(text) <= keep else f"{text[: keep // 2]}...{text[-keep // 2 :]}"


def _not_a_directory(parent: Path) -> str:
    """Why ``parent`` is no directory to download into: missing, or why it cannot be
    looked up (a link loop, a name too long)."""
    try:
        os.stat(parent)
    except FileNotFoundError:
        return f"the directory {parent} does not exist"
    except (OSError, ValueError) as exc:
        return f"the directory {_shorten(str(parent))} cannot be looked up: {getattr(exc, 'strerror', None) or exc}"
    return f"{parent} is not a directory"


_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def not_a_file(path: str | Path) -> str | None:
    """What is at ``path`` when it is not a regular file: "a directory", "a character
    device", "a symbolic link (to ...)"...; None for a regular file or nothing (or a name too
    long to look up). A link is not followed: a rename would replace the link itself, and
    /dev/stdout is a link to whatever the process's output is."""
    try:
        mode = os.lstat(path).st_mode
    except (OSError, ValueError):
        return None
    return _kind(path, mode)


def _kind(path: str | Path, mode: int) -> str | None:
    if stat.S_ISLNK(mode):
        try:
            return f"a symbolic link (to {os.readlink(path)})"
        except OSError:
            return "a symbolic link"
    return next((kind for test, kind in _KINDS if test(mode)), None)


def check_source(local_name: str) -> None:
    """AddFile for uploads: an existing, readable regular file."""
    path = Path(local_name)
    if not os.path.isfile(path):
        raise BitsError(hresult.E_INVALIDARG, f"{path} is not an existing regular file")
    if not os.access(path, os.R_OK):
        raise BitsError(hresult.E_ACCESSDENIED, f"{path} is not readable")


def check_local_names(
    job_type: JobType, local_names: Iterable[str], good_dirs: set[str] | None = None
) -> None:
    """AddFile's checks of local names. ``good_dirs``: destination directories found good
    since the caller began (one group commit of 10,000 jobs: one look at their directory);
    by default, those of this call."""
    if job_type is not JobType.DOWNLOAD:
        for name in local_names:
            check_source(name)
        return
    if good_dirs is None:
        good_dirs = set()  # 10,000 files in one directory: one look at it
    for name in local_names:
        check_destination(name, good_dirs)


@attrs.define(eq=False)
class FinishedFile:
    """A temp file whose bytes have all arrived: open at ``fd`` with them written, or not
    created yet with them in ``body``. ``stamp``: the modification time to give it.
    ``inode``: the file's, once ``GroupSync`` synced it (FileTransferred records it)."""

    path: str
    fd: int = -1
    body: bytes | None = None
    stamp: float | None = None
    inode: int | None = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class GroupSync:
    """Group commit for file data. ``await finish(files)`` returns once each file's bytes
    are on disk: the files kept in memory are created and written first, then all are
    synced, given their time stamps and closed, in one worker thread. Callers that come
    while a batch is in the thread wait for the next batch, so one call serves all the
    files that finished meanwhile, of any job (the small files of a many-file job finish
    about every 0.1 ms; an ``fdatasync`` each costs a journal commit, and those commits
    also stall every file creation behind them).

    A batch of one file on a filesystem is an ``fdatasync``. Two or more on one
    filesystem are one ``syncfs(2)`` (Linux): it flushes everything dirty on that
    filesystem, so it may also write other files' pages early, never later. When
    ``syncfs`` fails (an earlier writeback error anywhere on the filesystem), each file
    of the batch is ``fdatasync``ed, so that every caller gets its own file's answer."""

    def __init__(self, syncfs: Callable[[int], None] | None = None, *, lookup: bool = True) -> None:
        # Without a ``syncfs``: libc's, looked up at the first batch that needs one, unless
        # ``lookup`` is False (then every file gets its own fdatasync).
        self._syncfs = syncfs
        self._lookup = syncfs is None and lookup
        self._waiting: list[
            tuple[Sequence[FinishedFile], asyncio.Future[list[OSError | None]]]
        ] = []
        self._drain: asyncio.Task[None] | None = None
        self.batches = 0  # syncfs calls, for the benchmarks and tests
        self.files = 0

    async def finish(self, files: Sequence[FinishedFile]) -> list[OSError | None]:
        """Write, sync, stamp and close these files (with whatever else is waiting): each
        one's error, or None. Every file is closed in the end, whatever happened."""
        future: asyncio.Future[list[OSError | None]] = asyncio.get_running_loop().create_future()
        self._waiting.append((files, future))
        if self._drain is None or self._drain.done():
            self._drain = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            files = [f for group, _ in batch for f in group]
            try:
                errors = await asyncio.to_thread(self._finish_all, files)
            except BaseException as exc:  # cancelled, or a bug: nobody may hang
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                raise
            start = 0
            for group, future in batch:
                if not future.done():
                    future.set_result(errors[start : start + len(group)])
                start += len(group)

    def _finish_all(self, files: Sequence[FinishedFile]) -> list[OSError | None]:
        """In a worker thread."""
        errors: list[OSError | None] = [None] * len(files)
        try:
            for i, f in enumerate(files):
                if f.body is not None:
                    errors[i] = _create(f)
            live = [i for i, f in enumerate(files) if errors[i] is None]
            inodes: dict[int, int] = {}
            synced = self._sync([files[i].fd for i in live], inodes)
            for i, error in zip(live, synced, strict=True):
                files[i].inode = inodes.get(files[i].fd)
                errors[i] = error
                stamp = files[i].stamp
                if error is None and stamp is not None:
                    with contextlib.suppress(OSError):
                        os.utime(files[i].fd, (stamp, stamp))
        finally:
            for f in files:
                f.close()
        return errors

    def _sync(self, fds: Sequence[int], inodes: dict[int, int]) -> list[OSError | None]:
        """Each file's error, or None; ``inodes`` gets each file's inode number."""
        by_device: dict[int, list[int]] = {}
        errors: dict[int, OSError | None] = {}
        for fd in fds:
            try:
                st = os.fstat(fd)
            except OSError as exc:
                errors[fd] = exc
                continue
            inodes[fd] = st.st_ino
            if st.st_nlink == 0:
                # Deleted while it was written (its directory removed, say): syncing the
                # bytes would claim a file that Complete cannot find.
                errors[fd] = FileNotFoundError(errno.ENOENT, "deleted while it was written")
                continue
            by_device.setdefault(st.st_dev, []).append(fd)
        if self._lookup and any(len(group) > 1 for group in by_device.values()):
            self._syncfs, self._lookup = _syncfs(), False
        for group in by_device.values():
            if len(group) > 1 and self._syncfs is not None:
                try:
                    self._syncfs(group[0])
                except OSError:
                    pass  # find out whose: one fdatasync each, below
                else:
                    self.batches += 1
                    self.files += len(group)
                    errors.update(dict.fromkeys(group))
                    continue
            for fd in group:
                try:
                    os.fdatasync(fd)
                    errors[fd] = None
                except OSError as exc:
                    errors[fd] = exc
        return [errors[fd] for fd in fds]


def _create(f: FinishedFile) -> OSError | None:
    """Create ``f``'s temp file with the bytes kept in memory (they leave memory)."""
    body, f.body = f.body or b"", None
    try:
        f.fd = create_written(f.path, body)
    except OSError as exc:
        return exc
    return None


# Temp files are the owner's alone while they fill: the new version of a private file (0600)
# is readable by no one else before Complete gives it its mode (``_keep_mode``).
TEMP_MODE: Final = 0o600


def open_temp(path: str | Path, flags: int) -> int:
    """Open (``flags`` with O_CREAT: create) a temp file, never through a symbolic link: the
    names are predictable (GetTemporaryName shows them), and one planted at the name would
    send the bytes outside the destination directory, then be published as the file.
    ELOOP then, which the error table gives as access denied (fatal)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, TEMP_MODE)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise OSError(
            errno.ELOOP, "a symbolic link is at the temp file's name; only a file is written"
        ) from exc


def new_temp(path: str | Path) -> BinaryIO:
    """A temp file made anew (truncated), for writing, as ``open_temp`` opens one."""
    return os.fdopen(open_temp(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb")


def create_written(path: str, data: bytes) -> int:
    """Create (or truncate) ``path`` with ``data`` in it: its open descriptor."""
    fd = open_temp(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        pwrite_all(fd, data, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite until every byte is written: a full disk can first show as a short write,
    and a checkpoint must never claim bytes that are not in the file."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += n


def _syncfs() -> Callable[[int], None] | None:
    """libc's ``syncfs(2)``, or None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        call = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None

    def syncfs(fd: int) -> None:
        if call(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return syncfs


def _fsync_dir(directory: str | Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(job: Job, indexes: Iterable[int], dirs: set[str] | None = None) -> list[int]:
    """Rename the whole files into place. Raises BitsError on the first failure; the
    files renamed before it stay renamed (BITS keeps them available too). ``dirs``: a
    batch's set of directories to fsync once after all its renames (``sync_dirs``);
    without it, the directories of this job are fsynced here."""
    done: list[int] = []
    own = dirs is None
    dirs = set() if dirs is None else dirs
    for i in indexes:
        f = job.files[i]
        tmp = temp_name(job.id, i, f.local_name, f.temp_worker)
        target = f.local_name
        replaced = _check_replaceable(target)
        try:
            # No fsync of the file here: the engine synced its bytes before it recorded
            # FileTransferred. The rename, and the directory's fsync below, make it durable.
            try:
                _check_temp(tmp)
                _keep_mode(tmp, replaced)
                os.replace(tmp, target)
            except FileNotFoundError:
                if os.path.exists(tmp):
                    raise  # the temp file is there: the target's directory is not
                if _is_empty(f):
                    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o644))
                    _keep_mode(tmp, replaced)
                    os.replace(tmp, target)
                elif _already_published(target, f):
                    done.append(i)  # an earlier Complete renamed it before failing later
                    continue
                else:
                    raise
        except OSError as exc:
            raise BitsError(os_hresult(exc), f"cannot publish {target}: {exc.strerror}") from exc
        done.append(i)
        dirs.add(os.path.dirname(target))
    if own:
        sync_dirs(dirs)
    return done


def _check_replaceable(target: str | Path) -> os.stat_result | None:
    """Complete renames over a regular file or nothing, never over a device, FIFO, socket
    or directory made at the name since AddFile looked (MoveFileEx refuses those too).
    The file it replaces, if any."""
    try:
        found = os.lstat(target)
    except (OSError, ValueError):
        return None
    kind = _kind(target, found.st_mode)
    if kind is not None:
        raise BitsError(
            hresult.hresult_from_win32(hresult.ERROR_ACCESS_DENIED),
            f"cannot publish {target}: it is {kind} now, not a regular file",
        )
    return found


def _check_temp(tmp: str) -> None:
    """The temp file is a regular file: a link or anything else at its name was not made
    by the engine, and is never renamed into place (FileNotFoundError when there is none)."""
    if not stat.S_ISREG(os.lstat(tmp).st_mode):
        raise OSError(errno.EACCES, "the temp file's name holds something other than a file")


def _keep_mode(tmp: str | Path, replaced: os.stat_result | None) -> None:
    """A file that replaces another keeps the other's permission bits (and, for root, its
    owner and group), as curl -o and wget keep them by writing in place: a private file
    (0600) must not turn readable by all (0644) because a new version came over it. A new
    name gets the usual mode, 0666 less the umask (its temp file was the owner's alone)."""
    if replaced is None:
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o666 & ~_umask())
        return
    with contextlib.suppress(OSError):  # not ours to change: the temp file's stay
        if os.geteuid() == 0:
            os.chown(tmp, replaced.st_uid, replaced.st_gid)
        # The read, write and execute bits only: no set-user-ID bit carried over to new bytes.
        os.chmod(tmp, replaced.st_mode & 0o777)


@functools.cache
def _umask() -> int:
    """The process's umask, read where reading it changes nothing (Linux's
    /proc/self/status; ``os.umask`` sets it, racing other threads' file creations).
    Elsewhere the usual 022."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def sync_dirs(dirs: Iterable[str | Path]) -> None:
    """Make the renames in these directories durable (one fsync each)."""
    for d in dirs:
        _fsync_dir(d)


def _already_published(target: str, f: FileState) -> bool:
    """The file at ``target`` is this file's temp file, renamed there by an earlier
    Complete (which then failed on a later file, or crashed before recording the end):
    the same inode (a rename keeps it) and size. A file recorded without its inode (an
    older log) is told by its size alone."""
    try:
        found = os.stat(target)
    except OSError:
        return False
    if f.inode is not None and found.st_ino != f.inode:
        return False  # another file of the same size: an older one, or someone else's
    return f.bytes_total is not None and found.st_size == f.bytes_total


def _is_empty(f: FileState) -> bool:
    return f.transferred and f.bytes_total == 0


def publish_reply(job: Job) -> None:
    """Complete of an upload-reply job: the reply file appears under its name."""
    tmp = reply_temp_path(job)
    if not os.path.exists(tmp):
        return
    target = reply_path(job)
    replaced = _check_replaceable(target)
    try:
        _check_temp(str(tmp))
        _keep_mode(tmp, replaced)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        raise BitsError(
            os_hresult(exc), f"cannot publish the reply {target}: {exc.strerror}"
        ) from exc


def discard(job: Job, listings: dict[str, list[str]] | None = None) -> list[Path]:
    """Delete every temp file of the job (and the reply's, for upload-reply jobs);
    return those that could not be deleted. Upload sources are never touched.

    ``listings``: the temp files of each directory, listed once and shared by the calls of
    one batch (10,000 jobs completed at once into one directory must not list it 10,000
    times); a name listed but gone meanwhile is skipped."""
    temps: list[str] = []
    if job.job_type is JobType.UPLOAD_REPLY and job.files:
        temps.append(str(reply_temp_path(job)))
    if job.job_type is JobType.DOWNLOAD:
        shared = listings if listings is not None else {}
        by_stem: dict[str, dict[str, list[str]]] = {}
        tag = f".{job_tag(job.id)}-"
        for i, f in enumerate(job.files):
            plain = temp_name(job.id, i, f.local_name)
            directory, name = os.path.split(plain)
            stems = by_stem.get(directory)
            if stems is None:  # one directory listing, not a glob per file
                if directory not in shared:
                    try:
                        names = os.listdir(directory)
                    except OSError:
                        names = []
                    shared[directory] = [n for n in names if n.endswith(TEMP_SUFFIX)]
                stems = by_stem[directory] = _temps_by_stem(shared[directory], tag)
            # every worker's temp of this file: .<name>.<job16>-<i>[.<worker>].bhtmp; the
            # listing holds each of them, the plain one included
            stem = name.removesuffix(TEMP_SUFFIX) + "."
            temps += [os.path.join(directory, n) for n in stems.get(stem, ())]
    left: list[Path] = []
    for tmp in temps:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            continue
        except OSError:
            left.append(Path(tmp))
    return left


def _temps_by_stem(names: Iterable[str], tag: str) -> dict[str, list[str]]:
    """This job's temp names (``tag``: ``.<job16>-``) by the stem they start with,
    ``.<name>.<job16>-<i>.``: the lookup of a job's 10,000 files is one pass, not a scan of
    the listing per file. A worker's name has no dot (``_safe``), so the stem ends at the
    first dot after the index."""
    stems: dict[str, list[str]] = {}
    for name in names:
        at = name.rfind(tag)
        if at < 0:
            continue
        end = name.find(".", at + len(tag))
        if end < 0:
            continue
        stems.setdefault(name[: end + 1], []).append(name)
    return stems


def os_hresult(exc: OSError) -> int:
    win32 = {
        errno.ENOENT: hresult.ERROR_FILE_NOT_FOUND,
        errno.EACCES: hresult.ERROR_ACCESS_DENIED,
        errno.EPERM: hresult.ERROR_ACCESS_DENIED,
        errno.ENOSPC: hresult.ERROR_DISK_FULL,
        errno.EDQUOT: hresult.ERROR_DISK_FULL,  # the user's quota: no room for them
        errno.EROFS: hresult.ERROR_WRITE_PROTECT,
        errno.EEXIST: hresult.ERROR_FILE_EXISTS,
        errno.ENAMETOOLONG: hresult.ERROR_FILENAME_EXCED_RANGE,
        errno.ELOOP: hresult.ERROR_ACCESS_DENIED,  # a link at a temp name (open_temp)
    }.get(exc.errno or 0)
    return hresult.hresult_from_win32(win32) if win32 else hresult.E_FAIL
