"""
A Locust load test of dreamraid, for teams that already use Locust: each
Locust user is a player on a plain blocking socket (no Twisted; under Locust
gevent makes it cooperative) who pings, lists their inventory and hunts, a
second or so apart.  Locust measures each request from sent to answered;
an error reply is a failure named by its error code (a hunt inside the
cooldown fails as C{HUNT_COOLDOWN}), as is a lost connection (the user logs
in again at its next task).

Frames are built and read with the construct schemas of
L{dreamraid.protocols.packets} (C{LENGTH_PREFIX}, C{FRAME_HEADER} and each
message's C{construct_encode} / C{construct_decode}): the reference codec, not
the generated one the servers use.

Tokens come the way players get them: at its first task each user
registers a fresh account (C{lc} and 16 hex digits) on the session server
named by Locust's host, logs in, enters the world and connects to the game
server that names, authenticating with the login token (each of these is a
request in Locust's statistics, and a failed one is tried again at the next
task); at its end it logs out, which writes its data back to MySQL.  The
accounts stay in the database.

Locust is not a project dependency: install it in a virtualenv of its own
with C{construct} (the one project dependency this module needs), put the
project on the path, and run against a running system (C{make run}: the
session server listens on 127.0.0.1:9091):

    python3 -m venv /tmp/locustenv && /tmp/locustenv/bin/pip install locust construct
    PYTHONPATH=. /tmp/locustenv/bin/locust -f bench/locustfile.py --headless \\
        --users 100 --spawn-rate 20 --run-time 1m --host 127.0.0.1:9091
"""

import random
import secrets
import socket
import time

from locust import User, between, task

from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets

SOCKET_TIMEOUT = 10.0


class ErrorReply(Exception):
    """The server answered with an error frame; the message is the code's name."""


class ConnectionClosed(Exception):
    """The server closed the connection; the message is its reason's code name, if it sent one."""


def code_name(code):
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)


def encode_frame(message, request_id, body):
    """A whole frame, length prefix included, built with the construct schemas."""
    payload = (packets.FRAME_HEADER.build({"message_id": message.id, "request_id": request_id})
               + message.construct_encode(body))
    return packets.LENGTH_PREFIX.build(len(payload)) + payload


class FrameSocket:
    """A blocking connection to a dreamraid server: one request at a time, the server's pings answered."""

    def __init__(self, host, port):
        self._socket = socket.create_connection((host, port), timeout=SOCKET_TIMEOUT)
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._stream = self._socket.makefile("rb")
        self._last_id = 0
        self._close_reason = None

    def request(self, message, body):
        """
        Send a request and read frames until its reply: C{(reply message, body,
        reply size in bytes)}, pushes answered or skipped meanwhile.
        """
        self._last_id += 1
        self._socket.sendall(encode_frame(message, self._last_id, body))
        while True:
            reply, request_id, reply_body, size = self._read_frame()
            if request_id == self._last_id:
                return reply, reply_body, size
            if request_id == 0 and reply is packets.PING:
                self._socket.sendall(encode_frame(packets.PONG, 0, reply_body))
            elif request_id == 0 and reply is packets.ERROR:
                self._close_reason = code_name(reply_body["code"])

    def _read_frame(self):
        prefix = self._read(packets.LENGTH_PREFIX.sizeof())
        payload = self._read(packets.LENGTH_PREFIX.parse(prefix))
        header = packets.FRAME_HEADER.parse(payload[:packets.FRAME_HEADER_SIZE])
        message = packets.MESSAGES[header.message_id]
        body = message.construct_decode(payload, packets.FRAME_HEADER_SIZE)
        return message, header.request_id, body, len(prefix) + len(payload)

    def _read(self, size):
        data = self._stream.read(size)
        if len(data) < size:
            raise ConnectionClosed(self._close_reason or "connection closed")
        return data

    def close(self):
        self._stream.close()
        self._socket.close()


def parse_host(host):
    """C{(host, port)} of Locust's host: C{HOST:PORT}, with or without a C{tcp://} in front."""
    address = host.removeprefix("tcp://")
    name, _, port = address.rpartition(":")
    return name, int(port)


class Player(User):
    """A player who registers, logs in, enters the world, then pings, lists the inventory and hunts."""

    host = "127.0.0.1:9091"
    wait_time = between(0.5, 1.5)

    def on_start(self):
        self.credentials = {"name": f"lc{secrets.token_hex(8)}", "password": secrets.token_hex(12)}
        self.registered = False
        self.game = None

    def on_stop(self):
        if self.game is not None:
            try:
                self._timed(self.game, "game", packets.LOGOUT, {})
            finally:
                self.game.close()

    def _enter(self):
        """
        Register (the first time), log in, enter the world and authenticate on
        the game server it names; the game connection.
        """
        session = FrameSocket(*parse_host(self.host))
        try:
            if not self.registered:
                self._timed(session, "session", packets.REGISTER, self.credentials)
                self.registered = True
            logged_in = self._timed(session, "session", packets.LOGIN, self.credentials)
            world = self._timed(session, "session", packets.ENTER_WORLD, {"token": logged_in["token"]})
        finally:
            session.close()
        game = FrameSocket(world["host"], world["port"])
        try:
            self._timed(game, "game", packets.AUTHENTICATE, {"token": logged_in["token"]})
        except Exception:
            game.close()
            raise
        return game

    def _play(self, message, body):
        """One request on the game server, entering the world first if there is no connection yet or any more."""
        try:
            if self.game is None:
                self.game = self._enter()
            self._timed(self.game, "game", message, body)
        except (ConnectionClosed, OSError):
            if self.game is not None:
                self.game.close()
            self.game = None
        except ErrorReply:
            pass  # reported to Locust as a failure already

    def _timed(self, connection, request_type, message, body):
        """
        Send a request and report it to Locust: its reply's body, or the
        exception that failed it (L{ErrorReply} for an error frame).
        """
        started = time.perf_counter()
        reply_body, size, exception = None, 0, None
        try:
            reply, reply_body, size = connection.request(message, body)
            if reply is packets.ERROR:
                exception = ErrorReply(code_name(reply_body["code"]))
        except (ConnectionClosed, OSError) as e:
            exception = e
        self.environment.events.request.fire(
            request_type=request_type, name=message.name, response_time=(time.perf_counter() - started) * 1000,
            response_length=size, exception=exception, context={})
        if exception is not None:
            raise exception
        return reply_body

    @task
    def ping(self):
        self._play(packets.PING, {"nonce": random.getrandbits(32)})

    @task
    def list_inventory(self):
        self._play(packets.LIST_INVENTORY, {})

    @task
    def hunt(self):
        self._play(packets.HUNT, {"monster": random.randint(1, 5)})
