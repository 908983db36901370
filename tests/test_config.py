"""Settings (etl/config.py, SPEC section 2): precedence, defaults, validation, masked secrets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from etl.config import (
    TOML_KEYS,
    Secret,
    Settings,
    load_settings,
    require_api,
)
from etl.errors import ConfigError, InputError

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
verify_tls = false

[database]
url = "sqlite:///file.db"

[sync]
batch_size = 123
"""


# -- defaults -------------------------------------------------------------------------------------


def test_defaults_are_those_of_the_spec():
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
    assert s.verify_tls is False
    assert s.batch_size == 123
    assert s.config_file == path


def test_example_config_file_loads_and_documents_every_key():
    example = ROOT / "config.example.toml"
    s = load_settings(config_file=str(example), env={})
    assert s.concurrency == 8
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
    url = "http://example.com:65536"
    kwargs: dict = {"env": {}}
    if source == "option":
        kwargs["overrides"] = {"base_url": url}
    elif source == "env":
        kwargs["env"] = {"COMMUBO_BASE_URL": url}
    else:
        kwargs["config_file"] = toml(tmp_path, f'[api]\nbase_url = "{url}"\n')
    with pytest.raises(ConfigError, match="65536"):
        load_settings(**kwargs)


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
    "url",
    [
        f"http://user:{DB_PASSWORD}@example.com:65536",
        f"http://user:{DB_PASSWORD}@example.com",
        f"ftp://user:{DB_PASSWORD}@example.com",
    ],
)
def test_base_url_errors_do_not_repeat_credentials(url):
    with pytest.raises(ConfigError) as info:
        load_settings(overrides={"base_url": url}, env={})
    assert DB_PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://etl:{DB_PASSWORD}@db:notaport/warehouse",
        f"mysql://etl:{DB_PASSWORD}@db/warehouse",
        f"::etl:{DB_PASSWORD}@",
    ],
)
def test_database_url_errors_do_not_repeat_the_password(url):
    with pytest.raises(ConfigError) as info:
        load_settings(overrides={"database_url": url}, env={})
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
