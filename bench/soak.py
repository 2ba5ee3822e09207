"""
Soak: the bot mix for N minutes, reporting memory, open files and latency drift.

The bots of C{dreamraid-bots} play against a session server and one game
server per core; every interval, each server's memory, open files and CPU
and the latency of the bots' requests to it are sampled, so that growth and
drift over time show.

- The servers are this run's own, run as production runs them (C{twistd -n}
  with JSON log lines) on free loopback ports: a session server on the
  development database (C{dreamraid}) and one game server per core with the
  development grant on (as C{make run}, so the bots have a weapon to
  enhance), sharing a fresh token key pair and sync, ranking and matchmaking
  key prefixes of their own.
- The bots come from generator processes, one per core, each playing its
  share of C{--bots} slots, started at random moments over the first
  interval.  A slot plays one L{dreamraid.bots.Bot} after another, each with
  a new account: register, log in, enter the world, hunt three times,
  enhance a weapon, queue for a raid of two, fight it over TCP and UDP, read
  its rank, log out.  Most of the load is the session server's: register
  and log in hash a password each (12 bots kept about three quarters of a
  core busy there, the game servers a tenth each).
- Every request of a session or game client goes through
  C{ClientProtocol.request}; the generators wrap it (dreamraid's client has no
  timing hook) to time each request from sent to answered, by the server
  that answered it.  A refusal such as C{HUNT_COOLDOWN} is an answer; errors
  are counted apart: C{timeout} (10 s), C{closed}, and C{reply:CODE} for
  answers saying the server failed (C{INTERNAL_ERROR}, C{UNAVAILABLE}, ...).
  Each finished round counts by how its raid ended (C{cleared}, C{failed},
  C{unmatched}) or as an C{error}, with the error that stopped the bot.
  UDP is not timed.
- Every interval (5 s quick, 10 s otherwise) this process reads each
  server's C{VmRSS} from C{/proc/PID/status}, its open files (the entries of
  C{/proc/PID/fd}) and CPU time, asks every generator what its bots did since
  the last sample (and how many connections they hold to each server), and
  counts the servers' log lines at level warn and above; each sample is
  printed as a row on standard error as it is taken.

Drift is measured from the first steady sample, the first after the
warm-up (a quarter of the run, at most 60 s), to the last.  C{value} is the
p99 of the game servers' requests in the last sample over that of the first
steady one (C{baseline}, ms); the session server's requests are apart (two
of each round's three hash a password: hundreds of ms).  The run is
C{steady} when every server's RSS grew by less than 10% and its open files,
less the bots' connections to it, by at most 5% (and at least 2
descriptors).  Latency is left out of that rule: on the shared 2-core
machine one interval's p99 moves with whatever else runs.

At the end the bots have 15 s to finish their rounds (the rest are cut
short), the servers are ended with SIGTERM, and the Redis keys the bots'
users and the run's prefixes left are deleted.  The accounts
(C{sk_<hex>_<n>}, hundreds a minute) and what the sync wrote for them stay
in MySQL.  Standard error then gets each server's RSS and open files
before the bots played, at the first steady sample, at the last and after
the bots, its most frequent log problems and the bots' most frequent
errors.
Needs the local stack (C{scripts/stack.sh up}).  The last line printed is
the JSON result.

    python bench/soak.py --quick                      # 1 minute, 12 bots, a sample every 5 s
    python bench/soak.py [--minutes N] [--bots N]     # default 10 minutes, 20 bots, every 10 s
"""

import argparse
import collections
import gc
import json
import math
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
import weakref

from twisted.internet import defer, protocol, stdio, task
from twisted.python.failure import Failure

from bench.ccu import Generator, rss_bytes
from bench.children import ROOT, CommandLines, forget_players
from bench.game_ops import free_port, listening
from bench.load import SERVER_FAILURES, code_name, latency_bucket, percentile_ms
from bench.raid_load import cpu_seconds
from dreamraid.bots import Bot
from dreamraid.client import ClientProtocol, ConnectionClosed, RemoteError
from dreamraid.config import load_settings
from dreamraid.services.deferreds import gather
from dreamraid.services.ranking import Ranking
from dreamraid.services.rediscluster import RedisCluster
from dreamraid.services.sync import SyncQueue
from dreamraid.services.tokens import create_key_pair

HUNTS = 3
QUEUE_TIMEOUT = 45.0  # dreamraid-bots' default: past the 30 s after which matchmaking widens
WIND_DOWN = 15.0  # seconds the rounds under way at the end have to finish
WARM_UP_MOST = 60.0
RSS_GROWTH_LIMIT = 0.10
FDS_GROWTH_LIMIT, FDS_GROWTH_FLOOR = 0.05, 2
SETTLE = 2.0  # seconds between the generators' end and the servers' figures after the bots
STOP_TIMEOUT = 30.0  # seconds a server has to end on SIGTERM before it is killed
ERROR_KINDS = {ConnectionClosed: "closed", defer.TimeoutError: "timeout"}
PROBLEM_LEVELS = frozenset({"warn", "error", "critical"})


# -- the generators -------------------------------------------------------------


class Tally:
    """What a generator's bots did since it last told: latencies by server and request, refusals, errors, rounds."""

    def __init__(self):
        self._forget()

    def _forget(self):
        self.latencies = collections.defaultdict(lambda: collections.defaultdict(collections.Counter))
        self.refusals, self.errors = collections.Counter(), collections.Counter()
        self.rounds, self.bot_errors = collections.Counter(), collections.Counter()

    def take(self):
        """Everything counted so far, forgotten once told."""
        told = {"latencies": self.latencies, "refusals": self.refusals, "errors": self.errors,
                "rounds": self.rounds, "bot_errors": self.bot_errors}
        self._forget()
        return told

    def replied(self, result, port, request, sent):
        """Count one request's reply or failure; C{result} passes on unchanged."""
        error = result.value if isinstance(result, Failure) else None
        if error is None or isinstance(error, RemoteError):
            self.latencies[port][request][latency_bucket((time.monotonic() - sent) * 1000)] += 1
        if isinstance(error, RemoteError) and error.code in SERVER_FAILURES:
            self.errors[f"reply:{code_name(error.code)}"] += 1
        elif isinstance(error, RemoteError):
            self.refusals[code_name(error.code)] += 1
        elif error is not None:
            self.errors[ERROR_KINDS.get(type(error), type(error).__name__)] += 1
        return result

    def finished(self, report):
        """Count one bot's round by how its raid ended, or by the error that stopped it."""
        if report.error:
            self.rounds["error"] += 1
            self.bot_errors[report.error[:100]] += 1
        else:
            self.rounds[report.raid or "no raid"] += 1


def time_requests(tally, connections):
    """
    Time every request of this process's clients into C{tally} by wrapping
    C{ClientProtocol.request}, and keep each connection that sent one in
    C{connections} (a weak set).
    """
    untimed = ClientProtocol.request

    def request(connection, message, body, timeout=None):
        connections.add(connection)
        sent = time.monotonic()
        return untimed(connection, message, body, timeout).addBoth(
            tally.replied, connection.transport.getPeer().port, message.name, sent)

    ClientProtocol.request = request


class BotSlots:
    """A generator's bots: each slot plays one L{Bot} after another, a new account each, until told to stop."""

    def __init__(self, reactor, session, count, tally):
        self._reactor, self._session, self._count, self._tally = reactor, session, count, tally
        self._tag = f"{random.getrandbits(32):08x}"
        self._made = 0
        self._slots = []
        self._stopping = False
        self._playing = set()
        self._user_ids = set()

    def start(self, within):
        """Start every slot, each at a random moment in the next C{within} seconds."""
        self._slots = [defer.ensureDeferred(self._play(random.uniform(0, within))) for _ in range(self._count)]

    async def _play(self, delay):
        await task.deferLater(self._reactor, delay, lambda: None)
        while not self._stopping:
            self._made += 1
            bot = Bot(self._reactor, self._session, f"sk_{self._tag}_{self._made}", HUNTS, "raid", QUEUE_TIMEOUT)
            self._playing.add(bot)
            report = await bot.run()
            self._playing.discard(bot)
            if bot.game is not None:
                self._user_ids.add(bot.game.user_id)
            self._tally.finished(report)

    async def stop(self, grace):
        """
        Start no more rounds, give those under way C{grace} seconds, then cut
        the rest short; the users the bots played as and how many were cut.
        """
        self._stopping = True
        for _ in range(int(grace * 10)):
            if not self._playing:
                break
            await task.deferLater(self._reactor, 0.1, lambda: None)
        cut = len(self._playing)
        for slot in self._slots:
            slot.cancel()
        await defer.DeferredList(self._slots, consumeErrors=True)
        return {"user_ids": sorted(self._user_ids), "cut_short": cut}


class Commands(CommandLines):
    """A generator's commands: C{go}, C{tally} and C{stop}."""

    def __init__(self, slots, tally, connections, ramp):
        self.slots, self.tally, self.connections, self.ramp = slots, tally, connections, ramp
        self._since = (time.monotonic(), time.process_time())

    def lineReceived(self, line):
        command = line.decode().strip()
        if command == "go":
            answer = defer.succeed(self._go())
        elif command == "tally":
            answer = defer.succeed(self._told())
        else:
            answer = defer.ensureDeferred(self.slots.stop(WIND_DOWN))
        self.answer(answer)

    def _go(self):
        # Collections stay on for a long run, but skip what was made so far.
        gc.freeze()
        self.slots.start(self.ramp)
        self._since = (time.monotonic(), time.process_time())
        return {}

    def _told(self):
        """What the bots did since the last tally, the connections they hold to each server, this process's CPU."""
        held = collections.Counter(c.transport.getPeer().port for c in self.connections if c.connected)
        (wall, cpu), self._since = self._since, (time.monotonic(), time.process_time())
        return {**self.tally.take(), "connections": held,
                "cpu_percent": round((self._since[1] - cpu) / (self._since[0] - wall) * 100)}


def generate(reactor, arguments):
    """A generator process: its bots play against the session server on "go"; commands until its input closes."""
    tally, connections = Tally(), weakref.WeakSet()
    time_requests(tally, connections)
    slots = BotSlots(reactor, ("127.0.0.1", arguments.session_port), arguments.bots, tally)
    stdio.StandardIO(Commands(slots, tally, connections, arguments.ramp), reactor=reactor)
    return defer.Deferred()


# -- the servers ----------------------------------------------------------------


class ServerProcess(protocol.ProcessProtocol):
    """
    A server of the run, its log JSON lines on standard output: lines at
    level warn and above counted since the last sample, and over the run by
    kind (the message with its digits blanked), with the first of each.
    """

    def __init__(self, name, port):
        self.name, self.port = name, port
        self.exited = defer.Deferred()
        self.recent = collections.Counter()  # level -> problem lines since the last sample
        self.kinds = collections.Counter()  # "level namespace: message" -> lines over the run
        self.first = {}  # kind -> the first such line's message, and its traceback's last line
        self._buffer = b""

    @property
    def pid(self):
        return self.transport.pid

    def outReceived(self, data):
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            self._logged(line.decode(errors="replace"))

    def _logged(self, line):
        try:
            record = json.loads(line)
        except ValueError:
            record = {"level": "error", "namespace": "not a JSON log line", "message": line}
        if record.get("level") not in PROBLEM_LEVELS:
            return
        self.recent[record["level"]] += 1
        kind = f"{record['level']} {record.get('namespace', '-')}: {re.sub(r'[0-9]+', 'N', record['message'])[:160]}"
        self.kinds[kind] += 1
        if kind not in self.first:
            tail = (record.get("traceback") or "").strip().splitlines()[-1:]
            self.first[kind] = " | ".join([record["message"][:300], *tail])

    def take_recent(self):
        recent, self.recent = self.recent, collections.Counter()
        return recent

    def errReceived(self, data):
        for line in data.decode(errors="replace").splitlines():
            sys.stderr.write(f"{self.name}: {line}\n")

    def processEnded(self, reason):
        self.exited.callback(None)


def start_server(reactor, name, plugin, section, extra):
    """Start C{twistd -n PLUGIN} on free loopback ports with JSON log lines; its L{ServerProcess}."""
    server = ServerProcess(name, free_port())
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    reactor.spawnProcess(server, twistd, [
        twistd, "-n", "--pidfile=", "--logger", "dreamraid.logs.json_lines", plugin,
        f"--{section}-listen", f"tcp:{server.port}:interface=127.0.0.1",
        f"--{section}-http-listen", f"tcp:{free_port()}:interface=127.0.0.1", *extra], env=None, path=ROOT)
    return server


async def stop_servers(reactor, servers):
    """End the servers with SIGTERM; one still running after STOP_TIMEOUT seconds is killed."""
    running = [s for s in servers if not s.exited.called]
    for server in running:
        server.transport.signalProcess("TERM")
    for _ in range(int(STOP_TIMEOUT * 10)):
        if all(s.exited.called for s in running):
            return
        await task.deferLater(reactor, 0.1, lambda: None)
    for server in running:
        if not server.exited.called:
            sys.stderr.write(f"{server.name} did not end on SIGTERM: killed\n")
            server.transport.signalProcess("KILL")
    await gather([s.exited for s in running])


def process_figures(pid):
    """C{(RSS in MB, open files, CPU seconds)} of a process, from /proc."""
    return rss_bytes(pid) / 2**20, len(os.listdir(f"/proc/{pid}/fd")), cpu_seconds(pid)


# -- sampling -------------------------------------------------------------------


def histogram(told):
    return collections.Counter({int(bucket): n for bucket, n in told.items()})


def latency_figures(latencies):
    return {"requests": sum(latencies.values()), "p50_ms": percentile_ms(latencies, 0.5),
            "p99_ms": percentile_ms(latencies, 0.99)}


class Sampler:
    """Takes the samples: each server's figures from /proc and its log, the generators' tallies, merged."""

    def __init__(self, servers, generators, interval, warm_up_samples):
        self.servers, self.generators = servers, generators
        self.interval, self.warm_up_samples = interval, warm_up_samples
        self.samples = []
        self.by_request = collections.defaultdict(collections.Counter)  # request -> latencies after the warm-up
        self.totals = {key: collections.Counter() for key in ("refusals", "errors", "rounds", "bot_errors")}
        self._cpu = {}

    def quiet_figures(self):
        """RSS and open files of each server, taken before (or after) the bots play; the CPU clock starts (again)."""
        figures = {}
        for server in self.servers:
            rss, fds, self._cpu[server.name] = process_figures(server.pid)
            figures[server.name] = {"rss_mb": round(rss, 1), "fds": fds}
        self._cpu["at"] = time.monotonic()
        return figures

    async def sample(self):
        """The next sample: appended to L{samples} and returned."""
        now, processes = time.monotonic(), {s.name: process_figures(s.pid) for s in self.servers}
        told = await gather([g.ask("tally") for g in self.generators])
        number = len(self.samples) + 1
        steady = number > self.warm_up_samples
        names = {str(s.port): s.name for s in self.servers}
        latencies = {s.name: collections.Counter() for s in self.servers}
        held = collections.Counter()
        for answer in told:
            for port, requests in answer["latencies"].items():
                for request, buckets in requests.items():
                    latencies[names[port]].update(histogram(buckets))
                    if steady:
                        self.by_request[request].update(histogram(buckets))
            held.update({names[port]: n for port, n in answer["connections"].items()})
        servers = {}
        for server in self.servers:
            rss, fds, cpu = processes[server.name]
            problems = server.take_recent()
            servers[server.name] = {
                "rss_mb": round(rss, 1), "fds": fds, "bot_connections": held[server.name],
                "cpu_percent": round((cpu - self._cpu[server.name]) / (now - self._cpu["at"]) * 100),
                **latency_figures(latencies[server.name]),
                "log_warnings": problems["warn"], "log_errors": problems["error"] + problems["critical"]}
            self._cpu[server.name] = cpu
        self._cpu["at"] = now
        games = sum((latencies[s.name] for s in self.servers[1:]), collections.Counter())
        sample = {"second": number * self.interval, "warm_up": not steady, "servers": servers,
                  "game": latency_figures(games), "generators_cpu_percent": [a["cpu_percent"] for a in told]}
        for key, total in self.totals.items():
            sample[key] = dict(sum((collections.Counter(a[key]) for a in told), collections.Counter()))
            total.update(sample[key])
        self.samples.append(sample)
        return sample


def _ms(value):
    return "     -" if value is None else f"{value:6.1f}"


def sample_row(sample):
    """One sample as a line of text."""
    parts = [f"{sample['second']:>5} s{'*' if sample['warm_up'] else ' '}"]
    for name, s in sample["servers"].items():
        logged = f" log {s['log_warnings']}w/{s['log_errors']}e" if s["log_warnings"] or s["log_errors"] else ""
        parts.append(f"{name} {s['rss_mb']:6.1f} MB {s['fds']:>4} fd ({s['bot_connections']:>3} bots) "
                     f"{s['cpu_percent']:>3}% {s['requests']:>5} req p50 {_ms(s['p50_ms'])} p99 {_ms(s['p99_ms'])} ms"
                     + logged)
    rounds = sample["rounds"]
    parts.append(f"rounds {sum(rounds.values()):>3} ({rounds.get('error', 0)} failed), "
                 f"errors {sum(sample['errors'].values())}")
    return " | ".join(parts)


async def soak(reactor, generators, sampler, seconds):
    """Let the bots play for C{seconds}, sampling every interval; the generators' final answers."""
    await gather([g.ask("go") for g in generators])
    began = time.monotonic()
    sys.stderr.write("samples (* warm-up; fd: open files, with the bots' connections among them):\n")
    for number in range(1, int(seconds // sampler.interval) + 1):
        await task.deferLater(reactor, max(0.0, began + number * sampler.interval - time.monotonic()), lambda: None)
        sys.stderr.write(sample_row(await sampler.sample()) + "\n")
    return await gather([g.ask("stop") for g in generators])


# -- drift ----------------------------------------------------------------------


def slope_per_minute(points):
    """The least-squares slope of C{(second, value)} points, per minute."""
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread * 60 if spread else 0.0


def ratio(last, first):
    return round(last / first, 3) if last is not None and first else None


def drift(samples):
    """Growth from the first steady sample to the last, per server, and whether the run was steady (see above)."""
    steady = [s for s in samples if not s["warm_up"]]
    first, last = steady[0], steady[-1]
    growth = {"rss_growth_mb": {}, "rss_growth_percent": {}, "rss_mb_per_minute": {}, "open_files_growth": {},
              "open_files_growth_less_bots": {}, "p99_drift": {}}
    holds = True
    for name, before in first["servers"].items():
        after = last["servers"][name]
        rss = after["rss_mb"] - before["rss_mb"]
        fds_before, fds_after = before["fds"] - before["bot_connections"], after["fds"] - after["bot_connections"]
        growth["rss_growth_mb"][name] = round(rss, 1)
        growth["rss_growth_percent"][name] = round(rss / before["rss_mb"] * 100, 1)
        growth["rss_mb_per_minute"][name] = round(slope_per_minute(
            [(s["second"], s["servers"][name]["rss_mb"]) for s in steady]), 2)
        growth["open_files_growth"][name] = after["fds"] - before["fds"]
        growth["open_files_growth_less_bots"][name] = fds_after - fds_before
        growth["p99_drift"][name] = ratio(after["p99_ms"], before["p99_ms"])
        holds = (holds and rss < RSS_GROWTH_LIMIT * before["rss_mb"]
                 and fds_after - fds_before <= max(FDS_GROWTH_FLOOR, FDS_GROWTH_LIMIT * fds_before))
    return first, last, growth, holds


# -- the run --------------------------------------------------------------------


def start_generator(reactor, session_port, bots, ramp):
    """Start a generator process for C{bots} bot slots; its L{Generator}."""
    generator = Generator()
    reactor.spawnProcess(generator, sys.executable, [
        sys.executable, os.path.abspath(__file__), "--generate", "--session-port", str(session_port),
        "--bots", str(bots), "--ramp", str(ramp)], env=None, path=ROOT)
    return generator


async def end_generators(generators):
    """Close the generators' input, which ends them; fires once they are gone."""
    for generator in generators:
        if not generator.exited.called:
            generator.transport.closeStdin()
    await gather([g.exited for g in generators])


async def forget_run(reactor, router, settings, user_ids, sync_prefix, ranking_prefix, mm_prefix):
    """
    Delete the Redis keys of the run: the users' (those the bots reported and
    any still in the sync's live sets: a bot cut short after entering the
    world is only there), the sync's, the ranking board's and matchmaking's;
    then stop the router.  How many users' keys were deleted.
    """
    queue = SyncQueue(router, reactor, settings.sync.shards, sync_prefix)
    live = await gather([router.execute("ZRANGE", key, 0, -1) for key in queue.live_sets])
    users = sorted(set(user_ids) | {int(u) for members in live for u in members})
    ranking = Ranking(router, ranking_prefix)
    await gather([router.execute("DEL", key)
                  for key in [*queue.live_sets, *queue.checkpoint_locks, ranking.board, ranking.names]])
    await forget_players(reactor, router, settings, users, sync_prefix, mm_prefix)
    return len(users)


async def run(reactor, arguments, settings, work, cores):
    """
    Start the servers and the generators, soak, end them all and delete the
    run's Redis keys; C{(the servers, the sampler, the servers' figures before
    and after the bots, the generators' final answers)}.
    """
    private, public = os.path.join(work, "token.pem"), os.path.join(work, "token.pub")
    create_key_pair(private, public)
    tag = f"{random.getrandbits(32):08x}"
    sync_prefix, ranking_prefix, mm_prefix = f"soak{tag}", f"soakranking{tag}", f"soakmm{tag}"
    shared = ["--tokens-public-key", public, "--sync-prefix", sync_prefix, "--sync-ranking-prefix", ranking_prefix]
    games = [start_server(reactor, f"game{i + 1}", "dreamraid-game", "game", [
        *shared, "--game-udp-port", "0", "--game-dev-grant", "on", "--raids-matchmaking-prefix", mm_prefix])
        for i in range(cores)]
    session = start_server(reactor, "session", "dreamraid-session", "session", [
        *shared, "--tokens-private-key", private, "--session-registrations-per-address", "0",
        "--session-game-servers", ",".join(f"127.0.0.1:{g.port}" for g in games)])
    servers = [session, *games]
    router = RedisCluster.from_settings(reactor, random.Random(), settings.redis)
    router.startService()
    generators, finals = [], []
    try:
        await router.refresh()
        for server in servers:
            await listening(reactor, server.port)
        interval = 5.0 if arguments.quick else 10.0
        seconds = arguments.minutes * 60
        shares = [arguments.bots // cores + (i < arguments.bots % cores) for i in range(cores)]
        generators = [start_generator(reactor, session.port, share, interval) for share in shares if share]
        sampler = Sampler(servers, generators, interval, math.ceil(min(WARM_UP_MOST, seconds / 4) / interval))
        before = sampler.quiet_figures()
        finals = await soak(reactor, generators, sampler, seconds)
        await end_generators(generators)
        await task.deferLater(reactor, SETTLE, lambda: None)
        after = sampler.quiet_figures()
    finally:
        await end_generators(generators)
        await stop_servers(reactor, servers)
        forgotten = await forget_run(reactor, router, settings, [u for f in finals for u in f["user_ids"]],
                                     sync_prefix, ranking_prefix, mm_prefix)
        sys.stderr.write(f"Redis: deleted the keys of {forgotten} users and of the run's prefixes; "
                         f"the accounts stay in MySQL\n")
    return servers, sampler, before, after, finals


async def main(reactor, arguments):
    settings = load_settings(os.path.join(ROOT, "conf", "dreamraid.ini"))
    cores = len(os.sched_getaffinity(0))
    work = tempfile.mkdtemp(prefix="dreamraid-soak-")
    try:
        servers, sampler, before, after, finals = await run(reactor, arguments, settings, work, cores)
    finally:
        shutil.rmtree(work)
    first, last, growth, steady = drift(sampler.samples)
    rss, fds = ({s.name: {"before_bots": before[s.name][key], "first_steady": first["servers"][s.name][key],
                          "last": last["servers"][s.name][key], "after_bots": after[s.name][key]} for s in servers}
                for key in ("rss_mb", "fds"))
    sys.stderr.write(f"steady: {steady} (from {first['second']} s to {last['second']} s)\n")
    for server in servers:
        sys.stderr.write(f"{server.name}: RSS MB {rss[server.name]} ({growth['rss_mb_per_minute'][server.name]:+} "
                         f"MB/min after the warm-up), open files {fds[server.name]}\n")
        for kind, count in server.kinds.most_common(5):
            sys.stderr.write(f"  log: {count} x {kind}\n    first: {server.first[kind]}\n")
    for error, count in sampler.totals["bot_errors"].most_common(5):
        sys.stderr.write(f"bot error: {count} x {error}\n")
    print(json.dumps({
        "metric": "soak_drift",
        "value": ratio(last["game"]["p99_ms"], first["game"]["p99_ms"]),
        "baseline": first["game"]["p99_ms"],
        "unit": "game servers' request p99, last sample over the first steady one (baseline: that one's p99, ms)",
        "last_p99_ms": last["game"]["p99_ms"],
        **growth,
        "rss_mb": rss,
        "open_files": fds,
        "steady": steady,
        "steady_rule": f"every server's RSS grew < {RSS_GROWTH_LIMIT:.0%} and its open files less the bots' "
                       f"connections by <= {FDS_GROWTH_LIMIT:.0%} (at least {FDS_GROWTH_FLOOR}) "
                       "from the first steady sample to the last",
        "log_problems": {s.name: sum(s.kinds.values()) for s in servers},
        **{key: dict(total) for key, total in sampler.totals.items()},
        "rounds_cut_short": sum(f["cut_short"] for f in finals),
        "requests_after_warm_up": {request: latency_figures(latencies)
                                   for request, latencies in sorted(sampler.by_request.items())},
        "samples": sampler.samples,
        "interval_seconds": sampler.interval,
        "warm_up_seconds": sampler.warm_up_samples * sampler.interval,
        "minutes": arguments.minutes,
        "bots": arguments.bots,
        "generators": len(sampler.generators),
        "game_servers": len(servers) - 1,
        "machine": f"{platform.machine()}, {cores} cores",
    }))


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 minute, 12 bots, a sample every 5 s")
    parser.add_argument("--minutes", type=int, help="how long the bots play (default 10; quick 1)")
    parser.add_argument("--bots", type=int, help="bots playing at once (default 20; quick 12)")
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--session-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ramp", type=float, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if not arguments.generate:
        arguments.minutes = arguments.minutes or (1 if arguments.quick else 10)
        arguments.bots = arguments.bots or (12 if arguments.quick else 20)
        if arguments.minutes < 1 or arguments.bots < 2:
            parser.error("--minutes must be at least 1 and --bots at least 2 (raids are of two)")
    return arguments


if __name__ == "__main__":
    arguments = parse_arguments()
    if arguments.generate:
        task.react(lambda reactor: generate(reactor, arguments))
    else:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments)))
