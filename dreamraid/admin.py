"""
C{dreamraid-admin}: operator commands that run once and exit, outside the
servers' reactors.

    dreamraid-admin migrate [--database NAME]   apply pending schema migrations
    dreamraid-admin version                     print the database's schema version
    dreamraid-admin keys                        create the token key pair if missing

Each takes C{--config PATH} (default: the shipped C{conf/dreamraid.ini}).
"""

import argparse
import sys

from dreamraid.config import DEFAULT_PATH, ConfigError, load_settings
from dreamraid.services.database import MySQLError, connect
from dreamraid.services.migrations import MigrationError, load_migrations, thd_migrate, thd_schema_version


def _migrate(settings, arguments):
    with connect(settings.mysql, arguments.database) as connection:
        applied = thd_migrate(connection, load_migrations())
        version = thd_schema_version(connection)
    done = f"applied {', '.join(map(str, applied))}" if applied else "nothing to apply"
    print(f"dreamraid-admin: schema at version {version} ({done})")


def _version(settings, arguments):
    with connect(settings.mysql, arguments.database) as connection:
        print(thd_schema_version(connection))


def _keys(settings, arguments):
    from dreamraid.services.tokens import create_key_pair

    tokens = settings.tokens
    if tokens.algorithm != "EdDSA":
        print(f"dreamraid-admin: tokens use {tokens.algorithm}; no key pair needed")
        return
    created = create_key_pair(tokens.private_key, tokens.public_key)
    print(f"dreamraid-admin: {'created' if created else 'kept'} {tokens.private_key} and {tokens.public_key}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="dreamraid-admin", description="dreamraid operator commands")
    parser.add_argument("--config", "-c", default=str(DEFAULT_PATH), help="configuration file")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, run, text in [
        ("migrate", _migrate, "apply pending schema migrations"),
        ("version", _version, "print the database's schema version"),
    ]:
        command = commands.add_parser(name, help=text)
        command.add_argument("--database", help="database name (default: the configured one)")
        command.set_defaults(run=run)
    commands.add_parser("keys", help="create the token key pair if missing").set_defaults(run=_keys)
    arguments = parser.parse_args(argv)
    try:
        settings = load_settings(arguments.config)
        arguments.run(settings, arguments)
    except (ConfigError, MigrationError, MySQLError, OSError) as e:
        sys.stderr.write(f"dreamraid-admin: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
