#!/usr/bin/env python3
"""What an idle TLS connection costs a bare uvloop server: the floor under poproxy's memory.

A server in this process accepts TLS connections (the bench's ECDSA P-256
certificate, TLS 1.3) and holds them; with `--backend` it also opens and
holds one plaintext connection per client to a local TCP server, as a proxy
does. N clients in a child process (so their memory is not counted) connect,
finish the handshake, exchange one line and stay. The report is this
process's VmRSS growth per client, and what glibc's malloc counts as in use:
the part of poproxy's figure in bench/RESULTS.md that no Python code above
uvloop and the ssl module can remove.

    .venv/bin/python bench/floor.py --connections 2000 --backend
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import subprocess
import sys
import tempfile
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # bench/run.py, beside this file

CLIENT = """
import socket, ssl, sys
context = ssl.create_default_context(cafile=sys.argv[1])
held = []
for _ in range(int(sys.argv[3])):
    raw = socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=30)
    client = context.wrap_socket(raw, server_hostname="localhost")
    client.sendall(b"NOOP\\r\\n")
    client.recv(64)
    held.append(client)
print("held", flush=True)
sys.stdin.read()  # until the parent is done measuring
"""


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def malloc_counts() -> tuple[int, int]:
    """glibc malloc's heap bytes in use, and its number of mmapped blocks."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks), int(info.hblks)


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def measure(connections: int, backend: bool) -> tuple[float, float, float]:
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory(prefix="poproxy-floor-") as name:
        certificates = run.make_certificates(Path(name))
        context = run.ssl.SSLContext(run.ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificates.cert, certificates.key)
        held: list[asyncio.BaseTransport] = []

        class Plain(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                held.append(transport)

        plain = await loop.create_server(Plain, run.HOST, 0)
        plain_port = plain.sockets[0].getsockname()[1]
        opened = asyncio.Event()
        opening: set[asyncio.Task[None]] = set()

        class Front(asyncio.Protocol):
            transport: asyncio.Transport

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport  # type: ignore[assignment]
                held.append(transport)
                if backend:
                    task = loop.create_task(self.open_backend())
                    opening.add(task)
                    task.add_done_callback(opening.discard)

            async def open_backend(self) -> None:
                transport, _ = await loop.create_connection(asyncio.Protocol, run.HOST, plain_port)
                held.append(transport)
                if len(held) >= 3 * connections:  # front + backend here, backend's accept
                    opened.set()

            def data_received(self, data: bytes) -> None:
                self.transport.write(b"+OK\r\n")

        front = await loop.create_server(Front, run.HOST, 0, ssl=context)
        port = front.sockets[0].getsockname()[1]
        rss, (used, blocks) = rss_kib(), malloc_counts()
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, str(certificates.ca), str(port), str(connections),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert client.stdout is not None
            async with asyncio.timeout(120):
                line = await client.stdout.readline()
                if line.strip() != b"held":
                    raise SystemExit("the clients did not connect")
                if backend:
                    await opened.wait()
                await asyncio.sleep(1.0)  # let the last handshakes' buffers settle
            grown = (rss_kib() - rss) / connections
            now_used, now_blocks = malloc_counts()
            in_use = (now_used - used) / 1024 / connections
            mapped = (now_blocks - blocks) / connections
        finally:
            client.kill()
            await client.wait()
            for transport in held:
                transport.abort()  # type: ignore[attr-defined]
            front.close()
            plain.close()
    return grown, in_use, mapped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--backend", action="store_true", help="also hold a plaintext connection")
    args = parser.parse_args()
    if not 1 <= args.connections <= 9000:
        parser.error("--connections: 1 to 9000")
    run.raise_file_limit(2 * args.connections + 384)
    grown, in_use, mapped = uvloop.run(measure(args.connections, args.backend))
    what = "TLS connection and a plaintext one" if args.backend else "TLS connection"
    print(f"per idle {what}: {grown:.1f} KiB RSS; {in_use:.1f} KiB of malloc's heap in use;"
          f" {mapped:.2f} mmapped blocks (uvloop's 256 KiB TLS read buffers)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
