"""One container of a local pod: a process started through container_init, its restarts with the kubelet's
back-off, and its probes, reported as a Kubernetes ContainerStatus."""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_BACKOFF_SECONDS = 300.0
# The kubelet's limits on a termination message taken from the container's log (FallbackToLogsOnError).
TERMINATION_LOG_LINES, TERMINATION_LOG_BYTES = 80, 2048
# What a container runs, in place of an image: this project (its virtual environments and tools) and Python.
HOST_SOFTWARE = sorted({str(Path(__file__).resolve().parents[3]), sys.prefix, sys.base_prefix})


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Probe:
    """An httpGet or tcpSocket probe with the pod's ports already mapped to host ports."""

    url: str | None
    tcp_port: int | None
    period: float
    failure_threshold: int
    initial_delay: float
    last_run: float = 0.0
    failures: int = 0

    @classmethod
    def from_spec(cls, spec: dict[str, Any] | None, port_of: Any) -> Probe | None:
        if not spec:
            return None
        timing = {"period": float(spec.get("periodSeconds", 10)), "failure_threshold": int(spec.get(
            "failureThreshold", 3)), "initial_delay": float(spec.get("initialDelaySeconds", 0))}
        if "httpGet" in spec:
            http = spec["httpGet"]
            scheme = str(http.get("scheme", "HTTP")).lower()
            return cls(url=f"{scheme}://127.0.0.1:{port_of(http['port'])}{http.get('path', '/')}", tcp_port=None,
                       **timing)
        if "tcpSocket" in spec:
            return cls(url=None, tcp_port=port_of(spec["tcpSocket"]["port"]), **timing)
        return None  # exec and grpc probes are not run here; the container counts as passing them

    def due(self, started: float) -> bool:
        moment = time.monotonic()
        return moment - started >= self.initial_delay and moment - self.last_run >= self.period

    def run(self) -> bool:
        self.last_run = time.monotonic()
        try:
            if self.url is not None:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    passed = 200 <= response.status < 400
            else:
                with socket.create_connection(("127.0.0.1", self.tcp_port or 0), timeout=2):
                    passed = True
        except OSError:
            passed = False
        self.failures = 0 if passed else self.failures + 1
        return passed


@dataclass
class LocalContainer:
    name: str
    image: str
    argv: list[str]
    env: dict[str, str]
    mounts: list[dict[str, Any]]
    log: Path
    readiness: Probe | None = None
    liveness: Probe | None = None
    startup: Probe | None = None
    started_ok: bool = False
    initial_backoff: float = 10.0
    termination_message_policy: str = "File"
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: str | None = None
    started_monotonic: float = 0.0
    ready: bool = False
    waiting_reason: str | None = "ContainerCreating"
    waiting_message: str | None = None
    last_termination: dict[str, Any] | None = None
    next_start: float = 0.0
    backoff: float = field(default=0.0)

    def start(self) -> None:
        mounts_file = self.log.with_suffix(".mounts.json")
        mounts_file.write_text(json.dumps({"mounts": self.mounts, "keepVisible": HOST_SOFTWARE}))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loraplex.local.container_init", str(mounts_file), "--", *self.argv],
            env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        self.started_at, self.started_monotonic = now(), time.monotonic()
        self.ready, self.waiting_reason, self.waiting_message = self.readiness is None, None, None
        self.started_ok = self.startup is None
        if self.startup is not None:
            self.ready = False
        for probe in (self.readiness, self.liveness, self.startup):
            if probe is not None:
                probe.failures, probe.last_run = 0, 0.0

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tick(self) -> bool:
        """Restart after an exit (restartPolicy Always, with back-off) and run due probes.
        Returns True when anything a status shows has changed."""
        if self.process is None:
            return False
        if not self.running():
            if self.waiting_reason is None:
                self._record_exit(self.process.returncode)
                return True
            if time.monotonic() >= self.next_start:
                self.restarts += 1
                self.start()
                return True
            return False
        changed = False
        if not self.started_ok:
            # Until the startup probe passes, neither liveness nor readiness run (a model may load for minutes).
            assert self.startup is not None
            if self.startup.due(self.started_monotonic):
                if self.startup.run():
                    self.started_ok, self.ready = True, self.readiness is None
                    return True
                if self.startup.failures >= self.startup.failure_threshold:
                    self.signal(signal.SIGKILL)
            return False
        if self.liveness is not None and self.liveness.due(self.started_monotonic):
            self.liveness.run()
            if self.liveness.failures >= self.liveness.failure_threshold:
                self.signal(signal.SIGKILL)  # the kubelet kills a container that fails liveness
                return True
        if self.readiness is not None and self.readiness.due(self.started_monotonic):
            was = self.ready
            self.ready = self.readiness.run() or (self.ready and self.readiness.failures
                                                  < self.readiness.failure_threshold)
            changed = was != self.ready
        return changed

    def _record_exit(self, code: int | None) -> None:
        ran_for = time.monotonic() - self.started_monotonic
        self.backoff = 0.0 if ran_for > 600 else (self.initial_backoff if self.backoff == 0
                                                   else min(self.backoff * 2, MAX_BACKOFF_SECONDS))
        # The first restart is immediate, as the kubelet's; back-off grows from the second.
        delay = 0.0 if self.restarts == 0 and ran_for > 1 else self.backoff
        self.next_start = time.monotonic() + delay
        exit_code = code if code is not None and code >= 0 else 137
        self.last_termination = {"terminated": {
            "exitCode": exit_code, "reason": "Completed" if code == 0 else "Error", "startedAt": self.started_at,
            "finishedAt": now()}}
        if exit_code != 0 and self.termination_message_policy == "FallbackToLogsOnError":
            self.last_termination["terminated"]["message"] = self._log_tail()
        self.ready = False
        self.waiting_reason = "CrashLoopBackOff" if delay else "ContainerCreating"
        self.waiting_message = f"back-off {delay:.0f}s restarting failed container={self.name}" if delay else None

    def _log_tail(self) -> str:
        try:
            with self.log.open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - 64 * 1024))
                lines = log.read().splitlines()[-TERMINATION_LOG_LINES:]
        except OSError:
            return ""
        return b"\n".join(lines)[-TERMINATION_LOG_BYTES:].decode(errors="replace")

    def signal(self, signum: int) -> None:
        if self.running():
            assert self.process is not None
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def stop(self, grace_seconds: float) -> None:
        self.signal(signal.SIGTERM)
        if self.process is not None:
            try:
                self.process.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait(timeout=10)

    def status(self) -> dict[str, Any]:
        state: dict[str, Any]
        if self.running():
            state = {"running": {"startedAt": self.started_at}}
        else:
            state = {"waiting": {"reason": self.waiting_reason or "ContainerCreating",
                                 **({"message": self.waiting_message} if self.waiting_message else {})}}
        return {"name": self.name, "image": self.image, "imageID": f"local://{self.image}",
                "containerID": f"local://{self.process.pid}" if self.process else "",
                "ready": self.ready and self.running(), "started": self.running() and self.started_ok,
                "restartCount": self.restarts,
                "state": state, "lastState": self.last_termination or {}}
