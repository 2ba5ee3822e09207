"""
Helpers for the tests: settings from the shipped configuration, the local
stack (which `make test` starts and announces with DREAMRAID_STACK=1), free
ports, HTTP GETs and running the stack script.
"""

import json
import os
import socket
import sys
from pathlib import Path

from hypothesis import settings as hypothesis_settings
from twisted.internet import defer, reactor, task
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest
from twisted.web.client import Agent, readBody

from dreamraid.client import connect
from dreamraid.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "conf" / "dreamraid.ini"
STACK_SCRIPT = ROOT / "scripts" / "stack.sh"

hypothesis_settings.register_profile("dreamraid", deadline=None, max_examples=200)
hypothesis_settings.load_profile("dreamraid")


def make_settings(**overrides):
    """The shipped settings, with C{section_key=text} overrides."""
    parsed = {}
    for name, value in overrides.items():
        section, key = name.split("_", 1)
        parsed[section, key] = value
    return load_settings(CONFIG, parsed)


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


def python():
    """The interpreter running the tests (the project's venv)."""
    return sys.executable


class RunningServer:
    """A server service tree built by its tap and started in this process, on free ports."""

    def __init__(self, tap, section, extra=()):
        self.port, self.http_port = free_port(), free_port()
        options = tap.Options()
        options.parseOptions([
            "--config", str(CONFIG),
            f"--{section}-listen", f"tcp:{self.port}:interface=127.0.0.1",
            f"--{section}-http-listen", f"tcp:{self.http_port}:interface=127.0.0.1",
            *extra,
        ])
        self.service = tap.makeService(options, reactor)

    def start(self, testcase):
        self.service.startService()
        testcase.addCleanup(self.service.stopService)
        return self

    def health(self):
        return defer.Deferred.fromCoroutine(http_get(f"http://127.0.0.1:{self.http_port}/health"))

    async def client(self, testcase):
        client = await connect(reactor, "127.0.0.1", self.port)
        testcase.addCleanup(lambda: client.close() if client.connected else None)
        return client
