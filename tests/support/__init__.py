"""Test support: real Redis, tiny random models, helpers shared by the suites."""
