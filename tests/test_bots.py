"""Scripted players against a real session server and game server."""

from twisted.internet import reactor

from dreamraid.bots import main, run_bots, session_address
from tests.support import CONFIG
from tests.test_client_library import ServersCase


class BotsTests(ServersCase):

    async def test_four_bots_raid_and_are_ranked(self):
        """Four bots each hunt, enhance a granted weapon, clear a raid of two and log out; the board ranks them."""
        summary = await run_bots(reactor, ("127.0.0.1", self.session.port), 4, hunts=2)
        self.assertEqual([r.error for r in summary.reports], [""] * 4)
        self.assertEqual({r.raid for r in summary.reports}, {"cleared"})
        self.assertTrue(all(r.hunts == 2 and r.enhanced >= 1 for r in summary.reports))
        self.assertEqual(len({r.level for r in summary.reports}), 1)  # the same hunts: one level, one matchmaking group
        self.assertEqual(sum(r.score for r in summary.reports), 2 * 4)  # two raids, a boss of 4 HP each
        self.assertTrue(all((r.rank > 0) == (r.score > 0) for r in summary.reports))
        self.assertTrue(summary.ranking)
        self.assertEqual(summary.ranking, sorted(summary.ranking, key=lambda e: (e.rank, -e.score)))
        text = "\n".join(summary.lines())
        self.assertIn("bots: 4 played, 0 failed; raids: 4 players cleared, 0 failed, 0 unmatched", text)

    async def test_odd_bot_out_cancels_and_goes_on(self):
        """With raids of two, a lone bot is not matched: it cancels its ticket after the timeout and logs out."""
        summary = await run_bots(reactor, ("127.0.0.1", self.session.port), 1, hunts=1, queue_timeout=0.5)
        [report] = summary.reports
        self.assertEqual((report.raid, report.error), ("unmatched", ""))

    def test_session_address(self):
        self.assertEqual(session_address("10.0.0.5:7000", CONFIG), ("10.0.0.5", 7000))
        self.assertEqual(session_address(None, CONFIG), ("127.0.0.1", 9091))

    def test_bad_arguments_exit_with_usage(self):
        with self.assertRaises(SystemExit) as exited:
            main(["--session", "host:notaport"])
        self.assertEqual(exited.exception.code, 2)
