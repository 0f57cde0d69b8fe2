"""Persistence: the job store (SQL) and the artifact store (files or S3)."""
