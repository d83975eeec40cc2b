"""limit_malloc_arenas: caps glibc's arenas through mallopt and the environment, never over the user's setting."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

SCRIPT = ("import os; from wsi_response.malloc_arenas import limit_malloc_arenas; "
          "print(limit_malloc_arenas(), os.environ['MALLOC_ARENA_MAX'])")


def _run(env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_caps_arenas_unless_the_user_set_them():
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    assert _run(env) == "True 2"  # mallopt accepted; child processes inherit the variable
    assert _run({**env, "MALLOC_ARENA_MAX": "4"}) == "False 4"
