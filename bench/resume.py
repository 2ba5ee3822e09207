"""
Players whose connections keep dropping mid-raid: bots raid over and over
(quick: 200 players, raids of 4) and every second the TCP connections of a
random 5 % of them are reset (C{abortConnection}: an RST, no logout; the
game server sees a drop and keeps the player away); each client reconnects
by itself (the client library's backoff, then resume) and plays on.

Measures, for every cut: from the reconnect to resumed -- the reconnect
starts when the client library begins its first attempt after the drop
(the new TCP connection is opened, then the RESUME request written; that is
after the library's first backoff wait, which the C{reconnecting} event
announces) and ends when the C{resumed} event fires (the RESUMED reply is
in and the client plays through the new connection); the p99 of that is
C{value}.  Also from the cut itself to resumed (the backoff included), and
from resumed to the first boss-HP datagram the raid's host sends under the
player's new UDP key (back in the fight over UDP).  A resume failed when a
cut client gave up (C{reconnect_failed}) or was not resumed by the end of
the run.  C{ratio}: raids cleared (the boss fell: a member's raid_result
says cleared) over raids formed (a member got its raid_found).

In the same run, before the cuts, the same players raid for as long with
no cuts: that phase's clear ratio and server CPU are the baseline.  The
server's CPU per resume comes from three measurements: its idle rate (the
players connected, doing nothing, for C{IDLE_SECONDS}), its cost per hit
(the baseline's CPU over that idle rate, per hit answered) and the cut
phase's CPU beyond both, per resume answered (the hits and resumes counted
from the server's own /metrics).  Each phase's report also gives each
side's CPU and each core's load, to check the generator is not saturated.

Starts its own game server (twistd C{dreamraid-game}, the shipped settings
but raids of 4, a boss of C{BOSS_HP}, C{[game] resume_grace} 30 and no
abuse limits, prefixes of its own), pinned to core 0, and one load
generator process pinned to core 1 (this process too); the Redis Cluster
and MariaDB are the shared stack's, unpinned.  Needs the local stack
(C{scripts/stack.sh up}); what the players left in Redis is deleted at the
end.  The last line printed is the JSON result.

    python bench/resume.py [--quick] [--players N] [--seconds S] [--cut-fraction F]
"""

import argparse
import collections
import gc
import json
import os
import platform
import random
import re
import sys
import time
import urllib.request

from twisted.internet import defer, stdio, task, threads
from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner, textFileLogObserver

from bench.ccu import Generator
from bench.children import ROOT, UNLIMITED_GAME, CommandLines, forget_players, live_players, start
from bench.game_ops import free_port, listening
from bench.raid_load import cpu_seconds, percentile
from dreamraid.client import ConnectionClosed, GameClient, OutcomeUnknown, RaidNotStarted, RemoteError
from dreamraid.config import load_settings
from dreamraid.errors import ErrorCode
from dreamraid.services.livestore import Item

RAID_SIZE = 4
# The players are of the tables' top level, so a raid's pay does not level
# them up: their damage and level group stay the same all run long.
LEVEL = 15
# Damage 6 a hit (level 15, a +0 sword), a hit every 0.2 s or so from each
# of 4 players: the boss falls in about 11 s, well inside the time limit.
BOSS_HP = 1200
TIME_LIMIT = 60
READY_GRACE = 10
HIT_INTERVAL = 0.2
RESUME_GRACE = 30
# Hits a raid's players may not land: the raid is given up as stuck past its time limit and this.
RAID_PATIENCE = TIME_LIMIT + READY_GRACE + 30
# Seconds a bot waits for a raid's result after a resume said the raid is over (a result on its way).
RESULT_AFTER_RESUME = 2.0
# Seconds the server's idle CPU is measured, the players connected and doing nothing.
IDLE_SECONDS = 5
# Seconds after the phase's end every cut client has to be back before it counts as failed.
RESUME_PATIENCE = 30
# Above this a generator's CPU is taken as saturated: its own latency is in the figures.
SATURATED_PERCENT = 90
SERVER_CORE, GENERATOR_CORE = 0, 1


class TimedClient(GameClient):
    """A GameClient that says when each reconnect attempt starts: its resume opens a new connection."""

    on_attempt = None

    async def resume(self, host=None, port=None):
        if self.on_attempt is not None:
            self.on_attempt()
        return await super().resume(host, port)


class Cut:
    """
    One drop of a player's connection and its way back, in monotonic
    seconds: cut (None for a drop the bench did not make), the
    reconnecting event, the first attempt's start, resumed, the first
    boss-HP datagram after it (a player in a fight).
    """

    __slots__ = ("cut", "reconnecting", "attempt", "attempts", "resumed", "udp", "failed")

    def __init__(self, cut):
        self.cut = cut
        self.reconnecting = self.attempt = self.resumed = self.udp = self.failed = None
        self.attempts = 0


class Phase:
    """What the players did in one phase: its cuts, raids and counts."""

    def __init__(self, deadline):
        self.deadline = deadline  # reactor seconds: no raid is queued for after it
        self.cuts = []
        self.raids = {}  # raid id -> [members, results heard, cleared (None until a result says)]
        self.counts = collections.Counter()
        self.errors = collections.Counter()

    def formed(self, raid):
        self.raids.setdefault(raid.raid_id, [len(raid.members), 0, None])

    def ended(self, raid_id, cleared):
        record = self.raids[raid_id]
        record[1] += 1
        record[2] = bool(record[2]) or cleared

    def report(self):
        cuts = [c for c in self.cuts if c.cut is not None]
        resumed = [c for c in cuts if c.resumed is not None]

        def spread(values):
            values = [v * 1000 for v in values]
            return {"n": len(values), "p50_ms": _round(percentile(values, 0.5)),
                    "p99_ms": _round(percentile(values, 0.99)), "max_ms": _round(max(values, default=None))}
        formed = len(self.raids)
        cleared = sum(1 for r in self.raids.values() if r[2])
        return {
            "cuts": len(cuts),
            "resumed": len(resumed),
            "failed_resumes": len(cuts) - len(resumed),
            "failures": collections.Counter(c.failed or "not back" for c in cuts if c.resumed is None),
            "resumed_after_retries": sum(1 for c in resumed if c.attempts > 1),
            "drops_not_made_by_the_bench": len(self.cuts) - len(cuts),
            "reconnect_to_resumed": spread([c.resumed - c.attempt for c in resumed]),
            "cut_to_resumed": spread([c.resumed - c.cut for c in resumed]),
            "cut_to_reconnecting": spread([c.reconnecting - c.cut for c in resumed if c.reconnecting is not None]),
            "resumed_to_hp_datagram": spread([c.udp - c.resumed for c in resumed if c.udp is not None]),
            "raids_formed": formed,
            "raids_cleared": cleared,
            "raids_cleared_every_member_told": sum(1 for r in self.raids.values() if r[2] and r[1] == r[0]),
            "ratio": round(cleared / formed, 4) if formed else None,
            **self.counts,
            "errors": dict(self.errors),
        }


def _round(value):
    return None if value is None else round(value, 1)


def first_of(*deferreds):
    """A Deferred of the first of C{deferreds} to fire (none is cancelled); a failure fails it."""
    return defer.DeferredList(list(deferreds), fireOnOneCallback=True, fireOnOneErrback=True, consumeErrors=True)


class Bot:
    """One player: queues, fights its raid to the end with a hit every hit interval, queues again; cut at times."""

    def __init__(self, reactor, client):
        self.reactor, self.client = reactor, client
        self.phase = None
        self.cut = None  # the Cut under way
        self.dead = None  # the reason the client gave up, once it did
        self.raid = None
        self._waiting_udp = None  # the Cut whose player waits for its first HP datagram
        self._resumed_waiters = []
        self._told = None  # a Deferred a resume fires when it says where self.raid stands
        self._said = None  # and what it said: "fighting" or "over"
        client.on_attempt = self._attempt
        client.on("reconnecting", self._reconnecting)
        client.on("resumed", self._resumed)
        client.on("reconnect_failed", self._failed)

    # -- cuts and their way back ------------------------------------------------------

    def can_cut(self):
        return self.cut is None and self.dead is None and self.client.connection.connected

    def cut_now(self):
        self.cut = Cut(time.monotonic())
        self.phase.cuts.append(self.cut)
        self.client.connection.transport.abortConnection()

    def _reconnecting(self, attempt, delay):
        if self.cut is None:  # a drop the bench did not make (a heartbeat, the server)
            self.cut = Cut(None)
            self.phase.cuts.append(self.cut)
        if attempt == 1:
            self.cut.reconnecting = time.monotonic()

    def _attempt(self):
        if self.cut is not None:
            self.cut.attempts += 1
            if self.cut.attempt is None:
                self.cut.attempt = time.monotonic()

    def _resumed(self, record):
        if self.cut is not None:
            self.cut.resumed = time.monotonic()
            fighting = self.raid is not None and record.raid_id == self.raid.raid_id and record.seconds_left > 0
            self._waiting_udp = self.cut if fighting else None
            self.cut = None
        if self.raid is not None:
            self._records.append((time.monotonic(), record.raid_id == self.raid.raid_id, record.seconds_left,
                                  record.boss_hp))
        if self.raid is not None and self._told is not None:
            if record.raid_id != self.raid.raid_id:
                self._said = "over"  # it ended while this player was away: its result is not sent again
            elif record.seconds_left > 0 and self._said is None:
                self._said = "fighting"  # its raid_fight push may have come while away
            if self._said is not None and not self._told.called:
                self._told.callback(self._said)
        waiting, self._resumed_waiters = self._resumed_waiters, []
        for waiter in waiting:
            waiter.callback(record)

    def _failed(self, error):
        self.dead = f"{type(error).__name__}: {error}"
        if self.cut is not None:
            self.cut.failed = self.dead
            self.cut = None
        waiting, self._resumed_waiters = self._resumed_waiters, []
        for waiter in waiting:
            waiter.errback(ConnectionClosed(None, self.dead))

    def _next_resumed(self):
        waiter = defer.Deferred()
        self._resumed_waiters.append(waiter)
        return waiter

    def _hp(self, hp, sequence):
        if self._waiting_udp is not None:
            self._waiting_udp.udp, self._waiting_udp = time.monotonic(), None

    # -- playing ----------------------------------------------------------------------

    async def play(self, phase):
        """Raid until the phase's deadline; the last raid is played to its end."""
        self.phase = phase
        while self.dead is None and self.reactor.seconds() < phase.deadline:
            try:
                await self._one_raid()
            except OutcomeUnknown:
                phase.counts["outcome_unknown_elsewhere"] += 1
            except ConnectionClosed as e:
                self.dead = self.dead or f"{type(e).__name__}: {e}"
            except Exception as e:
                phase.errors[f"{type(e).__name__}: {getattr(e, 'code', e)}"] += 1
                await task.deferLater(self.reactor, 1, lambda: None)
        if self.dead is not None:
            phase.counts["players_lost"] += 1

    async def _one_raid(self):
        try:
            await self.client.queue_raid()
        except OutcomeUnknown:
            self.phase.counts["queue_outcome_unknown"] += 1
            record = await self._next_resumed()
            if not record.queued_group and not record.raid_id:
                return  # not queued: queue again
        except RemoteError as e:
            if e.code is not ErrorCode.ALREADY_QUEUED:
                raise
        raid = await self._await_raid()
        if raid is not None:
            await self._fight(raid)

    async def _await_raid(self):
        """The raid this player was matched into, ready; None if it did not start or the phase ended first."""
        while True:
            found = defer.ensureDeferred(self.client.next_raid())
            leave = self.reactor.callLater(max(0.0, self.phase.deadline - self.reactor.seconds()),
                                           lambda: defer.ensureDeferred(self._leave_queue(found)))
            try:
                return await found
            except defer.CancelledError:
                self.phase.counts["left_the_queue_at_the_end"] += 1
                return None
            except RaidNotStarted:
                self.phase.counts["raids_not_started"] += 1
                return None
            except OutcomeUnknown:  # its ready was cut: the raid's raid_found comes again once resumed
                self.phase.counts["ready_outcome_unknown"] += 1
            finally:
                if leave.active():
                    leave.cancel()

    async def _leave_queue(self, found):
        """The phase is over: leave the queue, unless a raid took this player meanwhile."""
        for _ in range(3):
            try:
                await self.client.cancel_queue()
            except OutcomeUnknown:
                continue  # ask again once back: NOT_QUEUED if the first one took
            except Exception:  # NOT_QUEUED: matched (its raid_found comes); or the client gave up
                return
            if not found.called:
                found.cancel()
            return

    async def _fight(self, raid):
        self.raid, self._told, self._said = raid, defer.Deferred(), None
        self._records = []
        self.phase.formed(raid)
        raid.channel.on_hp = self._hp
        result = defer.ensureDeferred(raid.result())
        fight = defer.ensureDeferred(raid.fight())
        give_up = time.monotonic() + RAID_PATIENCE
        try:
            await first_of(result, fight, self._told)
            if not fight.called and self._said == "fighting":
                self.phase.counts["fights_begun_while_away"] += 1  # its raid_fight push is not sent again
            while not result.called and self._said != "over" and time.monotonic() < give_up:
                try:
                    await raid.hit()
                    self.phase.counts["hits"] += 1
                except OutcomeUnknown:
                    self.phase.counts["hits_outcome_unknown"] += 1
                except RemoteError as e:
                    if e.code not in (ErrorCode.HIT_TOO_SOON, ErrorCode.RAID_NOT_FIGHTING, ErrorCode.NOT_IN_RAID):
                        raise
                    self.phase.counts[f"hits_refused_{e.code.name.lower()}"] += 1
                await task.deferLater(self.reactor, HIT_INTERVAL, lambda: None)
            if not result.called and self._said == "over":  # over while away: its result may be on its way yet
                await first_of(result, task.deferLater(self.reactor, RESULT_AFTER_RESUME, lambda: None))
            if result.called:
                outcome = await result
                self.phase.ended(raid.raid_id, outcome.cleared)
            elif self._said == "over":
                self.phase.counts["results_missed_while_away"] += 1
            else:
                self.phase.counts["raids_stuck"] += 1
                sys.stderr.write(f"stuck in raid {raid.raid_id}: resumes said {self._records}; unread on the "
                                 f"connection {[n for n, _ in self.client.connection.pushes]}; unread by the "
                                 f"client {[n for n, _ in self.client._pushes]}\n")
        finally:
            for waiting in (result, fight, self._told):
                if not waiting.called:
                    waiting.cancel()
            raid.close()
            self.raid = self._told = self._waiting_udp = None


class Players:
    """A generator's bots, logged in once; each phase they raid, cut or not."""

    def __init__(self, reactor, arguments):
        self.reactor, self.arguments = reactor, arguments
        self.rng = random.Random(arguments.seed)
        self.bots = []

    async def log_in(self):
        tokens = json.load(open(self.arguments.tokens))
        for first in range(0, len(tokens), 50):
            clients = await defer.gatherResults([defer.ensureDeferred(TimedClient.login(
                self.reactor, "127.0.0.1", self.arguments.port, token, rng=random.Random(self.rng.random())))
                for token in tokens[first:first + 50]], consumeErrors=True)
            self.bots.extend(Bot(self.reactor, client) for client in clients)
        return {"players": len(self.bots)}

    async def phase(self, seconds, fraction):
        """Raid for C{seconds}, cutting C{fraction} of the players every second; the phase's report."""
        gc.collect()
        gc.disable()  # a collection would stall every client at once and show as resume time
        cpu, started = time.process_time(), time.monotonic()
        phase = Phase(self.reactor.seconds() + seconds)
        count = round(fraction * len(self.bots))

        def cut():
            eligible = [bot for bot in self.bots if bot.can_cut()]
            for bot in self.rng.sample(eligible, min(count, len(eligible))):
                bot.cut_now()
        cutter = task.LoopingCall(cut)
        if count:
            cutter.start(1.0, now=False)
        playing = [defer.ensureDeferred(bot.play(phase)) for bot in self.bots]
        await task.deferLater(self.reactor, seconds, lambda: None)
        if cutter.running:
            cutter.stop()
        try:
            await defer.gatherResults(playing).addTimeout(RAID_PATIENCE + 60, self.reactor)
        except defer.TimeoutError:
            phase.counts["players_stuck"] = sum(1 for p in playing if not p.called)
        for _ in range(RESUME_PATIENCE * 10):
            if all(c.resumed is not None or c.failed is not None for c in phase.cuts):
                break
            await task.deferLater(self.reactor, 0.1, lambda: None)
        report = phase.report()
        report.update(window_seconds=seconds, phase_seconds=round(time.monotonic() - started, 1),
                      generator_cpu_seconds=round(time.process_time() - cpu, 2))
        gc.enable()
        return report


class Commands(CommandLines):
    """A generator's commands: C{login}, then C{idle SECONDS} or C{phase SECONDS FRACTION} as often as asked."""

    def __init__(self, players):
        self.players = players

    def lineReceived(self, line):
        word, *rest = line.decode().split()
        if word == "login":
            self.answer(defer.ensureDeferred(self.players.log_in()))
        elif word == "idle":
            self.answer(task.deferLater(self.players.reactor, float(rest[0]), dict))
        else:
            self.answer(defer.ensureDeferred(self.players.phase(float(rest[0]), float(rest[1]))))


def generate(reactor, arguments):
    """A load generator process: its bots, driven by commands on standard input until it closes."""
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(textFileLogObserver(sys.stderr), [
        LogLevelFilterPredicate(LogLevel.warn)])], redirectStandardIO=False)
    stdio.StandardIO(Commands(Players(reactor, arguments)), reactor=reactor)
    return defer.Deferred()


def start_generator(reactor, *args):
    generator = Generator()
    reactor.spawnProcess(generator, sys.executable, [sys.executable, os.path.abspath(__file__), "--generate", *args],
                         env=None, path=ROOT)
    return generator


def can_pin():
    """Whether this process may run on both cores the bench pins to."""
    return {SERVER_CORE, GENERATOR_CORE} <= os.sched_getaffinity(0)


def pin(pid, core):
    """Keep every thread of process C{pid} (and those it starts later) on C{core}."""
    for thread in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(thread), {core})


def core_times():
    """C{{core: (busy jiffies, all jiffies)}} from /proc/stat."""
    times = {}
    for line in open("/proc/stat"):
        name, *fields = line.split()
        if re.fullmatch(r"cpu\d+", name):
            values = [int(v) for v in fields[:8]]
            idle = values[3] + values[4]
            times[int(name[3:])] = (sum(values) - idle, sum(values))
    return times


def busy_percent(before, after):
    return {core: round(100 * (after[core][0] - before[core][0]) / max(1, after[core][1] - before[core][1]))
            for core in sorted(after)}


_SAMPLE = re.compile(r'^(dreamraid_request_seconds_(?:sum|count))\{message="(resume|raid_hit)"\} (\S+)$'
                     r'|^dreamraid_errors\{code="([^"]+)"\} (\S+)$', re.M)


def scrape(port):
    """The game server's resume and raid_hit request counts and seconds, and its error replies by code."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = collections.Counter()
    for name, message, value, code, errors in _SAMPLE.findall(text):
        if name:
            found[f"{message}_{name.rsplit('_', 1)[1]}"] = float(value)
        else:
            found[f"error_{code}"] = float(errors)
    return found


async def idle_cpu(generator, server, seconds):
    """The server's CPU seconds a second while the players are connected and do nothing (its timers, their pings)."""
    used, started = cpu_seconds(server), time.monotonic()
    await generator.ask(f"idle {seconds}")
    return (cpu_seconds(server) - used) / (time.monotonic() - started)


async def measured_phase(reactor, generator, server, http_port, seconds, fraction):
    """One phase, with the server's and the generator's CPU and the cores' load over it, and its metrics."""
    metrics = await threads.deferToThread(scrape, http_port)
    server_cpu, generator_cpu = cpu_seconds(server), cpu_seconds(generator.transport.pid)
    cores, started, load = core_times(), time.monotonic(), open("/proc/loadavg").read().split()[0]
    report = await generator.ask(f"phase {seconds} {fraction}")
    elapsed = time.monotonic() - started
    server_cpu, generator_cpu = cpu_seconds(server) - server_cpu, cpu_seconds(generator.transport.pid) - generator_cpu
    after = await threads.deferToThread(scrape, http_port)
    served = {k: after[k] - metrics.get(k, 0) for k in after if after[k] != metrics.get(k, 0)}
    report.update(
        server_cpu_seconds=round(server_cpu, 2), server_cpu_percent=round(100 * server_cpu / elapsed),
        elapsed_seconds=round(elapsed, 2),
        server_cpu_us_per_hit=round(1e6 * server_cpu / report["hits"]) if report.get("hits") else None,
        generator_cpu_percent=round(100 * generator_cpu / elapsed), cores_busy_percent=busy_percent(cores, core_times()),
        loadavg_1min_at_start=float(load),
        server_resumes=int(served.get("resume_count", 0)),
        server_resume_ms_mean=round(1000 * served["resume_sum"] / served["resume_count"], 2)
        if served.get("resume_count") else None,
        server_hits=int(served.get("raid_hit_count", 0)),
        server_error_replies={k[6:]: int(v) for k, v in served.items() if k.startswith("error_")})
    return report


async def main(reactor, arguments):
    quick = arguments.quick
    players = arguments.players or (200 if quick else 1000)
    seconds = arguments.seconds or (30.0 if quick else 60.0)
    pinned = can_pin()
    if pinned:  # the generator, started from here, starts there too
        pin(os.getpid(), GENERATOR_CORE)
    settings = load_settings(os.path.join(ROOT, "conf", "dreamraid.ini"))
    router, work, public, users, issued = await live_players(reactor, settings, players, {(0, 0): Item(101, 0, 1)},
                                                             level=LEVEL)
    tokens = os.path.join(work, "tokens.json")
    with open(tokens, "w") as f:
        json.dump([i.token for i in issued], f)
    tag = f"{random.getrandbits(32):08x}"
    prefix, mm, ranking = f"benchresume{tag}", f"benchresumemm{tag}", f"benchresumerank{tag}"
    game_port, http_port = free_port(), free_port()
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    game = start(reactor, "-n", "--pidfile=", "dreamraid-game", *UNLIMITED_GAME,
                 "--game-listen", f"tcp:{game_port}:interface=127.0.0.1",
                 "--game-http-listen", f"tcp:{http_port}:interface=127.0.0.1", "--game-udp-port", "0",
                 "--game-resume-grace", str(RESUME_GRACE), "--tokens-public-key", public,
                 "--sync-prefix", prefix, "--sync-ranking-prefix", ranking, "--raids-matchmaking-prefix", mm,
                 "--raids-raid-size", str(RAID_SIZE), "--raids-boss-hp", str(BOSS_HP),
                 "--raids-time-limit", str(TIME_LIMIT), "--raids-ready-grace", str(READY_GRACE),
                 "--raids-hit-interval", str(HIT_INTERVAL), executable=twistd, reports=False)
    generator = None
    try:
        await listening(reactor, game_port)
        if pinned:
            pin(game.transport.pid, SERVER_CORE)
        generator = start_generator(reactor, "--port", str(game_port), "--tokens", tokens,
                                    "--seed", str(arguments.seed))
        await generator.ask("login")
        idle = await idle_cpu(generator, game.transport.pid, IDLE_SECONDS)
        sys.stderr.write(f"{players} players in; {seconds:g} s with no cuts, then {seconds:g} s with "
                         f"{arguments.cut_fraction:.0%} of them cut every second\n")
        baseline = await measured_phase(reactor, generator, game.transport.pid, http_port, seconds, 0.0)
        print(json.dumps({"no_cuts": baseline}), flush=True)
        cuts = await measured_phase(reactor, generator, game.transport.pid, http_port, seconds,
                                    arguments.cut_fraction)
        print(json.dumps({"cuts": cuts}), flush=True)
    finally:
        if generator is not None:
            generator.transport.closeStdin()
            await generator.exited
        game.transport.signalProcess("TERM")
        await game.exited
        await forget_players(reactor, router, settings, users, prefix, mm,
                             extra_keys=(f"{ranking}:board", f"{ranking}:names"))

    # The server's CPU is taken as: its idle rate for the phase's time, a cost
    # per hit (the baseline's, over its idle share) and, with cuts, a cost per
    # resume: what the cut phase used beyond the other two, per resume.
    per_hit = per_resume = None
    if baseline["server_hits"]:
        per_hit = (baseline["server_cpu_seconds"] - idle * baseline["elapsed_seconds"]) / baseline["server_hits"]
    if per_hit is not None and cuts["server_resumes"]:
        per_resume = (cuts["server_cpu_seconds"] - idle * cuts["elapsed_seconds"]
                      - per_hit * cuts["server_hits"]) / cuts["server_resumes"]
    saturated = [name for name, phase in (("no_cuts", baseline), ("cuts", cuts))
                 if phase["generator_cpu_percent"] >= SATURATED_PERCENT]
    resume = cuts["reconnect_to_resumed"]
    print(json.dumps({
        "metric": "resume_p99_ms",
        "value": resume["p99_ms"],
        "unit": "ms from the client's first reconnect attempt (new TCP connection, then RESUME) to resumed",
        "ratio": cuts["ratio"],
        "failed_resumes": cuts["failed_resumes"],
        "cuts": cuts["cuts"],
        "resumed": cuts["resumed"],
        "p50_ms": resume["p50_ms"],
        "cut_to_resumed_p99_ms": cuts["cut_to_resumed"]["p99_ms"],
        "cut_to_resumed_p50_ms": cuts["cut_to_resumed"]["p50_ms"],
        "resumed_to_hp_datagram_p99_ms": cuts["resumed_to_hp_datagram"]["p99_ms"],
        "server_resume_ms_mean": cuts["server_resume_ms_mean"],
        "raids_formed": cuts["raids_formed"],
        "raids_cleared": cuts["raids_cleared"],
        "results_missed_while_away": cuts.get("results_missed_while_away", 0),
        "baseline_ratio": baseline["ratio"],
        "baseline_raids_formed": baseline["raids_formed"],
        "server_cpu_percent": cuts["server_cpu_percent"],
        "baseline_server_cpu_percent": baseline["server_cpu_percent"],
        "server_cpu_us_per_resume": None if per_resume is None else round(1e6 * per_resume),
        "server_cpu_us_per_hit_baseline": None if per_hit is None else round(1e6 * per_hit),
        "server_idle_cpu_percent": round(100 * idle, 1),
        "generator_cpu_percent": cuts["generator_cpu_percent"],
        "baseline_generator_cpu_percent": baseline["generator_cpu_percent"],
        "generator_saturated": saturated or False,
        "cores_busy_percent": cuts["cores_busy_percent"],
        "loadavg_1min_at_start": baseline["loadavg_1min_at_start"],
        "pinned": {"server": SERVER_CORE, "generator": GENERATOR_CORE} if pinned else None,
        "players": players,
        "window_seconds": seconds,
        "cut_fraction_per_second": arguments.cut_fraction,
        "target_p99_ms": 500,
        "target_ratio": 0.99,
        "machine": platform.machine(),
    }))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="200 players, 30 s a phase (full: 1,000, 60 s)")
    parser.add_argument("--players", type=int, help="this many players instead (a multiple of 4)")
    parser.add_argument("--seconds", type=float, help="seconds a phase queues raids")
    parser.add_argument("--cut-fraction", type=float, default=0.05, help="players cut every second (default 0.05)")
    parser.add_argument("--seed", type=int, default=7, help="the random source of the cuts")
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.generate:
        task.react(lambda reactor: generate(reactor, arguments))
    else:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments)))
