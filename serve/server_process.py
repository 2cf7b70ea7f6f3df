"""`loraplex serve` in a child process: started on a free port, awaited until ready, stopped.

For the demo and the load benchmark, which talk to the server the way users do.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def served(config: Path, log: Path, timeout: float = 600) -> Iterator[tuple[str, int]]:
    """Run `loraplex serve CONFIG --port FREE`; yields (its base URL, its pid)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loraplex = str(Path(sys.executable).parent / "loraplex")
    with Path(log).open("w") as out:
        process = subprocess.Popen(
            [loraplex, "serve", str(config), "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url, process, timeout, Path(log))
            yield url, process.pid
        finally:
            process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_ready(url: str, process: subprocess.Popen, timeout: float, log: Path) -> None:
    if not answers(f"{url}/ready", process, timeout):
        process.kill()
        raise RuntimeError(f"loraplex serve did not start:\n{log.read_text()[-3000:]}")


def answers(url: str, process: subprocess.Popen, timeout: float) -> bool:
    """Poll `url` until it answers 200 (True), or until `process` exits or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.5)
