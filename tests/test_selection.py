"""Which datasets a run backs up (client/selection.py) and how a selection changes over time
(client/changes.py): pure functions, no ZFS."""

from __future__ import annotations

import pytest

from zfsmgr.client.base import Base
from zfsmgr.client.changes import compare, unchanged
from zfsmgr.client.selection import Candidate, Choice, parse_list, select, selected
from zfsmgr.zfs import Snapshot


def tree(*entries):
    """Candidates from (name, backup, source) or plain names."""
    out = []
    for e in entries:
        name, backup, source = (e, "-", "-") if isinstance(e, str) else e
        out.append(Candidate(name, "filesystem", backup, source, guid=f"g-{name}"))
    return out


HOST = tree("tank", "tank/home", "tank/home/ann", "tank/home/bob", "tank/vm", "tank/vm/web",
            ("tank/scratch", "off", "local"), ("tank/scratch/keep", "on", "local"),
            ("tank/scratch/tmp", "off", "inherited from tank/scratch"), "rpool/ROOT")


def verdicts(choices):
    return {c.name: c.selected for c in choices}


def test_a_trailing_slash_names_the_same_dataset_once():
    """`tank/data tank/data/` listed the root twice: every bookmark was listed twice, the old
    one destroyed twice, and every backup after the first failed."""
    assert parse_list("tank/data tank/data/ tank/x//") == ["tank/data", "tank/x"]


def test_lists_are_comma_or_space_separated_and_deduplicated():
    assert parse_list("tank/home, tank/vm  tank/home,,rpool/ROOT/") == [
        "tank/home", "tank/vm", "rpool/ROOT"]
    assert parse_list("") == [] and parse_list(None) == []
    assert parse_list("tank/data") == ["tank/data"]


def test_without_recursion_only_the_named_datasets():
    choices = select(HOST, ["tank/home", "tank/vm"], recursive=False)
    assert verdicts(choices) == {"tank/home": True, "tank/vm": True}
    assert choices[0].reason == "named in LOCAL_DATASET" and choices[0].guid == "g-tank/home"


def test_recursion_adds_every_descendant_and_says_why():
    choices = select(HOST, ["tank/home"], recursive=True)
    assert selected(choices) == ["tank/home", "tank/home/ann", "tank/home/bob"]
    assert choices[1].reason == "below tank/home (RECURSIVE=true)"


def test_an_excluded_subtree_goes_whole():
    choices = select(HOST, ["tank"], recursive=True, excludes=["tank/vm"])
    v = verdicts(choices)
    assert v["tank/vm"] is False and v["tank/vm/web"] is False and v["tank/home/ann"] is True
    reasons = {c.name: c.reason for c in choices}
    assert reasons["tank/vm"] == "in EXCLUDE_DATASETS"
    assert reasons["tank/vm/web"] == "below tank/vm, in EXCLUDE_DATASETS"
    assert "rpool/ROOT" not in v  # outside the roots


def test_the_property_excludes_and_on_includes_again_below():
    choices = select(HOST, ["tank"], recursive=True)
    v = verdicts(choices)
    assert v["tank/scratch"] is False and v["tank/scratch/tmp"] is False
    assert v["tank/scratch/keep"] is True
    reasons = {c.name: c.reason for c in choices}
    assert reasons["tank/scratch"] == "org.zfsmgr:backup=off (set here)"
    assert reasons["tank/scratch/tmp"] == "org.zfsmgr:backup=off (inherited from tank/scratch)"
    assert reasons["tank/scratch/keep"] == "org.zfsmgr:backup=on (set here)"


def test_exclude_datasets_wins_over_the_property():
    choices = select(HOST, ["tank"], recursive=True, excludes=["tank/scratch"])
    assert verdicts(choices)["tank/scratch/keep"] is False


def test_a_missing_root_and_odd_values_and_unusable_names():
    odd = tree(("tank/a", "maybe", "local"), "tank/b c", "tank/s@snap")
    roots = ["tank/a", "tank/b c", "tank/gone", "tank/v"]
    choices = select(odd + [Candidate("tank/v", "volume")], roots, recursive=False)
    by = {c.name: c for c in choices}
    assert by["tank/gone"] == Choice("tank/gone", False, "does not exist", failed=True)
    assert by["tank/a"].selected and "neither on nor off" in by["tank/a"].reason
    assert not by["tank/b c"].selected and by["tank/b c"].reason.startswith("name not usable")
    assert by["tank/v"].selected  # volumes are backed up too
    assert "tank/s@snap" not in by
    # a wanted dataset zfsmgr cannot name fails the run (it was left out in silence); one
    # left out anyway is no failure
    assert by["tank/b c"].failed and not by["tank/a"].failed
    off = select(tree("tank", ("tank/my docs", "off", "local")), ["tank"], recursive=True)
    assert [(c.name, c.selected, c.failed) for c in off] == [
        ("tank", True, False), ("tank/my docs", False, False)]


def test_overlapping_roots_give_each_dataset_once():
    choices = select(HOST, ["tank/home", "tank/home/ann"], recursive=True)
    assert [c.name for c in choices] == ["tank/home", "tank/home/ann", "tank/home/bob"]


def chosen(*names, guid=None):
    return [Choice(n, True, "x", (guid or {}).get(n, f"g-{n}")) for n in names]


def test_changes_in_the_selection_are_reported():
    previous = {"tank/a": "g-tank/a", "tank/old": "g-old", "tank/gone": "g-gone",
                "tank/was": "g-moved", "tank/other": "g-other", "rpool/x": "g-x"}
    now = chosen("tank/a", "tank/new", "tank/moved", guid={"tank/moved": "g-moved"}) + [
        Choice("tank/old", False, "org.zfsmgr:backup=off (set here)", "g-old")]
    listed = {"tank": {"tank", "tank/a", "tank/new", "tank/moved", "tank/old", "tank/other"}}
    notes = compare(previous, now, listed)
    assert any(n.startswith("tank/gone was destroyed") for n in notes)
    # outside this run's LOCAL_DATASET (another cron line's, say): there, not destroyed
    assert any(n.startswith("tank/other is no longer backed up (outside LOCAL_DATASET)")
               for n in notes)
    assert any(n.startswith("rpool/x is no longer backed up (outside LOCAL_DATASET, or"
                            " destroyed)") for n in notes)  # its pool was not listed
    assert any(n.startswith("tank/old is no longer backed up (org.zfsmgr:backup=off")
               for n in notes)
    assert any(n.startswith("tank/was was renamed to tank/moved") for n in notes)
    assert "tank/new is new: it starts with a full backup" in notes
    assert not any("tank/moved is new" in n for n in notes)
    assert all("stay on the server" in n for n in notes if "new:" not in n)
    assert compare(None, now) == []  # the first run has nothing to compare
    assert compare({c.name: c.guid for c in now if c.selected}, now) == []


def test_each_selection_keeps_its_own_history():
    """Two cron lines backing up different datasets to one server shared one history: each
    run called the other's datasets destroyed, and their backups new."""
    from pathlib import Path

    from zfsmgr.client.changes import history_path

    one = history_path(Path("/s"), "t1", ["tank/vm"])
    assert one == history_path(Path("/s"), "t1", ["tank/vm"])
    assert one != history_path(Path("/s"), "t1", ["tank/data/a"])
    assert one != history_path(Path("/s"), "t2", ["tank/vm"])


def snap(name, guid, txg, **props):
    return Snapshot(name, guid, txg, txg, 0, {k: str(v) for k, v in props.items()})


BASE = Base("t/d@zfsmgr_1", "zfsmgr_1", "g1", False)


def test_unchanged_on_openzfs_sums_written_after_the_base():
    base = snap("t/d@zfsmgr_1", "g1", 5, written=900)
    new = snap("t/d@zfsmgr_2", "g2", 9, written=0)
    typed = snap("t/d@zfsmgr_daily_x", "g3", 7, written=0)
    assert unchanged(new, BASE, [base, typed, new], [], modern=True)
    busy = snap("t/d@zfsmgr_daily_x", "g3", 7, written=4096)
    assert not unchanged(new, BASE, [base, busy, new], [], modern=True)
    mark = Base("t/d#zfsmgr_1.ab", "zfsmgr_1", "g1", True, "ab")
    # a bookmark whose snapshot is gone: the first later snapshot may count older writes
    assert not unchanged(new, mark, [new], [snap("t/d#zfsmgr_1.ab", "g1", 5)], modern=True)


def test_unchanged_on_zfs_fuse_needs_the_base_right_before_with_no_space_of_its_own():
    base = snap("t/d@zfsmgr_1", "g1", 5, used=0, referenced=1000)
    new = snap("t/d@zfsmgr_2", "g2", 9, used=0, referenced=1000)
    assert unchanged(new, BASE, [base, new], [], modern=False)
    assert not unchanged(new, BASE, [snap("t/d@zfsmgr_1", "g1", 5, used=4096,
                                          referenced=1000), new], [], modern=False)
    grown = snap("t/d@zfsmgr_2", "g2", 9, used=0, referenced=2000)
    assert not unchanged(grown, BASE, [base, grown], [], modern=False)
    between = snap("t/d@mine", "g4", 7, used=0, referenced=1000)
    assert not unchanged(new, BASE, [base, between, new], [], modern=False)
    assert not unchanged(new, BASE, [new], [], modern=False)  # base snapshot gone


def test_dataset_locks_of_long_names_fit_a_file_name(tmp_path):
    """A 200-character name of ':'s escapes to 600 bytes: the lock file could not be made
    (OSError: File name too long) and the run stopped; now it is cut, with a hash, and two
    such names still get two locks."""
    from zfsmgr.client.locks import DatasetLock
    from zfsmgr.errors import LockedError

    names = ["tank/" + ":" * 194 + c for c in "ab"]
    with DatasetLock(tmp_path, names[0]), DatasetLock(tmp_path, names[1]):
        assert len(list(tmp_path.iterdir())) == 2
        assert all(len(p.name.encode()) <= 255 for p in tmp_path.iterdir())
        with pytest.raises(LockedError):
            with DatasetLock(tmp_path, names[0]):
                pass


def test_a_tree_restore_warns_of_datasets_its_run_may_not_have_had_or_failed():
    from zfsmgr.protocol import Manifest
    from zfsmgr.restore.tree import CLOCK_MARGIN, left_behind

    def backup(dataset, when):
        return ("", Manifest(key=f"c/{dataset.replace('/', '_')}_{when}.zfs", client_id="c",
                             dataset=dataset, snapshot=f"s{when}", type="full", parent=None,
                             compression="none", raw_size=1, stored_size=1, sha256="",
                             created="2026-01-01T00:00:00+00:00", snapshot_time=when))

    run = 100_000.0
    items = [backup("tank", run), backup("tank/unchanged", run - 7200),
             backup("tank/gone", run - 7200), backup("tank/failed", run - 7200),
             backup("tank/skewed", run - 7200)]
    items.append(backup("tank/mended", run - 7200))
    heard = {"tank/unchanged": (run + 1, 0.0), "tank/failed": (run - 9000, run + 30),
             "tank/gone": (run - 7000, run - 8000),
             "tank/skewed": (run - CLOCK_MARGIN + 1, 0.0),
             "tank/mended": (run + 60, run + 30)}  # failed, then checked in unchanged
    assert [(m.dataset, why) for m, why in left_behind(items, run, heard)] == [
        ("tank/gone", "unheard"), ("tank/failed", "failed")]
    later = [m for _, m in items] + [backup("tank/failed", run + 3600)[1]]
    assert [(m.dataset, why) for m, why in left_behind(items, run, heard, later)] == [
        ("tank/gone", "unheard")]  # a restore of an older run: its failure may be a later one
    assert [(m.dataset, why) for m, why in left_behind(items, run, {})] == [
        (name, "unheard") for name in ("tank/unchanged", "tank/gone", "tank/failed",
                                       "tank/skewed", "tank/mended")]
