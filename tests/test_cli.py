"""The command line without a part of the install: a clear error naming the extra, not a traceback."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize(("blocked", "argv", "extra"), [
    ("torch", ["describe", "photo.jpg"], "worker"),
    ("pycocoevalcap", ["evaluate", "--images", ".", "--captions", "photo.jpg"], "train"),
])
def test_a_command_without_its_extra_names_the_extra(tmp_path, blocked, argv, extra):
    (tmp_path / "photo.jpg").write_bytes(b"not read")
    # None in sys.modules makes `import torch` fail as if it were not installed
    code = (f"import sys; sys.modules[{blocked!r}] = None; from captioner.cli import cli; "
            f"cli({argv!r}, prog_name='captioner')")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (f"Error: this command needs {blocked}, which this installation lacks: "
                                   f"pip install 'captioner[{extra}]'")


def test_an_unrelated_missing_module_is_not_blamed_on_an_extra(tmp_path):
    code = ("import sys; sys.modules['PIL'] = None; from captioner.cli import cli; "
            "cli(['describe', 'photo.jpg'], prog_name='captioner')")
    (tmp_path / "photo.jpg").write_bytes(b"not read")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1 and "ModuleNotFoundError" in done.stderr and "captioner[" not in done.stderr


@pytest.fixture
def data_dir_env(monkeypatch):
    """Set or unset CAPTIONER_DATA_DIR for one CLI call, with the settings read afresh."""
    from captioner.core.settings import get_settings

    def use(value):
        if value is None:
            monkeypatch.delenv("CAPTIONER_DATA_DIR", raising=False)
        else:
            monkeypatch.setenv("CAPTIONER_DATA_DIR", str(value))
        get_settings.cache_clear()

    yield use
    get_settings.cache_clear()


def test_training_data_comes_from_an_option_or_the_data_dir_setting(tmp_path, data_dir_env):
    from click.testing import CliRunner

    from captioner.cli import cli

    data_dir_env(None)
    result = CliRunner().invoke(cli, ["train", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "pass --captions or set CAPTIONER_DATA_DIR to the folder that holds flickr8k/Flickr8k.token.txt" in result.output
    data_dir_env(tmp_path)
    result = CliRunner().invoke(cli, ["baseline"])
    assert result.exit_code == 2
    assert f"{tmp_path / 'flickr8k' / 'Flickr8k.token.txt'} does not exist" in result.output
    result = CliRunner().invoke(cli, ["bench", "decode"])
    assert result.exit_code == 2 and f"{tmp_path / 'flickr8k' / 'images'} does not exist" in result.output
