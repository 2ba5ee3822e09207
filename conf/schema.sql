-- dreamraid durable schema (MariaDB/MySQL, InnoDB, utf8mb4).
-- Applied by scripts/stack.sh on every start; every statement is idempotent.
-- The tables of accounts, inventories and rankings arrive with the session
-- server, as numbered migrations recorded in schema_version.

CREATE TABLE IF NOT EXISTS schema_version (
    version INT UNSIGNED NOT NULL PRIMARY KEY,
    applied_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
) ENGINE=InnoDB;
