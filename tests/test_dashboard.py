"""
conf/grafana/dreamraid.json: a well-formed Grafana dashboard, and every
metric its queries name is one the running servers export.
"""

import json
import re

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from dreamraid.client import RemoteError
from tests.support import ROOT
from tests.test_client_library import ServersCase
from tests.test_metrics import fetch, scrape

DASHBOARD = ROOT / "conf" / "grafana" / "dreamraid.json"

# A PromQL identifier of ours: not the tail of a longer name, not a label value
# (those are "dreamraid-game", with a dash).
_METRIC = re.compile(r"(?<![A-Za-z0-9_:])dreamraid_[A-Za-z0-9_:]*")

# The sample names a family of each type is exposed as (the text parser strips
# a counter's _total from the family name).
_SAMPLES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "unknown": ("",),
}


def load_dashboard():
    with open(DASHBOARD, encoding="utf-8") as f:
        return json.load(f)


def all_panels(dashboard):
    """Every panel, those inside collapsed rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", ())


def queried_metrics(dashboard):
    """C{{metric sample name: sorted titles of the panels (or variables) querying it}}."""
    queried = {}

    def note(text, where):
        for name in _METRIC.findall(text):
            queried.setdefault(name, set()).add(where)

    for panel in all_panels(dashboard):
        for target in panel.get("targets", ()):
            note(target["expr"], panel["title"])
    for variable in dashboard.get("templating", {}).get("list", ()):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        if variable.get("type") == "query":
            note(query or "", f"${variable['name']}")
    return {name: sorted(where) for name, where in queried.items()}


async def declared(server):
    """
    The sample names a server's /metrics declares, samples or not: a labelled
    family has none until its first label (no raid formed, no matchmaking wait).
    """
    _, body = await fetch(server, "/metrics")
    return {family.name + suffix for family in text_string_to_metric_families(body.decode())
            for suffix in _SAMPLES[family.type]}


class DashboardShapeTests(SynchronousTestCase):

    def test_dashboard_is_well_formed(self):
        """
        Panels have unique ids and fit the grid; every panel but a row has a
        unit and targets, each with an expr and a unique refId.
        """
        dashboard = load_dashboard()
        self.assertGreaterEqual(dashboard["schemaVersion"], 36)
        self.assertTrue(dashboard["title"])
        self.assertTrue(dashboard["uid"])
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        self.assertEqual(variables["datasource"]["type"], "datasource")
        self.assertEqual(variables["datasource"]["query"], "prometheus")
        self.assertIn("job", variables)

        panels = list(all_panels(dashboard))
        ids = [panel["id"] for panel in panels]
        self.assertEqual(len(ids), len(set(ids)), "panel ids repeat")
        graphs = [panel for panel in panels if panel["type"] != "row"]
        self.assertGreater(len(graphs), 10)
        for panel in panels:
            grid = panel["gridPos"]
            self.assertLessEqual(grid["x"] + grid["w"], 24, panel["title"])
        for panel in graphs:
            self.assertTrue(panel["title"])
            self.assertEqual(panel["datasource"]["uid"], "${datasource}", panel["title"])
            self.assertTrue(panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']}: no unit")
            targets = panel["targets"]
            self.assertTrue(targets, f"{panel['title']}: no targets")
            refs = [target["refId"] for target in targets]
            self.assertEqual(len(refs), len(set(refs)), panel["title"])
            for target in targets:
                self.assertTrue(target["expr"].strip(), f"{panel['title']}: empty expr")
                self.assertTrue(_METRIC.search(target["expr"]), f"{panel['title']}: queries no dreamraid_ metric")

    def test_metric_names_are_read_from_queries(self):
        """Histogram samples keep their suffix; label values and longer names are not taken for metrics."""
        expr = ('histogram_quantile(0.99, sum by (le) (rate('
                'dreamraid_request_seconds_bucket{server="dreamraid-game"}[1m]))) / x_dreamraid_players')
        dashboard = {"panels": [{"id": 1, "title": "p", "targets": [{"expr": expr}]}],
            "templating": {"list": [{"name": "job", "type": "query",
                                     "query": {"query": "label_values(dreamraid_server_info, job)"}}]}}
        self.assertEqual(queried_metrics(dashboard), {"dreamraid_request_seconds_bucket": ["p"],
                                                      "dreamraid_server_info": ["$job"]})


class DashboardMetricsTests(ServersCase):

    async def test_every_queried_metric_is_exported(self):
        """Each metric the dashboard queries is on the game or the session server's /metrics after a little play."""
        client = await self.player()
        await client.hunt(1)
        with self.assertRaises(RemoteError):  # the cooldown: an error reply, so dreamraid_errors_total has a sample
            await client.hunt(1)

        exported = set()
        for server in (self.game, self.session):
            exported |= {name for name, _ in await scrape(server)}
            exported |= await declared(server)

        queried = queried_metrics(load_dashboard())
        missing = {name: where for name, where in sorted(queried.items()) if name not in exported}
        self.assertEqual(missing, {}, "queried by the dashboard but exported by neither server:\n" + "\n".join(
            f"  {name}  (panels: {', '.join(where)})" for name, where in missing.items()))
