"""Fixtures every test tier may use. Defined once here so that the session's PostgreSQL server is
one for the whole session, not one per module that imports the fixture."""

from tests.postgres import postgresql, postgresql_url  # noqa: F401  (fixtures)
