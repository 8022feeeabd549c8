"""The wire protocol shared by server, client and restore: data only, importing none of them.

Routes, auth headers, request/response shapes, the manifest of a stored backup, validation of
names from clients, the upload part-size schedule, and the pair of pure functions that build and
parse storage keys in the seed's naming (`client1/tank_data_2024-02-13_14:30:00.zfs.gz`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zlib
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Optional

from zfsmgr.errors import ValidationError

PROTOCOL_VERSION = 1

# Routes (the seed's, plus the upload-session routes that make uploads atomic and resumable).
HEALTH = "/health"
UPLOAD = "/upload"  # POST: authorize an upload, open an upload session
UPLOAD_COMMIT = "/upload-stream/{upload_id}/commit"  # POST: verify and make visible
UPLOAD_ABORT = "/upload-stream/{upload_id}/abort"  # POST: discard
UPLOAD_RESUME = "/upload-stream/{upload_id}/resume"  # POST {"token", "from_part"}: send -t
UPLOAD_PART = "/upload-stream/{upload_id}/{index}"
UPLOAD_SESSION = "/upload-stream/{upload_id}"
STATUS = "/status"  # GET
SNAPSHOTS = "/snapshots"  # GET [?dataset=A&dataset=B…]: the client's manifests, oldest first
ROTATE = "/rotate"  # POST {"dry_run": bool}
DOWNLOAD = "/download"  # GET ?key=KEY, honours Range
ROTATION_POLICY = "/rotation-policy"  # GET
VERIFY_REPORT = "/verify-report"  # POST {"results": [{"key", "ok", "message"}]}
CHECKIN = "/checkin"  # POST {"dataset", "snapshot"}: checked, nothing written since that backup
METRICS = "/metrics"  # GET, Prometheus text (METRICS_TOKEN bearer)
STATUS_PAGE = "/"  # GET, HTML for admins (ADMIN_API_KEY)

# Authentication: the raw key travels in a header, never in a URL.
HEADER_CLIENT_ID = "X-Client-ID"
HEADER_API_KEY = "X-API-Key"
FULL_BACKUP_REQUIRED = "full_backup_required"  # in a 409 to POST /upload: send a full instead
HEADER_SEGMENT = "X-Upload-Segment"  # on a part: the part its stream starts at (after send -t)
HEADER_SHA256 = "X-Content-SHA256"  # response header of a part / download: sha256 of the body
# Response headers of a download (GET /download): what the stream is (storage/base.StreamInfo).
HEADER_COMPRESSION = "X-Compression"  # the codec of the body
HEADER_STORED_SIZE = "X-Stored-Size"  # the whole stream's size; empty: known only at its end
HEADER_OFFSET = "X-Stream-Offset"  # the byte of the stream the body starts at

COMPRESSIONS = {"gzip": ".zfs.gz", "zstd": ".zfs.zst", "none": ".zfs"}
ENCRYPTIONS = {"": "", "age": ".age"}  # client-side encryption of the compressed stream
BACKUP_TYPES = ("full", "incremental")

TIMESTAMP_FORMAT = "%Y-%m-%d_%H:%M:%S"
_TIMESTAMP = r"\d{4}-\d{2}-\d{2}_\d{2}:\d{2}:\d{2}"

_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_COMPONENT = re.compile(r"^[A-Za-z0-9_.:-]+$")
_SNAPSHOT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}$")
_UPLOAD_ID = re.compile(r"^[a-f0-9]{32}$")
_KEY = re.compile(r"^(?P<client>[^/]+)/(?P<dataset>[A-Za-z0-9_.:-]+)_(?P<ts>" + _TIMESTAMP
                  + r")(?P<ext>\.zfs(?:\.gz|\.zst)?)(?P<enc>\.age)?$")


def _reject(what: str, value: Any, why: str) -> None:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    raise ValidationError(f"invalid {what} {shown}: {why}")


def validate_client_id(value: Any) -> str:
    """A client id: letters, digits, '.', '_', '-'; 1-64 chars; not starting with a dot."""
    if not isinstance(value, str) or not _CLIENT_ID.fullmatch(value):
        _reject("client id", value, "use 1-64 letters, digits, '.', '_' or '-'")
    return value


def validate_dataset(value: Any) -> str:
    """A ZFS filesystem name: pool[/child...], components of [A-Za-z0-9_.:-]."""
    if not isinstance(value, str) or not value or len(value) > 200:
        _reject("dataset", value, "expected pool/name, at most 200 characters")
    parts = value.split("/")
    for part in parts:
        if not _COMPONENT.fullmatch(part) or part in (".", "..") or part.startswith("-"):
            _reject("dataset", value, "components are letters, digits, '_', '.', ':', '-'")
    if not parts[0][0].isalpha():
        _reject("dataset", value, "the pool name must start with a letter")
    return value


def validate_snapshot(value: Any) -> str:
    """A snapshot's short name (the part after '@')."""
    if not isinstance(value, str) or not _SNAPSHOT.fullmatch(value):
        _reject("snapshot name", value, "use letters, digits, '_', '.', ':' or '-'")
    return value


ZFS_MAX_NAME = 255  # ZFS_MAX_DATASET_NAME_LEN less the NUL: pool/fs@snap, whole
MAX_EPOCH = 253402300799  # 9999-12-31T23:59:59Z: what a timestamp in a key can show
MAX_BYTES = (1 << 63) - 1  # sizes as zfs reports them (u64, kept signed-safe)
MAX_PART_INDEX = 100_000  # above any provider's part limit (S3: 10,000)
MAX_JSON_BODY = 64 << 10  # a request's JSON body
MAX_ANSWER = 16 << 20  # the largest JSON answer a client reads (GET /snapshots of a whole catalog)
MAX_QUERY_DATASETS = 100  # datasets one GET /snapshots may name
MAX_JSON_DEPTH = 8  # nesting of a JSON body (the protocol uses 2)


def validate_snapshot_name(dataset: str, snapshot: str) -> str:
    """`dataset@snapshot` within ZFS's name length limit (255)."""
    full = f"{dataset}@{snapshot}"
    if len(full) > ZFS_MAX_NAME:
        _reject("snapshot", full, f"ZFS names are at most {ZFS_MAX_NAME} characters")
    return full


def validate_count(value: Any, what: str, limit: int = MAX_BYTES) -> int:
    """A whole number from 0 to `limit` (a JSON integer; true/false are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        _reject(what, value, f"expected a whole number from 0 to {limit}")
    return value


def validate_epoch(value: Any, what: str = "snapshot_time") -> float:
    """Epoch seconds: a finite number after 1970 and before the year 10000."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not 0 < value <= MAX_EPOCH:
        _reject(what, value, "expected epoch seconds")
    return float(value)


def validate_guid(value: Any, what: str = "guid") -> str:
    """A ZFS guid: a decimal u64 (as zfs prints it), or empty when unknown."""
    if value is None or value == "":
        return ""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not re.fullmatch(r"[0-9]{1,20}", text) or \
            int(text) >= 1 << 64:
        _reject(what, value, "expected a decimal 64-bit number")
    return text


def validate_choice(value: Any, what: str, choices: Iterable[str]) -> str:
    """One of `choices` (a string; anything else is refused, not hashed)."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        _reject(what, value, "expected " + ", ".join(choices))
    return value


def _reject_constant(name: str) -> None:
    raise ValidationError(f"{name} is not a number JSON allows")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: JSON's syntax, but no number
        raise ValidationError(f"{text[:40]} is not a finite number")
    return value


def _text(value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # "\ud800": JSON's syntax, but no text (SQLite refuses it)
        raise ValidationError("request body has a lone surrogate escape: not text") from None


def parse_json_object(raw: bytes) -> dict:
    """A request body: a JSON object of at most MAX_JSON_BODY bytes and MAX_JSON_DEPTH levels,
    with finite numbers only (NaN, Infinity and 1e999 are refused) and text that is UTF-8
    (a lone surrogate escape is refused)."""
    if len(raw) > MAX_JSON_BODY:
        raise ValidationError(f"request body too large: at most {MAX_JSON_BODY} bytes")
    try:
        data = json.loads(raw.decode("utf-8") if raw else "{}",
                          parse_constant=_reject_constant, parse_float=_finite)
    except ValidationError:
        raise
    except (ValueError, RecursionError):
        raise ValidationError("request body is not JSON") from None
    if not isinstance(data, dict):
        raise ValidationError("request body must be a JSON object")
    level, stack = 0, [(data, 1)]
    while stack:
        item, level = stack.pop()
        if level > MAX_JSON_DEPTH:
            raise ValidationError(f"request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            children = list(item.values())
            for name in item:
                _text(name)
        else:
            children = item
        for child in children:
            if isinstance(child, str):
                _text(child)
            elif isinstance(child, (dict, list)):
                stack.append((child, level + 1))
    return data


def validate_upload_id(value: Any) -> str:
    """An upload session id as the server makes them (32 hex digits)."""
    if not isinstance(value, str) or not _UPLOAD_ID.fullmatch(value):
        _reject("upload id", value, "expected 32 hex digits")
    return value


def format_timestamp(moment: datetime) -> str:
    """The seed's timestamp text, in UTC: 2024-02-13_14:30:00."""
    return moment.astimezone(timezone.utc).strftime(TIMESTAMP_FORMAT)


def parse_timestamp(text: str) -> datetime:
    """Inverse of format_timestamp."""
    if not re.fullmatch(_TIMESTAMP, text or ""):
        _reject("timestamp", text, "expected YYYY-MM-DD_HH:MM:SS")
    try:
        return datetime.strptime(text, TIMESTAMP_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        _reject("timestamp", text, "not a real date and time")
    raise AssertionError("unreachable")


def dataset_token(dataset: str) -> str:
    """The dataset as it appears in a key: '/' replaced by '_'."""
    return validate_dataset(dataset).replace("/", "_")


def unique_token(dataset: str, taken: Mapping[str, str]) -> str:
    """The key token of `dataset` given the tokens other datasets of the client already use
    (`taken`: dataset -> token). The seed's token (`tank/data` -> `tank_data`) unless another
    dataset holds it (`tank/a_b` and `tank/a/b` both give `tank_a_b`): then the token gets a
    dash and 8 hex digits of the dataset's sha256, keeping the key's shape. A dataset keeps the
    token its backups already have. ValueError if no unique token is left (never in practice).
    """
    if dataset in taken:
        return taken[dataset]
    others = {token for name, token in taken.items() if name != dataset}
    plain = dataset_token(dataset)
    for token in (plain, f"{plain}-{hashlib.sha256(dataset.encode()).hexdigest()[:8]}"):
        if token not in others:
            return token
    raise ValueError(f"the key token of {dataset} is taken by another dataset of this client")


@dataclass(frozen=True)
class StorageKey:
    """The parts of a storage key."""

    client_id: str
    dataset_token: str  # the dataset with '/' as '_' (lossy: the manifest has the real name)
    timestamp: str
    compression: str
    encryption: str = ""

    def __str__(self) -> str:
        return build_key(self.client_id, "", self.timestamp, self.compression,
                         token=self.dataset_token, encryption=self.encryption)


def build_key(client_id: str, dataset: str, timestamp: str, compression: str,
              token: Optional[str] = None, encryption: str = "") -> str:
    """`client1/tank_data_2024-02-13_14:30:00.zfs.gz` from its parts (all validated); an
    age-encrypted stream ends in `.zfs.gz.age`."""
    validate_client_id(client_id)
    token = token if token is not None else dataset_token(dataset)
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", token):
        _reject("dataset", token, "not usable in a key")
    parse_timestamp(timestamp)
    if compression not in COMPRESSIONS:
        _reject("compression", compression, f"expected {codecs_text()}")
    if encryption not in ENCRYPTIONS:
        _reject("encryption", encryption, "expected age or none")
    return (f"{client_id}/{token}_{timestamp}{COMPRESSIONS[compression]}"
            f"{ENCRYPTIONS[encryption]}")


def parse_key(key: str) -> StorageKey:
    """Inverse of build_key; rejects anything build_key would not make."""
    match = _KEY.fullmatch(key) if isinstance(key, str) else None
    if not match:
        _reject("storage key", key,
                "expected CLIENT/DATASET_YYYY-MM-DD_HH:MM:SS.zfs[.gz|.zst][.age]")
    validate_client_id(match.group("client"))
    parse_timestamp(match.group("ts"))
    compression = {v: k for k, v in COMPRESSIONS.items()}[match.group("ext")]
    return StorageKey(match.group("client"), match.group("dataset"), match.group("ts"),
                      compression, "age" if match.group("enc") else "")


def key_stem(key: str) -> str:
    """A key without its extensions: `client1/tank_data_2024-02-13_14:30:00`."""
    for ext in sorted((c + e for c in COMPRESSIONS.values() for e in ENCRYPTIONS.values()),
                      key=len, reverse=True):
        if key.endswith(ext):
            return key[:-len(ext)]
    return key


def redact_url(url: str) -> str:
    """`url` with its credentials hidden: http://user:***@host/. All that comes before its
    last `@` (after the scheme, if it has one) counts as them, however it is written: a
    password with `/` or spaces in it, no scheme, a token given as the user."""
    if "@" not in url:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        scheme, sep, rest = "", "", url
    userinfo, _, host = rest.rpartition("@")
    user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
    return f"{scheme}{sep}{user}:***@{host}"


def codecs_text() -> str:
    """The codecs for messages: "gzip, zstd or none"."""
    names = list(COMPRESSIONS)
    return f"{', '.join(names[:-1])} or {names[-1]}"


def manifest_key(key: str) -> str:
    """The key of the manifest stored beside an object."""
    return key + ".manifest.json"


@dataclass(frozen=True)
class Manifest:
    """What is recorded beside each stored stream, enough to rebuild the catalog."""

    key: str
    client_id: str
    dataset: str
    snapshot: str
    type: str  # full | incremental
    parent: Optional[str]  # the parent snapshot's short name, None for a full stream
    compression: str
    raw_size: int
    stored_size: int
    sha256: str  # of the stored bytes (the ciphertext, when encrypted)
    created: str  # ISO 8601 UTC, when the backup was committed
    snapshot_time: float  # the snapshot's creation, epoch seconds
    guid: str = ""
    parent_guid: str = ""
    raw_send: bool = False  # zfs send -w: encrypted at rest
    compressed_send: bool = False  # zfs send -c
    storage_type: str = ""
    encryption: str = ""  # "age": the stored bytes are an age file of the compressed stream
    parts: int = 0
    format: int = PROTOCOL_VERSION
    extra: dict = field(default_factory=dict)
    self_contained: bool = False  # its download restores alone, though incremental (the
    # server says so from its store when it lists backups: a `local` download is a full send)
    properties: Optional[dict] = None  # the dataset's own properties when the stream lacks
    # them (zfsmgr/properties.py); None: no record (the stream has them, or none were sent)

    @property
    def restores_alone(self) -> bool:
        """Whether this backup's download restores without the streams before it."""
        return self.type == "full" or self.self_contained

    def to_dict(self) -> dict:
        """JSON-ready mapping."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Manifest":
        """Build from a mapping, ignoring unknown fields (newer writers)."""
        known = {f.name for f in fields(cls)}
        try:
            manifest = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ValidationError(f"invalid manifest: {exc}") from None
        parse_key(manifest.key)
        validate_dataset(manifest.dataset)
        validate_snapshot(manifest.snapshot)
        if manifest.parent is not None:
            validate_snapshot(manifest.parent)
        if manifest.encryption not in ENCRYPTIONS:
            _reject("encryption", manifest.encryption, "expected age or none")
        if manifest.type not in BACKUP_TYPES:
            _reject("backup type", manifest.type, "expected full or incremental")
        if manifest.properties is not None and not isinstance(manifest.properties, dict):
            _reject("properties", manifest.properties, "expected an object or null")
        return manifest


# Upload part sizes grow so that one upload fits any stream up to ~5.8 TiB in 10,000 parts
# while each part stays small enough to spool: base for the first `every` parts, then double,
# capped at MAX_PART_SIZE (waitress's body limit is raised just above it).
MAX_PART_SIZE = 1 << 30
MIN_S3_PART_SIZE = 5 << 20


def part_size(index: int, base: int, every: int, cap: int = MAX_PART_SIZE) -> int:
    """Size of part `index` (0-based) under the growth schedule."""
    if index < 0 or base <= 0 or every <= 0:
        raise ValueError("bad part schedule")
    return min(cap, base << min(index // every, 40))


def schedule_capacity(base: int, every: int, max_parts: int, cap: int = MAX_PART_SIZE) -> int:
    """Largest stream the schedule can carry in `max_parts` parts."""
    total, index = 0, 0
    while index < max_parts:
        size = part_size(index, base, every, cap)
        run = min(every - index % every, max_parts - index)
        total += size * run
        index += run
    return total


def parts_checksum(crcs: Iterable[str]) -> str:
    """The checksum of an upload's parts that commit verifies, built as S3 builds a composite
    checksum: the CRC-32 of the parts' CRC-32s (4 bytes each, in order), a dash, their count.
    Each end computes it from its own per-part CRC-32s: the client's of what it sent, the
    server's of what it staged."""
    crcs = list(crcs)
    joined = b"".join(bytes.fromhex(c) for c in crcs)
    return f"{zlib.crc32(joined) & 0xFFFFFFFF:08x}-{len(crcs)}"


def ok(message: str = "ok", **payload: Any) -> dict:
    """A success response body."""
    return {"success": True, "message": message, **payload}


def error(message: str, **payload: Any) -> dict:
    """An error response body."""
    return {"success": False, "message": message, **payload}


def rotation_policy_response(policy: Optional[Mapping[str, int]]) -> dict:
    """The seed's /rotation-policy body, exactly."""
    if policy is None:
        return {"success": True, "message": "No server-managed rotation policy",
                "rotation_policy": None, "server_managed": False}
    return {"success": True, "message": "Server-managed rotation policy",
            "rotation_policy": {k: policy[k] for k in
                                ("keep_hourly", "keep_daily", "keep_weekly", "keep_monthly")},
            "server_managed": True}


def now_iso() -> str:
    """Current time, ISO 8601 UTC, seconds."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()
