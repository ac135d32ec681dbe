"""The import rule between the folders (pyproject.toml [tool.importlinter]), checked by import-linter
on the installed captioner.* packages, and shown to catch a wrong import in a copy of them."""
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = REPO / "pyproject.toml"
# import-linter's Python API (importing importlinter.api configures it), in a child interpreter:
# grimp finds each package through its import spec, and this process has imported the checkout's
LINT = ("import sys; import importlinter.api; from importlinter.application.use_cases import lint_imports; "
        "sys.exit(0 if lint_imports(config_filename=sys.argv[1], cache_dir=None, no_logo=True) else 1)")


def lint(config: Path, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)  # before site-packages, where the installed captioner.* lies
    return subprocess.run([sys.executable, "-c", LINT, str(config)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def test_the_folders_keep_their_contracts(tmp_path):
    done = lint(PYPROJECT, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    assert len(contracts) == 2
    for contract in contracts:
        assert f"{contract['name']} KEPT" in done.stdout


def _all_but_python(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__" or (Path(folder, n).is_file() and not n.endswith(".py"))]


@pytest.fixture
def copy(tmp_path) -> Path:
    """The Python files of every folder pyproject.toml maps, laid out as they install (captioner/core/...)
    beside a copy of pyproject.toml, for import-linter to check the copy instead of the checkout."""
    root = tmp_path / "copy"
    for package, folder in tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"].items():
        shutil.copytree(REPO / folder, root / package.replace(".", "/"), ignore=_all_but_python)
    shutil.copy(PYPROJECT, root / "pyproject.toml")
    return root


@pytest.mark.parametrize(("module", "line", "contract_type", "import_"), [
    ("core/errors.py", "from captioner.api import create_app", "layers", "captioner.core.errors -> captioner.api"),
    ("api/images.py", "import captioner.worker", "independence", "captioner.api.images -> captioner.worker"),
])
def test_a_wrong_import_breaks_a_contract_and_is_named(copy, module, line, contract_type, import_):
    unchanged = lint(copy / "pyproject.toml", copy, pythonpath=copy)
    assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr  # so what breaks is the line below
    with open(copy / "captioner" / module, "a") as f:
        f.write(f"\n{line}\n")
    done = lint(copy / "pyproject.toml", copy, pythonpath=copy)
    assert done.returncode == 1, done.stdout + done.stderr
    [contract] = [c for c in tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
                  if c["type"] == contract_type]
    assert f"{contract['name']} BROKEN" in done.stdout, done.stdout
    assert import_ in done.stdout, done.stdout
