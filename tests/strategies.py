"""Hypothesis strategies for every message, derived from its construct fields."""

from hypothesis import strategies as st

_INTS = {
    "B": (0, 2**8 - 1), "H": (0, 2**16 - 1), "I": (0, 2**32 - 1), "L": (0, 2**32 - 1),
    "Q": (0, 2**64 - 1), "b": (-(2**7), 2**7 - 1), "h": (-(2**15), 2**15 - 1),
    "i": (-(2**31), 2**31 - 1), "l": (-(2**31), 2**31 - 1), "q": (-(2**63), 2**63 - 1),
}


def value_strategy(kind, char, element=None):
    """Values that fit one field."""
    if kind == "array":
        chars, names = element
        record = st.fixed_dictionaries({n: value_strategy("fixed", c) for n, c in zip(names, chars)})
        return st.lists(record, max_size=8)
    if kind == "str":
        return st.text(max_size=64)
    if kind == "bytes":
        return st.binary(max_size=64)
    if char == "?":
        return st.booleans()
    if char == "f":
        return st.floats(width=32, allow_nan=False)
    if char == "d":
        return st.floats(allow_nan=False)
    low, high = _INTS[char]
    return st.integers(low, high)


def body_strategy(message):
    """Bodies of C{message} that fit its schema."""
    return st.fixed_dictionaries({name: value_strategy(kind, char, element)
                                  for name, kind, char, element in message.fields})
