"""Postgres: migrations, pool, stores."""
