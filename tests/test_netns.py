"""
Real link failures: a second host on this machine (a network namespace
joined by a veth pair, made and removed by C{scripts/netns.sh}) whose link
is cut with C{ip link set down}.  Checks that the script's cut really stops
traffic and its down leaves nothing behind, and what a session across the
link does when the link dies: the game server's heartbeat drops it, the
client's heartbeat notices, and the client gets back in once the link is
back.  Needs root (skipped otherwise); the session tests need the stack.
"""

import os
import random
import shutil
import sys
import tempfile

from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from dreamraid import game_tap, session_tap
from dreamraid.services.accounts import LoginThrottle
from dreamraid.services.deferreds import gather
from dreamraid.services.matchmaking import matchmaking_keys
from tests.storage import SessionServicesCase
from tests.support import ROOT, RunningServer, eventually, free_port, log_lines

NETNS_SCRIPT = ROOT / "scripts" / "netns.sh"
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
    One player on the second host, logged in across the veth, and its link
    cut: each stage a method, so a test can assert what happens at each.
    """

    def __init__(self, testcase, host, session_port, idle_timeout):
        self.testcase, self.host, self.idle_timeout = testcase, host, idle_timeout
        self.name = f"n_{random.getrandbits(40):x}"
        self.session = f"{host.host_address}:{session_port}"
        self.logs = log_lines(testcase)
        self.client = None
        self.cut_at = self.after_restore = self.attempts_while_cut = None

    async def authenticated(self, *options):
        """Start the client (it registers, logs in, enters the world, makes a party): its user id and party code."""
        self.client = self.host.client(self.testcase, "play", "--session", self.session, "--name", self.name,
                                       "--password", "correct horse", "--register", "--party", *options)
        line = await self.client.line("authenticated ")
        party = await self.client.line("party ")
        await self.client.line("pong ")  # the heartbeat crosses the veth
        return int(line.split()[1].removeprefix("user=")), party.split()[1]

    async def raiding(self):
        """(After L{authenticated} with --raid.)  Its "raid ..." line (where raid_found sent it) and its first hit's."""
        return await self.client.line("raid "), await self.client.line("hit ")

    async def cut(self, hold=0.0):
        """
        Cut the link, and keep it cut until both ends noticed and at least
        C{hold} seconds passed: C{(seconds until the client noticed, its
        line, seconds until the server dropped it)}.
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
        held = reactor.seconds() - self.cut_at
        if held < hold:
            await task.deferLater(reactor, hold - held, lambda: None)  # the scenario's length, not a wait for an event
        return (*noticed["client"], noticed["server"])

    async def server_dropped(self):
        """Wait until the game server logs that it dropped the second host's connection as idle."""
        def dropped():
            return defer.succeed(any(self.host.client_address in line and "IDLE_TIMEOUT" in line for line in self.logs))
        await eventually(dropped, STAGE_TIMEOUT, 0.05)

    async def restored(self):
        """
        Restore the link: the line the client prints once it is
        authenticated again, what it says of its party, and the seconds from
        the restore to that authentication.  (The client failed to get back
        in while cut: a test asserts that on L{attempts_while_cut}.)
        """
        self.attempts_while_cut = sum(line.startswith("attempt failed") for line in self.client.lines)
        restored_at = reactor.seconds()
        await self.host.restore()
        again = await self.client.line("authenticated again ")
        self.after_restore = self.client.lines.index(again)
        took = self.client.times[self.after_restore] - restored_at
        return again, await self.client.line(("party ", "no party"), self.after_restore), took

    async def raid_after_restore(self):
        """(After L{restored}, with --raid.)  What a hit in the raid got: "raid kept hp=N" or "no raid CODE"."""
        return await self.client.line(("raid kept", "no raid"), self.after_restore)

    async def quit(self):
        """Log out and end the client: it says bye and exits 0."""
        await self.client.line("ready")
        self.client.transport.write(b"quit\n")
        await self.client.line("bye")
        reason = await self.client.ended
        return reason.exitCode


class LinkCutTests(SessionServicesCase):
    """A session and a game server on this host's end of the veth, a player on the second host, its link cut."""

    idle_timeout = 3.0

    async def setUp(self):
        await super().setUp()
        self.host = await SecondHost.up(self)
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
            "--game-udp-interface", address,
            "--game-ping-interval", "0.5", "--game-idle-timeout", str(self.idle_timeout)]).start(self)
        await self.game.part("Players").when_listening()
        self.session = RunningServer(session_tap, "session", [
            *shared, "--tokens-private-key", self.private_key, "--mysql-database", self.settings.mysql.database,
            "--accounts-scrypt-n", "1024", "--session-listen", f"tcp:{session_port}:interface={address}",
            "--session-game-servers", f"{address}:{game_port}"]).start(self)
        self.link = LinkCut(self, self.host, session_port, self.idle_timeout)

    async def test_both_ends_notice_a_cut_link_and_the_client_gets_back_in(self):
        """
        Cut mid-session, the client's heartbeat notices within its 1.5 s and
        the game server's drops the silent connection after its idle
        timeout; once restored the client logs in again.  Today (no resume)
        the drop was a logout: the player's party is gone.
        """
        user_id, _ = await self.link.authenticated("--heartbeat", "0.5", "--heartbeat-timeout", "1.5")
        client_after, client_line, server_after = await self.link.cut()
        self.assertIn("no pong in 1.5 s", client_line)
        self.assertLess(client_after, 1.5 + 0.5 + 1.0)
        self.assertGreater(server_after, self.idle_timeout - 0.5 - 0.1)  # silent since at most a ping interval before
        self.assertLess(server_after, self.idle_timeout + 2.0)
        self.assertEqual(len(self.game.part("Players")), 0)

        again, party, _ = await self.link.restored()
        self.assertGreater(self.link.attempts_while_cut, 0)  # it tried, and was refused at once, while cut
        self.assertEqual(again.split()[2], f"user={user_id}")
        self.assertEqual(party, "no party")
        self.assertEqual(await self.link.quit(), 0)

    async def test_a_raid_across_the_link_and_the_link_cut_mid_fight(self):
        """
        raid_found sends the player on the second host to the game server's
        veth address for TCP and UDP, and the fight goes on across the link.
        Cut mid-fight, both heartbeats notice; once restored the client logs
        in again.  Today (no resume) a raid member who drops stays in the
        raid until its end: the new login is still in its party and its
        hits in the raid still count (the boss goes from 29 to 28), though
        nothing tells the client which raid it was in.
        """
        user_id, _ = await self.link.authenticated("--raid", "--heartbeat", "0.5", "--heartbeat-timeout", "1.5")
        found, hit = await self.link.raiding()
        address = self.host.host_address
        self.assertIn(f" host={address}:{self.game_port} ", found)
        self.assertIn(f" udp={address}:", found)
        self.assertTrue(hit.startswith("hit damage=1 hp=29 "), hit)

        client_after, client_line, server_after = await self.link.cut(hold=10.0)  # the 10 s cut
        self.assertIn("no pong in 1.5 s", client_line)
        self.assertLess(server_after, self.idle_timeout + 2.0)

        again, party, took = await self.link.restored()
        self.assertGreater(self.link.attempts_while_cut, 0)
        self.assertLess(took, 1.0 + 5.0)  # its backoff is capped at 1 s
        self.assertEqual((again.split()[2], party.split()[0]), (f"user={user_id}", "party"))
        self.assertEqual(await self.link.raid_after_restore(), "raid kept hp=28")
        self.assertEqual(await self.link.quit(), 0)

    async def test_the_client_library_alone_notices_a_cut_only_once_the_link_is_back(self):
        """
        Without pings of its own (the client library has no heartbeat
        today), the client says nothing while the link is cut, even after
        the server dropped it; only once the link is back does the server's
        IDLE_TIMEOUT and close reach it.  The resume work's client heartbeat
        is what makes a client notice while cut (the test above).
        """
        await self.link.authenticated("--heartbeat", "0")
        after = len(self.link.client.lines)
        await self.link.host.cut()
        await self.link.server_dropped()
        self.assertEqual(self.link.client.lines[after:], [])  # silent for longer than the heartbeat client needed
        restored_at = reactor.seconds()
        again, party, _ = await self.link.restored()
        lost = self.link.client.lines.index(await self.link.client.line("lost ", after))
        self.assertEqual(self.link.client.lines[lost], "lost connection closed (IDLE_TIMEOUT)")
        self.assertGreaterEqual(self.link.client.times[lost], restored_at)
        self.assertEqual(party, "no party")
        self.assertEqual(await self.link.quit(), 0)
