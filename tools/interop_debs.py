#!/usr/bin/env python3
"""Unpack Debian POP3 server packages for the interop matrix, without installing them.

popa3d, courier-pop and cyrus-pop3d each declare ``Conflicts: pop3-server``, which
dovecot-pop3d and mailutils-pop3d provide: apt installs at most one of them. So the matrix
never installs them. This script downloads each package named on the command line with
``apt-get download`` and unpacks it (``dpkg-deb -x``, control files in ``DEBIAN/``) into
``DEST/<package>/``. No maintainer script runs: no system user, no inetd entry, no daemon on
port 110. The tests lay each tree over / in a private mount namespace (see
tests/support/pop3_servers.py). What the unpacked packages depend on, apart from each other
and a mail transport agent (only needed to send mail), is installed with apt-get as usual.

A package already unpacked at the candidate version is left alone, so running it again is
cheap. Needs root for the apt-get install of the dependencies (run from ``make interop-deps``).

Usage: tools/interop_debs.py DEST PACKAGE...
"""

# Runs apt-get, apt-cache, dpkg-deb and dpkg-query from PATH with fixed options and package
# names from its own command line: S603/S607 do not apply.
# ruff: noqa: S603, S607

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Alternatives that stand for "some MTA": the servers only receive mail.
SKIPPED_DEPENDENCIES = frozenset({"default-mta", "mail-transport-agent"})
_NAME = re.compile(r"[a-z0-9][a-z0-9.+-]*")
_APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def candidate_versions(packages: list[str], *, update: bool = True) -> dict[str, str]:
    """Each package's candidate version (one apt-cache call); the package lists are fetched
    once if a package has none."""
    output = subprocess.run(
        ["apt-cache", "policy", *packages], check=True, capture_output=True, text=True
    ).stdout
    versions: dict[str, str] = {}
    package = ""
    for line in output.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            package = line[:-1]
        key, _, value = line.strip().partition(":")
        if key == "Candidate" and value.strip() not in ("", "(none)"):
            versions[package] = value.strip()
    missing = [package for package in packages if package not in versions]
    if missing and update:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=_APT_ENV)
        return candidate_versions(packages, update=False)
    if missing:
        raise SystemExit(f"no installation candidate for {' '.join(missing)}")
    return versions


def control_fields(tree: Path) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = ""
    for line in (tree / "DEBIAN" / "control").read_text().splitlines():
        if line[:1] in (" ", "\t") and key:
            fields[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def unpack(package: str, version: str, dest: Path) -> None:
    tree = dest / package
    if (tree / "DEBIAN" / "control").exists() and control_fields(tree).get("Version") == version:
        return
    print(f"unpacking {package} {version} into {tree}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        # As root, apt-get would fetch as the _apt user, who cannot write here.
        subprocess.run(
            ["apt-get", "download", "-qq", "-o", "APT::Sandbox::User=root", f"{package}={version}"],
            check=True,
            cwd=scratch,
        )
        (deb,) = Path(scratch).glob("*.deb")
        if tree.exists():
            shutil.rmtree(tree)
        tree.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
        subprocess.run(["dpkg-deb", "-e", str(deb), str(tree / "DEBIAN")], check=True)


def dependencies(trees: list[Path]) -> list[str]:
    """The first alternative of every Depends clause that no unpacked package satisfies."""
    unpacked = {tree.name for tree in trees}
    wanted: list[str] = []
    for tree in trees:
        fields = control_fields(tree)
        clauses = [fields.get("Pre-Depends", ""), fields.get("Depends", "")]
        for clause in ",".join(clauses).split(","):
            names = []
            for alternative in clause.split("|"):
                match = _NAME.match(alternative.strip())
                if match:
                    names.append(match.group(0))
            if not names or unpacked.intersection(names) or SKIPPED_DEPENDENCIES & set(names):
                continue
            if names[0] not in wanted:
                wanted.append(names[0])
    return wanted


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    dest = Path(argv[1]).resolve()
    packages = argv[2:]
    for package, version in candidate_versions(packages).items():
        unpack(package, version, dest)
    wanted = dependencies([dest / package for package in packages])
    # One query for all: a name dpkg has never heard of is simply not in the output.
    status = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n", *wanted],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split("\n")
    installed = {line.split()[0] for line in status if line.endswith(" installed")}
    missing = [name for name in wanted if name not in installed]
    if missing:
        print("installing dependencies:", " ".join(missing), flush=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            check=True,
            env=_APT_ENV,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
