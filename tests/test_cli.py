"""The `poproxy` command: one clear line and exit status 2 for every set-up mistake."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
from support.proxy import Certificates


def poproxy(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "poproxy", *arguments],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def write_config(
    tmp_path: Path, cert: Path, key: Path, listen: str = "127.0.0.1:0", user: str = "nobody"
) -> Path:
    path = tmp_path / "poproxy.yaml"
    path.write_text(
        f"""user: {user}

listeners:
  - name: pop3s
    listen: "{listen}"
    tls: implicit
tls:
  certificates:
    - cert: {cert}
      key: {key}
backends:
  - name: legacy
    servers: ["127.0.0.1:110"]
"""
    )
    return path


def assert_one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"poproxy: {expected}\n"


def test_check_config_prints_certificates_and_ok(
    tmp_path: Path, certificates: Certificates
) -> None:
    path = write_config(tmp_path, certificates.files.cert, certificates.files.key)
    result = poproxy("check-config", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert "names localhost, 127.0.0.1, ::1; expires " in result.stdout
    assert result.stdout.endswith(f"{path}: OK\n")


def test_bad_config_names_file_and_key(tmp_path: Path, certificates: Certificates) -> None:
    path = write_config(
        tmp_path, certificates.files.cert, certificates.files.key, listen="127.0.0.1:99999"
    )
    for command in ("check-config", "run"):
        assert_one_line_error(
            poproxy(command, "-c", str(path)),
            f"{path}: listeners[0].listen: port 99999 out of range",
        )


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert_one_line_error(
        poproxy("check-config", "-c", str(path)), f"{path}: cannot read: No such file or directory"
    )


def test_unreadable_certificate(tmp_path: Path, certificates: Certificates) -> None:
    missing = tmp_path / "missing.crt"
    path = write_config(tmp_path, missing, certificates.files.key)
    assert_one_line_error(
        poproxy("run", "-c", str(path)),
        f"{path}: tls.certificates[0].cert: cannot read {missing}: No such file or directory",
    )


def test_key_that_does_not_match_the_certificate(
    tmp_path: Path, certificates: Certificates
) -> None:
    other = tmp_path / "other.key"
    trustme.CA().issue_cert("localhost").private_key_pem.write_to_path(str(other))
    path = write_config(tmp_path, certificates.files.cert, other)
    assert_one_line_error(
        poproxy("check-config", "-c", str(path)),
        f"{path}: tls.certificates[0].key: {other} does not match the certificate in"
        f" {certificates.files.cert}",
    )


def test_key_file_that_is_not_a_key(tmp_path: Path, certificates: Certificates) -> None:
    path = write_config(tmp_path, certificates.files.cert, certificates.files.cert)
    assert_one_line_error(
        poproxy("check-config", "-c", str(path)),
        f"{path}: tls.certificates[0].key: {certificates.files.cert} holds no unencrypted"
        " PEM private key",
    )


def test_port_that_cannot_be_bound(tmp_path: Path, certificates: Certificates) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(
            tmp_path, certificates.files.cert, certificates.files.key, f"127.0.0.1:{port}"
        )
        assert_one_line_error(
            poproxy("run", "-c", str(path)),
            f"{path}: listeners[0].listen: cannot listen on 127.0.0.1:{port}:"
            " Address already in use",
        )


@pytest.mark.parametrize("arguments", [(), ("run",), ("frobnicate",)])
def test_usage_errors_exit_2(arguments: tuple[str, ...]) -> None:
    result = poproxy(*arguments)
    assert result.returncode == 2
    assert "usage: poproxy" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="only a process started as root drops privileges")
def test_root_without_a_user_refuses_to_run(tmp_path: Path, certificates: Certificates) -> None:
    path = write_config(tmp_path, certificates.files.cert, certificates.files.key)
    path.write_text(path.read_text().replace("user: nobody\n", ""))
    assert_one_line_error(
        poproxy("run", "-c", str(path)),
        f"{path}: user: started as root, so a user to run as is required"
        " (user: root keeps root, which is not recommended)",
    )
