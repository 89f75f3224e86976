"""Packaging rules: vitok_core stays a pure-PyTorch library."""

from __future__ import annotations

import subprocess
import sys


def test_vitok_core_imports_no_ray_prefect_or_deepspeed():
    code = (
        "import sys, pkgutil, importlib, vitok_core\n"
        "for m in pkgutil.walk_packages(vitok_core.__path__, 'vitok_core.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'prefect', 'deepspeed'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
