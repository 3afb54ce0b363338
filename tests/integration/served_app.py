"""``pacsflow serve``'s app under uvicorn on a loopback port, in a thread of this process, for as long
as a ``with`` block runs."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


@contextmanager
def serving(app: Any, port: int) -> Iterator[str]:
    """The base URL of ``app`` served on 127.0.0.1:``port``. The server's thread runs in the caller's
    context: Prefect's settings (a test server's PREFECT_API_URL, which STOW-RS emits to) live in a
    context variable that a new thread would not see."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=contextvars.copy_context().run, args=(server.run,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
