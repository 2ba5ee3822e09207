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

-- migration 2: refresh tokens
-- A login starts a family; each refresh spends its token and adds the next
-- one to the family.  A spent token presented again revokes the family (the
-- OAuth refresh-rotation rule).  Tokens are stored only as the SHA-256 of
-- their text (256 random bits: a fast hash cannot be reversed or guessed).
-- Times are Unix seconds of the session server's clock, like a JWT's.
CREATE TABLE refresh_families (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    user_id BIGINT UNSIGNED NOT NULL,
    created_at BIGINT UNSIGNED NOT NULL,
    -- The newest token's expiry: the whole family is dead after it.
    expires_at BIGINT UNSIGNED NOT NULL,
    revoked_at BIGINT UNSIGNED NULL,
    -- 'reuse' (a spent token came back) or 'revoke' (logout).
    revoked_why VARCHAR(16) CHARACTER SET ascii NULL,
    KEY refresh_families_by_user (user_id),
    KEY refresh_families_by_expiry (expires_at),
    CONSTRAINT refresh_family_of_user FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE=InnoDB;

CREATE TABLE refresh_tokens (
    token_hash BINARY(32) NOT NULL PRIMARY KEY,
    family_id BIGINT UNSIGNED NOT NULL,
    expires_at BIGINT UNSIGNED NOT NULL,
    -- When it was used for a refresh; a spent token is kept for reuse detection.
    spent_at BIGINT UNSIGNED NULL,
    KEY refresh_tokens_by_family (family_id),
    CONSTRAINT refresh_token_of_family FOREIGN KEY (family_id) REFERENCES refresh_families (id) ON DELETE CASCADE
) ENGINE=InnoDB;
