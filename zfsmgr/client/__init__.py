"""The ZFS-host side: snapshot, send, track the incremental base, rotate."""
