"""Permissions of files and directories written through temporaries (atomic writes).

``tempfile.mkstemp`` creates 0600 files and ``tempfile.mkdtemp`` 0700 directories, and a rename keeps that mode, so
outputs written atomically would be private to their owner. :func:`set_default_mode` gives them the mode a plain
``open`` / ``mkdir`` would have (0644 files / 0755 directories under the usual umask 022).
"""

from __future__ import annotations

import os
import threading

_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _lock:  # elsewhere: set and restore (a short window that other threads' file creation could see)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """0666 (files) or 0777 (directories) less the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def set_default_mode(target: int | str | os.PathLike, directory: bool = False) -> None:
    """chmod ``target`` (an open file descriptor or a local path) to :func:`default_mode`."""
    if isinstance(target, int):
        os.fchmod(target, default_mode(directory))
    else:
        os.chmod(target, default_mode(directory))
