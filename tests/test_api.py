"""The curated public surface: every name in __all__ resolves; importing the package skips torch."""
from __future__ import annotations

import subprocess
import sys

import wsi_response


def test_all_names_resolve():
    for name in wsi_response.__all__:
        assert getattr(wsi_response, name) is not None, name
    assert len(set(wsi_response.__all__)) == len(wsi_response.__all__)


def test_import_does_not_load_torch():
    code = "import sys, wsi_response; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
