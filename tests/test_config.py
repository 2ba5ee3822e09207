"""Settings: the shipped file, command-line overrides, and every kind of bad setting."""

import configparser
import dataclasses
import json
from pathlib import Path

from twisted.python import usage
from twisted.trial.unittest import TestCase

from dreamraid import config, game_tap, session_tap
from dreamraid.services.limits import Rate
from dreamraid.tables import TableError, load_tables, parse_tables
from tests.support import CONFIG, ROOT


def write_config(testcase, *changes, drop=None):
    """A copy of the shipped file with C{(section, key, value)} changes."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(CONFIG)
    for section, key, value in changes:
        if not parser.has_section(section):
            parser.add_section(section)
        parser[section][key] = value
    if drop:
        parser.remove_option(*drop)
    path = Path(testcase.mktemp() + ".ini")
    with open(path, "w") as f:
        parser.write(f)
    # Relative paths resolve against the file's directory: keep them pointing at conf/.
    text = path.read_text().replace("path = tables.json", f"path = {ROOT / 'conf' / 'tables.json'}")
    path.write_text(text)
    return path


class ShippedConfigTests(TestCase):
    """conf/dreamraid.ini holds every setting with the documented defaults."""

    def test_defaults(self):
        """The shipped file parses into the spec's defaults."""
        s = config.load_settings(CONFIG)
        self.assertEqual(s.game.listen, "tcp:9090:interface=127.0.0.1")
        self.assertEqual(s.game.http_listen, "tcp:9190:interface=127.0.0.1")
        self.assertEqual(s.session.listen, "tcp:9091:interface=127.0.0.1")
        self.assertEqual(s.session.http_listen, "tcp:9191:interface=127.0.0.1")
        self.assertEqual((s.game.ping_interval, s.game.idle_timeout, s.game.auth_timeout), (1.0, 15.0, 5.0))
        self.assertEqual(s.game.udp_port, 50000)
        self.assertEqual(s.game.resume_grace, 30.0)
        self.assertEqual(len(s.redis.startup_nodes), 6)
        self.assertEqual(s.redis.startup_nodes[0], ("127.0.0.1", 7000))
        self.assertEqual((s.tokens.algorithm, s.tokens.audience, s.tokens.ttl), ("EdDSA", "dreamraid-game", 600))
        self.assertEqual(s.tokens.public_key, ROOT / "var" / "keys" / "token_ed25519.pub")
        self.assertEqual(s.tokens.refresh_ttl, 30 * 86400)
        self.assertEqual(s.tables.path, ROOT / "conf" / "tables.json")
        self.assertEqual((s.raids.datagram_rate, s.raids.world_bound), (Rate(10.0, 20.0), 10000.0))
        self.assertEqual((s.accounts.failures_per_account, s.accounts.account_window), (5, 60.0))
        self.assertEqual((s.accounts.failures_per_address, s.accounts.address_window), (20, 600.0))
        self.assertEqual((s.session.registrations_per_address, s.session.registration_window), (10, 600.0))

    def test_every_setting_is_in_the_file(self):
        """Each section's every field appears in the shipped file, and nothing else does."""
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(CONFIG)
        for section, cls in config.SECTIONS.items():
            self.assertEqual(
                sorted(parser[section]), sorted(f.name for f in dataclasses.fields(cls)), section
            )

    def test_shell_assignments(self):
        """The stack script's view of the settings is quoted for the shell."""
        text = config.shell_assignments(config.load_settings(CONFIG))
        self.assertIn("MYSQL_PORT=3307\n", text)
        self.assertIn("REDIS_NODES='127.0.0.1:7000 127.0.0.1:7001", text)

    def test_shell_command_names_bad_setting(self):
        """python -m dreamraid.config shell fails with the setting's name on bad input."""
        bad = write_config(self, ("mysql", "port", "none"))
        self.assertEqual(config.main(["shell", str(bad)]), 1)
        self.assertEqual(config.main(["nonsense"]), 2)

class BadConfigTests(TestCase):
    """Each kind of bad setting stops start-up with a message naming it."""

    def assertRefused(self, expected, *changes, drop=None):
        """Loading the shipped file with C{changes} fails naming C{expected}."""
        path = write_config(self, *changes, drop=drop)
        with self.assertRaises(config.ConfigError) as caught:
            config.load_settings(path)
        self.assertIn(expected, str(caught.exception))

    def test_unknown_setting(self):
        """An unknown key names itself."""
        self.assertRefused("unknown setting game.colour", ("game", "colour", "blue"))

    def test_unknown_section(self):
        """An unknown section names itself."""
        self.assertRefused("unknown section [gmae]", ("gmae", "listen", "tcp:1"))

    def test_missing_setting(self):
        """A missing key names itself."""
        self.assertRefused("setting game.listen is missing", drop=("game", "listen"))

    def test_not_a_number(self):
        """A number that is not one names the setting and the value."""
        self.assertRefused("setting game.ping_interval ([game] ping_interval): expected a number, got 'fast'",
                           ("game", "ping_interval", "fast"))

    def test_out_of_range(self):
        """A number out of range names the setting and the range."""
        self.assertRefused("setting mysql.port", ("mysql", "port", "70000"))
        self.assertRefused("setting game.max_frame_size", ("game", "max_frame_size", "65536"))
        self.assertRefused("setting session.registrations_per_address", ("session", "registrations_per_address", "-1"))
        self.assertRefused("setting session.registration_window", ("session", "registration_window", "0"))

    def test_bad_endpoint(self):
        """An endpoint string Twisted cannot parse names the setting."""
        self.assertRefused("setting session.listen", ("session", "listen", "tcp:notaport"))
        self.assertRefused("setting game.http_listen", ("game", "http_listen", "carrier-pigeon:1"))

    def test_bad_nodes(self):
        """Startup nodes must be host:port pairs."""
        self.assertRefused("setting redis.startup_nodes", ("redis", "startup_nodes", "localhost"))
        self.assertRefused("setting redis.startup_nodes", ("redis", "startup_nodes", " , "))

    def test_bad_choice(self):
        """An algorithm outside the allowed set names the choices."""
        self.assertRefused("must be one of EdDSA, HS256", ("tokens", "algorithm", "none"))

    def test_cross_field_rules(self):
        """Rules that join settings name the one to change."""
        self.assertRefused("setting game.idle_timeout", ("game", "idle_timeout", "0.5"))
        self.assertRefused("setting mysql.pool_min", ("mysql", "pool_min", "9"))
        self.assertRefused("setting tokens.secret", ("tokens", "algorithm", "HS256"))
        self.assertRefused("setting tokens.refresh_ttl", ("tokens", "refresh_ttl", "600"))

    def test_bad_refresh_ttl(self):
        """A refresh token's life is a whole number of seconds from a minute to 366 days."""
        self.assertRefused("setting tokens.refresh_ttl", ("tokens", "refresh_ttl", "30d"))
        self.assertRefused("setting tokens.refresh_ttl", ("tokens", "refresh_ttl", "59"))
        self.assertRefused("setting tokens.refresh_ttl", ("tokens", "refresh_ttl", "31622401"))

    def test_bad_raid_datagram_limits(self):
        """A datagram rate that is not per_second/burst, or a world bound past float32, names the setting."""
        self.assertRefused("setting raids.datagram_rate ([raids] datagram_rate): expected per_second/burst or off",
                           ("raids", "datagram_rate", "10"))
        self.assertRefused("setting raids.world_bound", ("raids", "world_bound", "1e39"))
        self.assertRefused("setting raids.world_bound", ("raids", "world_bound", "nan"))
        self.assertIsNone(config.load_settings(write_config(self, ("raids", "datagram_rate", "off"))).raids.datagram_rate)

    def test_bad_tables(self):
        """A tables file that is missing or breaks a rule names tables.path."""
        self.assertRefused("setting tables.path", ("tables", "path", "/nonexistent/tables.json"))

    def test_unreadable_file(self):
        """A configuration file that cannot be read says so."""
        self.assertRaises(config.ConfigError, config.load_settings, "/nonexistent/dreamraid.ini")
        path = Path(self.mktemp())
        path.write_text("this is not = an ini file\n")
        self.assertRaises(config.ConfigError, config.load_settings, path)


class IncludeTests(TestCase):
    """A file that names a base in C{[include]} changes only what it sets."""

    def write(self, directory, text):
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "layer.ini"
        path.write_text(text)
        return path

    def test_layer_over_the_shipped_file(self):
        """Its own settings win; the rest, relative paths included, are the base file's, resolved against the base's directory."""
        path = self.write(Path(self.mktemp()) / "a" / "b",
                          f"[include]\nbase = {CONFIG}\n[game]\nping_interval = 2.5\n")
        shipped, layered = config.load_settings(CONFIG), config.load_settings(path)
        self.assertEqual(layered.game.ping_interval, 2.5)
        self.assertEqual(layered.game.listen, shipped.game.listen)
        self.assertEqual(layered.tokens.public_key, shipped.tokens.public_key)  # ../var/keys from conf/, not from a/b/
        self.assertEqual(layered.path, path.resolve())

    def test_relative_path_is_the_setting_files(self):
        """A relative path the layer sets is resolved against the layer's directory."""
        directory = Path(self.mktemp()).resolve()
        (directory / "t").mkdir(parents=True)
        (directory / "t" / "tables.json").write_text((ROOT / "conf" / "tables.json").read_text())
        path = self.write(directory, f"[include]\nbase = {CONFIG}\n[tables]\npath = t/tables.json\n")
        self.assertEqual(config.load_settings(path).tables.path, directory / "t" / "tables.json")

    def test_refusals(self):
        """A file including itself, an [include] with another key, and a missing base are refused with a clear message."""
        directory = Path(self.mktemp())
        itself = self.write(directory, "[include]\nbase = layer.ini\n")
        self.assertRaisesRegex(config.ConfigError, "includes itself", config.load_settings, itself)
        other = self.write(directory / "x", f"[include]\nbase = {CONFIG}\nextra = 1\n")
        self.assertRaisesRegex(config.ConfigError, r"include\.base", config.load_settings, other)
        missing = self.write(directory / "y", "[include]\nbase = nowhere.ini\n")
        self.assertRaisesRegex(config.ConfigError, "cannot read configuration file .*nowhere.ini",
                               config.load_settings, missing)


class OptionsTests(TestCase):
    """The twistd options of both servers."""

    def test_game_options(self):
        """Every game setting is an option; parsing yields the whole settings object."""
        options = game_tap.Options()
        options.parseOptions(["--config", str(CONFIG), "--game-listen", "tcp:9999", "--redis-command-timeout", "0.5"])
        expected = {"config": str(CONFIG), "settings": options["settings"]}
        expected.update({name: None for name in options if name not in expected})
        expected["game-listen"] = "tcp:9999"
        expected["redis-command-timeout"] = "0.5"
        self.assertEqual(dict(options), expected)
        self.assertEqual(options["settings"].game.listen, "tcp:9999")
        self.assertEqual(options["settings"].redis.command_timeout, 0.5)
        self.assertIn("game-udp-port", options)
        self.assertNotIn("mysql-host", options)

    def test_session_options(self):
        """The session server has the MySQL options and no game ones."""
        options = session_tap.Options()
        options.parseOptions(["--mysql-port", "3399"])
        self.assertEqual(options["settings"].mysql.port, 3399)
        self.assertIn("session-listen", options)
        self.assertNotIn("game-listen", options)

    def test_bad_option(self):
        """A bad override is a UsageError naming the option."""
        with self.assertRaises(usage.UsageError) as caught:
            game_tap.Options().parseOptions(["--game-udp-port", "-1"])
        self.assertIn("--game-udp-port", str(caught.exception))

    def test_relative_override_paths_use_the_current_directory(self):
        """A path given on the command line is relative to where the command runs."""
        options = game_tap.Options()
        options.parseOptions(["--tables-path", str(ROOT / "conf" / "tables.json"), "--tokens-public-key", "k.pub"])
        self.assertEqual(options["settings"].tokens.public_key, Path.cwd() / "k.pub")


class TablesTests(TestCase):
    """The game tables file."""

    def tables(self):
        return json.loads((ROOT / "conf" / "tables.json").read_text())

    def test_shipped(self):
        """The shipped tables are the spec's."""
        t = load_tables(ROOT / "conf" / "tables.json")
        self.assertEqual(t.max_level, 15)
        self.assertEqual(dict(t.exp_to_advance), {1: 1, 2: 2, 3: 4, 4: 6, 5: 10, 6: 16, 7: 23, 8: 31,
                                                  9: 40, 10: 51, 11: 60, 12: 71, 13: 80, 14: 91})
        self.assertEqual(t.enhance_success_percent[0], 100)
        self.assertEqual(t.enhance_success_percent[9], 10)
        self.assertEqual(t.max_enhancement, 10)
        self.assertEqual(sorted(t.monster_exp), [1, 2, 3, 4, 5])
        self.assertEqual(t.slots, 50)
        self.assertEqual({kind.tab for kind in t.items.values()}, {0, 1, 2})
        self.assertTrue(all(kind.stack == 1 for kind in t.items.values() if kind.tab == 0))

    def test_broken_rules(self):
        """Each broken rule is a TableError that names the entry."""
        cases = [
            (lambda t: t["levels"]["exp_to_advance"].pop("14"), "levels.exp_to_advance"),
            (lambda t: t["levels"]["exp_to_advance"].update({"3": 1}), "must increase"),
            (lambda t: t["enhancement"]["success_percent"].update({"2": 101}), "success_percent[2]"),
            (lambda t: t["enhancement"]["success_percent"].update({"x": 1}), "not a whole number"),
            (lambda t: t.pop("monsters"), "monsters"),
            (lambda t: t["monsters"].update({"exp": {}}), "at least one"),
            (lambda t: t["levels"].update({"max_level": 0}), "levels.max_level"),
            (lambda t: t["items"].update({"x1": {"name": "n", "tab": "materials"}}), "items[x1]"),
            (lambda t: t["items"]["101"].update({"tab": "pockets"}), "items[101]"),
            (lambda t: t["items"]["101"].update({"stack": 5}), "items[101].stack"),
            (lambda t: t["items"]["101"].update({"name": ""}), "items[101].name"),
            (lambda t: t["items"]["101"].update({"name": "two\nlines"}), "items[101].name"),
            (lambda t: t["monsters"]["drops"]["1"][0].update({"item": 999}), "monsters.drops[1]"),
            (lambda t: t["monsters"]["drops"].update({"9": []}), "monsters.drops[9]"),
            (lambda t: t["monsters"].update({"cooldown_ms": -1}), "monsters.cooldown_ms"),
            (lambda t: t["inventory"].update({"slots": 0}), "inventory.slots"),
        ]
        for change, expected in cases:
            tables = self.tables()
            change(tables)
            with self.assertRaises(TableError) as caught:
                parse_tables(tables)
            self.assertIn(expected, str(caught.exception))

    def test_not_json(self):
        """A file that is not JSON is a TableError."""
        path = Path(self.mktemp())
        path.write_text("{")
        self.assertRaises(TableError, load_tables, path)
