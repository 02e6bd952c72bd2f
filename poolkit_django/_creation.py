"""Test-database creation that closes every pooled connection before a clone or a drop."""

from __future__ import annotations

from typing import Any

from django.db.backends.postgresql.creation import DatabaseCreation as PgCreation

from . import _lending


class DatabaseCreation(PgCreation):
    def _clone_test_db(self, suffix: Any, verbosity: int, keepdb: bool = False) -> None:
        # CREATE DATABASE ... TEMPLATE fails while any session uses the template: close the
        # pools of every alias pointing at it, not only this alias's.
        self.connection.close()
        _lending.close_pools_for(self.connection.settings_dict["NAME"])
        super()._clone_test_db(suffix, verbosity, keepdb)  # type: ignore[misc]

    def _destroy_test_db(self, test_database_name: str, verbosity: int) -> None:
        _lending.close_pools_for(test_database_name)
        super()._destroy_test_db(test_database_name, verbosity)  # type: ignore[misc]
