"""Virtual environments the tests make: new interpreters that import what this one imports."""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

import autocoder


def venv_importing_ours(path: Path) -> Path:
    """Make a venv at `path` whose python imports what the running interpreter imports (its
    packages, and autocoder from the same checkout), and return that python.

    `python -m venv --system-site-packages` does not: run from a venv, it makes one on the
    *base* interpreter, whose packages may lack ipykernel or hold another autocoder. So the
    new venv's own site-packages gets a .pth that names ours (with site.addsitedir, so that the
    .pth files there, editable installs among them, count too). Its own packages come first.
    """
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60
    )
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    ours = [*site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        ours.append(site.getusersitepackages())
    checkout = Path(autocoder.__file__).resolve().parent.parent
    lines = [str(checkout)]
    lines.append("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in ours))
    Path(purelib, "_imports_as_the_tests_do.pth").write_text("\n".join(lines) + "\n")
    return python
