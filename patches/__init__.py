"""Monkeypatches for what a plugin cannot reach; each names the upstream version it targets."""
