"""Test helpers shipped with semroute (real loopback servers, no mocks)."""
