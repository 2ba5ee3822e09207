"""
Versioned schema migrations: C{conf/schema.sql} is a list of sections headed
C{-- migration N: what}, applied in order, each recorded in C{schema_version}.

The work is a thread function over a PyMySQL connection, so the admin
command runs it directly and a server would run it in its pool.
"""

import re
from pathlib import Path
from typing import NamedTuple

SCHEMA_PATH = Path(__file__).resolve().parent.parent.parent / "conf" / "schema.sql"

_HEADER = re.compile(r"^-- migration (\d+): (.+)$", re.MULTILINE)
_LOCK = "dreamraid-migrate"
_LOCK_WAIT_SECONDS = 60


class MigrationError(Exception):
    """The schema file is malformed, or the database is newer than it."""


class Migration(NamedTuple):
    """One numbered section of the schema file."""

    version: int
    name: str
    statements: tuple


def parse_migrations(text):
    """The migrations of a schema file, checked to be numbered 1, 2, 3, ..."""
    headers = list(_HEADER.finditer(text))
    migrations = []
    for i, header in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        body = "\n".join(
            line for line in text[header.end():end].splitlines() if not line.lstrip().startswith("--")
        )
        statements = tuple(s.strip() for s in re.split(r";\s*$", body, flags=re.MULTILINE) if s.strip())
        migrations.append(Migration(int(header.group(1)), header.group(2).strip(), statements))
    if [m.version for m in migrations] != list(range(1, len(migrations) + 1)):
        raise MigrationError("migrations must be numbered 1, 2, 3, ... in order")
    return migrations


def load_migrations(path=SCHEMA_PATH):
    """The migrations of the schema file at C{path}."""
    return parse_migrations(Path(path).read_text(encoding="utf-8"))


def _query(connection, sql, args=None):
    with connection.cursor() as cursor:
        cursor.execute(sql, args)
        return cursor.fetchall()


def thd_schema_version(connection):
    """The database's schema version (0 before the first migration)."""
    _query(connection, """
        CREATE TABLE IF NOT EXISTS schema_version (
            version INT UNSIGNED NOT NULL PRIMARY KEY,
            name VARCHAR(200) NOT NULL DEFAULT '',
            applied_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
        ) ENGINE=InnoDB""")
    _query(connection, "ALTER TABLE schema_version ADD COLUMN IF NOT EXISTS name VARCHAR(200) NOT NULL DEFAULT ''")
    [(version,)] = _query(connection, "SELECT COALESCE(MAX(version), 0) FROM schema_version")
    return int(version)


def thd_migrate(connection, migrations):
    """
    Apply the migrations newer than the database, under a named lock so two
    runners never interleave; the list of versions applied.

    @raise MigrationError: the database is at a version the file lacks.
    """
    [(locked,)] = _query(connection, "SELECT GET_LOCK(%s, %s)", (_LOCK, _LOCK_WAIT_SECONDS))
    if locked != 1:
        raise MigrationError(f"another migration held the lock for {_LOCK_WAIT_SECONDS} s")
    try:
        current = thd_schema_version(connection)
        if current > len(migrations):
            raise MigrationError(f"the database is at version {current}, newer than the schema file's {len(migrations)}")
        applied = []
        for migration in migrations[current:]:
            for statement in migration.statements:
                _query(connection, statement)
            _query(connection, "INSERT INTO schema_version (version, name) VALUES (%s, %s)",
                   (migration.version, migration.name))
            connection.commit()
            applied.append(migration.version)
        return applied
    finally:
        _query(connection, "SELECT RELEASE_LOCK(%s)", (_LOCK,))
