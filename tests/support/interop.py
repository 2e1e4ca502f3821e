"""Decide whether an interop test can run on this machine.

Owns the rule for missing external programs: skip, or fail when POPROXY_REQUIRE_INTEROP=1
(CI sets it so that a missing program cannot silently turn the interop suite green).
Must never install anything or change the machine.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

REQUIRE_INTEROP_ENV = "POPROXY_REQUIRE_INTEROP"


def interop_unavailable(reason: str) -> NoReturn:
    """Skip the current test, or fail it when interop tests are required."""
    if os.environ.get(REQUIRE_INTEROP_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_INTEROP_ENV}=1)", pytrace=False)
    pytest.skip(reason)


def require_program(path_or_name: str) -> str:
    """Return the executable's path: a name is looked up on PATH, a path is checked as is."""
    path = shutil.which(path_or_name)
    if path is None:
        interop_unavailable(f"{path_or_name} is not installed or not executable")
    return path
