"""Print the project's core dependencies minus the engine stack (torch).

The GPU image installs PyPI's CUDA ``vllm`` first, which brings its own torch; the CPU
pin of torch in ``pyproject.toml`` must not replace it. Usage (in a Dockerfile):
``python docker/core_requirements.py pyproject.toml > /tmp/requirements.txt``.
"""

from __future__ import annotations

import sys
import tomllib

ENGINE_OWNED = {"torch"}


def main(path: str) -> None:
    with open(path, "rb") as handle:
        project = tomllib.load(handle)["project"]
    for requirement in project["dependencies"]:
        name = requirement.split("=")[0].split("<")[0].split(">")[0].strip().lower()
        if name not in ENGINE_OWNED:
            print(requirement)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
