import pytest

from captioner.core.errors import ConfigError
from captioner.core.settings import Settings, load_settings


def test_defaults_are_the_embedded_mode():
    settings = load_settings({})
    assert settings == Settings()
    assert settings.embedded
    assert settings.database_url.startswith("sqlite:///")


def test_reads_captioner_variables_and_ignores_others():
    settings = load_settings({"CAPTIONER_BROKER_URL": "redis://h:6379/0", "CAPTIONER_BATCH_SIZE": "64",
                              "CAPTIONER_STORAGE": "s3://bucket/uploads", "HOME": "/root"})
    assert settings.broker_url == "redis://h:6379/0" and not settings.embedded
    assert settings.batch_size == 64
    assert settings.storage == "s3://bucket/uploads"


def test_batch_size_suits_the_device_unless_set():
    from captioner.core.captioner import CPU_BATCH, GPU_BATCH, batch_size

    assert batch_size(load_settings({"CAPTIONER_DEVICE": "cuda:0"})) == GPU_BATCH
    assert batch_size(load_settings({"CAPTIONER_DEVICE": "cpu"})) == CPU_BATCH
    assert batch_size(load_settings({"CAPTIONER_DEVICE": "cuda", "CAPTIONER_BATCH_SIZE": "100"})) == 100


def test_forwards_fill_a_gpu_batch_and_split_a_cpu_one():
    from captioner.core.captioner import CPU_BATCH, CPU_FORWARD, GPU_BATCH, forward_size

    assert forward_size(load_settings({"CAPTIONER_DEVICE": "cuda"})) == GPU_BATCH
    assert forward_size(load_settings({"CAPTIONER_DEVICE": "cpu"})) == CPU_FORWARD < CPU_BATCH
    assert forward_size(load_settings({"CAPTIONER_DEVICE": "cpu", "CAPTIONER_FORWARD_SIZE": "100"})) == CPU_BATCH
    assert forward_size(load_settings({"CAPTIONER_DEVICE": "cuda", "CAPTIONER_FORWARD_SIZE": "64"})) == 64


@pytest.mark.parametrize("name", ["PRECISION", "JPEG_DECODE"])
def test_choice_settings_name_their_choices(name):
    with pytest.raises(ConfigError, match=f"CAPTIONER_{name} must be one of"):
        load_settings({f"CAPTIONER_{name}": "fastest"})


def test_empty_variable_means_default():
    assert load_settings({"CAPTIONER_BROKER_URL": ""}).broker_url is None


def test_unknown_variable_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="CAPTIONER_BATCHSIZE"):
        load_settings({"CAPTIONER_BATCHSIZE": "8"})


@pytest.mark.parametrize("raw", ["many", "0", "-3"])
def test_integer_settings_must_be_positive_integers(raw):
    with pytest.raises(ConfigError, match="CAPTIONER_BATCH_WAIT_MS"):
        load_settings({"CAPTIONER_BATCH_WAIT_MS": raw})


def test_test_suite_variables_are_not_settings():
    assert load_settings({"CAPTIONER_TEST_DATA": "/data"}) == Settings()


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("true", True), ("Yes", True), ("0", False), ("off", False)])
def test_switches_read_the_usual_words(raw, value):
    assert load_settings({"CAPTIONER_SESSION_COOKIE_SECURE": raw}).session_cookie_secure is value


def test_a_switch_refuses_other_words():
    with pytest.raises(ConfigError, match="CAPTIONER_SESSION_COOKIE_SECURE must be one of 1, true"):
        load_settings({"CAPTIONER_SESSION_COOKIE_SECURE": "sometimes"})


def test_a_short_secret_key_is_refused():
    with pytest.raises(ConfigError, match="at least 32 characters"):
        load_settings({"CAPTIONER_SECRET_KEY": "hunter2"})
    assert load_settings({"CAPTIONER_SECRET_KEY": "x" * 43}).secret_key == "x" * 43


@pytest.mark.parametrize("raw, why", [
    ("admin", "neither of them empty"), ("admin:", "neither of them empty"), (":secret", "neither of them empty"),
    ("admin:Sup3r,secret", "comma"), ("admin:pw,ops:pw", "comma")])
def test_flower_credentials_that_cannot_be_safe_are_refused(raw, why):
    """Flower splits the setting at commas: `admin:Sup3r,secret` let `secret` alone sign in."""
    with pytest.raises(ConfigError, match=why):
        load_settings({"CAPTIONER_FLOWER_BASIC_AUTH": raw})
    assert load_settings({"CAPTIONER_FLOWER_BASIC_AUTH": "admin:Sup3r:secret"}).flower_basic_auth

