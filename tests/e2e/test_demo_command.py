"""`poproxy demo`: the in-memory backend behind the proxy, reachable as the printed lines say."""

from __future__ import annotations

import asyncio
import poplib
import re
import ssl
from pathlib import Path

import pytest

from poproxy.demo import DEMO_CONFIG, SAMPLE_MESSAGES, run_demo


@pytest.mark.asyncio
async def test_demo_serves_the_sample_mail_and_stops(tmp_path: Path) -> None:
    # The packaged demo configuration, moved to free ports.
    config_file = tmp_path / "demo.yaml"
    config_file.write_text(re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:0", DEMO_CONFIG.read_text()))
    printed: list[str] = []
    ready = asyncio.Event()
    stop = asyncio.Event()

    def out(text: str) -> None:
        printed.append(text)
        ready.set()

    demo = asyncio.create_task(run_demo(config_file, stop, out))
    async with asyncio.timeout(10):
        await ready.wait()
    text = printed[0]
    ca = re.search(r"--cacert (\S+)", text)
    pop3s = re.search(r"pop3s://127\.0\.0\.1:(\d+)/", text)
    assert ca and pop3s
    assert "openssl s_client -quiet -starttls pop3" in text
    context = ssl.create_default_context(cafile=ca.group(1))

    def fetch() -> list[bytes]:
        client = poplib.POP3_SSL("127.0.0.1", int(pop3s.group(1)), context=context, timeout=5)
        client.user("alice")
        client.pass_("wonderland")
        _, lines, _ = client.retr(3)
        client.quit()
        return lines

    lines = await asyncio.to_thread(fetch)
    assert b"\r\n".join(lines) + b"\r\n" == SAMPLE_MESSAGES[2]
    stop.set()
    async with asyncio.timeout(10):
        await demo


def test_config_demo_yaml_is_the_packaged_demo_configuration() -> None:
    example = Path(__file__).parents[2] / "config" / "demo.yaml"
    assert example.read_text() == DEMO_CONFIG.read_text()
