"""Model-based (stateful) and property tests, with their Hypothesis profiles."""
