"""Benchmarks: poolkit measured side by side with psycopg_pool, SQLAlchemy and a minimal pool."""
