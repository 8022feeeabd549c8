"""The `zfsmgr` command: dispatches server, client and restore; maps errors to exit codes."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from typing import List, Optional

from zfsmgr import __version__
from zfsmgr.errors import ExitStatus, ZfsmgrError

USAGE = "zfsmgr [--env-file PATH] [-q] [-v] server|client|restore|help COMMAND ..."
GROUPS = """commands:
  zfsmgr server  [COMMAND]      the backup server (see `zfsmgr server help`)
  zfsmgr client  COMMAND        back up this host (see `zfsmgr client help`)
  zfsmgr restore COMMAND        list, restore, verify (see `zfsmgr restore help`)
  zfsmgr help | --version

--env-file, -q and -v may also follow the command (`zfsmgr client backup -q`)."""
GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose")

EXIT_CODES = "exit codes: " + ", ".join(f"{s.value} {s.name.lower()}" for s in ExitStatus)


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with a one-line error after the usage; a command's usage line
    starts with its own name (`zfsmgr client backup`), not with its parent's usage text."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"zfsmgr: error: {message}\n")
        raise SystemExit(ExitStatus.USAGE)

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("prog", self.prog)
        kwargs.setdefault("parser_class", type(self))
        return super().add_subparsers(**kwargs)


def hoist_global_options(argv: List[str]) -> List[str]:
    """Move --env-file, -q and -v to the front, so they work after the command as well."""
    front, rest, index = [], [], 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            rest += argv[index:]
            break
        if arg in GLOBAL_FLAGS or arg.startswith("--env-file="):
            front.append(arg)
        elif arg == "--env-file" and index + 1 < len(argv):
            front += argv[index:index + 2]
            index += 1
        else:
            rest.append(arg)
        index += 1
    return front + rest


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    from zfsmgr.client import commands as client
    from zfsmgr.restore import commands as restore
    from zfsmgr.server import commands as server

    parser = _Parser(prog="zfsmgr", usage=USAGE, epilog=GROUPS + "\n\n" + EXIT_CODES,
                     description="ZFS snapshot backups to S3, local ZFS or a directory.",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"zfsmgr {__version__}")
    parser.add_argument("--env-file", metavar="PATH",
                        help="settings file (default: .env in the working directory)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="nothing on stdout on success (for cron); errors on stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="group", metavar="{server,client,restore,help}")
    server.add_parser(sub)
    client.add_parser(sub)
    restore.add_parser(sub)
    sub.add_parser("help", help="show this help")
    return parser


def _logging(verbose: bool, role: str, env_file: Optional[str], quiet: bool = False) -> None:
    """Logging for the command: LOG_FORMAT of the role's settings (plain when unreadable: the
    command's own settings check reports a bad file); -q keeps only warnings and errors."""
    from zfsmgr import settings as config
    from zfsmgr.logformat import configure

    try:
        log_format = config.load(role, env_file, names=("LOG_FORMAT",)).log_format
    except ZfsmgrError as exc:
        if "LOG_FORMAT" in str(exc):
            raise
        log_format = "plain"
    configure(verbose, log_format)
    if quiet and not verbose:
        logging.getLogger().setLevel(logging.WARNING)


def _interrupt(signum, _frame) -> None:
    """SIGTERM: unwind like Ctrl-C so no half backup, stray snapshot or lock stays behind."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def _stdout_unless(quiet: bool):
    """-q: what a command prints on stdout goes nowhere (errors go to stderr as ever)."""
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def main(argv: Optional[List[str]] = None) -> int:
    """Run one zfsmgr command; return its exit status (never raises, never a traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(hoist_global_options(argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.group in (None, "help"):
        parser.print_help(sys.stdout if args.group else sys.stderr)
        return ExitStatus.OK if args.group else ExitStatus.USAGE
    if args.group != "server":  # the server handles SIGTERM itself (graceful shutdown)
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        _logging(args.verbose, args.group, args.env_file, args.quiet)
        with _stdout_unless(args.quiet):
            return int(args.run(args, args.env_file))
    except ZfsmgrError as exc:
        sys.stderr.write(f"zfsmgr: error: {exc}\n")
        return int(exc.exit_status)
    except KeyboardInterrupt:
        sys.stderr.write("zfsmgr: interrupted\n")
        return 130
    except BrokenPipeError:
        return ExitStatus.ERROR
    except Exception as exc:  # a bug: one line unless ZFSMGR_DEBUG asks for the trace
        if os.environ.get("ZFSMGR_DEBUG"):
            raise
        sys.stderr.write(f"zfsmgr: internal error: {type(exc).__name__}: {exc}"
                         " (set ZFSMGR_DEBUG=1 for a traceback)\n")
        return ExitStatus.ERROR
