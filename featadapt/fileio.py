"""Writing files without ever leaving a half-written one behind.

Standalone (no featadapt imports): tools/ load this file by its path.
"""

import contextlib
import os
import secrets
import stat

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def _new_temporary(path):
    """A new empty file beside `path`, created as open() creates files (0o666 less the
    umask) rather than mkstemp's owner-only 0o600, since it becomes `path` itself."""
    directory, name = os.path.split(os.path.abspath(path))
    while True:
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _sync_directory(directory):
    """Make the renames in `directory` durable. Best effort: by now they are done and
    every reader sees them, and some systems cannot sync a folder (Windows, some
    network file systems); at worst a power cut would bring back the old files, whole."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_files(writes):
    """Write several files, then rename them into place in the order given.

    writes: (path, write) pairs; write(tmp) writes one file's content into the
    temporary file tmp beside its path. Every file is written and flushed to disk
    before the first rename, so a failure while writing leaves every path as it
    was and no temporary behind. Each rename is atomic: a reader of one path sees
    its old file or its new one, never half; to make a group of files one unit,
    let the file readers trust be renamed last.
    """
    temporaries = []
    try:
        for path, write in writes:
            tmp = _new_temporary(path)
            temporaries.append(tmp)
            mode = stat.S_IMODE(os.stat(tmp).st_mode)
            write(tmp)
            if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
                os.chmod(tmp, mode)  # a writer that replaced the file (safetensors does) made it owner-only
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for (path, _), tmp in zip(writes, temporaries):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temporaries:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for directory in dict.fromkeys(os.path.dirname(os.path.abspath(path)) for path, _ in writes):
        _sync_directory(directory)


def write_atomically(path, write):
    """Call write(tmp) on a temporary file beside `path`, flush it to disk and
    rename it into place: readers see the old file or the new one, never half."""
    replace_files([(path, write)])


@contextlib.contextmanager
def folder_lock(directory, *, shared=False):
    """Hold an advisory lock on the folder `directory` itself (so no lock file
    appears in it): exclusive for writers, shared for readers, between threads
    and processes alike. Where folders cannot be locked (Windows, some network
    file systems) it holds none, and each file's atomic rename is all there is."""
    try:
        fd = os.open(directory, os.O_RDONLY) if fcntl is not None else None
    except OSError:
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            except OSError:
                pass
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock
