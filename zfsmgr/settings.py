"""Settings as a declared table: `.env` in the working directory, overridden by the environment.

Each setting has a name, a converter, a default and a one-line description. `load()` reads them
once into a frozen `Settings` object that is passed down; nothing mutates `os.environ`.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

from zfsmgr.compress import LEVELS
from zfsmgr.errors import SettingsError
from zfsmgr.protocol import COMPRESSIONS, ENCRYPTIONS, codecs_text, redact_url
from zfsmgr.storage import registry


def as_bool(text: str) -> bool:
    """Parse true/false, yes/no, on/off, 1/0."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("true or false")


def _digits(text: str) -> bool:
    """ASCII digits only: `isdigit()` takes '²' (which int() refuses) and '٢٤' (which it reads)."""
    return re.fullmatch(r"[0-9]+", text.strip()) is not None


def as_port(text: str) -> int:
    """Parse a TCP port number."""
    if not _digits(text) or not 0 < int(text) < 65536:
        raise ValueError("a port number between 1 and 65535")
    return int(text)


def as_positive_int(text: str) -> int:
    """Parse a whole number greater than zero."""
    if not _digits(text) or int(text) <= 0:
        raise ValueError("a whole number greater than 0")
    return int(text)


def as_part_count(text: str) -> int:
    """Parse a multipart part limit: 1 to S3's 10000 (a compose of more fails)."""
    if not _digits(text) or not 0 < int(text) <= 10000:
        raise ValueError("a whole number from 1 to 10000 (S3's most parts of an object)")
    return int(text)


def as_count(text: str) -> int:
    """Parse a whole number, zero allowed."""
    if not _digits(text):
        raise ValueError("a whole number (0 or more)")
    return int(text)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)


MAX_SIZE = (1 << 63) - 1  # bytes: SQLite's integers, and every store's sizes, fit in it
MAX_DURATION = 100 * 365 * 86400.0  # seconds: past that, dates no longer fit a datetime


def as_size(text: str) -> int:
    """Parse a byte size such as 1048576, 64M, 1.5GiB or 100G (powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError("a size such as 1048576, 64M or 100G")
    number, unit = float(match.group(1)), match.group(2).lower()
    size = number * 1024 ** " kmgtp".index(unit or " ")
    if not size <= MAX_SIZE:  # also inf, from 400 digits
        raise ValueError("a size such as 1048576, 64M or 100G, at most 8 EiB")
    return int(size)


def as_text(text: str) -> str:
    """Keep text as it is, trimmed."""
    return text.strip()


def as_header(text: str) -> str:
    """Text sent in an HTTP header (CLIENT_ID, API_KEY): printable ASCII, trimmed. A line
    break or a character outside Latin-1 failed only in http.client, which quoted the value
    (the key) in its error."""
    value = text.strip()
    if not all(" " <= ch <= "~" for ch in value):
        raise ValueError("printable ASCII: letters, digits and punctuation, no line breaks")
    return value


def as_compression(text: str) -> str:
    """COMPRESS: true/false (the seed's form) or gzip, zstd, none."""
    value = text.strip().lower()
    if value in COMPRESSIONS:
        return value
    try:
        return "gzip" if as_bool(value) else "none"
    except ValueError:
        raise ValueError(f"true, false, {codecs_text()}") from None


def as_level(text: str) -> int:
    """A compression level 1-19 (gzip takes 1-9: checked with COMPRESS, in _check_together)."""
    high = max(h for _, h in LEVELS.values())
    if not _digits(text) or not 1 <= int(text) <= high:
        raise ValueError(f"a compression level from 1 to {high}")
    return int(text)


def as_storage_type(text: str) -> str:
    """One of the storage backends of the registry, or empty for the server's default."""
    value = text.strip().lower()
    if value and value not in registry.KINDS:
        raise ValueError(registry.kinds_text())
    return value


def as_existing_file(text: str) -> str:
    """A path to a file that exists (empty: not set)."""
    value = text.strip()
    if value and not Path(value).is_file():
        raise ValueError("the path of a file that exists (no such file)")
    return value


def _address(value: str, pattern: str, prefix: str = "") -> bool:
    """Whether `value` matches `pattern` and urllib takes `prefix + value` with a host and a
    port from 1 to 65535 (what http.client and the S3 library trip over only when used: a
    bracket left open, a port out of range)."""
    try:
        parts = urllib.parse.urlsplit(prefix + value)
        return bool(re.match(pattern, value) and parts.hostname and parts.port != 0)
    except ValueError:  # .port raises it when out of range or not a number
        return False


def as_url(text: str) -> str:
    """An http:// or https:// URL with a host, without credentials in it."""
    value = text.strip().rstrip("/")
    if not value.isascii() or not value.isprintable() or \
            not _address(value, r"^https?://[^/@\s]+(/[^\s]*)?$"):  # http.client's refusals
        raise ValueError("a URL such as http://backup-server:8080 (a host; a port from 1 to"
                         " 65535; printable ASCII: percent-encode the rest)")
    return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def as_duration(text: str) -> float:
    """Parse a duration in seconds: 3600, 90s, 30m, 26h, 2d, 1w."""
    match = _DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError("a duration such as 90s, 30m, 26h or 2d")
    seconds = float(match.group(1)) * _SECONDS[match.group(2).lower()]
    if not seconds <= MAX_DURATION:
        raise ValueError("a duration such as 90s, 30m, 26h or 2d, at most 100 years")
    return seconds


def as_sha256(text: str) -> str:
    """The SHA-256 hex of a secret (64 hex digits), or empty."""
    value = text.strip().lower()
    if value and not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError("the 64-hex SHA-256 of the key (`zfsmgr server admin-key` makes one)")
    return value


def as_log_format(text: str) -> str:
    """plain or json."""
    value = text.strip().lower()
    if value not in ("plain", "json"):
        raise ValueError("plain or json")
    return value


def as_endpoint(text: str) -> str:
    """S3_ENDPOINT: host[:port] (a name, an IPv4 address or a [bracketed] IPv6 one), or empty;
    no scheme (S3_USE_SSL chooses https) and no path, which the S3 library refuses only when
    the server starts."""
    value = text.strip()
    if value and "://" in value:
        raise ValueError("host[:port] without the scheme, e.g. s3.amazonaws.com"
                         " (S3_USE_SSL=true chooses https)")
    if value and not _address(value, r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(:\d+)?$", "//"):
        raise ValueError("host[:port], e.g. s3.amazonaws.com or minio.example.com:9000 (a"
                         " port from 1 to 65535, no path)")
    return value


def as_optional_url(text: str) -> str:
    """An http(s) URL as as_url, or empty for none."""
    return as_url(text) if text.strip() else ""


def as_lock_mode(text: str) -> str:
    """S3_OBJECT_LOCK: empty (off), governance or compliance."""
    value = text.strip().lower()
    if value not in ("", "governance", "compliance"):
        raise ValueError("governance or compliance (or empty for none)")
    return value


def as_encryption(text: str) -> str:
    """ENCRYPT: none (or empty/false) or age."""
    value = text.strip().lower()
    if value in ("", "none", "false", "off", "no"):
        return "none"
    if value and value in ENCRYPTIONS:
        return value
    raise ValueError(" or ".join(label or "none" for label in ENCRYPTIONS))


_AGE_RECIPIENT = re.compile(r"^(age1[qpzry9x8gf2tvdw0s3jn54khce6mua7l]{58}"
                            r"|ssh-(ed25519|rsa) [A-Za-z0-9+/=]+( [^,\s]+)?)$")


def as_recipients(text: str) -> tuple:
    """AGE_RECIPIENTS: age public keys, separated by commas or new lines."""
    found = tuple(r.strip() for r in re.split(r"[,\n]", text) if r.strip())
    for recipient in found:
        if not _AGE_RECIPIENT.match(recipient):
            raise ValueError("age public keys (age1..., ssh-ed25519 ...) separated by commas")
    return found


def option_type(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """A setting's converter as an argparse `type=`: its ValueError becomes a usage error."""
    def parse(text: str) -> Any:
        import argparse

        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected {exc}") from None
    parse.__name__ = convert.__name__
    return parse


@dataclass(frozen=True)
class Setting:
    """One declared setting."""

    name: str
    convert: Callable[[str], Any]
    default: Optional[str]  # None: required when a command needs it
    roles: tuple
    help: str
    secret: bool = False


SERVER, CLIENT, RESTORE = "server", "client", "restore"
_ALL = (SERVER, CLIENT, RESTORE)

TABLE = (
    Setting("S3_ENABLED", as_bool, "false", (SERVER,), "store backups in S3 by default"),
    Setting("S3_ENDPOINT", as_endpoint, "", (SERVER,), "S3 host[:port], e.g. s3.amazonaws.com"),
    Setting("S3_ACCESS_KEY", as_text, "", (SERVER,), "S3 access key", secret=True),
    Setting("S3_SECRET_KEY", as_text, "", (SERVER,), "S3 secret key", secret=True),
    Setting("S3_BUCKET", as_text, "zfs-snapshots", (SERVER,), "bucket (created if missing)"),
    Setting("S3_USE_SSL", as_bool, "true", (SERVER,), "use https to reach S3"),
    Setting("S3_REGION", as_text, "", (SERVER,), "S3 region (empty: ask the server)"),
    Setting("S3_OBJECT_LOCK", as_lock_mode, "", (SERVER,),
            "governance or compliance: a new bucket with Object Lock, each backup retained"),
    Setting("S3_MAX_PARTS", as_part_count, "10000", (SERVER,),
            "the provider's multipart part limit (AWS 10000, some 1000)"),
    Setting("ZFS_BASE_DATASET", as_text, "", (SERVER,), "dataset under which `local` receives"),
    Setting("STORAGE_DIR", as_text, "./backups", (SERVER,), "root of the directory store"),
    Setting("CONFIG_FILE", as_text, "clients.json", (SERVER,), "the clients file"),
    Setting("METADATA_FILE", as_text, "metadata.json", (SERVER,),
            "the catalog: a .json name means the SQLite file beside it with .db"),
    Setting("CATALOG_DB", as_text, "", (SERVER,),
            "the catalog's SQLite file (empty: from METADATA_FILE)"),
    Setting("HOST", as_text, "0.0.0.0", (SERVER,), "address to listen on"),
    Setting("PORT", as_port, "8080", (SERVER,), "port to listen on"),
    Setting("TLS_CERT", as_text, "", (SERVER,),
            "PEM certificate with its chain: serve HTTPS (with TLS_KEY; SIGHUP reloads)"),
    Setting("TLS_KEY", as_text, "", (SERVER,), "PEM private key of TLS_CERT"),
    Setting("PART_SIZE", as_size, "32M", (SERVER,),
            "first upload part size (grows for big streams)"),
    Setting("UPLOAD_EXPIRY_HOURS", as_positive_int, "24", (SERVER,),
            "abandoned uploads are discarded after this many hours"),
    Setting("AUTO_ROTATE", as_bool, "false", (SERVER,),
            "delete old backups when an upload would exceed the quota"),
    Setting("THREADS", as_positive_int, "12", (SERVER,), "request worker threads"),
    Setting("APPEND_ONLY", as_bool, "false", (SERVER,),
            "clients may not delete backups unless clients.json says append_only: false"),
    Setting("MIN_RETAIN_DAYS", as_count, "0", (SERVER,),
            "no rotation deletes a backup committed fewer days ago than this"),
    Setting("METRICS_TOKEN", as_text, "", (SERVER,),
            "bearer token for GET /metrics", secret=True),
    Setting("METRICS_NO_AUTH", as_bool, "false", (SERVER,), "serve /metrics without a token"),
    Setting("ADMIN_API_KEY", as_sha256, "", (SERVER,),
            "SHA-256 hex of the admin key for the status page at /"),
    Setting("NOTIFY_URL", as_optional_url, "", (SERVER,),
            "webhook (JSON POST) when a dataset goes stale or an upload fails verification",
            secret=True),
    Setting("CHECK_WARN", as_duration, "26h", (SERVER,),
            "a dataset's newest backup older than this is stale (warning)"),
    Setting("CHECK_CRIT", as_duration, "50h", (SERVER,),
            "a dataset's newest backup older than this is critical"),
    Setting("STALE_CHECK_INTERVAL", as_duration, "5m", (SERVER,),
            "how often the server looks for stale datasets to notify about"),
    Setting("ZFSMGR_ZFS", as_text, "zfs", _ALL,
            "the zfs program: a path, or a name found on PATH or in /sbin, /usr/sbin"),
    Setting("ZFSMGR_ZPOOL", as_text, "zpool", _ALL, "the zpool program, found as ZFSMGR_ZFS is"),
    Setting("CLIENT_MAX_REQUESTS", as_count, "0", (SERVER,),
            "requests one client may have in the server at once (0: THREADS/3, at least 2)"),
    Setting("CLIENT_MAX_UPLOADS", as_positive_int, "4", (SERVER,),
            "open upload sessions one client may have"),
    Setting("CLIENT_ID", as_header, None, (CLIENT, RESTORE), "this host's client id"),
    Setting("API_KEY", as_header, None, (CLIENT, RESTORE), "the raw (unhashed) API key",
            secret=True),
    Setting("SERVER_URL", as_url, None, (CLIENT, RESTORE), "e.g. http://backup-server:8080"),
    Setting("CA_FILE", as_existing_file, "", (CLIENT, RESTORE),
            "CA bundle for an https server"),
    Setting("REQUEST_TIMEOUT", as_duration, "2m", (CLIENT, RESTORE),
            "how long to wait for each answer of the server (a commit it says is under way"
            " is waited for beyond that)"),
    Setting("LOCAL_DATASET", as_text, None, (CLIENT,),
            "the datasets to back up, comma or space separated, e.g. tank/data"),
    Setting("RECURSIVE", as_bool, "false", (CLIENT,),
            "also back up every filesystem and volume below them"),
    Setting("EXCLUDE_DATASETS", as_text, "", (CLIENT,),
            "datasets left out with their whole subtree, comma or space separated"),
    Setting("SEND_PROPERTIES", as_bool, "true", (CLIENT,),
            "send the datasets' properties with the streams (zfs send -p)"),
    Setting("BACKUP_UNCHANGED", as_bool, "false", (CLIENT,),
            "send a backup even when nothing was written since the last one"),
    Setting("PARALLEL", as_count, "0", (CLIENT,),
            "datasets a run sends at once (0: 2 where the server's share of requests for the"
            " client allows; each upload keeps 2 requests in the server)"),
    Setting("COMPRESS", as_compression, "true", (CLIENT,), "true/false, or gzip, zstd, none"),
    Setting("COMPRESS_LEVEL", as_level, "1", (CLIENT,), "gzip 1-9 or zstd 1-19"),
    Setting("ENCRYPT", as_encryption, "none", (CLIENT,),
            "none, or age: encrypt streams to AGE_RECIPIENTS before they leave the host"),
    Setting("AGE_RECIPIENTS", as_recipients, "", (CLIENT,),
            "age public keys to encrypt to (age1..., ssh-ed25519 ...), comma-separated"),
    Setting("AGE_IDENTITY_FILE", as_text, "", (RESTORE,),
            "the age secret key file that decrypts ENCRYPT=age backups"),
    Setting("STORAGE_TYPE", as_storage_type, "", (CLIENT,),
            f"{registry.kinds_text()} (server decides)"),
    Setting("STATE_DIR", as_text, "", (CLIENT,), "where locks and the cached policy live"),
    Setting("KEEP_HOURLY", as_count, "24", (CLIENT,), "hourly snapshots to keep locally"),
    Setting("KEEP_DAILY", as_count, "7", (CLIENT,), "daily snapshots to keep locally"),
    Setting("KEEP_WEEKLY", as_count, "4", (CLIENT,), "weekly snapshots to keep locally"),
    Setting("KEEP_MONTHLY", as_count, "12", (CLIENT,), "monthly snapshots to keep locally"),
    Setting("HEALTHCHECK_URL", as_optional_url, "", (CLIENT,),
            "healthchecks.io-style ping URL (/start, success, /fail)", secret=True),
    Setting("LOG_FORMAT", as_log_format, "plain", _ALL, "plain lines or json (one per line)"),
)

BY_NAME = {s.name: s for s in TABLE}


class Settings:
    """Frozen, converted settings of one role; `settings.port` reads PORT."""

    def __init__(self, role: str, values: Mapping[str, Any], origin: Mapping[str, str]):
        object.__setattr__(self, "_role", role)
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_origin", dict(origin))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name.upper()]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("settings are read-only")

    def require(self, *names: str) -> None:
        """Fail with a one-line error when a needed setting is not set."""
        for name in names:
            if self._values.get(name) in (None, ""):
                raise SettingsError(f"{name} is not set: expected {BY_NAME[name].help}"
                                    f" (in .env or the environment)")

    def get(self, name: str, default: Any = None) -> Any:
        """Value of a setting by its name."""
        return self._values.get(name, default)


def default_env_file(cwd: Optional[Path] = None) -> Optional[Path]:
    """The `.env` of the working directory (not of the calling file, as dotenv would pick)."""
    path = (cwd or Path.cwd()) / ".env"
    return path if path.is_file() else None


def read_env_file(path: Path) -> dict:
    """Values of a .env file, without touching os.environ."""
    from dotenv import dotenv_values

    try:
        # utf-8-sig: the byte-order mark a Windows editor writes is not part of the first key
        with open(path, encoding="utf-8-sig") as stream:
            values = dotenv_values(stream=stream)
    except OSError as exc:
        raise SettingsError(f"cannot read env file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise SettingsError(f"env file {path} is not UTF-8 text") from exc
    return {k: v for k, v in values.items() if v is not None}


def load(role: str, env_file: Optional[str] = None,
         environ: Optional[Mapping[str, str]] = None,
         names: Optional[Iterable[str]] = None) -> Settings:
    """Load the settings of `role` from the env file, then the process environment."""
    environ = os.environ if environ is None else environ
    path = Path(env_file) if env_file else default_env_file()
    if env_file and not Path(env_file).is_file():
        raise SettingsError(f"env file {env_file} does not exist")
    from_file = read_env_file(path) if path else {}
    values, origin = {}, {}
    wanted = set(names) if names else None
    for setting in TABLE:
        if role not in setting.roles or (wanted and setting.name not in wanted):
            continue
        raw, where = setting.default, "default"
        if setting.name in from_file:
            raw, where = from_file[setting.name], str(path)
        if setting.name in environ:
            raw, where = environ[setting.name], "environment"
        if raw is None:
            values[setting.name] = None
        else:
            try:
                values[setting.name] = setting.convert(raw)
            except ValueError as exc:
                shown = "(hidden)" if setting.secret else repr(redact_url(raw))
                raise SettingsError(f"{setting.name}={shown} from {where} is invalid:"
                                    f" expected {exc}") from None
        origin[setting.name] = where
    _check_together(values, origin)
    return Settings(role, values, origin)


def _check_together(values: Mapping[str, Any], origin: Mapping[str, str]) -> None:
    """Refuse settings that are each valid but not together, before any command acts."""
    codec, level = values.get("COMPRESS"), values.get("COMPRESS_LEVEL")
    if codec in LEVELS and level is not None:
        low, high = LEVELS[codec]
        if not low <= level <= high:
            raise SettingsError(f"COMPRESS_LEVEL={level} from {origin['COMPRESS_LEVEL']} is"
                                f" invalid with COMPRESS={codec}: expected {max(low, 1)}-{high}")
