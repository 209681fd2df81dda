"""The runtime installs and runs without the training stack (``pip install 'rstr[runtime,cpu]'``).

A bundle built by the toolchain is loaded and run in fresh processes that must never import
torch, diffusers or any other module of the ``toolchain`` extra; a toolchain command run where
that extra is missing says which extra to install, in one line.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rstr._cli import TOOLCHAIN_MODULES

ROOT = Path(__file__).resolve().parent.parent


def _toolchain_imported(modules) -> list[str]:
    return sorted({m for m in modules if m.partition(".")[0] in TOOLCHAIN_MODULES})


def test_pipeline_runs_without_importing_the_toolchain(pixel_dit_bundle):
    script = textwrap.dedent(f"""
        import json, sys, warnings
        warnings.simplefilter("ignore")  # auto falls back from TensorRT with a warning here
        from rstr.engines import Pipeline

        with Pipeline.load({str(pixel_dit_bundle)!r}) as pipe:
            out = pipe({{"class_labels": [3, 4]}}, seed=0)
        print(json.dumps({{"shape": list(out.images.shape), "backend": pipe.backend, "modules": sorted(sys.modules)}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["shape"] == [2, 8, 8, 1] and report["backend"].startswith("onnxruntime")
    assert "onnxruntime" in report["modules"]  # the check below looks at a process that really ran a bundle
    assert _toolchain_imported(report["modules"]) == []


def _imported_by(cmd: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``python -X importtime -m rstr.export.cli CMD``; the process and every module it imported."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "rstr.export.cli", *cmd], capture_output=True, text=True, timeout=300
    )
    modules = [
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and not line.endswith("imported package")
    ]
    return proc, modules


def test_cli_run_and_inspect_do_not_import_the_toolchain(pixel_dit_bundle, tmp_path):
    from PIL import Image
    from rstr.engines import Pipeline

    png = tmp_path / "x.png"
    proc, modules = _imported_by(
        ["run", str(pixel_dit_bundle), "--class", "3,4", "--seed", "5", "--backend", "onnxruntime", "--out", str(png)]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rstr.engines.onnxruntime" in modules
    assert _toolchain_imported(modules) == []
    # The PNG holds the two images side by side, 8-bit grey, as the Python API returns them.
    with Pipeline.load(pixel_dit_bundle, backend="onnxruntime") as pipe:
        images = pipe({"class_labels": [3, 4]}, seed=5).images
    expected = np.round(np.concatenate(list(images), axis=1)[..., 0] * 255).astype(np.uint8)
    with Image.open(png) as im:
        assert im.mode == "L" and im.size == (16, 8)
        np.testing.assert_array_equal(np.asarray(im), expected)

    proc, modules = _imported_by(["inspect", str(pixel_dit_bundle)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rstr.engines.bundle" in modules
    assert _toolchain_imported(modules) == []


@pytest.mark.parametrize(
    "command",
    [
        ("rstr.export.cli", "rstr-export", ["build", "--out", "{tmp}/b"]),
        ("rstr.export.cli", "rstr-export", ["verify", "{bundle}"]),
        ("rstr.cli", "rstr", ["sample", "--out", "{tmp}/s.png"]),
    ],
    ids=["rstr-export build", "rstr-export verify", "rstr sample"],
)
def test_toolchain_command_without_the_toolchain_names_the_extra(command, pixel_dit_bundle, tmp_path):
    module, prog, argv = command
    argv = [a.format(tmp=tmp_path, bundle=pixel_dit_bundle) for a in argv]
    # A runtime-only install, simulated: every toolchain module fails to import as if absent.
    script = textwrap.dedent(f"""
        import sys
        for name in {sorted(TOOLCHAIN_MODULES)!r}:
            sys.modules[name] = None
        sys.argv = [{prog!r}, *{argv!r}]
        from {module} import main
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"{prog}: error: `{prog} {argv[0]}` needs the toolchain")
    assert lines[0].endswith("pip install 'rstr[toolchain,cpu]'")
    assert not list(tmp_path.iterdir())  # nothing written


def _dist_name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()


def test_toolchain_modules_match_the_toolchain_extra():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    toolchain = {_dist_name(r) for r in project["optional-dependencies"]["toolchain"]}
    runtime = {_dist_name(r) for r in project["dependencies"] + project["optional-dependencies"]["runtime"]}
    assert "torch" in toolchain and not toolchain & runtime
    modules_of: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            modules_of.setdefault(_dist_name(dist), set()).add(module)
    # Every toolchain distribution is recognised by one of its modules, and every module named is the toolchain's.
    assert {d for d in toolchain if not modules_of.get(d, set()) & TOOLCHAIN_MODULES} == set()
    assert TOOLCHAIN_MODULES <= set().union(*(modules_of.get(d, set()) for d in toolchain))


def test_ci_runs_the_readme_commands_extras():
    """.ci/run runs lint, format and type checks, then the README's test command verbatim; both README
    commands install extras that exist."""
    tomllib = pytest.importorskip("tomllib")
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv && ")]
    assert len(commands) == 2 and commands[1].endswith("&& pytest -q")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci
    assert {"ruff check .", "ruff format --check .", "mypy build/typed/rstr"} <= set(ci[: ci.index(commands[1])])
    for command in commands:
        named = set(re.search(r"pip install -e '\.\[([a-z,]+)\]'", command).group(1).split(","))
        assert "toolchain" in named and named <= extras


def test_every_package_folder_is_installed():
    """A non-editable install (the runtime's) holds only the packages pyproject lists: every folder with an
    ``__init__.py`` under rstr/, export/ and engines/ must be one of them (a new subpackage is easy to miss)."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folder_of = {package: Path(folder) for package, folder in setuptools["package-dir"].items()}
    found = set()
    for package, folder in folder_of.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    assert found == set(setuptools["packages"])
