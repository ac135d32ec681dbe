"""What `pip install` makes of pyproject.toml: the extras' dependency closures, and a wheel that
installs captioner.* alone and runs outside the checkout."""
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
PACKAGE_DIR: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
TORCH = re.compile(r"torch|torchvision|timm|triton|nvidia-.*")  # the model's stack and its CUDA wheels


def _requirements(name: str, extra: str) -> list[Requirement]:
    """What installing name[extra] asks for ("" = no extra) on this platform: this project's from its
    pyproject.toml (the source, not a possibly stale install), the others' from their installed metadata."""
    if name == canonicalize_name(PROJECT["name"]):
        raw = PROJECT["optional-dependencies"][extra] if extra else PROJECT["dependencies"]
        return [Requirement(r) for r in raw]
    try:
        raw = importlib.metadata.distribution(name).requires or []
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{name} is not installed: install the project with its [test] extra first")
    return [r for r in map(Requirement, raw) if r.marker is None or r.marker.evaluate({"extra": extra})]


def closure(extra: str) -> set[str]:
    """The distributions `pip install 'captioner[extra]'` installs here, by canonical name."""
    todo = [(canonicalize_name(PROJECT["name"]), "")] + ([(canonicalize_name(PROJECT["name"]), extra)] if extra else [])
    seen: set[tuple[str, str]] = set()
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        for req in _requirements(name, wanted):
            dependency = canonicalize_name(req.name)
            todo += [(dependency, "")] + [(dependency, e) for e in req.extras]
    return {name for name, _ in seen}


CONSTRAINTS = REPO / "constraints.txt"
CONSTRAINTS_HEADER = """\
# Every distribution `pip install -e '.[test]'` installs, at the version CI and the README's set-up
# install (`-c constraints.txt`): the same, known versions everywhere, above the known CVEs' fixes.
# Regenerate after changing pyproject.toml or upgrading: .venv/bin/python tests/test_packaging.py > constraints.txt
"""


# the venv's own tools: `python3 -m venv` brings them at its Python's version, which the
# dependencies' floors (torch: setuptools>=77.0.3) may then raise
UNPINNED = {canonicalize_name(PROJECT["name"]), "setuptools", "pip"}


def pinned() -> str:
    """constraints.txt as it should read: the [test] extra's closure at the installed versions."""
    names = sorted(closure("test") - UNPINNED)
    return CONSTRAINTS_HEADER + "".join(f"{n}=={importlib.metadata.version(n)}\n" for n in names)


def test_the_constraints_file_pins_every_distribution_of_the_test_extra():
    pins = dict(line.split("==") for line in CONSTRAINTS.read_text().splitlines() if line and not line.startswith("#"))
    missing = sorted(closure("test") - UNPINNED - set(pins))
    assert not missing, f"constraints.txt lacks {missing}: regenerate it ({CONSTRAINTS_HEADER.splitlines()[-1][2:]})"
    for name, version in pins.items():  # and every pin meets this project's own floors
        for req in _requirements(canonicalize_name(PROJECT["name"]), "") + [
                r for extra in PROJECT["optional-dependencies"] for r in _requirements("captioner", extra)]:
            if canonicalize_name(req.name) == name:
                assert req.specifier.contains(version, prereleases=True), f"{name}=={version} breaks {req}"
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text()
    setup = "pip install -e '.[test]' -c constraints.txt"
    assert setup in readme and setup in ci


def test_the_base_install_has_neither_torch_nor_flask():
    installed = closure("")
    assert {"sqlalchemy", "celery", "redis", "boto3"} <= installed  # the closure follows extras (celery[redis])
    assert not {n for n in installed if TORCH.fullmatch(n)} and "flask" not in installed


def test_the_api_extra_installs_no_torch():
    installed = closure("api")
    assert {"flask", "gunicorn", "flower", "tornado", "sqlalchemy"} <= installed
    assert not {n for n in installed if TORCH.fullmatch(n)}, sorted(n for n in installed if TORCH.fullmatch(n))


def test_the_worker_extra_installs_torch():
    installed = closure("worker")
    assert {"torch", "torchvision", "timm", "celery-batches"} <= installed
    assert "flask" not in installed


def _source(root: Path) -> Path:
    """What the build reads, copied out of the checkout: pyproject.toml, the readme it names and
    the folders it maps (a build in place would write build/ and *.egg-info into the checkout)."""
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    shutil.copy(REPO / PROJECT["readme"], root / PROJECT["readme"])
    for folder in PACKAGE_DIR.values():
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _build_wheel(source: Path, out: Path) -> Path:
    """pip's wheel of source. Without build isolation when this interpreter has the build back-end
    pyproject.toml asks for; otherwise pip fetches it from the package index."""
    isolation = []
    try:
        if all(importlib.metadata.version(r.name) in r.specifier
               for r in map(Requirement, PYPROJECT["build-system"]["requires"])):
            isolation = ["--no-build-isolation"]
    except importlib.metadata.PackageNotFoundError:
        pass
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(out),
                           str(source)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    [wheel] = out.glob("*.whl")
    return wheel


def _expected_files() -> set[str]:
    """Every module of the mapped folders and every file their package-data patterns match, as
    captioner/... paths."""
    expected = set()
    for package, folder in PACKAGE_DIR.items():
        installed_as = package.replace(".", "/")
        for path in (REPO / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                expected.add(f"{installed_as}/{path.relative_to(REPO / folder).as_posix()}")
        for pattern in PYPROJECT["tool"]["setuptools"]["package-data"].get(package, []):
            for path in (REPO / folder).glob(pattern):
                expected.add(f"{installed_as}/{path.relative_to(REPO / folder).as_posix()}")
    return expected


@pytest.mark.integration  # pip builds (from the package index without the back-end here) and installs: ~15 s
def test_the_wheel_holds_captioner_alone_and_runs_outside_the_checkout(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    wheel = _build_wheel(_source(source), tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"captioner", f"captioner-{PROJECT['version']}.dist-info"}
    assert not _expected_files() - set(names), sorted(_expected_files() - set(names))
    for shipped in ("captioner/model/checkpoints/default.pt", "captioner/api/templates/base.html",
                    "captioner/bench/search_queries.txt", "captioner/migrations/script.py.mako"):
        assert shipped in names
    assert any(re.fullmatch(r"captioner/migrations/versions/\w+\.py", n) for n in names)

    # a fresh venv that sees this interpreter's dependencies through plain path lines: a .pth line
    # naming a directory adds it to sys.path without running the .pth files in it, so the editable
    # install's finder, which maps captioner.* onto the checkout, is never loaded
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    site_dirs = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (Path(purelib) / "test-dependencies.pth").write_text("".join(f"{p}\n" for p in site_dirs))
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                           "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_") and k != "PYTHONPATH"}
    where = subprocess.run([python, "-c", "import captioner.model, captioner.cli; print(captioner.model.__file__)"],
                           cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where

    helped = subprocess.run([venv / "bin" / "captioner", "--help"], cwd=cwd, env=env, capture_output=True, text=True)
    assert helped.returncode == 0 and "describe" in helped.stdout, helped.stdout + helped.stderr
    photo = cwd / "photo.jpg"
    image = Image.new("RGB", (320, 240), (90, 150, 60))
    ImageDraw.Draw(image).ellipse((100, 60, 220, 180), fill=(200, 40, 40))
    image.save(photo)
    described = subprocess.run([venv / "bin" / "captioner", "describe", photo.name, "--json"], cwd=cwd, env=env,
                               capture_output=True, text=True, timeout=300)
    assert described.returncode == 0, described.stdout + described.stderr
    [line] = described.stdout.splitlines()
    result = json.loads(line)
    assert result["image"] == "photo.jpg" and result["text"].strip() and result["candidates"], result

    # the main job, embedded: the shipped checkpoint found as captioner.model's, the migrations as
    # captioner.migrations' package data, a SQLite file made in the working directory
    captioned = subprocess.run([venv / "bin" / "captioner", "caption", photo.name], cwd=cwd, env=env,
                               capture_output=True, text=True, timeout=300)
    assert captioned.returncode == 0, captioned.stdout + captioned.stderr
    assert "1 images: 1 done (1 captioned now, 0 already), 0 failed, 0 left" in captioned.stdout, captioned.stdout
    assert (cwd / "captioner.db").is_file()


if __name__ == "__main__":
    sys.stdout.write(pinned())
