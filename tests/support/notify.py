"""A $NOTIFY_SOCKET of the test's own, to hear what poproxy tells systemd (sd_notify)."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path


class NotifySocket:
    """A bound datagram socket; `environment` points a child process at it, and
    `message()` waits at most `wait` seconds for each state."""

    def __init__(self, path: Path, wait: float = 10.0) -> None:
        self.path = path
        self.wait = wait
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    @property
    def environment(self) -> dict[str, str]:
        return {**os.environ, "NOTIFY_SOCKET": str(self.path)}

    async def message(self) -> str:
        """The next state sent."""
        async with asyncio.timeout(self.wait):
            data = await asyncio.get_running_loop().sock_recv(self.sock, 4096)
        return data.decode()

    def close(self) -> None:
        self.sock.close()
