"""
C{scripts/stack.sh} beside another stack: it reuses only the servers of its
own data directory (C{DREAMRAID_VAR}) and refuses, in one line naming the
other stack's directory, ports held by anything else; a second stack on
other ports (C{DREAMRAID_CONFIG}) comes up, migrates its own MariaDB and goes
down while the first keeps running.  And the shipped second-stack example
differs from C{conf/dreamraid.ini} only in its addresses.
"""

import configparser
import dataclasses
import os
import random
import shutil
import socket
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, reactor, threads
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from dreamraid.config import load_settings, shell_assignments
from dreamraid.services.database import connect
from dreamraid.services.migrations import load_migrations
from tests.cluster import node_command
from tests.support import (
    CONFIG, ROOT, STACK_CONFIG, STACK_SCRIPT, eventually, http_get, make_settings, require_stack,
)

EXAMPLE = ROOT / "conf" / "examples" / "second-stack.ini"

# The settings that hold an address; everything else must be the same in both files.
ADDRESSES = {
    ("game", "listen"), ("game", "http_listen"), ("game", "udp_port"),
    ("session", "listen"), ("session", "http_listen"), ("session", "game_servers"),
    ("redis", "startup_nodes"), ("mysql", "port"),
}


def _ports(settings):
    """Every TCP port a stack of C{settings} listens on, cluster bus ports (port + 10000) included."""
    redis = [port for _, port in settings.redis.startup_nodes]
    listens = [settings.game.listen, settings.game.http_listen, settings.session.listen, settings.session.http_listen]
    return {*redis, *(port + 10000 for port in redis), settings.mysql.port,
            *(int(listen.split(":")[1]) for listen in listens)}


class ExampleConfigTests(TestCase):
    """conf/examples/second-stack.ini, the documented second stack."""

    def test_only_addresses_differ(self):
        """It loads, and every setting but the addresses equals the shipped one (the files cannot drift)."""
        shipped, example = load_settings(CONFIG), load_settings(EXAMPLE)
        differ = [
            f"{section.name}.{field.name}"
            for section in dataclasses.fields(shipped) if section.name != "path"
            for field in dataclasses.fields(getattr(shipped, section.name))
            if (section.name, field.name) not in ADDRESSES
            and getattr(getattr(example, section.name), field.name) != getattr(getattr(shipped, section.name), field.name)
        ]
        self.assertEqual(differ, [])

    def test_no_port_shared(self):
        """No port of the example, cluster bus ports included, is one of the shipped stack's."""
        shipped, example = load_settings(CONFIG), load_settings(EXAMPLE)
        self.assertEqual(_ports(shipped) & _ports(example), set())
        self.assertNotEqual(shipped.game.udp_port, example.game.udp_port)
        self.assertEqual(example.session.game_servers, (("127.0.0.1", 9290),))  # its own game server


    def test_shell_addresses(self):
        """The shell assignments run.sh prints its servers' addresses from are the configuration's."""
        text = shell_assignments(load_settings(EXAMPLE))
        for line in ["SESSION_ADDRESS=127.0.0.1:9291", "SESSION_HTTP_ADDRESS=127.0.0.1:9391",
                     "GAME_ADDRESS=127.0.0.1:9290", "GAME_HTTP_ADDRESS=127.0.0.1:9390", "GAME_UDP_PORT=50100",
                     "MYSQL_PORT=3308", "REDIS_NODES='127.0.0.1:7100 127.0.0.1:7101"]:
            self.assertIn(f"\n{line}", f"\n{text}")


class _Script(ProcessProtocol):
    """What a run of the stack script printed, and how it ended."""

    def __init__(self):
        self.out, self.err = [], []
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.out.append(data)

    def errReceived(self, data):
        self.err.append(data)

    def processEnded(self, reason):
        code = reason.value.exitCode if isinstance(reason.value, ProcessTerminated) else 0
        self.ended.callback((b"".join(self.out).decode(), b"".join(self.err).decode(), code))

    def output(self):
        """All it printed so far, both streams."""
        return b"".join(self.out + self.err).decode(errors="replace")


async def run_stack(command, config, var, timeout=90.0):
    """C{(stdout, stderr, exit code)} of C{scripts/stack.sh command} for the stack of C{config} and C{var}."""
    env = dict(os.environ, DREAMRAID_CONFIG=str(config), DREAMRAID_VAR=str(var))
    script = _Script()
    reactor.spawnProcess(script, "/bin/bash", ["/bin/bash", str(STACK_SCRIPT), command], env=env, path=str(ROOT))
    timer = reactor.callLater(timeout, script.transport.signalProcess, "KILL")
    try:
        return await script.ended
    finally:
        if timer.active():
            timer.cancel()


def _bindable(port):
    """True when nothing listens on TCP port C{port} (connections in TIME_WAIT are no bar, as to a server)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def second_stack_ports():
    """
    C{base}: ports C{base} to C{base + 10} are free, and so are the cluster
    bus ports C{base + 10000} to C{base + 10005}; all below the ephemeral
    range, well away from the shipped stack's.
    """
    for _ in range(200):
        base = random.randrange(20000, 22000)
        if all(map(_bindable, [*range(base, base + 11), *range(base + 10000, base + 10006)])):
            return base
    raise AssertionError("found no free ports for a second stack")


def write_second_config(path, base):
    """A configuration at C{path} that includes the stack's and moves every address to C{base}'s free ports."""
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00")
    parser["include"] = {"base": str(Path(STACK_CONFIG).resolve())}  # its relative paths stay the base's
    parser["redis"] = {"startup_nodes": ",".join(f"127.0.0.1:{base + i}" for i in range(6))}
    parser["mysql"] = {"port": str(base + 6)}
    parser["game"] = {"listen": f"tcp:{base + 7}:interface=127.0.0.1",
                      "http_listen": f"tcp:{base + 8}:interface=127.0.0.1", "udp_port": str(base + 7)}
    parser["session"] = {"listen": f"tcp:{base + 9}:interface=127.0.0.1",
                         "http_listen": f"tcp:{base + 10}:interface=127.0.0.1",
                         "game_servers": f"127.0.0.1:{base + 7}"}
    with open(path, "w", encoding="utf-8") as f:
        parser.write(f)


def _thd_tables(mysql):
    """The tables of the configured database, and the highest schema version applied to it."""
    with connect(mysql) as connection, connection.cursor() as cursor:
        cursor.execute("SHOW TABLES")
        tables = {name for (name,) in cursor.fetchall()}
        version = None
        if "schema_version" in tables:
            cursor.execute("SELECT MAX(version) FROM schema_version")
            [(version,)] = cursor.fetchall()
        return tables, version


def _thd_server(mysql):
    """C{(the server's data directory, seconds it has been up)}: who answers at these settings."""
    with connect(mysql) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT @@datadir")
        [(datadir,)] = cursor.fetchall()
        cursor.execute("SHOW GLOBAL STATUS LIKE 'Uptime'")
        [(_, uptime)] = cursor.fetchall()
        return datadir, int(uptime)


def _in_thread(f, *args):
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)


class SecondStackTests(TestCase):
    """A second stack started by scripts/stack.sh while the stack under test runs (about 15 s)."""

    _log = Logger()

    def setUp(self):
        require_stack()
        self.settings = make_settings()
        # Short: MariaDB's socket goes in it, and a socket path holds at most 107 bytes.
        self.var = tempfile.mkdtemp(prefix="dreamraid-stack-")
        self.addCleanup(shutil.rmtree, self.var, ignore_errors=True)

    async def running_stack(self):
        """The running stack's data directory (as its first Redis node says), and its MariaDB's data directory."""
        [_, redis_dir] = await node_command(self.settings.redis.startup_nodes[0], "CONFIG", "GET", "dir")
        datadir, _ = await _in_thread(_thd_server, self.settings.mysql)
        return redis_dir.decode().rsplit("/redis/", 1)[0], datadir

    async def test_same_ports_refused(self):
        """
        With the running stack's ports but another data directory, `ensure`
        fails at once with one line naming the running stack's directory, and
        starts, stops and migrates nothing.
        """
        running_var, datadir = await self.running_stack()
        pids = {port: await node_command(("127.0.0.1", port), "INFO", "server")
                for _, port in self.settings.redis.startup_nodes}
        _, uptime = await _in_thread(_thd_server, self.settings.mysql)
        started = time.monotonic()
        out, err, code = await run_stack("ensure", STACK_CONFIG, self.var, timeout=30)
        elapsed = time.monotonic() - started
        self.assertNotEqual(code, 0, err)
        self.assertEqual(out, "")
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn(f"the stack in {running_var}", err)
        self.assertIn("DREAMRAID_VAR", err)
        self.assertIn("DREAMRAID_CONFIG", err)
        self.assertLess(elapsed, 10, err)
        self.assertEqual(os.listdir(self.var), [], "it began a stack of its own")
        # The running stack is the same processes as before, still serving.
        for port, info in pids.items():
            self.assertEqual(_process_id(await node_command(("127.0.0.1", port), "INFO", "server")),
                             _process_id(info))
        now_datadir, now_uptime = await _in_thread(_thd_server, self.settings.mysql)
        self.assertEqual(now_datadir, datadir)
        self.assertGreaterEqual(now_uptime, uptime)

    async def test_second_stack_on_other_ports(self):
        """
        On other ports, a second stack comes up beside the running one,
        migrates its own MariaDB (the running one's is left as it was),
        answers, and goes down, leaving its ports free.
        """
        base = second_stack_ports()
        config = os.path.join(self.var, "second.ini")
        write_second_config(config, base)
        second = load_settings(config)
        before = await _in_thread(_thd_tables, self.settings.mysql)
        _, uptime = await _in_thread(_thd_server, self.settings.mysql)

        async def down():
            await run_stack("down", config, self.var)

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(down()))
        started = time.monotonic()
        out, err, code = await run_stack("ensure", config, self.var)
        self._log.info("second stack up in {seconds:.1f} s", seconds=time.monotonic() - started)
        self.assertEqual((code, out), (0, "started\n"), err)

        tables, version = await _in_thread(_thd_tables, second.mysql)
        self.assertEqual(version, max(m.version for m in load_migrations()), err)
        self.assertIn("users", tables)
        datadir, _ = await _in_thread(_thd_server, second.mysql)
        self.assertEqual(os.path.realpath(datadir), os.path.realpath(os.path.join(self.var, "mysql", "data")))
        self.assertEqual(await _in_thread(_thd_tables, self.settings.mysql), before)
        _, now_uptime = await _in_thread(_thd_server, self.settings.mysql)
        self.assertGreaterEqual(now_uptime, uptime)

        out, err, code = await run_stack("ensure", config, self.var)
        self.assertEqual((code, out), (0, "reused\n"), err)
        for host, port in second.redis.startup_nodes:
            info = (await node_command((host, port), "CLUSTER", "INFO")).decode()
            self.assertIn("cluster_state:ok", info)
            [_, redis_dir] = await node_command((host, port), "CONFIG", "GET", "dir")
            self.assertEqual(os.path.realpath(redis_dir.decode()), os.path.realpath(f"{self.var}/redis/{port}"))

        pids = [int(open(f"{self.var}/redis/{port}/redis.pid").read()) for _, port in second.redis.startup_nodes]
        pids.append(int(open(f"{self.var}/mysql/mysqld.pid").read()))
        out, err, code = await run_stack("down", config, self.var)
        self.assertEqual(code, 0, err)
        for pid in pids:
            self.assertFalse(_running(pid), f"pid {pid} still runs")
        for port in _ports(second):
            self.assertTrue(_bindable(port), f"port {port} still taken")
        # The running stack still answers.
        self.assertEqual(await _in_thread(_thd_tables, self.settings.mysql), before)


    async def test_make_run_takes_the_config(self):
        """
        `make run` (scripts/run.sh) with a second stack's configuration starts
        that stack, its servers on that configuration's ports and the demo's
        bots against them; stopped (SIGTERM, as Ctrl-C), it stops them all.
        """
        base = second_stack_ports()
        config = os.path.join(self.var, "second.ini")
        write_second_config(config, base)
        second = load_settings(config)

        async def down():
            await run_stack("down", config, self.var)

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(down()))
        run = _Script()
        env = dict(os.environ, DREAMRAID_CONFIG=config, DREAMRAID_VAR=self.var, DREAMRAID_DEMO="1")
        reactor.spawnProcess(run, "/bin/bash", ["/bin/bash", str(ROOT / "scripts" / "run.sh")], env=env, path=str(ROOT))

        def kill():
            if not run.ended.called:
                run.transport.signalProcess("KILL")
            return run.ended

        self.addCleanup(kill)

        async def serving():
            if run.ended.called:
                raise AssertionError(f"run.sh exited:\n{run.output()}")
            return "run: serving" in run.output()

        started = time.monotonic()
        await eventually(serving, timeout=90)
        self._log.info("make run served its demo in {seconds:.1f} s", seconds=time.monotonic() - started)
        output = run.output()
        self.assertIn("bots: 4 played, 0 failed", output)
        session_http = f"127.0.0.1:{base + 10}"
        self.assertIn(f"run: session server on 127.0.0.1:{base + 9} (health: http://{session_http}/health)", output)
        self.assertIn(f"--config {config}", output)
        for http in (session_http, f"127.0.0.1:{base + 8}"):
            status, _ = await http_get(f"http://{http}/health")
            self.assertEqual(status, 200)
        datadir, _ = await _in_thread(_thd_server, second.mysql)
        self.assertEqual(os.path.realpath(datadir), os.path.realpath(os.path.join(self.var, "mysql", "data")))

        run.transport.signalProcess("TERM")
        _, _, code = await run.ended
        self.assertEqual(code, 0, run.output())
        self.assertIn("stack: stopped", run.output())
        for port in _ports(second):
            self.assertTrue(_bindable(port), f"port {port} still taken")


def _process_id(info):
    return next(line for line in info.decode().splitlines() if line.startswith("process_id:"))


def _running(pid):
    """True while process C{pid} runs (a zombie waiting for init to reap it has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
