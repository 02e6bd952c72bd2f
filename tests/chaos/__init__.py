"""Chaos and soak suite: real app servers under load while the database and network fail."""
