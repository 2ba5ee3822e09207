"""
Settings: ``conf/dreamraid.ini`` read into typed, validated, frozen objects.

The shipped ini file holds every setting; this module holds only their types, rules and
help text, so there is one place for each default.  A setting can be
overridden on the command line (``--section-key value``); an unknown or invalid
setting raises L{ConfigError} naming it, which stops start-up.

Relative paths in the file are resolved against the file's own directory,
those given on the command line against the current directory.

A file may hold only some settings and name the file it changes in
``[include] base = PATH``: it is read over that one (a second local stack's
config changes only the addresses; ``conf/examples/second-stack.ini``).  A
relative path setting is resolved against the directory of the file that set it.

Run as ``python -m dreamraid.config shell [path]`` it prints the stack's
settings and the servers' addresses as shell assignments, for
``scripts/stack.sh`` and ``scripts/run.sh``.
"""

import configparser
import dataclasses
import shlex
import sys
from pathlib import Path

from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from dreamraid.tables import TableError, load_tables

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "conf" / "dreamraid.ini"
# The largest finite float32, the type of a position's coordinates on the wire.
FLOAT32_MAX = 3.4028234663852886e38


class ConfigError(Exception):
    """A setting is missing, unknown or invalid; the message names it."""


# -- value parsers: text -> typed value, ValueError with a reason otherwise ----


_KIND_TEXT = {int: "a whole number", float: "a number"}


def _number(kind, low=None, high=None):
    def parse(text, base):
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"expected {_KIND_TEXT[kind]}, got {text!r}") from None
        # Written so that NaN, which compares false with everything, is out of range too.
        if (low is not None and not value >= low) or (high is not None and not value <= high):
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    parse.kind = kind.__name__
    return parse


def _text(text, base):
    if not text:
        raise ValueError("must not be empty")
    return text


_text.kind = "text"


def _optional_text(text, base):
    return text


_optional_text.kind = "text"


def _server_endpoint(text, base):
    try:
        serverFromString(None, text)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"not a server endpoint description: {text!r} ({e})") from None
    return text


_server_endpoint.kind = "endpoint"


def _host_port(text):
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {text!r}")
    return host, _number(int, 1, 65535)(port, None)


def _host_ports(text, base):
    nodes = tuple(_host_port(part) for part in text.split(",") if part.strip())
    if not nodes:
        raise ValueError("needs at least one host:port")
    return nodes


_host_ports.kind = "host:port,..."


def _rates(text, base):
    """C{*=20/40 hunt=2/4}: requests a second and burst, by message name (C{*}: every other); C{off}: none."""
    from dreamraid.protocols.packets import MESSAGES_BY_NAME

    if text.strip() == "off":
        return {}
    rates = {}
    for part in text.split():
        name, sep, rate = part.partition("=")
        if not sep or rate.strip() == "off":
            raise ValueError(f"expected name=per_second/burst, got {part!r}")
        if name != "*" and name not in MESSAGES_BY_NAME:
            raise ValueError(f"no message is named {name!r}")
        rates[name] = _rate(rate, base)
    if not rates:
        raise ValueError("needs name=per_second/burst pairs, or off")
    return rates


_rates.kind = "name=per_second/burst ...|off"


def _rate(text, base):
    """C{per_second/burst}, or C{off}: None."""
    from dreamraid.services.limits import Rate

    if text.strip() == "off":
        return None
    per_second, slash, burst = text.partition("/")
    if not slash:
        raise ValueError(f"expected per_second/burst or off, got {text!r}")
    return Rate(_number(float, 0.001, 1e9)(per_second, None), _number(float, 1, 1e9)(burst, None))


_rate.kind = "per_second/burst|off"


def _path(text, base):
    if not text:
        raise ValueError("must not be empty")
    return (base / text).resolve()


_path.kind = "path"


def _optional_texts(text, base):
    return tuple(part.strip() for part in text.split(",") if part.strip())


_optional_texts.kind = "text,... (or nothing)"


def _optional_paths(text, base):
    return tuple((base / part).resolve() for part in _optional_texts(text, base))


_optional_paths.kind = "path,... (or nothing)"


def _choice(*choices):
    def parse(text, base):
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {text!r}")
        return text

    parse.kind = "|".join(choices)
    return parse


def setting(parse, help):
    """Declare a field of a settings section."""
    return dataclasses.field(metadata={"parse": parse, "help": help})


# -- sections -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """The client-facing side of a server process."""

    listen: str = setting(_server_endpoint, "client TCP endpoint")
    http_listen: str = setting(_server_endpoint, "HTTP endpoint serving /health and /metrics")
    max_frame_size: int = setting(
        _number(int, 16, 65535), "largest frame accepted, in bytes after the length"
    )
    ping_interval: float = setting(_number(float, 0.05, 60.0), "seconds between server pings")
    idle_timeout: float = setting(
        _number(float, 0.1, 3600.0), "seconds of silence before a connection is dropped"
    )
    auth_timeout: float = setting(
        _number(float, 0.1, 3600.0), "seconds a connection may stay unauthenticated"
    )
    metrics: str = setting(_choice("on", "off"), "Prometheus metrics at /metrics on the HTTP endpoint (on or off)")
    rate_limits: dict = setting(_rates, "requests a second and burst a connection may send, by message (or off)")
    frame_rate: object = setting(
        _rate, "frames a second and burst a connection is read at; past it reading waits for the budget (or off)"
    )
    rate_limited_drop: int = setting(
        _number(int, 1, 1_000_000), "rate-limited requests in a row after which a connection is closed"
    )
    connections_per_address: int = setting(
        _number(int, 0, 1_000_000), "connections one client address may hold (0: no cap)"
    )
    slow_reader_timeout: float = setting(
        _number(float, 0.1, 3600.0), "seconds a connection may leave its replies unread before it is dropped"
    )
    write_buffer_limit: int = setting(
        _number(int, 1024, 2**31), "bytes written to a connection that reads nothing before it is dropped"
    )

    def check(self):
        if self.idle_timeout <= self.ping_interval:
            raise ConfigError(
                "idle_timeout: must be longer than ping_interval "
                f"({self.idle_timeout} <= {self.ping_interval})"
            )


@dataclasses.dataclass(frozen=True)
class GameSettings(ServerSettings):
    """A game server: the client side plus real-time UDP."""

    presence_ttl: float = setting(
        _number(float, 1.0, 3600.0), "seconds a player's presence lasts unless this server renews it"
    )
    resume_grace: float = setting(
        _number(float, 0.0, 3600.0), "seconds a player whose connection dropped stays away, all kept, for a resume"
    )
    dev_grant: str = setting(_choice("on", "off"), "the development-only grant command (on or off)")
    udp_interface: str = setting(_text, "address the raid UDP socket binds")
    udp_port: int = setting(_number(int, 0, 65535), "raid UDP port (0: any free one)")
    public_host: str = setting(_text, "host name or address clients reach this server at (raid handoffs and UDP)")


@dataclasses.dataclass(frozen=True)
class SessionSettings(ServerSettings):
    """The session server: the client side plus where it sends players."""

    game_servers: tuple = setting(_host_ports, "game servers handed to players who enter the world (those alive)")
    board_check_interval: float = setting(
        _number(float, 0.1, 86400.0), "seconds between checks that Redis still has the ranking board"
    )
    registrations_per_address: int = setting(
        _number(int, 0, 1_000_000), "accounts one client address may create per registration_window (0: no cap)"
    )
    registration_window: float = setting(_number(float, 1.0, 86400.0), "seconds of the per-address registration window")


@dataclasses.dataclass(frozen=True)
class AccountSettings:
    """Password hashing and login throttling."""

    scrypt_n: int = setting(_number(int, 2, 2**20), "scrypt cost (a power of two)")
    scrypt_r: int = setting(_number(int, 1, 64), "scrypt block size")
    scrypt_p: int = setting(_number(int, 1, 16), "scrypt parallelism")
    failures_per_account: int = setting(_number(int, 1, 1000000), "failed logins of one account per window")
    account_window: float = setting(_number(float, 1.0, 86400.0), "seconds of the per-account window")
    failures_per_address: int = setting(_number(int, 1, 1000000), "failed logins from one address per window")
    address_window: float = setting(_number(float, 1.0, 86400.0), "seconds of the per-address window")

    def check(self):
        if self.scrypt_n & (self.scrypt_n - 1):
            raise ConfigError(f"scrypt_n: must be a power of two, got {self.scrypt_n}")


@dataclasses.dataclass(frozen=True)
class SyncSettings:
    """The sync jobs from Redis back to MySQL."""

    prefix: str = setting(_text, "prefix of the sync keys (servers that share a cluster and a database share it)")
    ranking_prefix: str = setting(_text, "prefix of the ranking board's keys (shared like the sync prefix)")
    session_ttl: float = setting(
        _number(float, 10.0, 86400.0), "seconds a live session lasts unless a game server renews it"
    )
    shards: int = setting(_number(int, 1, 1024), "sync streams (spread over the masters)")
    batch_users: int = setting(_number(int, 1, 100000), "users written in one MySQL transaction, at most")
    batch_wait: float = setting(_number(float, 0.001, 60.0), "seconds between reads while no jobs arrive")
    batches_in_flight: int = setting(_number(int, 1, 64), "batches synced at once by one worker")
    claim_idle: float = setting(_number(float, 0.01, 86400.0), "seconds a job may stay unacknowledged before another worker takes it")
    claim_interval: float = setting(_number(float, 0.01, 3600.0), "seconds between looks for such jobs")
    max_deliveries: int = setting(
        _number(int, 1, 1000), "deliveries of a job that fails alone before it is moved to the dead-letter stream"
    )
    checkpoint_interval: float = setting(_number(float, 0.1, 86400.0), "seconds between checkpoints of live users")
    retry_backoff: float = setting(_number(float, 0.001, 60.0), "first pause after a failed batch, seconds (doubles)")
    retry_backoff_max: float = setting(_number(float, 0.001, 600.0), "longest pause after a failed batch, seconds")


@dataclasses.dataclass(frozen=True)
class RedisSettings:
    """How to reach the Redis Cluster."""

    startup_nodes: tuple = setting(_host_ports, "cluster nodes to discover the topology from")
    connect_timeout: float = setting(_number(float, 0.01, 60.0), "seconds to open a connection")
    command_timeout: float = setting(_number(float, 0.01, 60.0), "deadline of one call, seconds")
    max_in_flight: int = setting(_number(int, 1, 100000), "calls sent to one master and not yet answered, at most")
    max_waiting: int = setting(_number(int, 0, 1000000), "calls waiting for room at one master, at most")
    refresh_interval: float = setting(_number(float, 0.1, 3600.0), "seconds between routine slot-table reads")
    retry_backoff: float = setting(_number(float, 0.001, 10.0), "first pause before a retry, seconds (doubles)")
    retry_backoff_max: float = setting(_number(float, 0.001, 10.0), "longest pause before a retry, seconds")


@dataclasses.dataclass(frozen=True)
class MysqlSettings:
    """How the session server reaches MariaDB/MySQL."""

    host: str = setting(_text, "server address")
    port: int = setting(_number(int, 1, 65535), "server port")
    user: str = setting(_text, "user name")
    password: str = setting(_optional_text, "password")
    database: str = setting(_text, "database name")
    pool_min: int = setting(_number(int, 1, 100), "connections kept open")
    pool_max: int = setting(_number(int, 1, 100), "connections at most")
    connect_timeout: float = setting(_number(float, 0.1, 60.0), "seconds to connect")
    read_timeout: float = setting(_number(float, 0.1, 3600.0), "seconds a query may take before it fails")

    def check(self):
        if self.pool_min > self.pool_max:
            raise ConfigError(f"pool_min: must not exceed pool_max ({self.pool_min} > {self.pool_max})")


@dataclasses.dataclass(frozen=True)
class TokenSettings:
    """JWTs: minted by the session server, verified by game servers."""

    algorithm: str = setting(_choice("EdDSA", "HS256"), "signature algorithm")
    issuer: str = setting(_text, "iss claim")
    audience: str = setting(_text, "aud claim")
    ttl: int = setting(_number(int, 10, 86400), "seconds a token lives")
    refresh_ttl: int = setting(_number(int, 60, 31622400),
                               "seconds a refresh token lives (session server only; each refresh issues a new one)")
    private_key: Path = setting(_path, "EdDSA signing key (session server only)")
    public_key: Path = setting(_path, "EdDSA verifying key")
    secret: str = setting(_optional_text, "shared secret, HS256 only")
    other_public_keys: tuple = setting(
        _optional_paths, "EdDSA verifying keys accepted besides public_key (a key rotation's next or previous)")
    other_secrets: tuple = setting(_optional_texts, "HS256 secrets accepted besides secret (a rotation's)")

    def check(self):
        if self.refresh_ttl <= self.ttl:
            raise ConfigError(f"refresh_ttl: must be longer than ttl, the access token's life "
                              f"({self.refresh_ttl} <= {self.ttl})")
        if self.algorithm == "HS256" and len(self.secret) < 32:
            raise ConfigError("secret: HS256 needs a secret of at least 32 characters")
        if self.algorithm == "HS256" and any(len(other) < 32 for other in self.other_secrets):
            raise ConfigError("other_secrets: each needs at least 32 characters")


@dataclasses.dataclass(frozen=True)
class TablesSettings:
    """Where the game tables live."""

    path: Path = setting(_path, "JSON file of the game tables")

    def check(self):
        try:
            load_tables(self.path)
        except TableError as e:
            raise ConfigError(f"path: {e}") from None


@dataclasses.dataclass(frozen=True)
class RaidSettings:
    """Parties, matchmaking and the raid."""

    raid_size: int = setting(_number(int, 1, 8), "players in a raid, and the most in a party")
    time_limit: float = setting(_number(float, 1.0, 3600.0), "seconds a raid's fight lasts at most")
    ready_grace: float = setting(_number(float, 0.0, 600.0), "seconds a formed raid waits for its players to be ready")
    boss_hp: int = setting(_number(int, 1, 10**9), "the boss's hit points")
    hit_interval: float = setting(_number(float, 0.0, 60.0), "seconds a player must wait between two hits")
    widen_after: float = setting(
        _number(float, 0.0, 3600.0), "seconds a ticket waits before it may match the neighbouring level group"
    )
    match_interval: float = setting(
        _number(float, 0.05, 60.0), "seconds between each game server's matchmaking passes (besides one per ticket)"
    )
    host_lease: float = setting(
        _number(float, 1.0, 600.0), "seconds a raid's host stays alive without renewing; then its raids fail"
    )
    matchmaking_prefix: str = setting(_text, "hash tag of the matchmaking keys (servers that share a cluster share it)")
    datagram_rate: object = setting(
        _rate, "UDP datagrams a second and burst one raid member may send, hellos and positions together; "
        "the excess is dropped and counted (or off)"
    )
    world_bound: float = setting(
        _number(float, 1.0, FLOAT32_MAX), "a position's x and y must lie within -world_bound..world_bound, "
        "or it is dropped and counted"
    )


SECTIONS = {
    "game": GameSettings,
    "session": SessionSettings,
    "accounts": AccountSettings,
    "sync": SyncSettings,
    "redis": RedisSettings,
    "mysql": MysqlSettings,
    "tokens": TokenSettings,
    "tables": TablesSettings,
    "raids": RaidSettings,
}
GAME_SECTIONS = ("game", "sync", "redis", "tokens", "tables", "raids")
SESSION_SECTIONS = ("session", "accounts", "sync", "redis", "mysql", "tokens")


@dataclasses.dataclass(frozen=True)
class Settings:
    """All sections of one configuration file."""

    path: Path
    game: GameSettings
    session: SessionSettings
    accounts: AccountSettings
    sync: SyncSettings
    redis: RedisSettings
    mysql: MysqlSettings
    tokens: TokenSettings
    tables: TablesSettings
    raids: RaidSettings


def option_name(section, key):
    """The command-line option that overrides C{[section] key}."""
    return f"{section}-{key}".replace("_", "-")


def _build_section(section, cls, raw, overrides):
    """C{cls} from C{raw} (C{{key: (text, directory of the file that set it)}}) under C{overrides}."""
    values = {}
    for f in dataclasses.fields(cls):
        if (section, f.name) in overrides:
            text, where, relative_to = overrides[section, f.name], f"--{option_name(section, f.name)}", Path.cwd()
        elif f.name in raw:
            (text, relative_to), where = raw[f.name], f"[{section}] {f.name}"
        else:
            raise ConfigError(f"setting {section}.{f.name} is missing")
        try:
            values[f.name] = f.metadata["parse"](text.strip(), relative_to)
        except ValueError as e:
            raise ConfigError(f"setting {section}.{f.name} ({where}): {e}") from None
    unknown = sorted(set(raw) - set(values))
    if unknown:
        raise ConfigError(f"unknown setting {section}.{unknown[0]}")
    built = cls(**values)
    check = getattr(built, "check", None)
    if check is not None:
        try:
            check()
        except ConfigError as e:
            raise ConfigError(f"setting {section}.{e}") from None
    return built


# The section a file names the file it changes in (C{base = PATH}); not a section of settings.
INCLUDE = "include"


def _read_layers(path, including=()):
    """
    The settings of the file C{path} over those of its C{[include] base}:
    C{{section: {key: (text, directory of the file that set it)}}}.
    """
    if path in including:
        raise ConfigError(f"configuration file {path} includes itself")
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00")
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(f"cannot read configuration file {path}: {e.strerror}") from None
    except configparser.Error as e:
        raise ConfigError(f"configuration file {path} is malformed: {e}") from None
    unknown = sorted(set(parser.sections()) - set(SECTIONS) - {INCLUDE})
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}] in {path}")
    layers = {}
    if parser.has_section(INCLUDE):
        include = dict(parser[INCLUDE])
        if set(include) != {"base"}:
            raise ConfigError(f"setting include.base: [include] in {path} takes only base = PATH")
        layers = _read_layers((path.parent / include["base"].strip()).resolve(), (*including, path))
    for section in parser.sections():
        if section != INCLUDE:
            layers.setdefault(section, {}).update((key, (text, path.parent)) for key, text in parser[section].items())
    return layers


def load_settings(path=DEFAULT_PATH, overrides=None):
    """
    Read and validate a configuration file (over the one it includes, if any).

    @param overrides: C{{(section, key): text}} applied over the file.
    @raise ConfigError: naming the first bad, missing or unknown setting.
    """
    path = Path(path).resolve()
    layers = _read_layers(path)
    overrides = overrides or {}
    sections = {name: _build_section(name, cls, layers.get(name, {}), overrides) for name, cls in SECTIONS.items()}
    return Settings(path=path, **sections)


def settings_options(server_name, sections):
    """
    A twistd L{usage.Options} class: C{--config} plus one option per setting
    of C{sections}; after parsing, C{options["settings"]} is a L{Settings}.
    """
    params = [["config", "c", str(DEFAULT_PATH), "configuration file"]]
    for section in sections:
        for f in dataclasses.fields(SECTIONS[section]):
            kind = f.metadata["parse"].kind
            params.append([option_name(section, f.name), None, None, f"{f.metadata['help']} ({kind})"])

    class Options(usage.Options):
        synopsis = f"[options]   (runs the dreamraid {server_name})"
        optParameters = params

        def postOptions(self):
            overrides = {
                (section, f.name): self[option_name(section, f.name)]
                for section in sections
                for f in dataclasses.fields(SECTIONS[section])
                if self[option_name(section, f.name)] is not None
            }
            try:
                self["settings"] = load_settings(self["config"], overrides)
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None

    return Options


def _client_address(listen):
    """C{host:port} a client on this host reaches the endpoint C{listen} at, or C{listen} itself if that cannot be told."""
    from dreamraid.client.session import listen_address

    try:
        host, port = listen_address(listen)
    except ValueError:
        return listen
    return f"{host}:{port}"


def shell_assignments(settings):
    """The stack's settings, and the servers' addresses, as lines of C{NAME='value'} for a shell to eval."""
    m = settings.mysql
    values = {
        "REDIS_NODES": " ".join(f"{h}:{p}" for h, p in settings.redis.startup_nodes),
        "MYSQL_HOST": m.host,
        "MYSQL_PORT": m.port,
        "MYSQL_USER": m.user,
        "MYSQL_PASSWORD": m.password,
        "MYSQL_DATABASE": m.database,
        "SESSION_ADDRESS": _client_address(settings.session.listen),
        "SESSION_HTTP_ADDRESS": _client_address(settings.session.http_listen),
        "GAME_ADDRESS": _client_address(settings.game.listen),
        "GAME_HTTP_ADDRESS": _client_address(settings.game.http_listen),
        "GAME_UDP_PORT": settings.game.udp_port,
    }
    return "".join(f"{k}={shlex.quote(str(v))}\n" for k, v in values.items())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "shell" or len(argv) > 2:
        sys.stderr.write("usage: python -m dreamraid.config shell [path]\n")
        return 2
    try:
        settings = load_settings(argv[1] if len(argv) > 1 else DEFAULT_PATH)
    except ConfigError as e:
        sys.stderr.write(f"dreamraid: {e}\n")
        return 1
    sys.stdout.write(shell_assignments(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
