"""The built wheel holds the whole package: installed alone into a fresh virtual environment (which sees this
environment's dependencies, not its editable jaxtrace nor the source tree), every module of it imports."""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import jaxtrace

REPO = Path(__file__).resolve().parents[1]

IMPORT_ALL = """
import importlib, json, sys
import jaxtrace
files = {}
for name in sys.argv[1:]:
    files[name] = importlib.import_module(name).__file__
print(json.dumps({"files": files, "version": jaxtrace.__version__, "path": sys.path}))
"""


def _run(args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _module(member: str) -> str:
    parts = Path(member).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.slow
def test_the_wheel_alone_imports_every_module(tmp_path):
    # Build from a copy of the sources, so that the build leaves nothing (build/, *.egg-info) in the tree.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "jaxtrace", source / "jaxtrace", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                  "-w", tmp_path / "dist", source], cwd=tmp_path)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("jaxtrace-*.whl")
    assert wheel.name.startswith(f"jaxtrace-{jaxtrace.__version__}-")

    with zipfile.ZipFile(wheel) as archive:
        members = archive.namelist()
        in_wheel = sorted(m for m in members if m.startswith("jaxtrace/") and m.endswith(".py"))
        in_tree = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "jaxtrace").rglob("*.py")
                         if "__pycache__" not in p.parts)
        assert in_wheel == in_tree  # no module (nor a folder without __init__.py) left out

        # A fresh environment with the wheel unpacked into its site-packages, then this environment's site-packages
        # listed in a .pth file: plain paths, appended after the wheel's, whose own .pth files (the editable
        # jaxtrace's finder among them) are not run.
        venv = tmp_path / "venv"
        created = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
        assert created.returncode == 0, created.stderr[-3000:]
        purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
        assert purelib.is_dir(), purelib
        archive.extractall(purelib)
    parents = [path for path in site.getsitepackages() if Path(path).is_dir()]
    (purelib / "zz_parent_environment.pth").write_text("".join(f"{path}\n" for path in parents))

    python = venv / "bin" / "python"
    modules = [_module(m) for m in in_wheel if Path(m).stem != "__main__"]  # __main__ runs the command line
    done = _run([python, "-c", IMPORT_ALL, *modules], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-5000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["version"] == jaxtrace.__version__
    assert sorted(result["files"]) == sorted(modules) and len(modules) > 40
    outside = {name: file for name, file in result["files"].items() if not Path(file).is_relative_to(purelib)}
    assert not outside, outside
    assert Path(result["files"]["jaxtrace"]) == purelib / "jaxtrace" / "__init__.py"
    assert not any(Path(entry).resolve() in (REPO.resolve(), Path(jaxtrace.__file__).resolve().parents[1])
                   for entry in result["path"] if entry), result["path"]

    version = _run([python, "-m", "jaxtrace", "--version"], cwd=tmp_path)
    assert (version.returncode, version.stdout.strip()) == (0, jaxtrace.__version__), version.stderr[-3000:]
