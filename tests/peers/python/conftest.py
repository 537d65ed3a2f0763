"""Fixtures that run the real `sblocal` binary for the peer tests.

`sblocal` (function scope) starts `target/debug/sblocal serve --dir <tmp>` with every port picked
by the OS, waits for `ready`, and stops it (SIGTERM) after the test. It yields a `Sblocal` object:

    sblocal.emulator_env["AZURE_SERVICEBUS_CONNECTION_STRING"]   # emulator.env as a dict
    sblocal.workload_env["AZURE_CLIENT_ID"]                       # workload.env as a dict
    sblocal.env                                                   # both merged (workload wins)
    sblocal.connection_string, sblocal.queue_name, sblocal.ca_file, sblocal.dir
    sblocal.amqp_port, sblocal.amqps_port, sblocal.http_port, sblocal.https_port
    sblocal.admin("drop-connections"); sblocal.admin("server-busy", seconds=5); sblocal.stats()
    sblocal.token(sub="system:serviceaccount:default:x", ttl=600)  # `sblocal token`
    sblocal.identities()["servicebusdemo-producer"]["client_id"]  # DIR/identities.json by name
    sblocal.identity_env("servicebusdemo-producer", ttl=600)      # workload env for another identity

`sblocal_factory(config=..., identities=..., identity=..., extra_args=[...])` starts more
instances (each stopped after the test) when a test needs a non-default configuration.

The binary must have been built (`cargo build -p sblocal`); a missing binary fails the test
with that instruction. Set SBLOCAL_BIN to use another build.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Dict, Iterator, List, Optional

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
DEFAULT_BIN = REPO_ROOT / "target" / "debug" / "sblocal"
READY_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0


def sblocal_binary() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("SBLOCAL_BIN", DEFAULT_BIN))
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(
            f"sblocal binary not found at {path}: build it first with `cargo build -p sblocal` "
            "(or set SBLOCAL_BIN)",
            pytrace=False,
        )
    return path


def read_env_file(path: pathlib.Path) -> Dict[str, str]:
    """Parses the KEY=VALUE lines sblocal writes (values unquoted, split at the first '=')."""
    values: Dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        values[key] = value
    return values


class Sblocal:
    """One running `sblocal serve` process."""

    def __init__(self, directory: pathlib.Path, args: List[str]):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.binary = sblocal_binary()
        self._stderr_path = self.dir.parent / f"{self.dir.name}.stderr.log"
        self._stderr = open(self._stderr_path, "wb")
        command = [
            str(self.binary),
            "serve",
            "--dir",
            str(self.dir),
            "--amqp",
            "127.0.0.1:0",
            "--amqps",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--https",
            "127.0.0.1:0",
            *args,
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL
        )
        self._wait_ready()
        self.emulator_env = read_env_file(self.dir / "emulator.env")
        self.workload_env = read_env_file(self.dir / "workload.env")
        self.env = {**self.emulator_env, **self.workload_env}
        self.connection_string = self.emulator_env["AZURE_SERVICEBUS_CONNECTION_STRING"]
        self.queue_name = self.emulator_env["AZURE_SERVICEBUS_QUEUE_NAME"]
        self.ca_file = str(self.dir / "ca.pem")
        self.amqp_port = int(re.search(r"sb://localhost:(\d+)", self.connection_string).group(1))
        self.amqps_port = int(self.workload_env["AZURE_SERVICEBUS_HOSTNAME"].rsplit(":", 1)[1])
        self.http_port = _port_of(self.emulator_env["AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT"])
        self.https_port = _port_of(self.workload_env["AZURE_AUTHORITY_HOST"])
        self.http_url = f"http://localhost:{self.http_port}"
        self.https_url = f"https://localhost:{self.https_port}"

    def _wait_ready(self) -> None:
        lines: List[bytes] = []
        ready = threading.Event()

        def read_stdout() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                lines.append(line)
                if line.strip() == b"ready":
                    ready.set()

        threading.Thread(target=read_stdout, daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not ready.wait(0.05):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(
                    f"sblocal did not become ready (exit code {self.process.returncode}); "
                    f"stdout: {b''.join(lines)!r}; stderr: {self.stderr()}",
                    pytrace=False,
                )

    def stderr(self) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return self._stderr_path.read_text(errors="replace")

    def stop(self) -> Optional[int]:
        """SIGTERM, then SIGKILL if it does not stop; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self._stderr.closed:
            self._stderr.close()
        return self.process.returncode

    # --- admin and fault routes -------------------------------------------------------------

    def admin(self, route: str, **params) -> str:
        """POSTs to /$admin/<route>?<params> on the plain HTTP port; returns the body."""
        query = urllib.parse.urlencode(params)
        url = f"{self.http_url}/$admin/{route}" + (f"?{query}" if query else "")
        request = urllib.request.Request(url, data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode()

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.http_url}/$admin/stats", timeout=10) as response:
            return json.loads(response.read())

    def http_get(self, path: str, headers: Optional[Dict[str, str]] = None):
        """GET on the plain HTTP port; returns (status, headers, body) without raising on 4xx."""
        request = urllib.request.Request(f"{self.http_url}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read().decode()

    # --- identities ---------------------------------------------------------------------------

    def token(self, sub: str, ttl: int = 3600, aud: Optional[str] = None, iss: Optional[str] = None) -> str:
        """A service-account token minted by `sblocal token` with this instance's issuer key."""
        command = [str(self.binary), "token", "--dir", str(self.dir), "--sub", sub, "--ttl", str(ttl)]
        if aud is not None:
            command += ["--aud", aud]
        if iss is not None:
            command += ["--iss", iss]
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()

    def identities(self) -> Dict[str, dict]:
        """The effective identities (DIR/identities.json) by name, with their client/object ids."""
        document = json.loads((self.dir / "identities.json").read_text())
        return {identity["name"]: identity for identity in document["identities"]}

    def identity_env(self, name: str, ttl: int = 3600, sub: Optional[str] = None) -> Dict[str, str]:
        """workload.env as the webhook would write it for identity `name`: its client id and a
        freshly minted token file for its federated subject (or `sub`, to present another one)."""
        identity = self.identities()[name]
        subject = sub or identity["federated_credentials"][0]["subject"]
        token_file = self.dir / f"token-{name}-{abs(hash((subject, ttl, time.time())))}"
        token_file.write_text(self.token(subject, ttl=ttl))
        return {
            **self.workload_env,
            "AZURE_CLIENT_ID": identity["client_id"],
            "AZURE_FEDERATED_TOKEN_FILE": str(token_file),
        }


def _port_of(url: str) -> int:
    port = urllib.parse.urlparse(url).port
    if port is None:
        raise ValueError(f"no port in {url}")
    return port


@pytest.fixture
def sblocal_factory(tmp_path_factory) -> Iterator:
    started: List[Sblocal] = []

    def start(
        config: Optional[str] = None,
        identities: Optional[str] = None,
        identity: Optional[str] = None,
        extra_args: Optional[List[str]] = None,
    ) -> Sblocal:
        args: List[str] = []
        if config is not None:
            args += ["--config", str(config)]
        if identities is not None:
            args += ["--identities", str(identities)]
        if identity is not None:
            args += ["--identity", identity]
        args += extra_args or []
        instance = Sblocal(tmp_path_factory.mktemp("sblocal") / "dir", args)
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.stop()


@pytest.fixture
def sblocal(sblocal_factory) -> Sblocal:
    return sblocal_factory()
