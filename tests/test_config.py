"""Settings (etl/config.py, docs/design.md §2): precedence, defaults, validation, masked secrets."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import etl_env, run_etl
from sqlalchemy import create_engine, func, inspect, select
from sqlalchemy.engine import URL

from etl.cli import cli
from etl.config import (
    TOML_KEYS,
    Secret,
    Settings,
    load_settings,
    require_api,
    with_overrides,
)
from etl.errors import ConfigError, InputError
from etl.schema import etl_runs
from etl.simulator import Simulator

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "tok-9f8e7d6c5b4a"
DB_PASSWORD = "pw-Zq81xKs0"


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run every test in an empty directory, so a developer's ./etl.toml cannot leak in."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def toml(tmp_path: Path, text: str, name: str = "settings.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


FULL_FILE = """
[api]
base_url = "http://file.example:8000"
tenant_id = "file-tenant"
access_token = "file-token"
concurrency = 3
timeout_s = 12.5
max_attempts = 7
max_requests_per_s = 4.5
backoff_s = 0.25
max_backoff_s = 9
retry_after_cap_s = 60
max_response_bytes = 2048
unreachable_after_s = 7.5
verify_tls = false

[database]
url = "sqlite:///file.db"

[sync]
batch_size = 123
"""


# -- defaults -------------------------------------------------------------------------------------


def test_defaults_are_those_documented():
    s = load_settings(env={})
    assert s.base_url is None
    assert s.tenant_id is None
    assert s.access_token is None
    assert s.database_url.render_as_string() == "sqlite:///commubo.db"
    assert s.concurrency == 8
    assert s.timeout_s == 30
    assert s.max_attempts == 5
    assert s.max_requests_per_s == 0
    assert s.batch_size == 500
    assert s.max_response_bytes == 10 * 1024 * 1024
    assert s.unreachable_after_s == 20
    assert s.config_file is None


def test_every_key_of_a_config_file_is_read(tmp_path):
    path = toml(tmp_path, FULL_FILE)
    s = load_settings(config_file=path, env={})
    assert s.base_url == "http://file.example:8000"
    assert s.tenant_id == "file-tenant"
    assert s.access_token == Secret("file-token")
    assert s.database_url.render_as_string() == "sqlite:///file.db"
    assert (s.concurrency, s.timeout_s, s.max_attempts, s.max_requests_per_s) == (3, 12.5, 7, 4.5)
    assert (s.backoff_s, s.max_backoff_s, s.retry_after_cap_s) == (0.25, 9.0, 60.0)
    assert (s.max_response_bytes, s.unreachable_after_s) == (2048, 7.5)
    assert s.verify_tls is False
    assert s.batch_size == 123
    assert s.config_file == path


def test_example_config_file_loads_and_documents_every_key():
    example = ROOT / "config.example.toml"
    s = load_settings(config_file=str(example), env={})
    assert s.concurrency == 8
    assert s.max_response_bytes == Settings().max_response_bytes
    assert s.unreachable_after_s == Settings().unreachable_after_s
    text = example.read_text(encoding="utf-8")
    for dotted in TOML_KEYS:
        section, key = dotted.split(".")
        assert f"[{section}]" in text
        assert re.search(rf"^#? ?{key} = ", text, re.MULTILINE), dotted


# -- precedence: option > environment > file > default --------------------------------------------


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        ({"file", "env", "option"}, "http://option.example"),
        ({"file", "env"}, "http://env.example"),
        ({"file", "option"}, "http://option.example"),
        ({"env", "option"}, "http://option.example"),
        ({"file"}, "http://file.example"),
        ({"env"}, "http://env.example"),
        (set(), None),
    ],
)
def test_base_url_precedence_is_option_then_env_then_file_then_default(tmp_path, sources,
                                                                       expected):
    path = None
    if "file" in sources:
        path = toml(tmp_path, '[api]\nbase_url = "http://file.example"\n')
    env = {"COMMUBO_BASE_URL": "http://env.example"} if "env" in sources else {}
    overrides = {"base_url": "http://option.example" if "option" in sources else None}
    s = load_settings(config_file=path, overrides=overrides, env=env)
    assert s.base_url == expected


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        ({"file", "env", "option"}, "sqlite:///option.db"),
        ({"file", "env"}, "sqlite:///env.db"),
        ({"file"}, "sqlite:///file.db"),
        (set(), "sqlite:///commubo.db"),
    ],
)
def test_database_url_precedence_is_option_then_env_then_file_then_default(tmp_path, sources,
                                                                           expected):
    path = toml(tmp_path, '[database]\nurl = "sqlite:///file.db"\n') if "file" in sources else None
    env = {"ETL_DATABASE_URL": "sqlite:///env.db"} if "env" in sources else {}
    overrides = {"database_url": "sqlite:///option.db"} if "option" in sources else {}
    s = load_settings(config_file=path, overrides=overrides, env=env)
    assert s.database_url.render_as_string() == expected


def test_tenant_and_token_from_env_beat_the_file(tmp_path):
    path = toml(tmp_path, '[api]\ntenant_id = "file-tenant"\naccess_token = "file-token"\n')
    s = load_settings(config_file=path,
                      env={"COMMUBO_TENANT_ID": "env-tenant", "COMMUBO_ACCESS_TOKEN": TOKEN})
    assert s.tenant_id == "env-tenant"
    assert s.access_token is not None
    assert s.access_token.get() == TOKEN


@pytest.mark.parametrize(
    ("name", "toml_line", "option", "default"),
    [
        ("concurrency", "[api]\nconcurrency = 3", 12, 8),
        ("max_requests_per_s", "[api]\nmax_requests_per_s = 5", 2.5, 0),
        ("batch_size", "[sync]\nbatch_size = 40", 77, 500),
    ],
)
def test_options_beat_the_file_which_beats_the_default(tmp_path, name, toml_line, option,
                                                       default):
    path = toml(tmp_path, toml_line + "\n")
    file_value = float(toml_line.rsplit("=", 1)[1])
    assert getattr(load_settings(env={}), name) == default
    assert getattr(load_settings(config_file=path, env={}), name) == file_value
    assert getattr(load_settings(config_file=path, overrides={name: option}, env={}),
                   name) == option
    # None means "option not given": the file value stays.
    assert getattr(load_settings(config_file=path, overrides={name: None}, env={}),
                   name) == file_value


def test_empty_environment_variable_counts_as_unset(tmp_path):
    path = toml(tmp_path, '[api]\nbase_url = "http://file.example"\n')
    s = load_settings(config_file=path, env={"COMMUBO_BASE_URL": ""})
    assert s.base_url == "http://file.example"


# -- which config file ----------------------------------------------------------------------------


def test_etl_config_environment_variable_names_the_file(tmp_path):
    path = toml(tmp_path, "[api]\nconcurrency = 2\n")
    s = load_settings(env={"ETL_CONFIG": path})
    assert s.concurrency == 2
    assert s.config_file == path


def test_config_option_beats_etl_config(tmp_path):
    from_env = toml(tmp_path, "[api]\nconcurrency = 2\n", "env.toml")
    from_option = toml(tmp_path, "[api]\nconcurrency = 3\n", "option.toml")
    s = load_settings(config_file=from_option, env={"ETL_CONFIG": from_env})
    assert s.concurrency == 3


def test_etl_toml_in_the_working_directory_is_picked_up(_isolated_cwd):
    (_isolated_cwd / "etl.toml").write_text("[sync]\nbatch_size = 42\n")
    s = load_settings(env={})
    assert s.batch_size == 42
    assert s.config_file == "etl.toml"


def test_explicit_config_file_beats_the_working_directory_etl_toml(tmp_path, _isolated_cwd):
    (_isolated_cwd / "etl.toml").write_text("[sync]\nbatch_size = 42\n")
    path = toml(tmp_path, "[sync]\nbatch_size = 9\n")
    assert load_settings(config_file=path, env={}).batch_size == 9
    assert load_settings(env={"ETL_CONFIG": path}).batch_size == 9


def test_without_any_config_file_nothing_is_read():
    assert load_settings(env={}).config_file is None


@pytest.mark.parametrize("how", ["option", "env"])
def test_missing_explicit_config_file_is_refused(tmp_path, how):
    path = str(tmp_path / "absent.toml")
    kwargs = {"config_file": path, "env": {}} if how == "option" else {"env": {"ETL_CONFIG": path}}
    with pytest.raises(ConfigError, match="not found") as info:
        load_settings(**kwargs)
    assert path in str(info.value)


def test_directory_as_config_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="directory"):
        load_settings(config_file=str(tmp_path), env={})


# -- validation -----------------------------------------------------------------------------------


def test_vendor_documented_port_65536_is_refused_clearly():
    with pytest.raises(ConfigError) as info:
        load_settings(overrides={"base_url": "https://example.com:65536"}, env={})
    message = str(info.value)
    assert "https://example.com:65536" in message
    assert "invalid" in message
    assert "port" in message.lower()
    assert "\n" not in message


@pytest.mark.parametrize("source", ["option", "env", "file"])
def test_invalid_port_is_refused_from_any_source(tmp_path, source):
    with pytest.raises(ConfigError, match="65536"):
        load_settings(**base_url_from(source, "http://example.com:65536", tmp_path))


def base_url_from(source: str, url: str, tmp_path) -> dict:
    """load_settings arguments that give `url` as an option, in the environment or a file."""
    if source == "option":
        return {"env": {}, "overrides": {"base_url": url}}
    if source == "env":
        return {"env": {"COMMUBO_BASE_URL": url}}
    return {"env": {}, "config_file": toml(tmp_path, f'[api]\nbase_url = "{url}"\n')}


@pytest.mark.parametrize(
    "url", ["ftp://example.com", "example.com", "file:///etc/passwd", "ws://example.com"]
)
def test_base_url_without_http_scheme_is_refused(url):
    with pytest.raises(ConfigError, match=r"http:// or https://"):
        load_settings(overrides={"base_url": url}, env={})


@pytest.mark.parametrize(
    "url", ["http://", "http://:8080", "http://example.com/?q=1", "http://example.com/#x"]
)
def test_base_url_without_host_or_with_query_is_refused(url):
    with pytest.raises(ConfigError, match="API base URL"):
        load_settings(overrides={"base_url": url}, env={})


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("http://example.com/", "http://example.com"),
        ("https://api.example.com:8443/connect/", "https://api.example.com:8443/connect"),
        ("https://api.example.com/connect", "https://api.example.com/connect"),
        ("  http://127.0.0.1:8089/  ", "http://127.0.0.1:8089"),
        ("http://example.com:65535", "http://example.com:65535"),
        # Paths that only look like the API's version are kept.
        ("https://host/api/", "https://host/api"),
        ("https://host/v10", "https://host/v10"),
        ("https://host/v1beta", "https://host/v1beta"),
        ("https://host/api/v2", "https://host/api/v2"),
        ("https://host/apiv1", "https://host/apiv1"),
    ],
)
def test_base_url_is_kept_without_trailing_slash(given, stored):
    assert load_settings(overrides={"base_url": given}, env={}).base_url == stored


@pytest.mark.parametrize(
    ("given", "driver"),
    [
        ("postgres://etl@db:5432/warehouse", "postgresql+psycopg"),
        ("postgresql://etl@db:5432/warehouse", "postgresql+psycopg"),
        ("postgresql+psycopg://etl@db/warehouse", "postgresql+psycopg"),
        ("sqlite:///x.db", "sqlite"),
    ],
)
@pytest.mark.parametrize("source", ["option", "env", "file"])
def test_postgres_urls_use_psycopg3_without_asking(tmp_path, given, driver, source):
    kwargs: dict = {"env": {}}
    if source == "option":
        kwargs["overrides"] = {"database_url": given}
    elif source == "env":
        kwargs["env"] = {"ETL_DATABASE_URL": given}
    else:
        kwargs["config_file"] = toml(tmp_path, f'[database]\nurl = "{given}"\n')
    url = load_settings(**kwargs).database_url
    assert url.drivername == driver
    if driver != "sqlite":
        assert (url.host, url.database, url.username) == ("db", "warehouse", "etl")


@pytest.mark.parametrize("url", ["mysql://u@h/db", "not a url", "oracle://h/db"])
def test_unsupported_or_malformed_database_url_is_refused(url):
    with pytest.raises(ConfigError, match="database"):
        load_settings(overrides={"database_url": url}, env={})


def test_unknown_toml_key_is_refused_naming_file_and_key(tmp_path):
    path = toml(tmp_path, '[api]\nbase_ur = "http://x"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=path, env={})
    message = str(info.value)
    assert path in message
    assert "api.base_ur" in message
    assert "api.base_url" in message  # the known keys are listed


@pytest.mark.parametrize("text", ["[apis]\nconcurrency = 2\n", 'base_url = "http://x"\n'])
def test_unknown_section_or_top_level_key_is_refused(tmp_path, text):
    path = toml(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(path)):
        load_settings(config_file=path, env={})


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[api]\nconcurrency = "many"\n', "api.concurrency"),
        ("[api]\nconcurrency = true\n", "api.concurrency"),
        ("[api]\nconcurrency = [1]\n", "api.concurrency"),
        ("[api]\nbase_url = 8080\n", "api.base_url"),
        ("[api]\naccess_token = 12345\n", "api.access_token"),
        ('[api]\ntimeout_s = "soon"\n', "api.timeout_s"),
        ('[api]\nverify_tls = "maybe"\n', "api.verify_tls"),
        ("[database]\nurl = 5\n", "database.url"),
        ('[sync]\nbatch_size = "lots"\n', "sync.batch_size"),
    ],
)
def test_wrong_type_in_the_config_file_is_refused(tmp_path, text, key):
    path = toml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=path, env={})
    assert path in str(info.value)
    assert key in str(info.value)


@pytest.mark.parametrize("text", ["[api]\nconcurrency = 8.5\n", "[sync]\nbatch_size = 99.9\n"])
def test_fractional_number_for_an_integer_setting_is_refused(tmp_path, text):
    with pytest.raises(ConfigError):
        load_settings(config_file=toml(tmp_path, text), env={})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 5000}, "concurrency"),
        ({"batch_size": 0}, "batch size"),
        ({"max_requests_per_s": -1}, "per second"),
    ],
)
def test_out_of_range_values_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(overrides=overrides, env={})


# -- sane ranges, checked up front ----------------------------------------------------------------

TIMEOUT = "api.timeout_s must be a {} more than 0 and at most 3600 seconds, got {}"
ATTEMPTS = "api.max_attempts must be an integer between 1 and 100, got {}"
RPS = ("max requests per second (--max-rps or api.max_requests_per_s) must be 0 (no cap) or "
       "between 0.1 and 100000, got {}")
BYTES = "api.max_response_bytes must be an integer between 1024 and 1073741824 bytes, got {}"
UNREACHABLE = "api.unreachable_after_s must be a {} between 1 and 3600 seconds, got {}"
PACING = "api.{} must be a {} between 0 and 3600 seconds, got {}"
CONCURRENCY = ("concurrency (--concurrency or api.concurrency) must be an integer between 1 and "
               "1024, got {}")
BATCH = ("batch size (--batch-size or sync.batch_size) must be an integer between 1 and 100000, "
         "got {}")

# (TOML key, value as written in the file, the whole message)
BAD_FILE_VALUES = [
    ("api.timeout_s", "inf", TIMEOUT.format("finite number", "inf")),
    ("api.timeout_s", "-inf", TIMEOUT.format("finite number", "-inf")),
    ("api.timeout_s", "nan", TIMEOUT.format("finite number", "nan")),
    ("api.timeout_s", '"inf"', TIMEOUT.format("finite number", "inf")),
    ("api.timeout_s", "0", TIMEOUT.format("number", "0.0")),
    ("api.timeout_s", "-1", TIMEOUT.format("number", "-1.0")),
    ("api.timeout_s", "3600.5", TIMEOUT.format("number", "3600.5")),
    ("api.max_attempts", "0", ATTEMPTS.format(0)),
    ("api.max_attempts", "101", ATTEMPTS.format(101)),
    ("api.max_attempts", "40000", ATTEMPTS.format(40000)),  # beyond a smallint column
    ("api.max_requests_per_s", "0.0001", RPS.format("0.0001")),
    ("api.max_requests_per_s", "0.09", RPS.format("0.09")),
    ("api.max_requests_per_s", "-1", RPS.format("-1.0")),
    ("api.max_requests_per_s", "100001", RPS.format("100001.0")),
    ("api.max_requests_per_s", "inf", RPS.format("inf")),
    ("api.max_requests_per_s", "nan", RPS.format("nan")),
    ("api.max_response_bytes", "1023", BYTES.format(1023)),
    ("api.max_response_bytes", "0", BYTES.format(0)),
    ("api.max_response_bytes", "1073741825", BYTES.format(1073741825)),
    ("api.unreachable_after_s", "0.5", UNREACHABLE.format("number", "0.5")),
    ("api.unreachable_after_s", "0", UNREACHABLE.format("number", "0.0")),
    ("api.unreachable_after_s", "3601", UNREACHABLE.format("number", "3601.0")),
    ("api.unreachable_after_s", "inf", UNREACHABLE.format("finite number", "inf")),
    ("api.unreachable_after_s", "nan", UNREACHABLE.format("finite number", "nan")),
    ("api.backoff_s", "-0.1", PACING.format("backoff_s", "number", "-0.1")),
    ("api.backoff_s", "3601", PACING.format("backoff_s", "number", "3601.0")),
    ("api.backoff_s", "inf", PACING.format("backoff_s", "finite number", "inf")),
    ("api.backoff_s", "nan", PACING.format("backoff_s", "finite number", "nan")),
    ("api.max_backoff_s", "-1", PACING.format("max_backoff_s", "number", "-1.0")),
    ("api.max_backoff_s", "3601", PACING.format("max_backoff_s", "number", "3601.0")),
    ("api.max_backoff_s", "inf", PACING.format("max_backoff_s", "finite number", "inf")),
    ("api.retry_after_cap_s", "-1", PACING.format("retry_after_cap_s", "number", "-1.0")),
    ("api.retry_after_cap_s", "3601", PACING.format("retry_after_cap_s", "number", "3601.0")),
    ("api.retry_after_cap_s", "nan", PACING.format("retry_after_cap_s", "finite number",
                                                   "nan")),
    ("api.concurrency", "0", CONCURRENCY.format(0)),
    ("api.concurrency", "1025", CONCURRENCY.format(1025)),
    ("sync.batch_size", "0", BATCH.format(0)),
    ("sync.batch_size", "100001", BATCH.format(100001)),
]


def toml_line(dotted: str, value: str) -> str:
    section, key = dotted.split(".")
    return f"[{section}]\n{key} = {value}\n"


@pytest.mark.parametrize(("key", "value", "message"), BAD_FILE_VALUES,
                         ids=[f"{k}={v}" for k, v, _ in BAD_FILE_VALUES])
def test_out_of_range_value_in_the_config_file_is_refused_in_one_line(tmp_path, key, value,
                                                                      message):
    path = toml(tmp_path, toml_line(key, value))
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=path, env={})
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("api.timeout_s", "0.001"), ("api.timeout_s", "3600"),
        ("api.max_attempts", "1"), ("api.max_attempts", "100"),
        ("api.max_requests_per_s", "0"), ("api.max_requests_per_s", "0.1"),
        ("api.max_requests_per_s", "100000"),
        ("api.max_response_bytes", "1024"), ("api.max_response_bytes", "1073741824"),
        ("api.unreachable_after_s", "1"), ("api.unreachable_after_s", "3600"),
        ("api.backoff_s", "0"), ("api.backoff_s", "3600"),
        ("api.max_backoff_s", "0"), ("api.retry_after_cap_s", "3600"),
        ("api.concurrency", "1"), ("api.concurrency", "1024"),
        ("sync.batch_size", "1"), ("sync.batch_size", "100000"),
    ],
)
def test_values_at_the_ends_of_their_range_are_accepted(tmp_path, key, value):
    s = load_settings(config_file=toml(tmp_path, toml_line(key, value)), env={})
    assert getattr(s, TOML_KEYS[key][0]) == float(value)


# (option as typed, the whole message): what `etl sync` passes to load_settings.
BAD_OPTIONS = [
    (["--max-rps", "0.0001"], RPS.format("0.0001")),
    (["--max-rps", "100001"], RPS.format("100001.0")),
    (["--max-rps", "inf"], RPS.format("inf")),
    (["--max-rps", "nan"], RPS.format("nan")),
    (["--concurrency", "1025"], CONCURRENCY.format(1025)),
    (["--batch-size", "100001"], BATCH.format(100001)),
]


@pytest.mark.parametrize(("option", "message"), BAD_OPTIONS,
                         ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_out_of_range_option_is_refused_before_anything_else(monkeypatch, option, message):
    for var in ("COMMUBO_BASE_URL", "COMMUBO_TENANT_ID", "COMMUBO_ACCESS_TOKEN",
                "ETL_DATABASE_URL", "ETL_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    # The click command as `etl sync` parses it: the option reaches validate() unchanged.
    result = CliRunner().invoke(cli, ["sync", "--ids-file", "absent.txt", *option])
    assert isinstance(result.exception, ConfigError), result.output
    assert str(result.exception) == message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_requests_per_s": 0.0001}, RPS.format("0.0001")),
        ({"max_requests_per_s": float("inf")}, RPS.format("inf")),
        ({"concurrency": 0}, CONCURRENCY.format(0)),
        ({"batch_size": 0}, BATCH.format(0)),
    ],
)
def test_out_of_range_override_is_refused(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_settings(overrides=overrides, env={})
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"timeout_s": float("nan")}, TIMEOUT.format("finite number", "nan")),
        ({"max_attempts": 40000}, ATTEMPTS.format(40000)),
        ({"unreachable_after_s": float("-inf")}, UNREACHABLE.format("finite number", "-inf")),
        ({"max_response_bytes": 2**31}, BYTES.format(2**31)),
    ],
)
def test_library_settings_are_checked_the_same_way(changes, message):
    with pytest.raises(ConfigError) as info:
        with_overrides(Settings(), **changes)
    assert str(info.value) == message


# -- base URL: the part before /v1 ----------------------------------------------------------------

V1_URLS = [
    "http://host/v1", "http://host/v1/", "http://host/v1/calls", "http://host/v1/calls/",
    "http://host/V1", "http://host:8080/V1/Calls/", "https://host/api/v1",
    "https://host/api/v1/calls", "http://host/v1//",
]


@pytest.mark.parametrize("url", V1_URLS)
@pytest.mark.parametrize("source", ["option", "env", "file"])
def test_base_url_ending_in_v1_is_refused(tmp_path, url, source):
    with pytest.raises(ConfigError) as info:
        load_settings(**base_url_from(source, url, tmp_path))
    assert str(info.value) == (f"API base URL {url!r} must not include /v1: give the part before "
                               "/v1 (the sync adds /v1/calls/{callId})")


@pytest.mark.parametrize("text", ["[api\nconcurrency = 2\n", "[api]\nconcurrency = \n",
                                  '[api]\nbase_url = "unterminated\n'])
def test_invalid_toml_is_refused_naming_the_file(tmp_path, text):
    path = toml(tmp_path, text)
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_settings(config_file=path, env={})
    assert path in str(info.value)


def test_config_error_is_an_input_error_with_exit_code_2(tmp_path):
    with pytest.raises(InputError) as info:
        load_settings(overrides={"base_url": "ftp://x"}, env={})
    assert info.value.exit_code == 2


# -- secrets --------------------------------------------------------------------------------------


def _secret_settings(tmp_path: Path) -> Settings:
    path = toml(tmp_path, f'[api]\naccess_token = "{TOKEN}-file"\n')
    return load_settings(
        config_file=path,
        env={
            "COMMUBO_ACCESS_TOKEN": TOKEN,
            "COMMUBO_TENANT_ID": "tenant",
            "COMMUBO_BASE_URL": "https://api.example.com",
            "ETL_DATABASE_URL": f"postgresql://etl:{DB_PASSWORD}@db.internal:5432/warehouse",
        },
    )


def test_settings_never_show_the_token_or_the_database_password(tmp_path):
    s = _secret_settings(tmp_path)
    assert s.access_token is not None
    assert s.access_token.get() == TOKEN  # the real value is still there for the requests
    assert s.database_url.password == DB_PASSWORD
    shown = [repr(s), str(s), str(s.describe()), repr(s.describe()), f"{s}",
             repr(s.access_token), str(s.access_token), f"{s.access_token}",
             repr(s.database_url)]
    for text in shown:
        assert TOKEN not in text
        assert DB_PASSWORD not in text
    described = s.describe()
    assert described["access_token"] == "***"
    assert described["database_url"] == "postgresql+psycopg://etl:***@db.internal:5432/warehouse"


@pytest.mark.parametrize(
    ("setting", "url"),
    [
        ("base_url", f"http://user:{DB_PASSWORD}@example.com:65536"),
        ("base_url", f"http://user:{DB_PASSWORD}@example.com"),
        ("base_url", f"ftp://user:{DB_PASSWORD}@example.com"),
        ("database_url", f"postgresql://etl:{DB_PASSWORD}@db:notaport/warehouse"),
        ("database_url", f"mysql://etl:{DB_PASSWORD}@db/warehouse"),
        ("database_url", f"::etl:{DB_PASSWORD}@"),
    ],
)
def test_url_errors_do_not_repeat_credentials(setting, url):
    with pytest.raises(ConfigError) as info:
        load_settings(overrides={setting: url}, env={})
    assert DB_PASSWORD not in str(info.value)


def test_access_token_of_the_wrong_type_is_not_repeated(tmp_path):
    path = toml(tmp_path, "[api]\naccess_token = 987654321987\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=path, env={})
    assert "987654321987" not in str(info.value)


def test_database_password_in_the_query_string_is_masked():
    s = load_settings(
        env={"ETL_DATABASE_URL": f"postgresql://etl@db/warehouse?password={DB_PASSWORD}"}
    )
    assert DB_PASSWORD not in repr(s)
    assert DB_PASSWORD not in str(s.describe())


# -- require_api ----------------------------------------------------------------------------------


def test_require_api_lists_everything_missing():
    with pytest.raises(ConfigError) as info:
        require_api(load_settings(env={}))
    message = str(info.value)
    for needed in ("base URL", "COMMUBO_BASE_URL", "--base-url", "tenant id", "COMMUBO_TENANT_ID",
                   "access token", "COMMUBO_ACCESS_TOKEN"):
        assert needed in message


def test_require_api_names_only_what_is_missing():
    s = load_settings(env={"COMMUBO_BASE_URL": "http://x.example",
                           "COMMUBO_ACCESS_TOKEN": TOKEN})
    with pytest.raises(ConfigError) as info:
        require_api(s)
    message = str(info.value)
    assert "tenant id" in message
    assert "base URL" not in message
    assert "access token" not in message
    assert TOKEN not in message


def test_require_api_passes_when_everything_is_set():
    s = load_settings(env={"COMMUBO_BASE_URL": "http://x.example", "COMMUBO_TENANT_ID": "t",
                           "COMMUBO_ACCESS_TOKEN": TOKEN})
    require_api(s)  # no error
    assert s.base_url == "http://x.example"


TENANT_LABEL = "tenant id (COMMUBO_TENANT_ID or api.tenant_id)"
TOKEN_LABEL = "access token (COMMUBO_ACCESS_TOKEN or api.access_token)"
NOT_IN_A_HEADER = (" has a line break, a control character, surrounding spaces or other "
                   "characters an HTTP header cannot carry (only printable ASCII)")
# Values no HTTP header can carry: beyond Latin-1, Latin-1 but not ASCII, control characters.
UNCARRIABLE = {
    "japanese": "テナント",
    "accents": "tökén",
    "e-acute": "tok\u00e9n",
    "no-break-space": "tok\u00a0en",
    "nul": "tok\x00en",
    "tab": "tok\ten",
    "escape": "tok\x1b[31men",
    "del": "tok\x7fen",
    "line-separator": "tok\u2028en",
    "emoji": "tok\U0001f600en",
}


def _toml_string(value: str) -> str:
    """A TOML basic string with everything but printable ASCII escaped."""
    return '"' + "".join(c if " " <= c <= "~" and c not in '"\\' else f"\\U{ord(c):08x}"
                         for c in value) + '"'


@pytest.mark.parametrize("value", list(UNCARRIABLE.values()), ids=list(UNCARRIABLE))
@pytest.mark.parametrize("which", ["tenant", "token"])
@pytest.mark.parametrize("source", ["env", "file"])
def test_tenant_or_token_no_http_header_can_carry_is_refused_without_showing_it(
        tmp_path, value, which, source):
    given = {"tenant": "tenant-1", "token": TOKEN}
    given[which] = value
    kwargs: dict = {"env": {"COMMUBO_BASE_URL": "http://127.0.0.1:8089"}}
    if source == "env":
        kwargs["env"].update(COMMUBO_TENANT_ID=given["tenant"],
                             COMMUBO_ACCESS_TOKEN=given["token"])
    else:
        kwargs["config_file"] = toml(
            tmp_path, f'[api]\ntenant_id = {_toml_string(given["tenant"])}\n'
                      f'access_token = {_toml_string(given["token"])}\n')
    s = load_settings(**kwargs)
    with pytest.raises(ConfigError) as info:
        require_api(s)
    message = str(info.value)
    assert message == (TENANT_LABEL if which == "tenant" else TOKEN_LABEL) + NOT_IN_A_HEADER
    assert value.strip() not in message
    assert TOKEN not in message
    assert message.isascii()


@pytest.mark.parametrize("token", [f" {TOKEN}", f"{TOKEN} "])
def test_library_settings_with_spaces_around_the_token_are_refused(token):
    s = Settings(base_url="http://127.0.0.1:8089", tenant_id="t", access_token=Secret(token))
    with pytest.raises(ConfigError) as info:
        require_api(s)
    assert str(info.value) == TOKEN_LABEL + NOT_IN_A_HEADER


def test_every_printable_ascii_character_is_accepted():
    printable = "".join(chr(c) for c in range(0x21, 0x7F))
    s = load_settings(env={"COMMUBO_BASE_URL": "http://127.0.0.1:8089",
                           "COMMUBO_TENANT_ID": "tenant with spaces",
                           "COMMUBO_ACCESS_TOKEN": f"{printable} {printable}"})
    require_api(s)  # no error


@pytest.mark.parametrize(
    "url",
    ["http://api.example.com", "http://10.0.0.5:8080", "http://[2001:db8::1]:8080",
     "http://localhost.example.com", "http://128.0.0.1", "http://192.168.1.20/api"],
)
def test_plain_http_to_another_host_warns_that_the_token_travels_in_clear_text(caplog, url):
    caplog.set_level(logging.WARNING, logger="etl.config")
    require_api(load_settings(env={"COMMUBO_BASE_URL": url, "COMMUBO_TENANT_ID": "t",
                                   "COMMUBO_ACCESS_TOKEN": TOKEN}))
    warnings = [r for r in caplog.records
                if r.name == "etl.config" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "clear text" in text
    assert url in text
    assert TOKEN not in caplog.text


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8089", "http://127.8.9.10", "http://localhost:8000", "http://LOCALHOST",
     "http://[::1]:8080", "https://api.example.com", "https://10.0.0.5"],
)
def test_no_clear_text_warning_for_this_machine_or_https(caplog, url):
    caplog.set_level(logging.DEBUG, logger="etl.config")
    require_api(load_settings(env={"COMMUBO_BASE_URL": url, "COMMUBO_TENANT_ID": "t",
                                   "COMMUBO_ACCESS_TOKEN": TOKEN}))
    assert [r for r in caplog.records if r.name == "etl.config"] == []


# -- end to end: `etl sync` refuses a bad setting before touching the database or the API ---------


def assert_no_run_recorded(db_url: URL) -> None:
    """SQLite: the file was not created or holds no run; PostgreSQL: no etl_runs or empty."""
    if db_url.get_backend_name() == "sqlite" and not Path(db_url.database or "").exists():
        return
    engine = create_engine(db_url)
    try:
        if not inspect(engine).has_table("etl_runs"):
            return
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(etl_runs)).scalar_one() == 0
    finally:
        engine.dispose()


E2E_TOKEN = "tok-caf\u00e9-SECRET"


@pytest.mark.parametrize(
    ("config", "args", "env", "message"),
    [
        pytest.param("[api]\ntimeout_s = inf\n", [], {},
                     TIMEOUT.format("finite number", "inf"), id="timeout-inf"),
        pytest.param("[api]\nmax_attempts = 40000\n", [], {}, ATTEMPTS.format(40000),
                     id="max-attempts-40000"),
        pytest.param(None, ["--max-rps", "0.0001"], {}, RPS.format("0.0001"), id="max-rps-tiny"),
        pytest.param(None, [], {"COMMUBO_TENANT_ID": "テナント"}, TENANT_LABEL + NOT_IN_A_HEADER,
                     id="tenant-non-latin1"),
        pytest.param(None, [], {"COMMUBO_ACCESS_TOKEN": E2E_TOKEN},
                     TOKEN_LABEL + NOT_IN_A_HEADER, id="token-e-acute"),
        pytest.param(None, ["--base-url", "{sim}/v1"], {},
                     "API base URL '{sim}/v1' must not include /v1: give the part before /v1 "
                     "(the sync adds /v1/calls/{{callId}})", id="base-url-v1"),
    ],
)
def test_etl_sync_refuses_a_bad_setting_before_any_request_or_run_row(
        sim: Simulator, any_db_url: URL, tmp_path: Path, config: str | None, args: list[str],
        env: dict[str, str], message: str):
    ids = tmp_path / "ids.txt"
    ids.write_text("call-000001\ncall-000002\n")
    argv = ["sync", "--ids-file", str(ids), *(a.format(sim=sim.url) for a in args)]
    if config is not None:
        argv += ["--config", toml(tmp_path, config, "bad.toml")]
    proc = run_etl(*argv, env=etl_env(sim, any_db_url, **env))

    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines == [f"etl: error: {message.format(sim=sim.url)}"]
    assert E2E_TOKEN not in proc.stderr + proc.stdout
    assert sim.total_requests == 0
    assert_no_run_recorded(any_db_url)
