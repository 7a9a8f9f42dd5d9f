"""Build the GPU image on a host without a GPU and check what can be checked there.

    python tests/docker/build_and_check_gpu_image.py [--tag talan-serve:check] [--keep] [--worktree]

Builds docker/Dockerfile.gpu from the committed tree (``git archive HEAD``; ``--worktree``:
the working copy through .dockerignore), then runs tests/docker/check_gpu_image.py in the image
(``docker run -i --entrypoint python IMAGE -``, no GPU): vLLM's CUDA build imports, the
``talan`` vLLM plugin registers, ``talan-serve --help`` runs, and a prepared TALAN model
folder resolves to ``TalanQwen3ForCausalLM`` in vLLM's model registry. Writes the build
time, image size, largest layers and check results to bench/results/docker_gpu_image.json.

The daemon, the base image stand-in and the host's package index come from
tests/docker/dockerhost.py: dockerd is stopped again (by PID) if this script started it. The
image is removed afterwards (``--keep`` keeps it) and dangling layers are pruned. Not part
of the test suite: the image is large and its build downloads gigabytes of CUDA wheels.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = REPO / "bench" / "results" / "docker_gpu_image.json"


def _dockerhost():
    spec = importlib.util.spec_from_file_location("talan_dockerhost", HERE / "dockerhost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default="talan-serve:check")
    parser.add_argument("--keep", action="store_true", help="keep the image afterwards")
    parser.add_argument("--worktree", action="store_true",
                        help="build the working copy instead of the committed tree")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    dh = _dockerhost()
    work = Path(tempfile.mkdtemp(prefix="talan-gpu-image-"))
    record: dict = {"image": args.tag, "dockerfile": "docker/Dockerfile.gpu",
                    "commit": dh.head_commit(), "context": "worktree" if args.worktree
                    else "git archive HEAD", "cpus": os.cpu_count()}
    try:
        daemon = dh.start_daemon(work / "dockerd")
    except dh.Unavailable as why:
        print(f"no docker here: {why}", file=sys.stderr)
        return 2
    docker = daemon.docker
    ok = False
    try:
        record["base_image_built"] = dh.ensure_base_image(docker)
        log = work / "build.log"
        print(f"building {args.tag} (log: {log})", flush=True)
        try:
            with dh.HostIndex(dh.pip_settings(sys.executable)) as index:
                build_args = index.build_args()
                record["build_args"] = sorted(build_args)
                record["build_seconds"] = round(dh.build(
                    docker, "docker/Dockerfile.gpu", args.tag, build_args, log,
                    context=REPO if args.worktree else None, timeout=7200), 1)
        except RuntimeError as error:
            record["build_error"] = str(error)[-4000:]
            raise
        record["image_size_bytes"] = dh.image_size(docker, args.tag)
        record["image_size_gb"] = round(record["image_size_bytes"] / 1e9, 2)
        history = dh.run(docker, "history", "--no-trunc", "--format",
                         "{{.Size}}\t{{.CreatedBy}}", args.tag).stdout.splitlines()
        record["largest_layers"] = [  # the command without its build-argument prefix
            {"size": size, "step": step.rpartition("/bin/sh -c ")[2][:160] or "(base)"}
            for size, _, step in (line.partition("\t") for line in history)
            if size.endswith("GB") or (size.endswith("MB") and float(size[:-2]) >= 50)]

        start = time.monotonic()
        with open(HERE / "check_gpu_image.py", "rb") as script:
            check = dh.run(docker, "run", "--rm", "-i", "--entrypoint", "python", args.tag,
                           "-", stdin=script, check=False, timeout=1800)
        record["check_seconds"] = round(time.monotonic() - start, 1)
        sys.stderr.write(check.stderr[-6000:])
        try:
            report = json.loads(check.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            report = {"passed": False, "output": check.stdout[-3000:]}
        for result in report.get("checks", {}).values():
            if result.get("passed"):
                result.pop("traceback", None)
        record["checks_passed"] = bool(report.get("passed")) and check.returncode == 0
        record["checks"] = report.get("checks", report)
        ok = record["checks_passed"]
    finally:
        dh.write_json(args.results, record)
        print(json.dumps({k: v for k, v in record.items() if k != "checks"}, indent=2))
        if not args.keep:
            dh.remove(docker, args.tag)
        else:
            dh.run(docker, "image", "prune", "-f", check=False)
        daemon.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
