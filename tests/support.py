"""
Helpers for the tests: settings from the stack's configuration, the local
stack (which `make test` starts and announces with DREAMRAID_STACK=1), free
ports, HTTP GETs, running the stack script and watching the log.

The stack under test is the one C{scripts/stack.sh} reads: its configuration
is C{$DREAMRAID_CONFIG} (default: the shipped C{conf/dreamraid.ini}) and its
data directory C{$DREAMRAID_VAR} (default: C{var/}), relative paths taken
from the checkout, so a second stack on other ports is tested as the first.
"""

import json
import os
import socket
import sys
from pathlib import Path

from hypothesis import settings as hypothesis_settings
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest
from twisted.web.client import Agent, readBody

from dreamraid.client import RaidChannel, connect
from dreamraid.services.deferreds import gather
from dreamraid.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
# The shipped configuration, whose defaults some tests check.
CONFIG = ROOT / "conf" / "dreamraid.ini"
# The configuration and data directory of the stack the tests run against.
STACK_CONFIG = ROOT / (os.environ.get("DREAMRAID_CONFIG") or CONFIG)
STACK_VAR = ROOT / (os.environ.get("DREAMRAID_VAR") or "var")
STACK_SCRIPT = ROOT / "scripts" / "stack.sh"

hypothesis_settings.register_profile("dreamraid", deadline=None, max_examples=200)
hypothesis_settings.load_profile("dreamraid")


def make_settings(**overrides):
    """The stack's settings (L{STACK_CONFIG}), with C{section_key=text} overrides."""
    parsed = {}
    for name, value in overrides.items():
        section, key = name.split("_", 1)
        parsed[section, key] = value
    return load_settings(STACK_CONFIG, parsed)


def require_stack():
    """
    Skip unless the local stack is meant to be up (C{make test} sets
    DREAMRAID_STACK=1); with it set, a stack that does not answer fails the
    test rather than skipping it.
    """
    if os.environ.get("DREAMRAID_STACK") != "1":
        raise SkipTest("needs the local Redis Cluster and MariaDB: run `make test`")


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def http_get(url):
    """C{(status, decoded JSON body)} of a GET."""
    response = await Agent(reactor).request(b"GET", url.encode("ascii"))
    body = await readBody(response)
    return response.code, json.loads(body)


async def stack(command):
    """Run C{scripts/stack.sh command}; fail the test if it fails."""
    out, err, code = await getProcessOutputAndValue(
        "/bin/bash", [str(STACK_SCRIPT), command], env=dict(os.environ), path=str(ROOT)
    )
    if code != 0:
        raise AssertionError(f"stack.sh {command} exited {code}: {err.decode(errors='replace')}")
    return out.decode()


async def greeted_channels(testcase, found):
    """
    A raid UDP channel on loopback for each C{raid_found} body in C{found}
    (closed after the test), each greeted: the channels, and the boss HP
    each was told.
    """
    channels = []
    for body in found:
        channel = RaidChannel(body)
        port = reactor.listenUDP(0, channel, interface="127.0.0.1")
        testcase.addCleanup(port.stopListening)
        channels.append(channel)
    return channels, await gather([channel.greet(reactor) for channel in channels])


async def eventually(probe, timeout=30.0, interval=0.1):
    """
    Await C{probe()} until it returns a true value, for at most C{timeout}
    seconds of real time: for waiting on another process, which can only be
    asked.  Returns that value.
    """
    deadline = reactor.seconds() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {probe}")
        await task.deferLater(reactor, interval, lambda: None)


def log_lines(testcase):
    """A list that collects the text of every log event from now until the test ends."""
    lines = []

    def observe(event):
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    testcase.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


def when_logged(testcase, text):
    """A Deferred that fires with the text of the first log event from now on that contains C{text}."""
    seen = defer.Deferred()

    def observe(event):
        if not seen.called:
            line = formatEvent(event)
            if text in line:
                seen.callback(line)

    globalLogPublisher.addObserver(observe)
    testcase.addCleanup(globalLogPublisher.removeObserver, observe)
    return seen


# Tests register from 127.0.0.1 all over one shared Redis, many accounts a
# run: their session servers have no per-address registration cap unless a
# test sets one (an option given later wins).  Their game servers have no
# resume grace unless a test sets one: a dropped connection is a leave at
# once, as the tests written before resume expect (tests of resume set it).
TEST_SERVER_OPTIONS = {"session": ["--session-registrations-per-address", "0"],
                       "game": ["--game-resume-grace", "0"]}


def _free_ports(section, port, http_port):
    """Options putting a server on free ports (a game server's raid UDP too)."""
    options = [f"--{section}-listen", f"tcp:{port}:interface=127.0.0.1",
               f"--{section}-http-listen", f"tcp:{http_port}:interface=127.0.0.1"]
    return options + (["--game-udp-port", "0"] if section == "game" else [])


class _Listening:
    """A server a test connects to on C{self.port}."""

    async def client(self, testcase):
        """A connected L{dreamraid.client} client, closed after the test."""
        client = await connect(reactor, "127.0.0.1", self.port)
        testcase.addCleanup(lambda: client.close() if client.connected else None)
        return client


class RunningServer(_Listening):
    """A server service tree built by its tap and started in this process, on free ports."""

    def __init__(self, tap, section, extra=()):
        self.port, self.http_port = free_port(), free_port()
        options = tap.Options()
        options.parseOptions(["--config", str(STACK_CONFIG), *_free_ports(section, self.port, self.http_port),
                              *TEST_SERVER_OPTIONS[section], *extra])
        self.service = tap.makeService(options, reactor)

    def start(self, testcase):
        self.service.startService()
        testcase.addCleanup(self.service.stopService)
        return self

    def part(self, class_name):
        """The service of the tree whose class is named C{class_name}."""
        return next(s for s in self.service if type(s).__name__ == class_name)

    def health(self):
        return defer.Deferred.fromCoroutine(http_get(f"http://127.0.0.1:{self.http_port}/health"))



class ChildProcess(protocol.ProcessProtocol):
    """
    Keeps what a child process prints; C{ready} fires when it prints a
    "ready" line, C{ended} when it exits.
    """

    def __init__(self):
        self.output = []
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output.append(data)
        if not self.ready.called and b"ready\n" in b"".join(self.output):
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(reason.value)

    def lines(self):
        return b"".join(self.output).decode(errors="replace").splitlines()


def spawn(testcase, *args):
    """Run C{python args} in the project root; its L{ChildProcess}, ended after the test."""
    child = ChildProcess()
    reactor.spawnProcess(child, sys.executable, [sys.executable, *args], env=dict(os.environ), path=str(ROOT))

    def end():
        if not child.ended.called:
            child.transport.signalProcess("KILL")
        return child.ended

    testcase.addCleanup(end)
    return child


class ServerProcess(_Listening):
    """
    A server run as C{twistd -n <plugin>} in a process of its own, on free
    ports, as production runs it.  What it printed is shown when a test
    using it fails to get it going.
    """

    def __init__(self, plugin, section, extra=()):
        self.port, self.http_port = free_port(), free_port()
        self._args = [
            os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=", plugin,
            "--config", str(STACK_CONFIG), *_free_ports(section, self.port, self.http_port),
            *TEST_SERVER_OPTIONS[section], *extra,
        ]
        self._child = ChildProcess()

    async def start(self, testcase, timeout=30.0):
        """Start it and wait until its C{/health} says every dependency answers; stopped after the test."""
        reactor.spawnProcess(self._child, self._args[0], self._args, env=dict(os.environ), path=str(ROOT))
        testcase.addCleanup(self.stop)

        async def healthy():
            if self._child.ended.called:
                raise AssertionError(f"the server exited at start:\n{self.output()}")
            try:
                status, _ = await http_get(f"http://127.0.0.1:{self.http_port}/health")
            except Exception:
                return False
            return status == 200

        try:
            await eventually(healthy, timeout)
        except AssertionError:
            raise AssertionError(f"the server did not become healthy:\n{self.output()}") from None
        return self

    def output(self):
        return "\n".join(self._child.lines())

    def kill(self):
        """End it at once (SIGKILL), as a crash would; a Deferred that fires when it is gone."""
        if not self._child.ended.called:
            self._child.transport.signalProcess("KILL")
        return self._child.ended

    def stop(self):
        """End it as an operator would (SIGTERM); a Deferred that fires when it is gone."""
        if not self._child.ended.called:
            self._child.transport.signalProcess("TERM")
        return self._child.ended

