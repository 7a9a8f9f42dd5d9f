"""The OpenAI-compatible HTTP front end (FastAPI) and its engine adapters."""
