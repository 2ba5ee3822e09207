-- dreamraid durable schema (MariaDB/MySQL, InnoDB, utf8mb4), as numbered
-- migrations.  `dreamraid-admin migrate` applies those newer than the
-- database's version, in order, each recorded in schema_version; `make run`,
-- `make test` (through scripts/stack.sh) and the tests run it.  Add a change
-- as a new "-- migration N: what" section at the end; never edit an applied
-- one.  Statements end with ";" at the end of a line.

-- migration 1: users, inventories and best scores
CREATE TABLE users (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    -- Unique without regard to case, so "Alice" cannot pose as "alice".
    name VARCHAR(20) CHARACTER SET ascii COLLATE ascii_general_ci NOT NULL,
    password_hash VARCHAR(255) CHARACTER SET ascii NOT NULL,
    level TINYINT UNSIGNED NOT NULL DEFAULT 1,
    exp INT UNSIGNED NOT NULL DEFAULT 0,
    created_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    last_login_at TIMESTAMP(3) NULL,
    -- The live data's version last written here; an older snapshot is ignored.
    data_version BIGINT UNSIGNED NOT NULL DEFAULT 0,
    synced_at TIMESTAMP(3) NULL,
    UNIQUE KEY users_by_name (name)
) ENGINE=InnoDB;

-- One row per occupied slot; tab 0 equipment, 1 consumables, 2 materials.
-- Equipment has count 1; stackables have enhancement 0.
CREATE TABLE inventory (
    user_id BIGINT UNSIGNED NOT NULL,
    tab TINYINT UNSIGNED NOT NULL,
    slot SMALLINT UNSIGNED NOT NULL,
    item_code INT UNSIGNED NOT NULL,
    enhancement TINYINT UNSIGNED NOT NULL DEFAULT 0,
    count INT UNSIGNED NOT NULL DEFAULT 1,
    PRIMARY KEY (user_id, tab, slot),
    CONSTRAINT inventory_of_user FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE=InnoDB;

CREATE TABLE best_scores (
    user_id BIGINT UNSIGNED NOT NULL PRIMARY KEY,
    score INT UNSIGNED NOT NULL,
    achieved_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    KEY best_scores_by_score (score),
    CONSTRAINT best_score_of_user FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE=InnoDB;
