"""Real installed distributions, for the tests of plugin loading."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path


def install_distribution(site: Path, dist: str, entry_points: Mapping[str, str], modules: Mapping[str, str]) -> Path:
    """Write the distribution ``dist`` into the folder ``site`` and return ``site``.

    Its dist-info declares ``entry_points`` (name to value) in the group
    `sdjobs`; each of ``modules`` (name to source; `pkg/__init__` and `pkg/mod`
    for a package) is a module beside it.  With
    ``site`` on ``sys.path`` (or ``PYTHONPATH``) it is installed.  A module is
    imported once per process: give each test modules of its own.
    """
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    declared = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[sdjobs]\n{declared}")
    for module, source in modules.items():
        path = site / f"{module}.py"
        path.parent.mkdir(exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return site
