"""
Users per second written back from Redis to MariaDB by the batching sync
worker (enqueue, read, snapshot, one transaction per batch, acknowledge,
unload) against a baseline that snapshots and writes each user in a
transaction of its own, as many at once as the pool has connections, same
users, same kind of change, same run.  Needs the local stack (C{scripts/stack.sh up});
uses its own database, C{dreamraid_bench}.  The last line printed is the JSON
result.

Each user has 8 items.  Between syncs a user's level and exp change, one
item is enhanced, one stack grows, one slot is emptied and one new item
arrives: the shape of a session of hunting and enhancing.

    python bench/sync.py [--quick]
"""

import argparse
import dataclasses
import json
import platform
import random

import pymysql
from twisted.internet import defer, task, threads

from dreamraid.admin import connect
from dreamraid.config import load_settings
from dreamraid.services.database import Database
from dreamraid.services.deferreds import gather
from dreamraid.services.livestore import Item, LiveStore, Profile, data_keys
from dreamraid.services.migrations import load_migrations, thd_migrate
from dreamraid.services.rediscluster import RedisCluster
from dreamraid.services.sync import MysqlSnapshotStore, SyncQueue, SyncWorker

DATABASE = "dreamraid_bench"
ITEMS_PER_USER = 8


def thd_prepare(mysql, users):
    """A fresh bench database holding C{users} users with a first inventory; their ids."""
    with pymysql.connect(host=mysql.host, port=mysql.port, user=mysql.user, password=mysql.password) as server:
        with server.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
            cursor.execute(f"CREATE DATABASE {DATABASE} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    with connect(mysql, DATABASE) as connection:
        thd_migrate(connection, load_migrations())
        with connection.cursor() as cursor:
            names = [f"bench{i}" for i in range(users)]
            cursor.executemany("INSERT INTO users (name, password_hash) VALUES (%s, 'x')", names)
            cursor.execute("SELECT id FROM users ORDER BY id")
            ids = [row[0] for row in cursor.fetchall()]
            rows = [(u, tab, slot, *item) for u in ids for (tab, slot), item in data_of(u, 0).items.items()]
            cursor.executemany("INSERT INTO inventory VALUES (%s, %s, %s, %s, %s, %s)", rows)
        connection.commit()
    return ids


def data_of(user_id, version):
    """The user's data at C{version}: the first inventory, then C{version} sessions of play."""
    rng = random.Random(user_id)
    items = {(rng.randrange(3), slot): Item(rng.randrange(1, 500), rng.randrange(11), rng.randrange(1, 99))
             for slot in rng.sample(range(50), ITEMS_PER_USER)}
    level, exp = 1, 0
    for _ in range(version):
        level, exp = min(15, level + 1), exp + rng.randrange(1, 50)
        enhanced, grown, emptied = rng.sample(sorted(items), 3)
        items[enhanced] = items[enhanced]._replace(enhancement=(items[enhanced].enhancement + 1) % 11)
        items[grown] = items[grown]._replace(count=items[grown].count + 1)
        del items[emptied]
        free = next((tab, slot) for tab in range(3) for slot in range(50) if (tab, slot) not in items)
        items[free] = Item(rng.randrange(1, 500), 0, 1)
    return Profile(user_id, f"bench{user_id}", level, exp, 0, version, items)


async def load(router, live, users, version):
    """Make the users' data at C{version} their live data."""
    for start in range(0, len(users), 1000):
        chunk = users[start:start + 1000]
        await gather([router.execute("DEL", *data_keys(u)) for u in chunk])
        await gather([live.load(data_of(u, version)) for u in chunk])


async def wait_until(clock, condition):
    while not condition():
        await task.deferLater(clock, 0.01, lambda: None)


async def per_user_baseline(live, snapshots, users, parallel):
    """Snapshot and write each user in a transaction of its own, C{parallel} at a time."""
    limit = defer.DeferredSemaphore(parallel)

    async def one(user_id):
        await snapshots.write([await live.snapshot(user_id)])

    await gather([limit.run(lambda u=u: defer.ensureDeferred(one(u))) for u in users])


async def main(reactor, quick):
    settings = load_settings("conf/dreamraid.ini")
    count = 5000 if quick else 20000
    users = await threads.deferToThreadPool(reactor, reactor.getThreadPool(), thd_prepare, settings.mysql, count)
    database = Database(dataclasses.replace(settings.mysql, database=DATABASE))
    database.startService()
    router = RedisCluster.from_settings(reactor, random.Random(1), settings.redis)
    router.startService()
    await router.refresh()
    live = LiveStore(router)
    await load(router, live, users, 1)
    snapshots = MysqlSnapshotStore(database)

    started = reactor.seconds()
    await per_user_baseline(live, snapshots, users, settings.mysql.pool_max)
    baseline = count / (reactor.seconds() - started)

    await load(router, live, users, 2)
    queue = SyncQueue(router, reactor, settings.sync.shards, f"bench{random.getrandbits(32):x}")
    for start in range(0, count, 1000):
        await gather([queue.enqueue(u, "logout") for u in users[start:start + 1000]])
    worker = SyncWorker(router, queue, live, snapshots, reactor, settings.sync)
    started = reactor.seconds()
    worker.startService()
    await wait_until(reactor, lambda: worker.counters["acked"] >= count)
    batched = count / (reactor.seconds() - started)
    await wait_until(reactor, lambda: worker.counters["evicted"] >= count)
    await worker.stopService()
    await gather([router.execute("DEL", key) for key in queue.streams + queue.live_sets])
    await router.stopService()
    database.stopService()

    print(json.dumps({"users": count, "items_per_user": ITEMS_PER_USER, "batches": worker.counters["batches"],
                      "largest_batch": worker.largest_batch, "batch_users": settings.sync.batch_users,
                      "batches_in_flight": settings.sync.batches_in_flight, "retries": worker.counters["retries"],
                      "baseline_transactions_at_once": settings.mysql.pool_max},
                     indent=1))
    print(json.dumps({
        "metric": "sync_users_per_second",
        "value": round(batched),
        "baseline": round(baseline),
        "unit": "users/s written to MariaDB (batched worker vs one transaction per user)",
        "ratio": round(batched / baseline, 2),
        "machine": platform.machine(),
    }))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="5,000 users instead of 20,000")
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments.quick)))
