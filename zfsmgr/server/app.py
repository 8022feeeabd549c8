"""The HTTP API (bottle): routes of zfsmgr.protocol, JSON in and out, errors mapped once."""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from typing import Callable, Dict, Optional

import bottle

from zfsmgr import protocol
from zfsmgr.errors import (NeedsFullBackup, NotFound, QuotaExceeded, Unauthorized,
                           ValidationError, ZfsmgrError)
from zfsmgr.files import CHUNK
from zfsmgr.protocol import HEADER_API_KEY, HEADER_CLIENT_ID, HEADER_SHA256
from zfsmgr.server.cache import Cached
from zfsmgr.server.clients import ClientConfig
from zfsmgr.server.context import ServerContext
from zfsmgr.server.fleet import fleet
from zfsmgr.storage import registry

log = logging.getLogger("zfsmgr.server")
OPEN_ROUTES = " open routes"  # their one share of worker threads (no client id has a space)


def _json(status: int, body: dict) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(json.dumps(body), status=status,
                               headers={"Content-Type": "application/json"})


class _Body:
    """A store reader as a WSGI iterable that is closed when the response ends."""

    def __init__(self, reader):
        self.reader = reader
        self.on_close: Optional[Callable[[], None]] = None
        self.first = b""

    def prime(self) -> bool:
        """Read the first chunk now, in the route's handler (bottle peeks at the first item
        and, when there is none or reading fails, never closes the body): whether there is
        one. The reader is closed when it fails."""
        try:
            self.first = self.reader.read(CHUNK)
        except BaseException:
            self.reader.close()
            raise
        return bool(self.first)

    def __iter__(self):
        chunk, self.first = self.first, b""
        while True:
            if not chunk:
                chunk = self.reader.read(CHUNK)
            if not chunk:
                return
            yield chunk
            chunk = b""

    def close(self) -> None:
        try:
            self.reader.close()
        finally:
            if self.on_close is not None:
                self.on_close()
                self.on_close = None


def make_app(ctx: ServerContext) -> bottle.Bottle:
    """The WSGI application of one server."""
    app = bottle.Bottle()
    app.config["catchall"] = False
    # the open routes' answers, kept a moment: a flood of them costs one computation
    health_view, fleet_view = Cached(ctx.health_report), Cached(lambda: fleet(ctx))

    def handler(auth: bool = True, write: bool = True) -> Callable:
        """`write=False`: a disabled client may still call the route (list, restore, verify)."""
        def wrap(func: Callable) -> Callable:
            @functools.wraps(func)
            def run(*args, **kwargs):
                started, client_id, status = time.monotonic(), "-", 500
                slot = None  # the client's share of worker threads, given back when done
                try:
                    client = None
                    if auth:
                        client = authenticate(write)
                        client_id = client.client_id
                        ctx.working.take(client_id)
                        slot = client_id
                    else:  # all of the open routes together: one client's share
                        ctx.working.take(OPEN_ROUTES)
                        slot = OPEN_ROUTES
                    result = func(client, *args, **kwargs)
                    if isinstance(result, bottle.HTTPResponse) and \
                            isinstance(result.body, _Body):
                        if not result.body.prime():  # nothing to stream: done here
                            result.body.reader.close()
                            result.body = b""
                        elif slot:  # held while the body streams
                            result.body.on_close = functools.partial(ctx.working.give, slot)
                            slot = None
                    status = result.status_code if isinstance(result, bottle.HTTPResponse) \
                        else 200
                    return result
                except ZfsmgrError as exc:
                    status = exc.http_status
                    if status >= 500:
                        log.error("%s %s: %s", bottle.request.method, bottle.request.path, exc)
                    payload = dict(getattr(exc, "payload", None) or {})
                    if isinstance(exc, NeedsFullBackup):
                        payload[protocol.FULL_BACKUP_REQUIRED] = True
                    return _json(status, protocol.error(str(exc), **payload))
                except Exception as exc:  # never a traceback to the client
                    log.exception("internal error on %s", bottle.request.path)
                    return _json(500, protocol.error(
                        f"internal server error: {type(exc).__name__}"))
                finally:
                    if slot:
                        ctx.working.give(slot)
                    if auth and bottle.request.method != "GET" and status < 400:
                        # a client changed something; a refused request changed nothing, and
                        # made every /health a store check when it cleared them
                        health_view.clear()
                        fleet_view.clear()
                    log.info("%s %s %s client=%s %.3fs", bottle.request.method,
                             bottle.request.path, status, client_id, time.monotonic() - started)
            return run
        return wrap

    def authenticate(write: bool) -> ClientConfig:
        request = bottle.request
        client_id = _header(HEADER_CLIENT_ID)
        key = _header(HEADER_API_KEY)
        if client_id is None and request.path == protocol.ROTATION_POLICY:
            client_id, key = request.query.get("client_id"), request.query.get("api_key")
        if not client_id or not key:
            raise Unauthorized(f"send the {HEADER_CLIENT_ID} and {HEADER_API_KEY} headers")
        return ctx.clients.authenticate(client_id, key, write)

    def body_json() -> dict:
        length = bottle.request.content_length
        if length > protocol.MAX_JSON_BODY:
            raise ValidationError(f"request body too large: at most {protocol.MAX_JSON_BODY}"
                                  " bytes")
        return protocol.parse_json_object(
            bottle.request.environ["wsgi.input"].read(max(0, length)))

    @app.get(protocol.HEALTH)
    @handler(auth=False)
    def health(_):
        report = health_view.get(ctx.clients.stamp())
        return _json(200 if report["success"] else 503, report)

    @app.post(protocol.UPLOAD)
    @handler()
    def upload(client):
        request = body_json()
        requested = request.get("storage_type") or ""
        if requested:
            protocol.validate_choice(requested, "storage_type", registry.KINDS)
        store = ctx.store_for(client, requested)
        ctx.refresh(client)
        try:
            session = ctx.uploads.open(client, store, request)
        except QuotaExceeded as exc:
            dataset = request.get("dataset")
            ctx.outcomes.failed(client.client_id, dataset if isinstance(dataset, str) else "",
                                exc)
            raise
        log.info("upload %s opened: client=%s key=%s type=%s estimate=%s", session.upload_id,
                 client.client_id, session.key, session.type, session.estimated_size)
        return protocol.ok("upload authorized", upload_id=session.upload_id, key=session.key,
                           storage_type=session.storage_type, part_size=session.part_base,
                           part_growth_every=session.part_every,
                           max_part_size=protocol.MAX_PART_SIZE)

    @app.get(protocol.UPLOAD_SESSION.replace("{upload_id}", "<upload_id>"))
    @handler()
    def upload_state(client, upload_id):
        try:
            session = ctx.uploads.get(client.client_id, upload_id)
        except NotFound:  # a commit that failed may have discarded it: say why, not 404
            failed = ctx.uploads.commit_failure(client.client_id, upload_id)
            if failed is None:
                raise
            raise failed from None
        state = ctx.uploads.state(ctx.store_named(session.storage_type), session)
        return protocol.ok("upload open", upload_id=upload_id, key=session.key,
                           part_size=session.part_base, part_growth_every=session.part_every,
                           **state)

    @app.post(protocol.UPLOAD_RESUME.replace("{upload_id}", "<upload_id>"))
    @handler()
    def resume(client, upload_id):
        session = ctx.uploads.get(client.client_id, upload_id)
        session = ctx.uploads.resume(ctx.store_named(session.storage_type), session,
                                     body_json())
        log.info("upload %s: client=%s resumes with zfs send -t from part %d", upload_id,
                 client.client_id, session.segment)
        return protocol.ok("send the resumed stream", from_part=session.segment)

    @app.post(protocol.UPLOAD_COMMIT.replace("{upload_id}", "<upload_id>"))
    @handler()
    def commit(client, upload_id):
        started = time.monotonic()
        session = ctx.uploads.get(client.client_id, upload_id)
        store = ctx.store_named(session.storage_type)
        try:
            manifest = ctx.uploads.commit(client, store, session, body_json(), lambda: (
                ctx.retain_chain(client, store, session.dataset, session.parent)))
        except ZfsmgrError as exc:
            log.warning("upload %s failed: client=%s dataset=%s: %s", upload_id,
                        client.client_id, session.dataset, exc)
            if not isinstance(exc, ValidationError):  # a malformed request changes nothing
                ctx.outcomes.failed(client.client_id, session.dataset, exc)
            raise
        ctx.outcomes.committed(client.client_id, manifest.dataset, manifest.stored_size)
        log.info("upload %s committed: client=%s dataset=%s key=%s size=%d in %.1fs",
                 upload_id, client.client_id, manifest.dataset, manifest.key,
                 manifest.stored_size, time.monotonic() - started)
        return protocol.ok("backup stored", manifest=manifest.to_dict())

    @app.post(protocol.UPLOAD_ABORT.replace("{upload_id}", "<upload_id>"))
    @handler()
    def abort(client, upload_id):
        session = ctx.uploads.get(client.client_id, upload_id)
        ctx.uploads.abort_for_client(session, ctx.store_named(session.storage_type))
        ctx.outcomes.aborted(client.client_id, session.dataset)
        log.info("upload %s aborted by client=%s", upload_id, client.client_id)
        return protocol.ok("upload discarded")

    @app.post(protocol.UPLOAD_PART.replace("{upload_id}", "<upload_id>")
              .replace("{index}", "<index:int>"))
    @handler()
    def part(client, upload_id, index):
        session = ctx.uploads.get(client.client_id, upload_id)
        store = ctx.store_named(session.storage_type)
        protocol.validate_count(index, "part index", protocol.MAX_PART_INDEX)
        size = bottle.request.content_length
        segment = _header(protocol.HEADER_SEGMENT)
        if segment is not None and not re.fullmatch(r"[0-9]{1,6}", segment):
            raise ValidationError(f"{protocol.HEADER_SEGMENT} must be a part number")
        try:
            info = ctx.uploads.put_part(client, store, session, index,
                                        bottle.request.environ["wsgi.input"], size,
                                        None if segment is None else int(segment))
        except QuotaExceeded as exc:  # the upload was discarded
            ctx.outcomes.failed(client.client_id, session.dataset, exc)
            raise
        return _json(200, protocol.ok("part stored", **info.__dict__))

    @app.get(protocol.STATUS)
    @handler(write=False)
    def status(client):
        return protocol.ok("status", **ctx.status(client))

    @app.get(protocol.SNAPSHOTS)
    @handler(write=False)
    def snapshots(client):
        # ?dataset=A&dataset=B: those datasets' manifests (the answer names them, so a client
        # can tell this from an older server that took only one); none: all of the client's
        datasets = list(dict.fromkeys(bottle.request.query.getall("dataset")))
        if len(datasets) > protocol.MAX_QUERY_DATASETS:
            raise ValidationError(f"at most {protocol.MAX_QUERY_DATASETS} datasets per"
                                  " request")
        for dataset in datasets:
            protocol.validate_dataset(dataset)
        ctx.refresh(client, strict=False)
        found = [text for d in datasets for text in ctx.catalog.list_json(client.client_id, d)
                 ] if datasets else ctx.catalog.list_json(client.client_id)
        named = {"datasets": datasets} if datasets else {}
        # the stored manifests are JSON already: spliced in, not parsed and dumped again
        head = json.dumps(protocol.ok(f"{len(found)} backups", **named, snapshots=[]))[:-3]
        return bottle.HTTPResponse(head + "[" + ",".join(found) + "]}", status=200,
                                   headers={"Content-Type": "application/json"})

    @app.get(protocol.DOWNLOAD)
    @handler(write=False)
    def download(client):
        key = bottle.request.query.get("key") or ""
        parsed = protocol.parse_key(key)
        if parsed.client_id != client.client_id:
            raise NotFound(f"no backup {key}")
        try:
            ctx.refresh(client, strict=False)
            manifest = ctx.catalog.find(client.client_id, key)
        except KeyError:
            raise NotFound(f"no backup {key}") from None
        offset = _range_start(_header("Range"))
        store = ctx.store_named(manifest.storage_type or ctx.default_kind(client))
        size = store.describe(manifest).size
        if offset and size is not None and offset >= size:
            return _json(416, protocol.error(f"range starts past the end of {key}"))
        stream = store.open(manifest, offset)
        info = stream.info
        headers: Dict[str, str] = {"Content-Type": "application/octet-stream",
                                   protocol.HEADER_COMPRESSION: info.compression,
                                   HEADER_SHA256: info.sha256,
                                   protocol.HEADER_STORED_SIZE: "" if info.size is None
                                   else str(info.size),
                                   protocol.HEADER_OFFSET: str(offset)}
        if stream.length is not None:
            headers["Content-Length"] = str(stream.length)
        status = 200
        if offset and info.ranged:
            status = 206
            headers["Content-Range"] = f"bytes {offset}-{info.size - 1}/{info.size}"
        log.info("download client=%s key=%s offset=%d", client.client_id, key, offset)
        return bottle.HTTPResponse(_Body(stream.reader), status=status, headers=headers)

    @app.post(protocol.ROTATE)
    @handler()
    def rotate(client):
        dry_run = body_json().get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise ValidationError("dry_run must be true or false")
        return protocol.ok("rotation", **ctx.rotate(client, dry_run=dry_run))

    @app.get(protocol.ROTATION_POLICY)
    @handler(write=False)
    def rotation_policy(client):
        policy = client.rotation_policy.to_mapping() if client.rotation_policy else None
        return protocol.rotation_policy_response(policy)

    @app.post(protocol.VERIFY_REPORT)
    @handler(write=False)
    def verify_report(client):
        recorded = record_verify_report(ctx, client, body_json())
        return protocol.ok(f"recorded the verification of {len(recorded)} datasets",
                           datasets=recorded)

    @app.post(protocol.CHECKIN)
    @handler()
    def checkin(client):
        body = body_json()
        dataset = protocol.validate_dataset(body.get("dataset"))
        snapshot = body.get("snapshot")
        ctx.refresh(client, strict=False)  # a backup another server sharing the store took
        if not isinstance(snapshot, str) or ctx.catalog.first_of_snapshot(
                client.client_id, dataset, snapshot) is None:  # one indexed row
            raise NotFound(f"client {client.client_id} has no backup {dataset}@{snapshot}"
                           " to be unchanged from")
        at = ctx.ledger.record_checkin(client.client_id, dataset)
        return protocol.ok(f"{dataset} checked, unchanged since {snapshot}", checked_at=at)

    @app.get(protocol.METRICS)
    @handler(auth=False)
    def metrics(_):
        from zfsmgr.server import metrics as exposition

        s = ctx.settings
        exposition.authorize(s.metrics_no_auth, s.metrics_token,
                             _header("Authorization"))
        rows = fleet_view.get(ctx.clients.stamp())
        text = exposition.render(ctx.clients.all(), rows, ctx.ledger.counters(),
                                 len(ctx.clients.warnings()))
        return bottle.HTTPResponse(text, status=200,
                                   headers={"Content-Type": exposition.CONTENT_TYPE})

    @app.get(protocol.STATUS_PAGE)
    @handler(auth=False)
    def status_page(_):
        from zfsmgr.server import page

        try:
            page.authorize(ctx.settings.admin_api_key, _header("Authorization"))
        except Unauthorized as exc:
            return bottle.HTTPResponse(f"{exc}\n", status=401, headers={
                "WWW-Authenticate": page.CHALLENGE, "Content-Type": "text/plain"})
        query = bottle.request.query
        text = page.render(fleet_view.get(ctx.clients.stamp()), query.get("sort") or "state",
                           query.get("order") or "asc",
                           problems=ctx.clients.warnings())
        return bottle.HTTPResponse(text, status=200, headers={
            "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
            "X-Frame-Options": "DENY"})

    def not_found(error):
        bottle.response.content_type = "application/json"
        return json.dumps(protocol.error(f"no route {bottle.request.method}"
                                         f" {bottle.request.path}"))

    def method_not_allowed(error):
        bottle.response.content_type = "application/json"
        return json.dumps(protocol.error(f"{bottle.request.method} is not allowed on"
                                         f" {bottle.request.path}"))

    def other_error(error):
        bottle.response.content_type = "application/json"
        return json.dumps(protocol.error(str(error.body or error.status)))

    app.error_handler.update({404: not_found, 405: method_not_allowed})
    app.default_error_handler = other_error
    return app


def record_verify_report(ctx: ServerContext, client: ClientConfig, report: dict) -> list:
    """Record what `restore verify` found: `{"results": [{"key", "ok", "message"}]}`, keys of
    this client's catalog only; a dataset is verified when none of its checked keys failed."""
    results = report.get("results")
    if not isinstance(results, list) or len(results) > 100_000:
        raise ValidationError("results must be a list of {key, ok, message}")
    known = {m.key: m.dataset for m in ctx.catalog.list(client.client_id)}
    outcome: Dict[str, list] = {}
    for item in results:
        if not isinstance(item, dict) or not isinstance(item.get("ok"), bool) or \
                not isinstance(item.get("key"), str):
            raise ValidationError("each result needs a key and ok (true or false)")
        dataset = known.get(item.get("key"))
        if dataset is None:
            continue
        entry = outcome.setdefault(dataset, [True, ""])
        if not item["ok"]:
            entry[0] = False
            entry[1] = entry[1] or f"{item['key']}: {str(item.get('message') or '')[:300]}"
    for dataset, (ok, message) in sorted(outcome.items()):
        ctx.outcomes.verified(client.client_id, dataset, ok, message)
        log.info("verify report client=%s dataset=%s %s", client.client_id, dataset,
                 "ok" if ok else "FAILED")
    return sorted(outcome)


def _header(name: str) -> Optional[str]:
    """A request header as text; a value that is not UTF-8 is a 400 (bottle's own getter
    raises UnicodeDecodeError on it)."""
    value = bottle.request.environ.get("HTTP_" + name.upper().replace("-", "_"))
    if value is None:
        return None
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise ValidationError(f"the {name} header is not UTF-8 text") from None


def _range_start(header: Optional[str]) -> int:
    if not header:
        return 0
    match = re.fullmatch(r"bytes=([0-9]{1,19})-", header.strip())
    if not match:
        raise ValidationError("only Range: bytes=N- is supported")
    return int(match.group(1))
