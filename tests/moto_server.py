"""``python -m tests.moto_server ARGS``: moto's standalone server (``moto.server`` with the same
arguments) whose request recorder writes one request at a time.

The server answers requests in threads, and its recorder appends each request to the recording
in two writes (the JSON, then the line end) through a buffered file: two PUTs at once (the
nightly run's de-identification workers write in parallel) could glue or interleave their lines,
and the replay after a restart then failed on that line and brought nothing back.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from moto.moto_api._internal.recorder.models import Recorder
from moto.server import main

_lock = threading.Lock()
_record = Recorder._record_request


def _one_at_a_time(self: Recorder, *args: Any, **kwargs: Any) -> None:
    with _lock:
        _record(self, *args, **kwargs)


Recorder._record_request = _one_at_a_time  # type: ignore[method-assign]

if __name__ == "__main__":
    main(sys.argv[1:])
