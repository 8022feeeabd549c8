"""`zfsmgr server …`: serve, add-client, reindex."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from zfsmgr import settings as config
from zfsmgr import systemd
from zfsmgr.errors import UsageError
from zfsmgr.server import admin, check
from zfsmgr.server.engine import require_sqlite
from zfsmgr.settings import as_size, option_type
from zfsmgr.storage import registry

log = logging.getLogger("zfsmgr.server")

HELP = """commands:
  serve (default)     run the backup server (HOST, PORT)
  add-client NAME [--quota SIZE] [--storage KIND] [--dataset DS]
                 [--allowed-dataset SRC]...
                      add a client with a new random key to CONFIG_FILE; prints the key once.
                      --dataset: the server-side dataset that holds its backups (the local
                      store receives under it; default ZFS_BASE_DATASET/NAME);
                      --allowed-dataset: the only source datasets (and their children) it
                      may back up (default: any)
  reindex             rebuild the catalog from the manifests in storage (the server may
                      run; a damaged catalog needs it stopped)
  rotate [--client C] [--dry-run]
                      apply each client's rotation policy and quota (append-only clients
                      too), never under MIN_RETAIN_DAYS; for cron or a systemd timer
""" + admin.HELP + "\n" + check.HELP + """
  systemd-unit [--install] [--unit-dir DIR] [--workdir DIR] [--user U] [--zfs] [--rw PATH]
                      print (or write) a hardened zfsmgr-server.service
  help                this text"""


def add_parser(sub) -> None:
    """Register `server` and its commands."""
    parser = sub.add_parser("server", help="run the backup server or manage it",
                            usage="zfsmgr server [serve|COMMAND ...]",
                            description="The backup server.", epilog=HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="run the server")
    add = commands.add_parser("add-client", help="add a client")
    add.add_argument("name")
    add.add_argument("--quota", type=_size, default=0, help="e.g. 100G (default: none)")
    add.add_argument("--storage", choices=registry.KINDS, default="",
                     help=f"{registry.kinds_text()} (default: the server's)")
    add.add_argument("--dataset", default="",
                     help="server-side dataset for its backups (local store)")
    add.add_argument("--allowed-dataset", action="append", default=[], metavar="SRC",
                     help="a source dataset it may back up (repeatable; default: any)")
    commands.add_parser("reindex", help="rebuild the catalog from storage")
    rotate = commands.add_parser("rotate", help="apply the clients' retention and quota")
    rotate.add_argument("--client", default="", help="only this client")
    rotate.add_argument("--dry-run", action="store_true", help="show the plan only")
    admin.register(commands)
    check.register(commands)
    unit = commands.add_parser("systemd-unit", help="print or install the systemd service")
    systemd.add_arguments(unit, "/var/lib/zfsmgr")
    unit.add_argument("--user", default="", help="run as this user (default root)")
    unit.add_argument("--zfs", action="store_true",
                      help="the server uses the local ZFS store (allow /dev/zfs)")
    unit.add_argument("--rw", action="append", default=[], metavar="PATH",
                      help="another writable path (a STORAGE_DIR elsewhere); repeatable")
    commands.add_parser("help", help="show the commands")
    parser.set_defaults(run=run, group_parser=parser)


_size = option_type(as_size)


def run(args, env_file) -> int:
    """Dispatch a server command."""
    command = args.command or "serve"
    if command == "help":
        args.group_parser.print_help()
        return 0
    if command == "systemd-unit":
        units = systemd.server_unit(args.python, args.program or systemd.program(),
                                    args.workdir, args.user, args.zfs, args.rw)
        return systemd.emit(units, args.install, args.unit_dir,
                            ["zfsmgr-server.service", "zfsmgr-rotate.timer"])
    if command == "check":  # a plugin that cannot run says UNKNOWN (3), whatever the cause
        return check.run(args, env_file)
    settings = config.load(config.SERVER, env_file)
    if command in admin.COMMANDS:
        return admin.run(args, settings)
    if command == "add-client":
        from zfsmgr.server.clients import add_client

        key = add_client(settings.config_file, args.name, args.quota, args.storage,
                         args.dataset, args.allowed_dataset)
        print(f"added client {args.name} to {settings.config_file}")
        print(f"API_KEY={key}")
        print("(shown once: put it in the client's .env; the server keeps only its SHA-256)")
        return 0
    require_sqlite()  # the catalog, from here on
    from zfsmgr.server.context import ServerContext

    if command == "reindex":
        return reindex(ServerContext(settings, open_catalog=False))
    ctx = ServerContext(settings)
    if command == "rotate":
        return rotate(ctx, args.client, args.dry_run)
    return serve(ctx)


def reindex(ctx) -> int:
    """Rebuild the catalog from every configured store (zfsmgr.server.rebuild).

    A sound database is rebuilt in place, in one transaction, while the server may run; a
    damaged one (the server stopped) is replaced by a new file, keeping the open upload
    sessions when it can still be read. A store no client uses may be unusable (a warning),
    one that a client uses may not."""
    from zfsmgr.errors import ZfsmgrError
    from zfsmgr.server.rebuild import rebuild

    needed = ctx.needed_kinds()
    skipped: set = set()  # their rows stay as they are
    old = getattr(ctx, "db", None)
    if old is not None:  # a running context (tests): let go of the file first
        old.close()

    def manifests():
        for kind in ctx.configured_kinds():
            try:
                store = ctx.store_named(kind)
                found = [store.marked(m) for m in store.manifests()]
            except ZfsmgrError as exc:
                if kind in needed:
                    raise
                print(f"{kind}: skipped, unusable and no client uses it ({exc}); its"
                      " backups stay listed as they were", file=sys.stderr)
                skipped.add(kind)
                continue
            yield from found
            print(f"{kind}: {len(found)} backups")

    count, sessions = rebuild(ctx.catalog_path, manifests(), skipped)
    ctx.open_catalog()
    print(f"catalog {ctx.catalog_path} rebuilt: {count} backups"
          f" ({sessions} open uploads kept)")
    return 0


def rotate(ctx, client_id: str = "", dry_run: bool = False) -> int:
    """The server's own rotation: every client's (or one client's) policy and quota."""

    clients = ctx.clients.all()
    if client_id:
        clients = [c for c in clients if c.client_id == client_id]
        if not clients:
            raise UsageError(f"no client {client_id} in {ctx.settings.config_file}")
    for client in clients:
        result = ctx.rotate(client, dry_run=dry_run, by_server=True)
        verb = "would delete" if dry_run else "deleted"
        for key in result["deleted"]:
            print(f"{client.client_id}: {verb} {key} ({result['reasons'].get(key, '')})")
        print(f"{client.client_id}: {verb} {len(result['deleted'])}, kept"
              f" {len(result['kept'])} backups, {result['freed_bytes']} bytes"
              f" {'to free' if dry_run else 'freed'}"
              + ("" if result["enough"] else "; still over quota"))
    return 0


_FINISH_SECONDS = 10  # a request in flight gets this long after SIGTERM (the unit allows 60)


def serve(ctx) -> int:
    """Run waitress until SIGTERM/SIGINT; expire abandoned uploads in the background."""
    import waitress
    from waitress.server import create_server

    from zfsmgr.protocol import MAX_PART_SIZE
    from zfsmgr.server import connections
    from zfsmgr.server.app import make_app
    from zfsmgr.server.gate import Gate, channel_class

    s = ctx.settings
    kind = ctx.default_kind()
    ctx.store_named(kind)  # fail early when the default store is unusable
    adjustments = dict(host=s.host, port=s.port, threads=s.threads,
                       max_request_body_size=MAX_PART_SIZE + (1 << 20),
                       channel_timeout=300, ident="zfsmgr",
                       connection_limit=connections.connection_limit(),
                       cleanup_interval=connections.CHECK_SECONDS,
                       asyncore_use_poll=True,  # select() fails past descriptor 1023
                       recv_bytes=256 << 10)  # 8 KiB reads cost a syscall each
    certificate = _certificate(s)
    try:
        if certificate is None:
            server = create_server(make_app(ctx), **adjustments)
        else:
            from zfsmgr.server.tls import create_tls_server

            server = create_tls_server(make_app(ctx), certificate, **adjustments)
    except OSError as exc:
        raise UsageError(f"cannot listen on {s.host}:{s.port}: {exc.strerror or exc}"
                         " (another server on that port? set PORT or HOST)") from None

    def reload(_signum, _frame):  # `systemctl reload`; its default action ends the server
        if certificate is not None:
            certificate.reload()
        else:
            log.info("SIGHUP: no TLS certificate to reload (clients.json is read again"
                     " whenever it changes)")

    signal.signal(signal.SIGHUP, reload)
    server.channel_class = channel_class(Gate(ctx), server.channel_class)  # bodies: see gate
    connections.watch(server)
    stop = threading.Event()

    def shutdown(signum, _frame):
        if not stop.is_set():
            log.info("signal %d: shutting down (open uploads stay resumable)", signum)
            stop.set()
        # Unwinds waitress's loop (a second signal: the wait for requests in flight). Closing the
        # server from here instead raced a request still finishing: its worker wrote to the
        # closed trigger (EBADF, a traceback in the log).
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    threading.Thread(target=_janitor, args=(ctx, stop), daemon=True).start()
    if s.notify_url:
        from zfsmgr.server.notify import watch

        threading.Thread(target=watch, args=(ctx, stop), name="stale", daemon=True).start()
    scheme = "http" if certificate is None else "https"
    log.info("zfsmgr %s listening on %s://%s:%s, default storage %s (waitress %s), request"
             " bodies spooled in %s, at most %d connections", ctx.version, scheme, s.host,
             server.effective_port, kind, _version_of(waitress), _spool_dir(),
             server.adj.connection_limit)
    try:
        server.run()  # on the signal: stops accepting, waits up to 5 s for requests in flight
        server.task_dispatcher.shutdown(timeout=_FINISH_SECONDS - 5)  # a part being stored
    except SystemExit:
        pass  # a second signal: stop waiting
    return 0


def _spool_dir() -> str:
    """Where waitress spools request bodies: Python's temporary directory, chosen now for the
    server's lifetime. A TMPDIR Python cannot write to is passed over for /tmp, silently:
    said here."""
    import tempfile

    chosen = tempfile.gettempdir()
    wanted = os.environ.get("TMPDIR")
    if wanted and os.path.realpath(wanted) != os.path.realpath(chosen):
        log.warning("TMPDIR=%s cannot be written to: request bodies are spooled in %s instead",
                    wanted, chosen)
    return chosen


def _certificate(settings):
    """The TLS certificate when TLS_CERT and TLS_KEY are set (None: plain HTTP)."""
    if not settings.tls_cert and not settings.tls_key:
        return None
    settings.require("TLS_CERT", "TLS_KEY")
    from zfsmgr.server.tls import Certificate

    return Certificate(settings.tls_cert, settings.tls_key)


def _version_of(module) -> str:
    """A vendored package's version, from its dist-info (waitress has no __version__)."""
    try:
        from importlib.metadata import version

        return version(module.__name__)
    except Exception:  # noqa: BLE001 (no metadata: say so rather than fail to start)
        return getattr(module, "__version__", "unknown")


def _janitor(ctx, stop: threading.Event) -> None:
    """Settle abandoned uploads now and every ten minutes, in every store that can be used (an
    upload to a store other than the default, left by a server that stopped, is settled too)."""
    from zfsmgr.errors import ZfsmgrError

    ctx.store_named(ctx.default_kind())
    while True:
        for kind in ctx.configured_kinds():
            try:
                ctx.store_named(kind)
            except ZfsmgrError:  # unusable now: /health says so; tried again next time
                pass
        try:
            ctx.uploads.expire(ctx.stores())
        except Exception as exc:  # keep serving; say why cleanup failed
            log.warning("cleanup of abandoned uploads failed: %s", exc)
        if stop.wait(600):
            return
