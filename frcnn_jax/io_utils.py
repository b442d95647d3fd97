"""Atomic file writes: the project's one helper (JSON reports, metrics.jsonl rewrites, config.json, exports).

    write_atomic(path, text_or_bytes)

The data goes to a temporary file in the same folder (a name unique to this host,
process and thread, created exclusively), which is then renamed over `path`
(`os.replace`, atomic on POSIX). A reader never sees a partial file, `path` may be the
file the data was read from, and a failure leaves `path` as it was and no temporary.
"""

from __future__ import annotations

import os
import pathlib
import socket
import threading


def temporary_name(path: pathlib.Path) -> pathlib.Path:
    """The temporary beside `path`: ".<name>.tmp-<host>-<pid>-<thread>" (glob ".<name>.tmp*")."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}")


def write_atomic(path, data: str | bytes) -> pathlib.Path:
    """Writes `data` (str: UTF-8 text, bytes: as is) to `path` atomically; returns `path` as a Path."""
    path = pathlib.Path(path)
    tmp = temporary_name(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "xb") as f:
            f.write(payload)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
