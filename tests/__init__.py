"""dreamraid's trial test suite."""
