"""Serving-engine integrations (one package per engine)."""
