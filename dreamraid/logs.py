"""
Log output for operators and their log shippers: one flat JSON object a line.

    twistd -n --logger dreamraid.logs.json_lines dreamraid-game ...

C{--logger} names a log observer factory; L{json_lines} writes every event to
standard output (twistd's C{--logfile} does not reach such a factory, so run
it with C{-n} and let the supervisor keep the output).  Each line holds:

  - C{time}: ISO 8601, UTC, to the millisecond (C{2025-01-31T12:00:00.123Z});
  - C{level}: C{debug}, C{info}, C{warn}, C{error} or C{critical};
  - C{namespace}: the emitting logger's (C{dreamraid.services.raidhost.RaidHost});
  - C{system}: twistd's system tag (C{GameFactory,4,127.0.0.1}), when there is one;
  - C{message}: the event formatted as the text log shows it;
  - every other field of the event not starting with C{log_} (C{user_id},
    C{raid_id}, C{error}, ...): as JSON if it is JSON, else as its text (an
    exception as C{"TypeName: text"});
  - C{traceback}: the failure's traceback, for C{Logger.failure} and C{log.err}.
"""

import json
import sys
from datetime import datetime, timezone

from twisted.logger import FileLogObserver, formatEvent
from twisted.python.failure import Failure

# What a record says itself; event fields by these names (legacy twisted.python.log
# events carry message, time, system, format and isError) only repeat it.
_OWN = frozenset({"time", "level", "namespace", "system", "message", "traceback", "format", "isError", "failure"})


def json_lines(out=None):
    """The observer C{twistd --logger dreamraid.logs.json_lines} installs: JSON lines to C{out} (stdout)."""
    # sys.stdout is taken now: once logging begins twistd points sys.stdout at the log itself.
    return FileLogObserver(sys.stdout if out is None else out, event_as_json_line)


def event_as_json_line(event):
    """One log event as a line of compact JSON, newline included; never raises."""
    try:
        return json.dumps(_record(event), separators=(",", ":"), allow_nan=False) + "\n"
    except Exception as e:  # a log line must come out whatever the event holds
        return json.dumps({"time": _time(event), "level": "error", "namespace": __name__,
                           "message": f"unloggable event: {_text(e)}"}, separators=(",", ":")) + "\n"


def _record(event):
    level = event.get("log_level")
    record = {
        "time": _time(event),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", "-"),
    }
    system = event.get("log_system")
    if system is not None and system != "-":
        record["system"] = _text(system)
    record["message"] = formatEvent(event)
    for key, value in event.items():
        if key.startswith("log_") or key in _OWN or not isinstance(key, str):
            continue
        record[key] = _as_json(value)
    failure = event.get("log_failure", event.get("failure"))
    if isinstance(failure, Failure):
        record["traceback"] = failure.getTraceback()
    return record


def _time(event):
    when = event.get("log_time")
    if not isinstance(when, (int, float)):
        return None
    moment = datetime.fromtimestamp(when, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _as_json(value):
    """C{value} itself if it is JSON (no NaN), else its text."""
    if isinstance(value, BaseException):
        return _text(value)
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return _text(value)
    return value


def _text(value):
    """The text of C{value}; an exception's with its type (C{"ConnectionRefusedError: ..."})."""
    try:
        if isinstance(value, BaseException):
            detail = str(value)
            return f"{type(value).__name__}: {detail}" if detail else type(value).__name__
        return str(value)
    except Exception:
        return object.__repr__(value)
