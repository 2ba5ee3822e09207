"""
Real link failures: a second host on this machine (a network namespace
joined by a veth pair, made and removed by C{scripts/netns.sh}) whose link
is cut with C{ip link set down}.  Checks that the script's cut really stops
traffic and its down leaves nothing behind, and what a raid across the link
does when the link dies for 10 s: the client library's heartbeat notices,
the game server keeps the player away, and once the link is back the
library resumes the player into the same raid, which is cleared and pays
once.  Needs root (skipped otherwise); the session tests need the stack.
"""

import os
import random
import shutil
import sys
import tempfile

from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, TestCase

from dreamraid import game_tap, session_tap
from dreamraid.client.reconnect import BACKOFF_CAP
from dreamraid.services.accounts import LoginThrottle
from dreamraid.services.deferreds import gather
from dreamraid.services.livestore import profile_key, raid_mark_key, session_key
from dreamraid.services.matchmaking import matchmaking_keys
from dreamraid.services.parties import membership_key, party_key
from dreamraid.services.presence import away_key, presence_key
from tests.storage import SessionServicesCase
from tests.support import ROOT, RunningServer, eventually, free_port, log_lines, require_stack

NETNS_SCRIPT = ROOT / "scripts" / "netns.sh"
_log = Logger()
STAGE_TIMEOUT = 30.0  # seconds any one stage of a test may take


async def netns(*args):
    """C{scripts/netns.sh args}: its exit code, stdout and stderr."""
    out, err, code = await getProcessOutputAndValue("/bin/bash", [str(NETNS_SCRIPT), *args],
                                                    env=dict(os.environ), path=str(ROOT))
    return code, out.decode(), err.decode(errors="replace")


async def ip(*args):
    """C{ip args}: its exit code and stdout."""
    out, _, code = await getProcessOutputAndValue(shutil.which("ip") or "/usr/sbin/ip", args, env=dict(os.environ))
    return code, out.decode()


class ClientLines(protocol.ProcessProtocol):
    """What a C{tests.netns_client} prints, a line at a time; L{line} waits for one."""

    def __init__(self):
        self.lines = []
        self.times = []  # reactor.seconds() each line arrived at
        self.stderr = []
        self._partial = b""
        self._waiters = []  # (prefix, Deferred)
        self.ended = defer.Deferred()

    def outReceived(self, data):
        *complete, self._partial = (self._partial + data).split(b"\n")
        for raw in complete:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            self.times.append(reactor.seconds())
            for waiter in [w for w in self._waiters if line.startswith(w[0])]:
                self._waiters.remove(waiter)
                waiter[1].callback(line)

    def errReceived(self, data):
        self.stderr.append(data)

    def processEnded(self, reason):
        self.ended.callback(reason.value)
        for prefix, waiter in self._waiters:
            waiter.errback(AssertionError(f"the client ended before printing {prefix!r}:\n{self.transcript()}"))
        self._waiters = []

    def line(self, prefix, after=0):
        """
        The first line from the C{after}th on that starts with C{prefix} (or
        one of a tuple of them); fails after L{STAGE_TIMEOUT} s.
        """
        for line in self.lines[after:]:
            if line.startswith(prefix):
                return defer.succeed(line)
        if self.ended.called:
            return defer.fail(AssertionError(f"the client ended before printing {prefix!r}:\n{self.transcript()}"))
        waiter = defer.Deferred()
        self._waiters.append((prefix, waiter))

        def timed_out(failure):
            failure.trap(defer.TimeoutError)
            raise AssertionError(f"no {prefix!r} line in {STAGE_TIMEOUT} s:\n{self.transcript()}")
        return waiter.addTimeout(STAGE_TIMEOUT, reactor).addErrback(timed_out)

    def transcript(self):
        return "\n".join(self.lines + [b"".join(self.stderr).decode(errors="replace")])


class SecondHost:
    """The namespace C{scripts/netns.sh up} made: its names and the two addresses."""

    def __init__(self, assignments):
        values = dict(line.split("=", 1) for line in assignments.splitlines() if "=" in line)
        self.name = values["NETNS"]
        self.host_veth, self.client_veth = values["NETNS_HOST_VETH"], values["NETNS_CLIENT_VETH"]
        self.host_address, self.client_address = values["NETNS_HOST_ADDR"], values["NETNS_CLIENT_ADDR"]

    @classmethod
    async def up(cls, testcase):
        """Make it (skipping the test where that cannot be done); removed after the test, failed or not."""
        if os.geteuid() != 0:
            raise SkipTest("needs root: network namespaces and veth pairs (scripts/netns.sh)")
        code, out, err = await netns("up")
        testcase.addCleanup(cls._down)
        if code == 3:
            raise SkipTest(f"this machine cannot make network namespaces: {err.strip()}")
        if code != 0:
            raise AssertionError(f"scripts/netns.sh up exited {code}: {err}")
        return cls(out)

    @staticmethod
    async def _down():
        code, _, err = await netns("down")
        if code != 0:
            raise AssertionError(f"scripts/netns.sh down exited {code}: {err}")

    async def _run(self, command):
        code, _, err = await netns(command)
        if code != 0:
            raise AssertionError(f"scripts/netns.sh {command} exited {code}: {err}")

    def cut(self):
        """Pull the second host's cable (its end of the veth goes down)."""
        return defer.Deferred.fromCoroutine(self._run("cut"))

    def restore(self):
        return defer.Deferred.fromCoroutine(self._run("restore"))

    def command(self, *args):
        """C{python -m tests.netns_client args} run on the second host: the argument list."""
        return [shutil.which("ip") or "/usr/sbin/ip", "netns", "exec", self.name,
                sys.executable, "-m", "tests.netns_client", *args]

    def client(self, testcase, *args):
        """Start C{tests.netns_client args} on the second host: its L{ClientLines}, killed after the test."""
        lines = ClientLines()
        command = self.command(*args)
        reactor.spawnProcess(lines, command[0], command, env=dict(os.environ), path=str(ROOT))

        def end():
            if not lines.ended.called:
                lines.transport.signalProcess("KILL")
            return lines.ended
        testcase.addCleanup(end)
        return lines

    async def probe(self, host, port, timeout=1.0):
        """A TCP connect from the second host to C{host:port}: C{(exit code, what it printed)}."""
        command = self.command("probe", host, str(port), "--timeout", str(timeout))
        out, err, code = await getProcessOutputAndValue(command[0], command[1:], env=dict(os.environ), path=str(ROOT))
        return code, (out + err).decode(errors="replace").strip()


async def connect_from_host(address, port, timeout):
    """A TCP connect from this host within C{timeout} s: "connected", "refused" (the link works) or the error."""
    endpoint = TCP4ClientEndpoint(reactor, address, port, timeout=timeout)
    try:
        connected = await connectProtocol(endpoint, protocol.Protocol())
    except error.ConnectionRefusedError:
        return "refused"
    except Exception as e:
        return type(e).__name__
    connected.transport.loseConnection()
    return "connected"


class SecondHostTests(TestCase):
    """scripts/netns.sh: its link carries traffic, cut stops it, restore brings it back, down removes it all."""

    timeout = 60

    async def test_cut_stops_traffic_both_ways_and_restore_brings_it_back(self):
        """
        Across the veth a connect works both ways; while cut, one from the
        second host fails and one from this host gets no answer within its
        deadline; after restore both work again.
        """
        host = await SecondHost.up(self)
        listening = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol), interface=host.host_address)
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        closed_port = free_port()  # nothing listens on the second host: its kernel answers with a refusal

        self.assertEqual(await host.probe(host.host_address, port), (0, "connected"))
        self.assertEqual(await connect_from_host(host.client_address, closed_port, 1.0), "refused")

        await host.cut()
        code, said = await host.probe(host.host_address, port)
        self.assertEqual(code, 1, said)
        started = reactor.seconds()
        self.assertEqual(await connect_from_host(host.client_address, closed_port, 1.0), "TimeoutError")
        self.assertLess(reactor.seconds() - started, 3.0)  # bounded by its own deadline, not hung

        await host.restore()
        self.assertEqual(await host.probe(host.host_address, port, timeout=5.0), (0, "connected"))
        self.assertEqual(await connect_from_host(host.client_address, closed_port, 5.0), "refused")

    async def test_up_is_idempotent_and_down_leaves_nothing_behind(self):
        """
        A second up reuses the first's; down removes the namespace, both
        veth ends and the /30's routes; a second down is a no-op.
        """
        host = await SecondHost.up(self)
        code, out, err = await netns("up")
        self.assertEqual((code, SecondHost(out).__dict__), (0, host.__dict__), err)
        code, out, err = await netns("status")
        self.assertEqual(code, 0, err)
        self.assertIn("NETNS_LINK=up", out)

        self.assertEqual((await netns("down"))[0], 0)
        _, namespaces = await ip("netns", "list")
        self.assertNotIn(host.name, namespaces.split())
        _, links = await ip("-o", "link", "show")
        self.assertNotIn(host.host_veth, links)
        _, routes = await ip("-4", "route", "show", "table", "all")
        network = host.host_address.rsplit(".", 1)[0] + "."
        self.assertNotIn(network, routes)
        self.assertEqual((await netns("down"))[0], 0)
        self.assertEqual((await netns("status"))[0], 1)

    async def test_refuses_without_root(self):
        """Run by another user, up refuses with one clear line and makes nothing."""
        setpriv = shutil.which("setpriv")
        if os.geteuid() != 0 or setpriv is None:
            raise SkipTest("needs root and setpriv to run the script as another user")
        # A copy another user can read wherever the checkout is (a fresh clone under /root is not).
        where = tempfile.mkdtemp(prefix="dreamraid-netns-")
        self.addCleanup(shutil.rmtree, where)
        os.chmod(where, 0o755)
        script = shutil.copy(NETNS_SCRIPT, os.path.join(where, "netns.sh"))
        os.chmod(script, 0o755)
        out, err, code = await getProcessOutputAndValue(
            setpriv, ["--reuid=65534", "--regid=65534", "--clear-groups", "/bin/bash", script, "up"],
            env=dict(os.environ), path="/")
        self.assertEqual((code, err.decode().strip()),
                         (1, "netns: needs root (network namespaces and veth pairs are made with ip as root)"))


class LinkCut:
    """
    One player on the second host, playing across the veth through the
    client library (heartbeat and reconnect its own), and its link cut:
    each stage a method, so a test can assert what happens at each.
    """

    def __init__(self, testcase, host, session_port):
        self.testcase, self.host = testcase, host
        self.name = f"n_{random.getrandbits(40):x}"
        self.session = f"{host.host_address}:{session_port}"
        self.logs = log_lines(testcase)
        self.client = None
        self.cut_at = self.restored_at = None

    async def authenticated(self, *options):
        """Start the client (it registers, logs in, enters the world, makes a party): its user id and party code."""
        self.client = self.host.client(self.testcase, "play", "--session", self.session, "--name", self.name,
                                       "--password", "correct horse", "--register", "--party", *options)
        line = await self.client.line("authenticated ")
        party = await self.client.line("party ")
        return int(line.split()[1].removeprefix("user=")), party.split()[1]

    async def raiding(self):
        """
        (After L{authenticated} with --raid.)  Its "raid ..." line (where
        raid_found sent it) and its first hit's, once it plays on with its
        reconnect listeners in place.
        """
        found, hit = await self.client.line("raid "), await self.client.line("hit ")
        await self.client.line("playing")
        return found, hit

    async def cut(self):
        """
        Cut the link and wait until both ends noticed: C{(seconds until the
        client said it lost the connection, that line, seconds until the
        game server dropped it as idle)}.
        """
        after = len(self.client.lines)
        await self.host.cut()
        self.cut_at = reactor.seconds()
        noticed = {}

        async def client_noticed():
            line = await self.client.line("lost ", after)
            noticed["client"] = (reactor.seconds() - self.cut_at, line)

        async def server_dropped():
            await self.server_dropped()
            noticed["server"] = reactor.seconds() - self.cut_at

        await gather([defer.Deferred.fromCoroutine(client_noticed()), defer.Deferred.fromCoroutine(server_dropped())])
        return (*noticed["client"], noticed["server"])

    async def server_dropped(self):
        """Wait until the game server logs that it dropped the second host's connection as idle."""
        def dropped():
            return defer.succeed(any(self.host.client_address in line and "IDLE_TIMEOUT" in line for line in self.logs))
        await eventually(dropped, STAGE_TIMEOUT, 0.05)

    async def held(self, seconds):
        """Keep the link cut until C{seconds} after the cut."""
        left = self.cut_at + seconds - reactor.seconds()
        if left > 0:
            await task.deferLater(reactor, left, lambda: None)  # the scenario's length, not a wait for an event

    async def restored(self):
        """
        Restore the link: the line the client prints once the library
        resumed the player, and the seconds from the restore to it.
        """
        self.restored_at = reactor.seconds()
        await self.host.restore()
        line = await self.client.line(("resumed ", "entered again ", "reconnect failed "), self.lines_before_restore())
        return line, self.client.times[self.client.lines.index(line)] - self.restored_at

    def lines_before_restore(self):
        """How many lines the client printed before the link was restored."""
        return sum(1 for t in self.client.times if t < self.restored_at)

    def reconnect_attempts(self):
        """The attempts the library announced: C{(attempt number, seconds after the restore)}, in order."""
        return [(int(line.split()[1].removeprefix("attempt=")), at - self.restored_at)
                for line, at in zip(self.client.lines, self.client.times) if line.startswith("reconnecting ")]

    def logged(self, text):
        """The game server's log lines that contain C{text}."""
        return [line for line in self.logs if text in line]

    async def quit(self):
        """Log out and end the client: it says bye and exits 0."""
        await self.client.line("ready")
        self.client.transport.write(b"quit\n")
        await self.client.line("bye")
        reason = await self.client.ended
        return reason.exitCode


class LinkCutTests(SessionServicesCase):
    """
    A session and a game server (with a resume grace) on this host's end
    of the veth, a player on the second host in a raid, its link cut.
    """

    idle_timeout = 3.0  # the game server's: it drops the silent connection well inside the cut
    ping_interval = 0.5
    resume_grace = 30.0
    # The client's heartbeat (idle, answer), shorter than the library's 5 + 5 s so that it notices well inside
    # the 10 s cut rather than just as the link comes back.
    heartbeat = (1.0, 2.0)
    cut_for = 10.0  # the cut

    async def setUp(self):
        require_stack()
        self.host = await SecondHost.up(self)  # before the stack is touched: skipped at once without root
        await super().setUp()
        await self.router.execute("DEL", LoginThrottle.address_key(self.host.client_address))
        shared = ["--tokens-public-key", self.public_key, "--sync-prefix", self.settings.sync.prefix,
                  "--sync-ranking-prefix", self.settings.sync.ranking_prefix]
        matchmaking = f"testmm{random.getrandbits(40):x}"
        self.addCleanup(lambda: gather([self.router.execute("DEL", key) for key in matchmaking_keys(matchmaking)]))
        address = self.host.host_address
        self.game_port = game_port = free_port()
        session_port = free_port()
        self.game = RunningServer(game_tap, "game", [
            *shared, "--raids-matchmaking-prefix", matchmaking, "--raids-raid-size", "1", "--raids-boss-hp", "30",
            "--raids-match-interval", "0.1", "--raids-hit-interval", "0", "--raids-time-limit", "60",
            "--game-listen", f"tcp:{game_port}:interface={address}", "--game-public-host", address,
            "--game-udp-interface", address, "--game-resume-grace", str(self.resume_grace),
            "--game-ping-interval", str(self.ping_interval), "--game-idle-timeout", str(self.idle_timeout)]).start(self)
        await self.game.part("Players").when_listening()
        self.session = RunningServer(session_tap, "session", [
            *shared, "--tokens-private-key", self.private_key, "--mysql-database", self.settings.mysql.database,
            "--accounts-scrypt-n", "1024", "--session-listen", f"tcp:{session_port}:interface={address}",
            "--session-game-servers", f"{address}:{game_port}"]).start(self)
        self.link = LinkCut(self, self.host, session_port)

    async def kept(self, user_id):
        """
        What the game server and Redis hold of the player: C{(its Player's
        stage here, live session?, presence?, away mark?, its party's code,
        in that party's members?, raid mark?)}.
        """
        player = self.game.part("Players").player_of(user_id)
        keys = [session_key(user_id), presence_key(user_id), away_key(user_id), raid_mark_key(user_id)]
        session, presence, away, raid = [bool(n) for n in await gather([self.router.execute("EXISTS", k)
                                                                         for k in keys])]
        code = await self.router.execute("GET", membership_key(user_id))
        code = code.decode() if code else None
        ids = await self.router.execute("HGET", party_key(code), "ids") if code else None
        member = ids is not None and str(user_id) in ids.decode().split()
        return (player.stage.name if player else None, session, presence, away, code, member, raid)

    async def test_a_raid_across_the_link_survives_a_10_s_cut(self):
        """
        raid_found sends the player on the second host to the game server's
        veth address for TCP and UDP, and the fight begins across the link.
        The link is cut for 10 s mid-fight: the client library's heartbeat
        notices (nothing else can while no segment crosses), says it is
        reconnecting, tries in vain while cut, and once the link is back
        resumes the player into the same raid, greets the UDP channel again,
        and its later hits count: the raid is cleared and the player paid
        once.  The game server dropped the silent connection, but kept the
        player away, not gone: live session, presence, party and raid place
        stay, and the leave never runs.
        """
        user_id, code = await self.link.authenticated("--raid", "--heartbeat-idle", str(self.heartbeat[0]),
                                                      "--heartbeat-answer", str(self.heartbeat[1]))
        found, hit = await self.link.raiding()
        raid_id = found.split()[1]
        address = self.host.host_address
        self.assertIn(f" host={address}:{self.game_port} ", found)
        self.assertIn(f" udp={address}:", found)
        self.assertTrue(hit.startswith("hit damage=1 hp=29 "), hit)
        playing = ("PLAYING", True, True, False, code, True, True)
        self.assertEqual(await self.kept(user_id), playing)

        client_after, lost, server_after = await self.link.cut()
        # The library's heartbeat: idle + answer after the last frame heard (the server pings every 0.5 s), and
        # no reason from the server (its IDLE_TIMEOUT cannot cross the cut link).
        self.assertEqual(lost, "lost closed without a reason from the server")
        idle, answer = self.heartbeat
        self.assertGreater(client_after, idle + answer - 1.0)
        self.assertLess(client_after, idle + answer + 1.0)
        self.assertLess(server_after, self.idle_timeout + 2.0)
        await self.link.client.line("reconnecting attempt=1 ")
        away = ("AWAY", True, True, True, code, True, True)

        async def kept_away():
            return await self.kept(user_id) == away
        await eventually(kept_away, STAGE_TIMEOUT, 0.05)  # the away mark is written just after the log line
        self.assertEqual(len(self.link.logged(f"user {user_id}: connection lost; away for 30")), 1)

        await self.link.held(self.cut_for)
        resumed, took = await self.link.restored()
        self.assertEqual(resumed, f"resumed user={user_id} party={code} raid={raid_id} hp=29 score=1")
        attempts = self.link.reconnect_attempts()
        self.assertEqual([n for n, _ in attempts], list(range(1, len(attempts) + 1)))
        self.assertGreater(len([n for n, after in attempts if after < 0]), 1)  # it tried, and failed, while cut
        self.assertLess(took, BACKOFF_CAP + 2.0)  # the next attempt after the restore, at most the cap away
        self.assertEqual(self.link.logged(f"user {user_id}: resumed"), [f"user {user_id}: resumed (was away)"])
        _log.info("the link cut: the client noticed after {client:.2f} s, the server dropped it after {server:.2f} s; "
                  "{attempts} reconnect attempts, resumed {took:.2f} s after the restore", client=client_after,
                  server=server_after, attempts=len(attempts), took=took)  # for docs/operations.md's figures
        self.assertEqual(await self.kept(user_id), playing)

        self.assertEqual(await self.link.client.line("udp again "), "udp again hp=29")
        self.assertEqual(await self.link.client.line("hits "), "hits count=29 damage=29 hp=0")
        self.assertEqual(await self.link.client.line("udp hp="), "udp hp=0")
        result = await self.link.client.line("result ")
        self.assertTrue(result.startswith("result cleared=True score=30 team_score=30 exp_gained=30 "), result)
        level = int(result.split()[5].removeprefix("level="))
        self.assertEqual(await self.router.execute("HMGET", profile_key(user_id), "exp", "level", "best"),
                         [b"30", str(level).encode(), b"30"])  # paid once
        self.assertEqual(await self.link.client.line(("party ", "no party"), self.link.lines_before_restore()),
                         f"party {code}")
        self.assertEqual((await self.kept(user_id))[:6], playing[:6])  # the raid over, still in the game and party
        self.assertEqual(self.link.logged("leaving the game"), [])
        self.assertEqual(sum(line.startswith("authenticated ") for line in self.link.client.lines), 1)
        self.assertEqual(await self.link.quit(), 0)
