"""Docker on a host that cannot pull from Docker Hub: the daemon, the base image, the index.

Test-only (a user builds the images with plain ``docker build``, docker/Dockerfile.*).
Used by ``tests/docker/test_cpu_image.py`` and ``tests/docker/build_and_check_gpu_image.py``
(stdlib only):

- ``start_daemon()``: a running daemon, or dockerd started here (as root; ``docker.io``
  installed with apt-get when missing) with its own log; ``Daemon.stop()`` stops it by
  PID, and only if it was started here.
- ``ensure_base_image()``: ``python:3.11-slim-bookworm`` as it is, or the local stand-in
  that ``tests/docker/local_base.sh`` builds with debootstrap when the tag is missing.
- ``HostIndex``: the host's pip wheel folders and file:// indexes (``find-links``,
  ``extra-index-url``) served on 127.0.0.1 for the length of a build, handed to the
  Dockerfiles as pip's own build arguments (``PIP_FIND_LINKS``, ...), so pip in the
  build finds what pip on the host finds. Builds run with ``--network=host``.
- ``build()``: ``docker build`` of the committed tree (``git archive HEAD``) or a folder.

``Unavailable`` says why docker cannot run here (not root, no apt-get, dockerd refused to
start, no Debian mirror): callers skip on it; anything else is a real failure.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BASE_IMAGE = "python:3.11-slim-bookworm"


class Unavailable(RuntimeError):
    """Docker cannot run on this host; the message says why."""


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def client() -> str | None:
    """The docker CLI: $TALAN_DOCKER, else the one packaged beside dockerd, else PATH's."""
    for candidate in (os.environ.get("TALAN_DOCKER"), "/usr/bin/docker"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("docker")


def run(docker: str, *args: str, check: bool = True, timeout: float | None = 600,
        **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    return subprocess.run([docker, *args], check=check, text=True, timeout=timeout, **kwargs)


def daemon_running(docker: str | None) -> bool:
    if docker is None:
        return False
    try:
        return run(docker, "info", check=False, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def apt_install(*packages: str) -> None:
    """Install Debian packages, or say why not (not root, no apt-get, apt failed)."""
    if os.geteuid() != 0:
        raise Unavailable(f"needs {' '.join(packages)} and this user is not root")
    if shutil.which("apt-get") is None:
        raise Unavailable(f"needs {' '.join(packages)} and there is no apt-get here")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
        if result.returncode != 0:
            raise Unavailable(f"{' '.join(argv)} failed: {result.stderr.strip()[-500:]}")


@dataclass
class Daemon:
    docker: str
    pid: int | None = None  # set when dockerd was started here
    log: Path | None = None
    _process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def started_here(self) -> bool:
        return self.pid is not None

    def stop(self, timeout: float = 60) -> None:
        """Stop dockerd by its PID, if it was started here; a daemon found running stays."""
        if self._process is None or self._process.poll() is not None:
            return
        os.kill(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self._process.pid, signal.SIGKILL)
            self._process.wait(10)


def start_daemon(state_dir: Path, install: bool = True, wait_s: float = 60) -> Daemon:
    """A usable daemon: the running one, or dockerd started here (nice 10, log in
    ``state_dir``). Raises ``Unavailable`` with the reason when neither is possible."""
    docker = client()
    if daemon_running(docker):
        return Daemon(docker)
    if os.geteuid() != 0:
        raise Unavailable("no docker daemon is running and this user is not root "
                          "(cannot start dockerd)")
    if shutil.which("dockerd") is None or docker is None:
        if not install:
            raise Unavailable("dockerd is not installed")
        apt_install("docker.io")
        docker = client()
    if docker is None or shutil.which("dockerd") is None:
        raise Unavailable("docker.io installed but no dockerd/docker on PATH")
    state_dir.mkdir(parents=True, exist_ok=True)
    log = state_dir / "dockerd.log"
    # nice: the builds it runs share the host's cores with whatever else runs here.
    with open(log, "ab") as out:
        process = subprocess.Popen(["nice", "-n", "10", "dockerd"], stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise Unavailable(f"dockerd exited with {process.returncode}:\n{_tail(log)}")
        if daemon_running(docker):
            return Daemon(docker, process.pid, log, process)
        time.sleep(0.5)
    daemon = Daemon(docker, process.pid, log, process)
    daemon.stop()
    raise Unavailable(f"dockerd did not answer within {wait_s:.0f} s:\n{_tail(log)}")


def image_exists(docker: str, tag: str) -> bool:
    return run(docker, "image", "inspect", tag, check=False).returncode == 0


def ensure_base_image(docker: str, tag: str = BASE_IMAGE) -> bool:
    """``tag`` as it is, else the debootstrap stand-in (``tests/docker/local_base.sh``).
    Returns whether it was built now."""
    if image_exists(docker, tag):
        return False
    if shutil.which("debootstrap") is None:
        apt_install("debootstrap")
    result = subprocess.run(["bash", str(HERE / "local_base.sh"), tag],
                            capture_output=True, text=True, timeout=1800,
                            env=dict(os.environ, DOCKER=docker))
    if result.returncode in (3, 4):  # no debootstrap / no Debian mirror: this host
        raise Unavailable(f"cannot make a local {tag}: {result.stderr.strip()[-800:]}")
    if result.returncode != 0:
        raise RuntimeError(f"local_base.sh failed ({result.returncode}):\n"
                           f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return True


def pip_settings(python: str = "python3") -> dict[str, str]:
    """The host's effective pip options (site/user/global files, then PIP_* variables)."""
    settings: dict[str, str] = {}
    try:
        listing = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True,
                                 text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        listing = ""
    order = {"global": 0, "user": 1, "site": 2}
    found: dict[str, tuple[int, str]] = {}
    for line in listing.splitlines():
        name, _, value = line.partition("=")
        variant, _, key = name.rpartition(".")
        if variant in order and value:
            rank = order[variant]
            if key not in found or rank >= found[key][0]:
                found[key] = (rank, value.strip().strip("'\""))
    settings.update({key: value for key, (_, value) in found.items()})
    for name, value in os.environ.items():
        if name.startswith("PIP_") and value:
            settings[name[4:].lower().replace("_", "-")] = value
    return settings


class _Handler(http.server.SimpleHTTPRequestHandler):
    roots: tuple[str, ...] = ()

    def translate_path(self, path: str) -> str:
        path = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
        real = os.path.realpath(path)
        if any(real == root or real.startswith(root + os.sep) for root in self.roots):
            return real
        return "/nonexistent"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base's name
        pass


INDEX_PORT = 28471  # below the ephemeral range (32768-60999 here): no connection takes it


class HostIndex:
    """Serves the host's local pip sources on 127.0.0.1 while a build runs.

    ``find-links`` folders and ``file://`` (extra-)index URLs become http://127.0.0.1
    URLs with the same paths (pip treats loopback as a secure origin); http(s) URLs pass
    through. ``build_args()`` hands them to the Dockerfiles' PIP_* build arguments.
    """

    def __init__(self, settings: dict[str, str] | None = None):
        self.settings = pip_settings() if settings is None else settings
        self.server: http.server.ThreadingHTTPServer | None = None
        self.roots: list[str] = []

    def _local(self, entry: str) -> str | None:
        path = entry[len("file://"):] if entry.startswith("file://") else entry
        return os.path.realpath(path) if path.startswith("/") and os.path.isdir(path) else None

    def __enter__(self) -> HostIndex:
        for key in ("find-links", "index-url", "extra-index-url"):
            for entry in self.settings.get(key, "").split():
                local = self._local(entry)
                if local is not None:
                    # An index's files sit beside it (../../files/...): serve its parent.
                    root = local if key == "find-links" else os.path.dirname(local)
                    self.roots.append(root)
        if self.roots:
            handler = type("Handler", (_Handler,), {"roots": tuple(self.roots)})
            # One port from build to build where it is free: the URLs are build arguments,
            # part of the cache key of every RUN after them (another port, no cached layer).
            try:
                self.server = http.server.ThreadingHTTPServer(("127.0.0.1", INDEX_PORT),
                                                              handler)
            except OSError:
                self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def _url(self, entry: str) -> str | None:
        local = self._local(entry)
        if local is None:
            return entry if entry.startswith(("http://", "https://")) else None
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}{urllib.parse.quote(local)}/"

    def build_args(self) -> dict[str, str]:
        args = {}
        for key in ("find-links", "index-url", "extra-index-url"):
            urls = [u for u in map(self._url, self.settings.get(key, "").split()) if u]
            if urls:
                args["PIP_" + key.upper().replace("-", "_")] = " ".join(urls)
        return args

    def has_file(self, prefix: str) -> bool:
        """Whether a served find-links folder holds a file named ``prefix...``."""
        return any(name.startswith(prefix) for key in ("find-links",)
                   for entry in self.settings.get(key, "").split()
                   if (local := self._local(entry)) for name in os.listdir(local))


def build(docker: str, dockerfile: str, tag: str, build_args: dict[str, str],
          log: Path, context: Path | None = None, timeout: float = 3600) -> float:
    """``docker build`` of the committed tree (``git archive HEAD``, the default) or of
    ``context``; returns the seconds it took. The output goes to ``log``."""
    if context is None and not head_commit():
        context = REPO  # not a git checkout: the folder, through .dockerignore
    argv = [docker, "build", "--network=host", "-f", dockerfile, "-t", tag]
    for key, value in build_args.items():
        argv += ["--build-arg", f"{key}={value}"]
    start = time.monotonic()
    with open(log, "w") as out:
        if context is None:
            archive = subprocess.Popen(["git", "-C", str(REPO), "archive", "--format=tar",
                                        "HEAD"], stdout=subprocess.PIPE)
            result = subprocess.run([*argv, "-"], stdin=archive.stdout, stdout=out,
                                    stderr=subprocess.STDOUT, timeout=timeout)
            archive.stdout.close()
            archive.wait()
        else:
            result = subprocess.run([*argv, str(context)], stdout=out,
                                    stderr=subprocess.STDOUT, timeout=timeout)
    seconds = time.monotonic() - start
    if result.returncode != 0:
        raise RuntimeError(f"docker build -f {dockerfile} failed ({result.returncode}):\n"
                           f"{_tail(log, 40)}")
    return seconds


def image_size(docker: str, tag: str) -> int:
    return int(run(docker, "image", "inspect", "-f", "{{.Size}}", tag).stdout.strip())


def head_commit() -> str:
    """The checkout's HEAD commit ('' outside a git checkout)."""
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def remove(docker: str, tag: str, prune: bool = True) -> None:
    """Remove an image tag (its containers must be gone) and prune dangling layers."""
    run(docker, "image", "rm", "-f", tag, check=False)
    if prune:
        run(docker, "image", "prune", "-f", check=False)


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
