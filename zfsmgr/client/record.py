"""The property records of a run's datasets: what a stream sent without `-p` cannot carry.

Captured once per pool per run, for the datasets about to be sent (none when every dataset is
unchanged): one `zfs get -s local,received` names them all (split only where
one command line would be too long: zfs.py). The record travels in the upload
request (zfsmgr/properties.py says what is in it and what is left out).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Sequence

from zfsmgr import properties
from zfsmgr.zfs import Zfs, ZfsError

log = logging.getLogger("zfsmgr.client")


def attach(zfs: Zfs, todo: Sequence[tuple]) -> None:
    """Give each backup of `todo` ((dataset, Backup, snapshot) triples) that records its
    properties its record (`backup.properties`). A pool whose listing fails leaves its
    datasets without a record, with a warning: the backups go on."""
    by_pool: Dict[str, List] = {}
    for name, backup, _ in todo:
        if backup.records_properties:
            by_pool.setdefault(name.split("/")[0], []).append((name, backup))
    for pool, members in by_pool.items():
        try:
            listing = zfs.own_properties([name for name, _ in members])
        except ZfsError as exc:
            log.warning("%s: cannot read the datasets' properties (%s): sending them"
                        " without a property record", pool, exc)
            continue
        for name, backup in members:
            backup.properties = properties.record(
                listing.get(name, {}), lambda text, name=name: log.warning("%s: %s", name,
                                                                           text))
