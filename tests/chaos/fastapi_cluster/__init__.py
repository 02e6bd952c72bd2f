"""A FastAPI app on a primary + standby for the failover chaos runs."""
