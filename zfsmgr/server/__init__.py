"""The backup server: HTTP API, authentication, catalog, upload sessions."""
