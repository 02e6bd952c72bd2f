"""Runnable example applications for poolkit, plus the embedded PostgreSQL they share."""
