"""Importing the package makes no network call (air-gapped hospital machines, reproducible runs)."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import urllib.request
calls = []
def record(self, url, *args, **kwargs):
    calls.append(getattr(url, "full_url", url))
    raise OSError("network disabled in this test")
urllib.request.OpenerDirector.open = record
import busi_mtl.data.transforms
print(len(calls), calls)
"""


def _probe(env: dict[str, str]) -> str:
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_import_makes_no_network_call():
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    assert _probe(env).startswith("0 ")


def test_user_can_still_enable_the_update_check():
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "0"}
    assert _probe(env).startswith("1 ")
