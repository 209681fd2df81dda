"""The packages keep their shape: no module of ``rstr/``, ``export/`` or ``engines/`` past 500 lines.

A module that grows past it holds more than one concern; split it into a package of modules
(as ``rstr/search/`` and ``rstr/calibrate/`` are) rather than raising the limit.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("rstr", "export", "engines")
MAX_LINES = 500


def test_no_module_is_over_500_lines():
    modules = [path for folder in FOLDERS for path in sorted((ROOT / folder).rglob("*.py"))]
    assert {folder for folder in FOLDERS if ROOT / folder / "__init__.py" in modules} == set(FOLDERS)
    lines = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in modules}
    assert {name: n for name, n in lines.items() if n > MAX_LINES} == {}
