"""Test-only SGLang plugin for the CPU test runs (see ``plugin.py``). Not for serving."""
