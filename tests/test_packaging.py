"""Packaging: one version string, in fastconv/__init__.py, which setup.py reads."""
import os
import subprocess
import sys

import fastconv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(*args):
    env = dict(os.environ, FASTCONV_FORCE_CPU="1")
    env.pop("FASTCONV_FORCE_CUDA", None)
    proc = subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()


def test_setup_py_reads_the_package_version():
    assert _setup("--version")[-1] == fastconv.__version__

