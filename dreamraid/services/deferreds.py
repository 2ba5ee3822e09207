"""Small helpers for waiting on several Deferreds at once."""

from twisted.internet import defer


def pass_after(result, function, *args):
    """A callback that calls C{function(*args)} and passes the result on unchanged."""
    function(*args)
    return result


def gather(waitables):
    """
    A Deferred of the results of C{waitables} (Deferreds or coroutines) in
    order, failing with the first failure's own exception.
    """
    deferreds = [defer.ensureDeferred(w) for w in waitables]
    return defer.gatherResults(deferreds, consumeErrors=True).addErrback(lambda f: f.value.subFailure)
