"""sd_notify over real AF_UNIX datagram sockets, and the unit file."""

from __future__ import annotations

import configparser
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from opus.orchestrator.systemd import SystemdNotifier

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "opus-orchestrator.service"
DROPIN = ROOT / "systemd" / "opus-orchestrator.service.d" / "override.conf.example"


def receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)  # datagrams are queued before sendto returns; this only bounds a bug
    return sock


def assert_empty(sock: socket.socket) -> None:
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    address = str(tmp_path / "notify.sock")
    assert len(address.encode()) < 108, "tmp_path too long for a unix socket"
    sock = receiver(address)
    try:
        yield sock, address
    finally:
        sock.close()


def test_each_message_is_one_exact_datagram(path_socket: tuple[socket.socket, str]) -> None:
    sock, address = path_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    try:
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
        assert notifier.status("2 running, 1 queued")
        assert sock.recv(4096) == b"STATUS=2 running, 1 queued"
        before = time.monotonic_ns() // 1000
        assert notifier.reloading()
        after = time.monotonic_ns() // 1000
        first, second = sock.recv(4096).decode().split("\n")
        assert first == "RELOADING=1"
        key, _, usec = second.partition("=")
        assert key == "MONOTONIC_USEC"
        assert before <= int(usec) <= after
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert notifier.stopping()
        assert sock.recv(4096) == b"STOPPING=1"
        assert notifier.notify(STATUS="two\nlines", ERRNO=5)
        assert sock.recv(4096) == b"STATUS=two lines\nERRNO=5"
        assert_empty(sock)
    finally:
        notifier.close()


def test_abstract_socket() -> None:
    name = f"opus-test-{secrets.token_hex(6)}"
    sock = receiver("\0" + name)
    notifier = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
    try:
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
        assert notifier.status("serving")
        assert sock.recv(4096) == b"STATUS=serving"
        assert_empty(sock)
    finally:
        notifier.close()
        sock.close()


def test_reads_os_environ_by_default(
    path_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, address = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = SystemdNotifier()
    try:
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        notifier.close()


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:9"}])
def test_without_a_socket_everything_is_a_noop(environ: dict[str, str]) -> None:
    notifier = SystemdNotifier(environ)
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.status("x") is False
    assert notifier.reloading() is False
    assert notifier.stopping() is False
    assert notifier.watchdog() is False
    notifier.close()


def test_send_error_is_logged_once_and_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    address = str(tmp_path / "late.sock")
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
    with caplog.at_level(logging.DEBUG, logger="opus.orchestrator.systemd"):
        assert notifier.ready() is False
        assert notifier.status("a") is False
        assert notifier.watchdog() is False
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].levelno == logging.DEBUG
    # the manager appears later: the next message gets through
    sock = receiver(address)
    try:
        assert notifier.ready() is True
        assert sock.recv(4096) == b"READY=1"
    finally:
        notifier.close()
        sock.close()


def test_bad_field_name_is_a_programming_error() -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": "@opus-test-unused"})
    with pytest.raises(ValueError, match="field name"):
        notifier.notify(**{"A=B": 1})


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "120000000"}, 60.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "120000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "120000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert SystemdNotifier(environ).watchdog_interval() == expected


# --- the unit file ------------------------------------------------------------------------


def parse(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    assert parser.read(path, encoding="utf-8") == [str(path)]
    return parser


def test_unit_file_keys() -> None:
    unit = parse(UNIT)
    service = unit["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "%h/.local/bin/opus run --config %h/vault/opus.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "WatchdogSec": "120",
        "KillMode": "mixed",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": "90",
        "Restart": "on-failure",
        "RestartSec": "5",
        "Delegate": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectSystem": "full",
        "ProtectControlGroups": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelLogs": "yes",
        "RestrictSUIDSGID": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "LockPersonality": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "UMask": "0027",
        "Environment": "PYTHONUNBUFFERED=1",
    }
    assert {key: service.get(key) for key in expected} == expected
    # the sandbox needs user namespaces and mount(2); Node-based agents need W^X mappings
    assert "MemoryDenyWriteExecute" not in service
    assert "RestrictNamespaces" not in service
    assert (
        "@mount" not in service["SystemCallFilter"]
        and "@privileged" not in service["SystemCallFilter"]
    )
    assert int(service["TimeoutStopSec"]) > 60  # opus's default shutdown_grace
    assert unit["Install"]["WantedBy"] == "default.target"
    for doc in unit["Unit"]["Documentation"].split():
        # a man page, or the README the install steps copy: nothing that does not ship
        assert doc.startswith(("man:", "file:%h/.local/share/doc/opus-orchestrator/")), doc
    text = UNIT.read_text(encoding="utf-8")
    assert (
        "loginctl enable-linger" in text and "mkdir -p ~/.local/bin ~/.config/systemd/user" in text
    )
    assert "cp README.md ~/.local/share/doc/opus-orchestrator/" in text
    assert "# " in text and "MemoryDenyWriteExecute" in text and "RestrictNamespaces" in text


def test_dropin_example_sets_an_environment_file() -> None:
    dropin = parse(DROPIN)
    assert dropin["Service"]["EnvironmentFile"].endswith("secrets.env")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    units = tmp_path / "units"
    (units / "opus-orchestrator.service.d").mkdir(parents=True)
    shutil.copy(UNIT, units / UNIT.name)
    shutil.copy(DROPIN, units / "opus-orchestrator.service.d" / "override.conf")
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    home = tmp_path / "home"  # the README's install: ~/.local/bin/opus → this venv's opus
    (home / ".local" / "bin").mkdir(parents=True)
    opus = shutil.which("opus") or str(Path(sys.executable).with_name("opus"))
    (home / ".local" / "bin" / "opus").symlink_to(opus)
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(runtime),
        "SYSTEMD_UNIT_PATH": f"{units}:",
        "SYSTEMD_LOG_COLOR": "0",
    }
    result = subprocess.run(
        ["systemd-analyze", "verify", "--user", str(units / UNIT.name)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    if "Failed to initialize manager" in output or "Failed to lookup" in output:
        pytest.skip(f"systemd-analyze cannot run a user manager here: {output.strip()}")
    assert result.returncode == 0, output
    # verify reports unknown keys and bad values as warnings with exit status 0
    assert "opus-orchestrator.service" not in output, output
    assert "override.conf" not in output, output


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_security_rates_the_unit_ok(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_COLORS": "0"},
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    if match is None:
        pytest.skip(f"this systemd-analyze has no offline security: {result.stderr.strip()}")
    print(f"systemd-analyze security: {match.group(1)}")
    assert float(match.group(1)) <= 4.0, result.stdout  # was 8.0 EXPOSED
