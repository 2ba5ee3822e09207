"""
Users per second synced from Redis to MariaDB by the batching sync worker
(read jobs, snapshot, one transaction per batch of up to C{batch_users},
acknowledge, unload) against the same worker with batches of one user: one
transaction per user, with as many at once as the pool has connections.
Same users, same kind of change, same run, and both sides use every core:
one worker process per core, sharing the consumer group as several session
servers would.  Each process connects before the clock starts; the clock
stops when every job is acknowledged.  Needs the local stack (C{scripts/stack.sh up});
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
import os
import platform
import random
import sys

import pymysql
from twisted.internet import defer, task, threads

from bench import children
from dreamraid.config import load_settings
from dreamraid.services.database import Database, connect
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


def spawn(reactor, count, *args):
    """C{count} children running this file with C{args}."""
    return [children.start(reactor, os.path.abspath(__file__), *args, "--index", str(index))
            for index in range(count)]


async def timed_run(reactor, started, finished):
    """Seconds from "go" to C{finished()} firing, once every child is ready."""
    await gather([c.ready for c in started])
    began = reactor.seconds()
    children.say(started, "go")
    await finished()
    return reactor.seconds() - began


async def run_workers(reactor, router, settings, users, processes, batch_users, in_flight):
    """Users per second of C{processes} worker processes syncing every user once, and their counters."""
    queue = SyncQueue(router, reactor, settings.sync.shards, f"bench{random.getrandbits(32):x}")
    for start in range(0, len(users), 1000):
        await gather([queue.enqueue(u, "logout") for u in users[start:start + 1000]])

    async def drained():
        while sum(await gather([router.execute("XLEN", s) for s in queue.streams])):
            await task.deferLater(reactor, 0.01, lambda: None)

    started = spawn(reactor, processes, "--child", "--prefix", queue.streams[0].split(":")[0],
                     "--batch-users", str(batch_users), "--in-flight", str(in_flight))
    seconds = await timed_run(reactor, started, drained)
    children.say(started, "stop")
    await gather([c.done for c in started])
    await gather([router.execute("DEL", key) for key in queue.streams + queue.live_sets])
    counters = [c.result for c in started]
    return len(users) / seconds, {
        "batches": sum(c["batches"] for c in counters),
        "largest_batch": max(c["largest_batch"] for c in counters),
        "retries": sum(c["retries"] for c in counters),
    }


async def main(reactor, quick, processes):
    settings = load_settings("conf/dreamraid.ini")
    count = 5000 if quick else 20000
    users = await threads.deferToThreadPool(reactor, reactor.getThreadPool(), thd_prepare, settings.mysql, count)
    router = RedisCluster.from_settings(reactor, random.Random(1), settings.redis)
    router.startService()
    await router.refresh()
    live = LiveStore(router)

    await load(router, live, users, 1)
    per_user, per_user_counters = await run_workers(reactor, router, settings, users, processes,
                                                    1, settings.mysql.pool_max)
    await load(router, live, users, 2)
    batched, batched_counters = await run_workers(reactor, router, settings, users, processes,
                                                  settings.sync.batch_users, settings.sync.batches_in_flight)
    await router.stopService()

    print(json.dumps({"users": count, "items_per_user": ITEMS_PER_USER, "processes": processes,
                      "batched": {"batch_users": settings.sync.batch_users,
                                  "batches_in_flight": settings.sync.batches_in_flight, **batched_counters},
                      "one_per_user": {"batch_users": 1, "batches_in_flight": settings.mysql.pool_max,
                                       **per_user_counters}}, indent=1))
    print(json.dumps({
        "metric": "sync_users_per_second",
        "value": round(batched),
        "baseline": round(per_user),
        "unit": "users/s synced to MariaDB (batched worker vs one transaction per user)",
        "ratio": round(batched / per_user, 2),
        "machine": platform.machine(),
    }))


async def child(reactor, arguments):
    """One worker process: connects, says "ready", syncs from "go" to "stop", reports its counters."""
    settings = load_settings("conf/dreamraid.ini")
    database = Database(dataclasses.replace(settings.mysql, database=DATABASE))
    database.startService()
    router = RedisCluster.from_settings(reactor, random.Random(arguments.index), settings.redis)
    router.startService()
    await router.refresh()
    sync = dataclasses.replace(settings.sync, batch_users=arguments.batch_users, batches_in_flight=arguments.in_flight)
    queue = SyncQueue(router, reactor, sync.shards, arguments.prefix)
    worker = SyncWorker(router, queue, LiveStore(router), MysqlSnapshotStore(database), reactor, sync,
                        consumer=f"bench-{arguments.index}")
    print("ready", flush=True)
    await threads.deferToThreadPool(reactor, reactor.getThreadPool(), sys.stdin.readline)
    worker.startService()
    await threads.deferToThreadPool(reactor, reactor.getThreadPool(), sys.stdin.readline)
    await worker.stopService()
    counters = {"batches": worker.counters["batches"], "largest_batch": worker.largest_batch,
                "retries": worker.counters["retries"]}
    print("done", json.dumps(counters), flush=True)
    await router.stopService()
    database.stopService()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="5,000 users instead of 20,000")
    parser.add_argument("--processes", type=int, default=os.cpu_count(), help="processes per side (one per core)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--batch-users", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--in-flight", type=int, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        task.react(lambda reactor: defer.ensureDeferred(child(reactor, arguments)))
    else:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments.quick, arguments.processes)))
