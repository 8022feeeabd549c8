"""zfsmgr: ZFS snapshot backups from many hosts to one server (S3, local ZFS or a directory)."""

__version__ = "0.1.0"
