"""WorkerConfig.from_env: valid settings, and each bad setting named in its error, never the token nor a secret
pasted into another variable; the .env file CAPE_ENV_FILE names (it must be readable; ./.env is optional);
LocalConfig, all `status` needs; a warning for each CAPE_ variable the worker does not read."""
import os
import re
import shutil
from pathlib import Path

import pytest

from services.worker.config import (KNOWN_VARIABLES, NOT_SHOWN, OTHER_TOOLS_VARIABLES, Bucket, ConfigError,
                                    LocalConfig, WorkerConfig, env_file_path, exposed_env_file, parse_bucket,
                                    unknown_variables)

ROOT = Path(__file__).resolve().parents[1]

TOKEN = "tok123,c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"


def env(**overrides):
    base = {"CAPE_TOKEN": TOKEN, "CAPE_COORDINATOR": "http://127.0.0.1:8000", "CAPE_SPOOL_DIR": "/tmp/spool",
            "CAPE_STATE_DIR": "/tmp/state", "CAPE_WORKER_NAME": "org-a"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def test_defaults_and_derived_values():
    config = WorkerConfig.from_env(env())
    assert config.broker == "http://127.0.0.1:8000/broker"
    assert config.bucket is None
    assert config.log_group == "/cape/worker"
    assert config.cloudwatch is False
    assert config.aws_region == "us-east-1"
    assert config.token_id == "tok123"
    assert str(config.spool_dir) == "/tmp/spool"
    assert config.poll_interval == 10.0  # the job watch's long poll does the urgent part; 2 s made 36 requests/min


def test_token_never_in_repr():
    config = WorkerConfig.from_env(env(AWS_ACCESS_KEY_ID="AKIA", AWS_SECRET_ACCESS_KEY="verysecretkey"))
    text = repr(config) + str(config)
    assert "c2VjcmV0" not in text and "verysecretkey" not in text


@pytest.mark.parametrize("overrides, variable, words", [
    ({"CAPE_TOKEN": None}, "CAPE_TOKEN", "is not set"),
    ({"CAPE_TOKEN": "no-comma-here"}, "CAPE_TOKEN", "malformed"),
    ({"CAPE_TOKEN": "id,not base64!!"}, "CAPE_TOKEN", "not base64"),
    ({"CAPE_COORDINATOR": None}, "CAPE_COORDINATOR", "is not set"),
    ({"CAPE_COORDINATOR": "127.0.0.1:8000"}, "CAPE_COORDINATOR", "not an http(s) URL"),
    ({"CAPE_COORDINATOR": "ftp://host"}, "CAPE_COORDINATOR", "not an http(s) URL"),
    ({"CAPE_COORDINATOR": "http://host:99999"}, "CAPE_COORDINATOR", "invalid port"),
    ({"CAPE_BROKER": "broker.example.com"}, "CAPE_BROKER", "not an http(s) URL"),
    ({"AWS_ENDPOINT_URL": "localhost:9000"}, "AWS_ENDPOINT_URL", "not an http(s) URL"),
    ({"CAPE_BUCKET": "my-bucket"}, "CAPE_BUCKET", "s3://"),
    ({"CAPE_BUCKET": "s3://Bad_Bucket"}, "CAPE_BUCKET", "bucket name"),
    ({"CAPE_BUCKET": "file://relative/dir"}, "CAPE_BUCKET", "absolute path"),
    ({"CAPE_LOG_LEVEL": "chatty"}, "CAPE_LOG_LEVEL", "DEBUG, INFO"),
    ({"CAPE_CLOUDWATCH": "maybe"}, "CAPE_CLOUDWATCH", "'on' or 'off'"),
    ({"CAPE_WORKER_NAME": "a b"}, "CAPE_WORKER_NAME", "letters, digits"),
    ({"AWS_ACCESS_KEY_ID": "AKIA"}, "AWS_SECRET_ACCESS_KEY", "both"),
    ({"CAPE_POLL_INTERVAL": "fast"}, "CAPE_POLL_INTERVAL", "seconds"),
])
def test_bad_settings_name_the_variable(overrides, variable, words):
    with pytest.raises(ConfigError) as err:
        WorkerConfig.from_env(env(**overrides))
    assert err.value.variable == variable
    assert str(err.value).startswith(variable + ":")
    assert words in str(err.value)
    assert "c2VjcmV0" not in str(err.value)


def test_spool_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="CAPE_SPOOL_DIR: .* is not a directory"):
        WorkerConfig.from_env(env(CAPE_SPOOL_DIR=str(tmp_path / "file")))


def test_buckets():
    assert parse_bucket("s3://models/team/a") == Bucket("s3", "models", "team/a")
    assert parse_bucket("s3://models").uri == "s3://models"
    assert parse_bucket("file:///srv/models/").uri == "file:///srv/models"
    config = WorkerConfig.from_env(env(CAPE_BUCKET="s3://models/p", CAPE_CLOUDWATCH="on",
                                       AWS_ENDPOINT_URL="http://127.0.0.1:5000/"))
    assert config.bucket == Bucket("s3", "models", "p")
    assert config.cloudwatch is True
    assert config.boto3_kwargs("s3")["endpoint_url"] == "http://127.0.0.1:5000"


def test_dotenv_file_and_environment_wins(tmp_path):
    dotenv = tmp_path / "worker.env"
    dotenv.write_text(f"CAPE_TOKEN={TOKEN}\nCAPE_COORDINATOR=http://from-file:1\nCAPE_LOG_LEVEL=debug\n")
    config = WorkerConfig.from_env({"CAPE_COORDINATOR": "http://from-env:2", "CAPE_WORKER_NAME": "w"},
                                   env_file=dotenv)
    assert config.coordinator == "http://from-env:2"
    assert config.log_level == "DEBUG"
    assert config.token == TOKEN


@pytest.mark.parametrize("overrides, message", [
    ({"CAPE_COORDINATOR": "http://127.0.0.1:8000/v1"},
     "CAPE_COORDINATOR: give the coordinator's base URL, without /v1: http://127.0.0.1:8000"),
    ({"CAPE_COORDINATOR": "https://cape.example.com/api/v1/"},
     "CAPE_COORDINATOR: give the coordinator's base URL, without /v1: https://cape.example.com/api"),
    ({"CAPE_BROKER": "http://127.0.0.1:8000/broker/v1"},
     "CAPE_BROKER: give the broker's base URL, without /v1: http://127.0.0.1:8000/broker"),
    # Without a scheme: AWS_ENDPOINT_URL is an S3 endpoint, not a Cape server, so its example must look like one.
    ({"AWS_ENDPOINT_URL": "127.0.0.1:45871"},
     "AWS_ENDPOINT_URL: is not an http(s) URL: '127.0.0.1:45871'; use e.g. http://127.0.0.1:9000 or "
     "https://s3.eu-west-1.amazonaws.com"),
    ({"CAPE_COORDINATOR": "127.0.0.1:8000"},
     "CAPE_COORDINATOR: is not an http(s) URL: '127.0.0.1:8000'; use e.g. https://cape.example.com"),
    ({"CAPE_BROKER": "broker.example.com"},
     "CAPE_BROKER: is not an http(s) URL: 'broker.example.com'; use e.g. https://cape.example.com"),
])
def test_url_mistakes_name_the_variable_and_the_url_to_use(overrides, message):
    with pytest.raises(ConfigError) as err:
        WorkerConfig.from_env(env(**overrides))
    assert str(err.value) == message


def test_server_url_with_v1_elsewhere_in_its_path():
    config = WorkerConfig.from_env(env(CAPE_COORDINATOR="https://cape.example.com/v1x", CAPE_BROKER="http://b/v1/x"))
    assert (config.coordinator, config.broker) == ("https://cape.example.com/v1x", "http://b/v1/x")


def test_local_config_needs_no_token_or_coordinator():
    local = LocalConfig.from_env({"CAPE_STATE_DIR": "/tmp/state", "CAPE_WORKER_NAME": "w"})
    assert (local.spool_dir, local.run_dir, local.worker_name) == (Path("/var/lib/cape-worker/spool"),
                                                                    Path("/tmp/state/run"), "w")
    with pytest.raises(ConfigError, match="^CAPE_WORKER_NAME: "):
        LocalConfig.from_env({"CAPE_WORKER_NAME": "a b"})


def test_env_file_named_but_missing(tmp_path):
    missing = tmp_path / "nonexist.env"
    with pytest.raises(ConfigError) as err:
        env_file_path({"CAPE_ENV_FILE": str(missing)})
    assert str(err.value) == f"CAPE_ENV_FILE: {missing} does not exist; fix the path or unset CAPE_ENV_FILE"
    with pytest.raises(ConfigError) as err:
        WorkerConfig.from_env(env(), env_file=missing)
    assert err.value.variable == "CAPE_ENV_FILE"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_env_file_not_readable(tmp_path):
    unreadable = tmp_path / "worker.env"
    unreadable.write_text("CAPE_LOG_LEVEL=DEBUG\n")
    unreadable.chmod(0)
    with pytest.raises(ConfigError) as err:
        env_file_path({"CAPE_ENV_FILE": str(unreadable)})
    assert str(err.value) == (f"CAPE_ENV_FILE: cannot read {unreadable} (permission denied); let this user read "
                              "it, or unset CAPE_ENV_FILE")


def test_default_env_file_is_optional(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert env_file_path({}) is None
    (tmp_path / ".env").write_text("CAPE_LOG_LEVEL=DEBUG\n")
    assert env_file_path({}) == Path(".env")
    assert env_file_path({"CAPE_ENV_FILE": " "}) == Path(".env")  # blank: as if unset


@pytest.mark.parametrize("value", ["fast", "0", "7200", "nan", "2s"])
def test_poll_interval_error_shows_the_value(value):
    with pytest.raises(ConfigError) as err:
        WorkerConfig.from_env(env(CAPE_POLL_INTERVAL=value))
    assert str(err.value) == f"CAPE_POLL_INTERVAL: must be a number of seconds between 0.05 and 3600, not {value!r}"


AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # the shape of an AWS secret access key


@pytest.mark.parametrize("overrides, variable, hidden", [
    ({"CAPE_COORDINATOR": TOKEN}, "CAPE_COORDINATOR", TOKEN),
    ({"CAPE_BROKER": TOKEN.split(",")[1]}, "CAPE_BROKER", TOKEN.split(",")[1]),
    ({"CAPE_COORDINATOR": "otherid,QUJDREVGR0hJSktMTU5PUFFSU1RVVg=="}, "CAPE_COORDINATOR",
     "QUJDREVGR0hJSktMTU5PUFFSU1RVVg"),  # some other token: its shape gives it away
    ({"AWS_ENDPOINT_URL": "my-aws-secret", "AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "my-aws-secret"},
     "AWS_ENDPOINT_URL", "my-aws-secret"),
    ({"AWS_ENDPOINT_URL": AWS_SECRET}, "AWS_ENDPOINT_URL", AWS_SECRET),  # AWS_SECRET_ACCESS_KEY left unset
    ({"AWS_ENDPOINT_URL": "session-value", "AWS_SESSION_TOKEN": "session-value"}, "AWS_ENDPOINT_URL",
     "session-value"),
    ({"CAPE_POLL_INTERVAL": TOKEN}, "CAPE_POLL_INTERVAL", TOKEN),
    ({"CAPE_BROKER": f"cape.example.com/{TOKEN}"}, "CAPE_BROKER", TOKEN.split(",")[1]),  # holds the token
])
def test_a_secret_in_the_wrong_variable_is_not_shown(overrides, variable, hidden):
    with pytest.raises(ConfigError) as err:
        WorkerConfig.from_env(env(**overrides))
    assert err.value.variable == variable
    assert NOT_SHOWN in str(err.value) and hidden not in str(err.value), str(err.value)


def test_long_paths_and_urls_are_still_shown():
    """Only what looks like a key is hidden: a long path of letters, digits and slashes is the operator's to see."""
    top = Path(f"/tmp/capeworkerpaths{os.getpid()}")  # no '-', '_' or '.': the characters of a key only
    path = top / "home" / "operator" / "cape" / "worker" / "spool"
    path.parent.mkdir(parents=True)
    path.write_text("a file")
    try:
        with pytest.raises(ConfigError) as err:
            LocalConfig.from_env({"CAPE_SPOOL_DIR": str(path), "CAPE_WORKER_NAME": "w"})
    finally:
        shutil.rmtree(top)
    assert str(path) in str(err.value) and NOT_SHOWN not in str(err.value)
    with pytest.raises(ConfigError) as err:
        WorkerConfig.from_env(env(CAPE_COORDINATOR=f"https://cape.example.com/{TOKEN.split(',')[1]}/v1"))
    assert str(err.value) == f"CAPE_COORDINATOR: give the coordinator's base URL, without /v1: {NOT_SHOWN}"


def test_a_secret_where_a_directory_goes_is_not_shown(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / TOKEN).write_text("not a directory")
    with pytest.raises(ConfigError) as err:
        LocalConfig.from_env({"CAPE_STATE_DIR": TOKEN, "CAPE_TOKEN": TOKEN, "CAPE_WORKER_NAME": "w"})
    assert str(err.value) == (f"CAPE_STATE_DIR: {NOT_SHOWN} exists and is not a directory; point it at a directory "
                              "(a volume)")


def test_misspelled_variables_from_env_and_dotenv_are_named_with_the_likely_one(tmp_path, monkeypatch):
    for name in [name for name in os.environ if name.startswith("CAPE_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("CAPE_BUKCET=s3://models\nCAPE_TOKEN=x\n")
    monkeypatch.setenv("CAPE_CLOUDWACH", "on")
    monkeypatch.setenv("CAPE_POLL_INTERVALL", "5")
    monkeypatch.setenv("CAPE_XYZZY", "1")
    monkeypatch.setenv("CAPE_SERVER_DATA_DIR", "/srv/cape")  # cape-server's: the demo shares an environment
    assert unknown_variables() == [
        "CAPE_BUKCET is not a variable the worker reads, so it is ignored; did you mean CAPE_BUCKET?",
        "CAPE_CLOUDWACH is not a variable the worker reads, so it is ignored; did you mean CAPE_CLOUDWATCH?",
        "CAPE_POLL_INTERVALL is not a variable the worker reads, so it is ignored; did you mean CAPE_POLL_INTERVAL?",
        "CAPE_XYZZY is not a variable the worker reads, so it is ignored; check its name against the worker's "
        "variables in the README",
    ]
    assert unknown_variables(env()) == []


def test_misspelled_aws_variables_are_named_and_real_ones_left_alone():
    """botocore reads dozens of AWS_ variables and other AWS tools more: only a name botocore does not read that is
    close to one the README gives is warned of, and never its value."""
    table = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `")]
    readme_names = set(re.findall(r"AWS_[A-Z0-9_]*[A-Z0-9]", "\n".join(table)))  # the variables table's
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"} <= readme_names
    others = {"AWS_DEFAULT_OUTPUT", "AWS_PAGER", "AWS_ROLE_ARN", "AWS_ROLE_SESSION_NAME", "AWS_WEB_IDENTITY_TOKEN_FILE",
              "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_SECURITY_TOKEN", "AWS_MAX_ATTEMPTS", "AWS_ACCOUNT_ID",
              "AWS_ENDPOINT_URL_STS", "AWS_STS_REGIONAL_ENDPOINTS", "AWS_LAMBDA_FUNCTION_NAME"}
    assert unknown_variables({name: "x" for name in readme_names | others}) == []
    typos = {"AWS_SECRET_KEY": "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY": "AWS_ACCESS_KEY_ID",
             "AWS_SESION_TOKEN": "AWS_SESSION_TOKEN", "AWS_REGION_NAME": "AWS_REGION",
             "AWS_S3_ENDPOINT_URL": "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGIONS": "AWS_DEFAULT_REGION"}
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    warnings = unknown_variables({name: secret for name in typos})
    assert warnings == [f"{name} is not a variable boto3 reads, so it is ignored; did you mean {typos[name]}?"
                        for name in sorted(typos)]
    assert not any(secret in w for w in warnings)


def test_each_service_endpoint_wins_over_aws_endpoint_url_and_a_near_miss_is_warned_of():
    """botocore's rule: AWS_ENDPOINT_URL_<SERVICE> over AWS_ENDPOINT_URL (the worker's explicit endpoint_url overrode
    both). CloudWatch Logs' is AWS_ENDPOINT_URL_CLOUDWATCH_LOGS: the README named AWS_ENDPOINT_URL_LOGS, which
    botocore ignores."""
    config = WorkerConfig.from_env(env(AWS_ENDPOINT_URL="http://127.0.0.1:5000",
                                       AWS_ENDPOINT_URL_S3="http://127.0.0.1:9000/"))
    assert config.boto3_kwargs("s3")["endpoint_url"] == "http://127.0.0.1:9000"
    assert config.boto3_kwargs("logs")["endpoint_url"] == "http://127.0.0.1:5000"
    assert (config.endpoint_variable("s3"), config.endpoint_variable("logs")) == ("AWS_ENDPOINT_URL_S3",
                                                                                  "AWS_ENDPOINT_URL")
    logs_only = WorkerConfig.from_env(env(AWS_ENDPOINT_URL_CLOUDWATCH_LOGS="https://logs.example"))
    assert logs_only.boto3_kwargs("logs")["endpoint_url"] == "https://logs.example"
    assert "endpoint_url" not in logs_only.boto3_kwargs("s3")
    for variable in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS"):
        with pytest.raises(ConfigError, match=f"^{variable}: is not an http\\(s\\) URL: 'notaurl'"):
            WorkerConfig.from_env(env(**{variable: "notaurl"}))  # botocore raised ValueError in every program
    assert unknown_variables({"AWS_ENDPOINT_URL_LOGS": "x", "AWS_ENDPOINT_URL_STS": "x",
                              "AWS_ENDPOINT_URL_CLOUDWATCH": "x", "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS": "x"}) == [
        f"{name} is not a variable boto3 reads for the worker's S3 or CloudWatch Logs, so it is ignored; did you mean "
        "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS?" for name in ("AWS_ENDPOINT_URL_CLOUDWATCH", "AWS_ENDPOINT_URL_LOGS")]


def test_every_variable_the_worker_reads_is_known():
    """The worker's code, its supervisord configuration, its image and the tests' worker environment name only known
    variables (a new one must be added to KNOWN_VARIABLES, or every worker setting it would be warned)."""
    sources = [*(ROOT / "services" / "worker").glob("*.py"), ROOT / "conf" / "supervisord.conf",
               ROOT / "Dockerfile", ROOT / "tests" / "support" / "workers.py"]
    named = {name for path in sources for name in re.findall(r"CAPE_[A-Z][A-Z0-9_]*[A-Z0-9]", path.read_text())}
    assert {"CAPE_TOKEN", "CAPE_RUN_DIR", "CAPE_PYTHON", "CAPE_WORKER_CONF", "CAPE_ENV_FILE"} <= named
    assert named - KNOWN_VARIABLES - OTHER_TOOLS_VARIABLES == set()


def test_a_dotenv_file_with_the_token_that_others_can_read_is_warned_of(tmp_path):
    """README's recipe left the organization token readable by every local user (mode 644) without a word, while
    the worker refuses key files like that."""
    dotenv = tmp_path / "worker.env"
    dotenv.write_text(f"CAPE_TOKEN={TOKEN}\nCAPE_COORDINATOR=http://127.0.0.1:1\n")
    dotenv.chmod(0o644)
    assert exposed_env_file({"CAPE_ENV_FILE": str(dotenv)}) == [
        f"{dotenv} holds CAPE_TOKEN and other users can read it (mode 644); run chmod 600 {dotenv}"]
    dotenv.chmod(0o600)
    assert exposed_env_file({"CAPE_ENV_FILE": str(dotenv)}) == []
    dotenv.write_text("CAPE_COORDINATOR=http://127.0.0.1:1\n")
    dotenv.chmod(0o644)
    assert exposed_env_file({"CAPE_ENV_FILE": str(dotenv)}) == []  # no secret in it
