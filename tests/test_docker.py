"""Docker cannot run here: check what can be checked. compose.yaml parses, its builds name files
that exist, and every `captioner ...` command it runs is a real CLI command with real options."""
import re
import shlex
import tomllib
from pathlib import Path

import click
import pytest
import yaml

from captioner.cli import cli

DOCKER = Path(__file__).resolve().parent.parent / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
PACKAGE_FOLDERS = set(tomllib.loads((DOCKER.parent / "pyproject.toml").read_text())
                      ["tool"]["setuptools"]["package-dir"].values())
INSTRUCTIONS = {"FROM", "ENV", "WORKDIR", "COPY", "RUN", "USER", "EXPOSE", "CMD", "ARG", "LABEL"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _resolve(argv: list[str]) -> click.Command:
    """The click command `captioner argv...` runs, after parsing its options (as the CLI would)."""
    assert argv[0] == "captioner", argv
    command, args = cli, argv[1:]
    while isinstance(command, click.Group):
        name, args = args[0], args[1:]
        command = command.commands.get(name)
        assert command is not None, f"no `captioner ... {name}` command: {argv}"
    command.make_context(command.name, list(args))  # raises on an unknown option or a bad value
    return command


def _commands(compose: dict) -> list[list[str]]:
    found = []
    for service in compose["services"].values():
        if "command" in service:
            found.append(service["command"])
    for dockerfile in DOCKER.glob("*.Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("CMD "):
                found.append(yaml.safe_load(line[4:]))  # the exec form is a JSON array
    return [c for c in found if c[0] == "captioner"]


def test_compose_services_and_health_checks(compose):
    services = compose["services"]
    assert {"postgres", "redis", "s3", "migrate", "api", "worker", "webhooks", "flower"} <= set(services)
    for name in ("postgres", "redis", "s3", "api", "worker", "flower"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    assert services["api"]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert "CAPTIONER_FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    assert services["worker"]["build"]["dockerfile"] == "docker/worker.Dockerfile"


def test_compose_builds_name_existing_dockerfiles(compose):
    for service in compose["services"].values():
        if "build" in service:
            root = (DOCKER / service["build"]["context"]).resolve()
            assert (root / service["build"]["dockerfile"]).is_file()


def _instructions(dockerfile: Path) -> list[str]:
    """The file's instructions, one a line, continuation lines joined."""
    text = dockerfile.read_text().replace("\\\n", " ")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_dockerfiles_parse_and_copy_what_exists():
    root = DOCKER.parent
    for dockerfile in DOCKERFILES:
        lines = _instructions(dockerfile)
        assert lines[0].startswith("FROM "), dockerfile
        for line in lines:
            assert line.split()[0] in INSTRUCTIONS, line
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (root / source).exists(), f"{dockerfile.name}: {source}"
    assert "FROM nvidia/cuda:" in (DOCKER / "worker.Dockerfile").read_text()


def test_every_captioner_command_they_run_exists(compose):
    commands = _commands(compose)
    assert len(commands) >= 6
    ran = {_resolve(c).name for c in commands}
    assert {"serve", "worker", "flower", "upgrade"} <= ran


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_copy_every_folder_pyproject_maps(dockerfile):
    """A folder left out installs as an empty package; the dependency layer's placeholders must
    name each one too, or its `pip install` fails on a missing package folder."""
    lines = _instructions(dockerfile)
    copied = {source.strip("/") for line in lines if line.startswith("COPY ") for source in line.split()[1:-1]}
    assert PACKAGE_FOLDERS <= copied, PACKAGE_FOLDERS - copied
    [placeholders] = [re.search(r"for d in ([\w ]+); do mkdir -p", line) for line in lines if "for d in" in line]
    assert set(placeholders.group(1).split()) == PACKAGE_FOLDERS


def _pip_installs(dockerfile: Path) -> set[tuple[str, bool]]:
    """(what, with --no-deps) for each `pip install` of the project in the file's RUN lines."""
    found = set()
    for line in _instructions(dockerfile):
        if line.startswith("RUN "):
            for command in re.split(r"&&|;", line[4:]):
                words = shlex.split(command)
                if words[:2] == ["pip", "install"]:
                    found |= {(w, "--no-deps" in words) for w in words[2:] if w.startswith(".")}
    return found


def test_the_api_image_installs_the_api_extra_alone():
    assert _pip_installs(DOCKER / "api.Dockerfile") == {(".[api]", False), (".", True)}


def test_the_worker_image_installs_the_worker_extra():
    assert _pip_installs(DOCKER / "worker.Dockerfile") == {(".[worker]", False), (".", True)}
