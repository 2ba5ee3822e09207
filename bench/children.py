"""
Processes of a benchmark run: each connects first and prints "ready", waits
for a "go" line on its standard input, and ends with "done" and a JSON
object; servers print nothing and are only started and ended.
"""

import json
import os
import sys

from twisted.internet import defer, protocol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Child(protocol.ProcessProtocol):
    """A process of the run: "ready", then "go", then "done {json}"."""

    def __init__(self, reports):
        self.ready, self.done, self.exited = defer.Deferred(), defer.Deferred(), defer.Deferred()
        self.reports = reports
        self.result = None
        self._buffer = b""

    def outReceived(self, data):
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            word, _, rest = line.decode().partition(" ")
            if word == "ready":
                self.ready.callback(None)
            elif word == "done":
                self.result = json.loads(rest)
                self.done.callback(None)

    def errReceived(self, data):
        sys.stderr.write(data.decode(errors="replace"))

    def processEnded(self, reason):
        self.exited.callback(None)
        for waiting in (self.ready, self.done) if self.reports else ():
            if not waiting.called:
                waiting.errback(RuntimeError(f"a bench process ended early: {reason.value}"))


def start(reactor, *args, executable=sys.executable, reports=True):
    """Start C{executable args} in the project root; its L{Child}."""
    child = Child(reports)
    reactor.spawnProcess(child, executable, [executable, *args], env=None, path=ROOT)
    return child



def say(children, word):
    """Send C{word} as a line to every child."""
    for child in children:
        child.transport.write(word.encode() + b"\n")
