"""
The session server's pieces that need no stack: schema migration parsing,
password hashes, shard tags and how sync jobs are cut into batches.
"""

import random

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from dreamraid.services.accounts import PasswordHasher
from dreamraid.services.migrations import SCHEMA_PATH, MigrationError, load_migrations, parse_migrations
from dreamraid.services.rediscluster import SLOTS, key_slot
from dreamraid.services.sync import SyncWorker, shard_tags
from tests.storage import test_settings


class MigrationParsingTests(SynchronousTestCase):

    def test_shipped_schema(self):
        """The shipped schema parses into migrations numbered from 1, the first creating the three tables."""
        migrations = load_migrations(SCHEMA_PATH)
        self.assertEqual([m.version for m in migrations], list(range(1, len(migrations) + 1)))
        created = [s.split()[2] for s in migrations[0].statements if s.startswith("CREATE TABLE")]
        self.assertEqual(created, ["users", "inventory", "best_scores"])

    def test_statements_split_at_line_ends_and_comments_dropped(self):
        """Statements end with a semicolon at a line end; comment lines are not sent."""
        [first, second] = parse_migrations(
            "-- migration 1: a\n-- a comment\nCREATE TABLE a (x INT);\nINSERT INTO a VALUES (';');\n"
            "-- migration 2: b\nDROP TABLE a;\n")
        self.assertEqual(first.statements, ("CREATE TABLE a (x INT)", "INSERT INTO a VALUES (';')"))
        self.assertEqual((second.version, second.name, second.statements), (2, "b", ("DROP TABLE a",)))

    def test_numbering_gaps_refused(self):
        """Migrations numbered out of order, or with a gap, are refused."""
        for text in ["-- migration 2: x\nSELECT 1;\n", "-- migration 1: x\nSELECT 1;\n-- migration 3: y\nSELECT 1;\n"]:
            with self.assertRaises(MigrationError):
                parse_migrations(text)


class PasswordHasherTests(SynchronousTestCase):

    def setUp(self):
        self.hasher = PasswordHasher(lambda f, *a: defer.maybeDeferred(f, *a), random.Random(1), 1024, 8, 1)

    def test_hash_verifies_only_its_password(self):
        """A hash verifies its password and no other; two hashes of one password differ (salt)."""
        stored = self.successResultOf(self.hasher.hash("correct horse"))
        self.assertTrue(stored.startswith("scrypt$1024$8$1$"))
        self.assertTrue(self.successResultOf(self.hasher.verify("correct horse", stored)))
        self.assertFalse(self.successResultOf(self.hasher.verify("correct horsE", stored)))
        self.assertNotEqual(stored, self.successResultOf(self.hasher.hash("correct horse")))

    def test_malformed_stored_hash_never_verifies(self):
        """A stored value that is not one of ours fails verification instead of raising."""
        for stored in ["", "x", "scrypt$a$b$c$d$e", "bcrypt$1024$8$1$AAAA$AAAA", "scrypt$1024$8$1$!!$!!"]:
            self.assertFalse(self.successResultOf(self.hasher.verify("password", stored)), stored)


class ShardTests(SynchronousTestCase):

    def test_each_tag_in_its_share_of_the_slots(self):
        """The i-th of n tags hashes into the i-th n-th of the slot space."""
        for count in (1, 3, 6, 16):
            for shard, tag in enumerate(shard_tags(count)):
                self.assertTrue(shard * SLOTS // count <= key_slot(tag) < (shard + 1) * SLOTS // count)


class BatchTests(SynchronousTestCase):

    def test_batches_hold_at_most_batch_users_and_keep_a_users_jobs_together(self):
        """Jobs are cut into batches of at most batch_users users; every job of one user is in one batch."""
        settings = test_settings(sync_batch_users="3").sync
        worker = SyncWorker(None, None, None, None, None, settings)
        jobs = {(i % 2, f"{i}-0"): user for i, user in enumerate([1, 2, 3, 1, 4, 5, 2, 6, 7, None])}
        batches = list(worker._batches(jobs))
        self.assertEqual([len({u for u in b.values()}) for b in batches], [3, 3, 2])
        self.assertEqual({k: v for b in batches for k, v in b.items()}, jobs)
        for user in (1, 2):
            self.assertEqual(sum(user in b.values() for b in batches), 1)
