"""Pure tests: storage keys, name validation, part schedule, settings."""

from __future__ import annotations

import pytest

from zfsmgr import protocol, settings
from zfsmgr.errors import SettingsError, ValidationError


@pytest.mark.parametrize("client,dataset,stamp,codec", [
    ("client1", "tank/data", "2024-02-13_14:30:00", "gzip"),
    ("web-01.example", "pool", "1999-12-31_23:59:59", "zstd"),
    ("a", "tank/a_b/c:d.e-f", "2030-01-01_00:00:00", "none"),
])
def test_key_round_trip(client, dataset, stamp, codec):
    key = protocol.build_key(client, dataset, stamp, codec)
    parsed = protocol.parse_key(key)
    assert (parsed.client_id, parsed.dataset_token, parsed.timestamp, parsed.compression) == (
        client, dataset.replace("/", "_"), stamp, codec)
    assert protocol.build_key(parsed.client_id, "", parsed.timestamp, parsed.compression,
                              token=parsed.dataset_token) == key == str(parsed)


@pytest.mark.parametrize("codec", ["gzip", "zstd", "none"])
def test_encrypted_key_round_trip(codec):
    key = protocol.build_key("client1", "tank/data", "2024-02-13_14:30:00", codec,
                             encryption="age")
    assert key.endswith(protocol.COMPRESSIONS[codec] + ".age")
    parsed = protocol.parse_key(key)
    assert (parsed.compression, parsed.encryption) == (codec, "age") and str(parsed) == key
    assert protocol.key_stem(key) == "client1/tank_data_2024-02-13_14:30:00"
    with pytest.raises(ValidationError):
        protocol.build_key("client1", "tank/data", "2024-02-13_14:30:00", codec,
                           encryption="rot13")
    with pytest.raises(ValidationError):
        protocol.parse_key(key + ".age")


def test_age_recipients_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    key = "age1" + "q" * 58
    loaded = settings.load("client", environ={"AGE_RECIPIENTS": f"{key}, ssh-ed25519 AAAA x",
                                              "ENCRYPT": "age"})
    assert loaded.age_recipients == (key, "ssh-ed25519 AAAA x") and loaded.encrypt == "age"
    for bad in ("-R /etc/passwd", "age1short", key + " -o x"):
        with pytest.raises(SettingsError):
            settings.load("client", environ={"AGE_RECIPIENTS": bad})


def test_seed_example_key():
    assert protocol.build_key("client1", "tank/data", "2024-02-13_14:30:00", "gzip") == \
        "client1/tank_data_2024-02-13_14:30:00.zfs.gz"


@pytest.mark.parametrize("key", [
    "../client1/tank_data_2024-02-13_14:30:00.zfs.gz", "/etc/passwd",
    "client1/../../x_2024-02-13_14:30:00.zfs.gz", "client1/tank_data_2024-13-45_14:30:00.zfs.gz",
    "client1/tank\x00_2024-02-13_14:30:00.zfs.gz", "client1/tank_data.zfs.gz", "", None,
    "client1/sub/tank_2024-02-13_14:30:00.zfs.gz", "clïent/tank_2024-02-13_14:30:00.zfs.gz",
    "client1/tank_data_2024-02-13_14:30:00.zfs.gz\n"])
def test_parse_key_rejects_anything_build_would_not_make(key):
    with pytest.raises(ValidationError):
        protocol.parse_key(key)


@pytest.mark.parametrize("bad", ["", "..", ".hidden", "a/b", "x" * 65, "a b", "a\x00", "é", None,
                                 "-rf", "c1\n"])
def test_client_id_validation(bad):
    with pytest.raises(ValidationError):
        protocol.validate_client_id(bad)


@pytest.mark.parametrize("bad", ["", "/tank", "tank/", "tank//a", "tank/../etc", "1tank",
                                 "tank@snap", "tank#bm", "tank/-o", "tank/a b", "x" * 201,
                                 "tank/a\n"])
def test_dataset_validation(bad):
    with pytest.raises(ValidationError):
        protocol.validate_dataset(bad)


@pytest.mark.parametrize("bad", ["", "-x", "a@b", "a/b", "a b", "snap\n", "x" * 201, None])
def test_snapshot_validation(bad):
    with pytest.raises(ValidationError):
        protocol.validate_snapshot(bad)


def test_part_schedule_carries_5_tib_within_aws_limits():
    assert protocol.schedule_capacity(32 << 20, 1000, 10000) >= 5 << 40
    assert max(protocol.part_size(i, 32 << 20, 1000) for i in range(10000)) <= \
        protocol.MAX_PART_SIZE
    assert protocol.part_size(0, 1 << 20, 2) == 1 << 20
    assert protocol.part_size(2, 1 << 20, 2) == 2 << 20
    assert protocol.part_size(4, 1 << 20, 2) == 4 << 20


def test_rotation_policy_response_is_the_seeds():
    body = protocol.rotation_policy_response(
        {"keep_hourly": 24, "keep_daily": 7, "keep_weekly": 4, "keep_monthly": 12})
    assert body == {"success": True, "message": "Server-managed rotation policy",
                    "rotation_policy": {"keep_hourly": 24, "keep_daily": 7, "keep_weekly": 4,
                                        "keep_monthly": 12}, "server_managed": True}


def test_settings_env_file_then_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("PORT=9000\nS3_ENABLED=yes\nS3_SECRET_KEY=hush\n")
    loaded = settings.load("server", environ={"PORT": "9100"})
    assert loaded.port == 9100 and loaded.s3_enabled is True and loaded.s3_secret_key == "hush"
    other = tmp_path / "other.env"
    other.write_text("PORT=9200\n")
    assert settings.load("server", str(other), environ={}).port == 9200


@pytest.mark.parametrize("key,value,expect", [
    ("PORT", "abc", "PORT='abc'"), ("S3_USE_SSL", "maybe", "S3_USE_SSL"),
    ("PART_SIZE", "lots", "PART_SIZE"), ("S3_MAX_PARTS", "10001", "from 1 to 10000")])
def test_bad_setting_is_one_line_naming_the_key(key, value, expect, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError) as err:
        settings.load("server", environ={key: value})
    assert expect in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("role,key,value", [
    ("client", "SERVER_URL", "http://[::1"), ("client", "SERVER_URL", "http://h:99999"),
    ("client", "SERVER_URL", "http://h:0"), ("client", "SERVER_URL", "http://:8080"),
    ("client", "SERVER_URL", "http://h:port"), ("server", "NOTIFY_URL", "https://[fe80::1"),
    ("server", "S3_ENDPOINT", "s3:99999"), ("server", "S3_ENDPOINT", "[::1"),
    ("server", "S3_ENDPOINT", "localhost:8333/bucket"), ("server", "S3_ENDPOINT", "s3 host"),
    ("server", "S3_ENDPOINT", "https://s3.amazonaws.com"), ("server", "S3_ENDPOINT", "h:")])
def test_a_url_or_endpoint_that_would_fail_when_used_is_a_settings_error(role, key, value,
                                                                         tmp_path, monkeypatch):
    """These passed the settings and failed later as an internal error (ValueError from
    http.client or the S3 library) or a retry loop against a host named 's3 host'."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError) as err:
        settings.load(role, environ={key: value})
    assert f"{key}=" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("value", ["s3.amazonaws.com", "minio.example.com:9000",
                                   "s3.us-west-000.backblazeb2.com", "127.0.0.1:8333",
                                   "[::1]:9000", ""])
def test_s3_endpoints_of_the_readme_and_addresses_are_taken(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert settings.load("server", environ={"S3_ENDPOINT": value}).s3_endpoint == value


@pytest.mark.parametrize("url", ["http://[::1]:8080", "https://backup.example:8443/zfsmgr"])
def test_server_urls_with_ipv6_and_a_path_are_taken(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert settings.load("client", environ={"SERVER_URL": url}).server_url == url


@pytest.mark.parametrize("url", ["http://user:s3cr3t-pw@host", "https://user:s3cr3t-pw@h:8443/x",
                                 "http://:s3cr3t-pw@host",
                                 # a password with / (base64), no scheme, a space, a token
                                 "http://backup:wJal/s3cr3t-pw/K7@backup-server:8080",
                                 "backup:s3cr3t-pw@backup-server:8080",
                                 "http://u:s3 cr3t-pw@host", "http://s3cr3t-pw@host"])
def test_a_server_url_with_a_password_is_refused_without_echoing_it(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError) as err:
        settings.load("client", environ={"SERVER_URL": url})
    assert "SERVER_URL=" in str(err.value) and ":***@" in str(err.value)
    assert "s3cr3t-pw" not in str(err.value)


def test_secret_settings_are_hidden_whole(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError) as err:  # a secret that fails its converter
        settings.load("server", environ={"NOTIFY_URL": "gopher://hook/s3cr3t"})
    assert "NOTIFY_URL=(hidden)" in str(err.value) and "s3cr3t" not in str(err.value)


@pytest.mark.parametrize("codec, level, ok", [("gzip", "9", True), ("gzip", "12", False),
                                              ("true", "10", False), ("zstd", "19", True),
                                              ("none", "19", True)])
def test_compress_level_is_checked_with_the_codec_at_load(codec, level, ok, tmp_path,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"COMPRESS": codec, "COMPRESS_LEVEL": level}
    if ok:
        assert settings.load("client", environ=env).compress_level == int(level)
        return
    with pytest.raises(SettingsError) as err:
        settings.load("client", environ=env)
    assert f"COMPRESS_LEVEL={level}" in str(err.value) and "COMPRESS=gzip" in str(err.value)
    assert err.value.exit_status == 2


def test_a_backup_with_a_level_gzip_cannot_take_stops_before_touching_zfs(tmp_path, monkeypatch,
                                                                          capsys):
    from zfsmgr import cli

    log = tmp_path / "zfs-calls"
    fake = tmp_path / "zfs"
    fake.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    for key, value in {"COMPRESS": "gzip", "COMPRESS_LEVEL": "12", "ZFSMGR_ZFS": str(fake),
                       "CLIENT_ID": "c", "API_KEY": "k", "SERVER_URL": "http://127.0.0.1:9",
                       "LOCAL_DATASET": "tank/data", "STATE_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["client", "backup"]) == 2
    assert "COMPRESS_LEVEL=12" in capsys.readouterr().err
    assert not log.exists()  # no snapshot, no upload: nothing happened


def test_missing_required_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = settings.load("client", environ={})
    with pytest.raises(SettingsError, match="LOCAL_DATASET is not set"):
        loaded.require("LOCAL_DATASET")


def test_sizes():
    assert settings.as_size("64M") == 64 << 20
    assert settings.as_size("1.5GiB") == 3 << 29
    assert settings.as_size("100") == 100


@pytest.mark.parametrize("raw,why", [
    (b'{"a": 1e999}', "not a finite number"), (b'{"a": [-1e400]}', "not a finite number"),
    (b'{"a": "\\ud800"}', "lone surrogate"), (b'{"\\udfff": 1}', "lone surrogate"),
    (b'{"a": [{"b": ["x\\udc00"]}]}', "lone surrogate"), (b'{"a": NaN}', "not a number")])
def test_request_bodies_that_are_json_but_no_numbers_or_text_are_refused(raw, why):
    with pytest.raises(ValidationError) as err:
        protocol.parse_json_object(raw)
    assert why in str(err.value)


def test_request_bodies_with_whole_surrogate_pairs_and_floats_pass():
    assert protocol.parse_json_object(b'{"a": "\\ud83d\\ude00", "b": [1.5e3]}') == {
        "a": "\U0001f600", "b": [1500.0]}


def test_temporary_names_stay_within_a_file_name(tmp_path):
    from zfsmgr.files import NAME_MAX, temp_sibling, write_atomic
    short = temp_sibling(tmp_path / "a.json", "123.456")
    assert short.name == ".a.json.123.456.tmp"
    names = {temp_sibling(tmp_path / (c * 250), "0123456789abcdef" * 2).name for c in "xy"}
    assert len(names) == 2 and all(len(n.encode()) == NAME_MAX for n in names)
    target = tmp_path / ("m" * NAME_MAX)
    write_atomic(target, b"data")
    assert target.read_bytes() == b"data" and [p.name for p in tmp_path.iterdir()] == [
        target.name]
