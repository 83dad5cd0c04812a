"""Compression methods: each is a config dataclass plus one function, found by the config's type."""
