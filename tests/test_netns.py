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

from twisted.internet import defer, error, protocol, reactor
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
        self.stderr = []
        self._partial = b""
        self._waiters = []  # (prefix, Deferred)
        self.ended = defer.Deferred()

    def outReceived(self, data):
        *complete, self._partial = (self._partial + data).split(b"\n")
        for raw in complete:
            line = raw.decode(errors="replace")
            self.lines.append(line)
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
        """The first line from the C{after}th on that starts with C{prefix} (or one of a tuple); fails after L{STAGE_TIMEOUT} s."""
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
    """scripts/netns.sh: the link it makes carries traffic, cut stops it, restore brings it back, down removes it all."""

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
        """A second up reuses the first's; down removes the namespace, both veth ends and the /30's routes; a second down is a no-op."""
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
        out, err, code = await getProcessOutputAndValue(
            setpriv, ["--reuid=65534", "--regid=65534", "--clear-groups", "/bin/bash", str(NETNS_SCRIPT), "up"],
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
        self.cut_at = None

    async def authenticated(self, *options):
        """Start the client (it registers, logs in, enters the world, makes a party): its user id and party code."""
        self.client = self.host.client(self.testcase, "play", "--session", self.session, "--name", self.name,
                                       "--password", "correct horse", "--register", "--party", *options)
        line = await self.client.line("authenticated ")
        party = await self.client.line("party ")
        await self.client.line("pong ")  # the heartbeat crosses the veth
        return int(line.split()[1].removeprefix("user=")), party.split()[1]

    async def cut(self):
        """Cut the link; C{(seconds until the client noticed, its line, seconds until the server dropped it)}."""
        after = len(self.client.lines)
        await self.host.cut()
        self.cut_at = reactor.seconds()
        noticed = {}

        async def client_noticed():
            line = await self.client.line("lost ", after)
            noticed["client"] = (reactor.seconds() - self.cut_at, line)

        async def server_dropped():
            await eventually(lambda: defer.succeed(any(
                self.host.client_address in line and "IDLE_TIMEOUT" in line for line in self.logs)),
                STAGE_TIMEOUT, 0.05)
            noticed["server"] = reactor.seconds() - self.cut_at

        await gather([defer.Deferred.fromCoroutine(client_noticed()), defer.Deferred.fromCoroutine(server_dropped())])
        return (*noticed["client"], noticed["server"])

    async def restored(self):
        """Restore the link: the line the client prints once it is authenticated again, and what it says of its party."""
        await self.host.restore()
        again = await self.client.line("authenticated again ")
        after = self.client.lines.index(again)
        return again, await self.client.line(("party ", "no party"), after)

    async def quit(self):
        """Log out and end the client: it says bye and exits 0."""
        await self.client.line("ready")
        self.client.transport.write(b"quit\n")
        await self.client.line("bye")
        reason = await self.client.ended
        return reason.exitCode


class LinkCutTests(SessionServicesCase):
    """A session and game server on this host's end of the veth, a player on the second host, the link cut mid-session."""

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
        game_port, session_port = free_port(), free_port()
        self.game = RunningServer(game_tap, "game", [
            *shared, "--raids-matchmaking-prefix", matchmaking,
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

        again, party = await self.link.restored()
        self.assertEqual(again.split()[2], f"user={user_id}")
        self.assertEqual(party, "no party")
        self.assertEqual(await self.link.quit(), 0)
