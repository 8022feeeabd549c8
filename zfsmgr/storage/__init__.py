"""Storage backends behind one interface: `dir` (files), `s3` (any S3 service), `local` (ZFS)."""
