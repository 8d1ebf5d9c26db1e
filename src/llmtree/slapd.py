"""A private OpenLDAP server (slapd) that llmtree creates, starts and stops by itself.

Everything lives in ``settings.ldap_data_dir`` (default ``var/ldap``): ``slapd.d/`` (cn=config),
``data/`` (mdb), ``run/`` (pid file, ldapi socket, ``slapd.log``) and the generated passwords
``admin.secret`` (rootDN) and ``nodes.secret`` (the nodes' service account). No systemd, never
``/etc/ldap/slapd.d``. The CLI (``llmtree ldap init|start|stop``) calls ``init``, ``start`` and
``stop``; tests and supervisors call ``popen`` and own the child. Every failure is a
``ConfigError`` whose message says what to do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from string import Template
from urllib.parse import quote, urlsplit

import ldap3

import llmtree
from llmtree.config import Settings
from llmtree.errors import ConfigError

logger = logging.getLogger(__name__)

SLAPD_CANDIDATES = ("/usr/sbin/slapd", "/usr/local/sbin/slapd", "/usr/libexec/slapd")
MODULE_DIRS = ("/usr/lib/ldap", "/usr/lib64/openldap", "/usr/lib/openldap", "/usr/libexec/openldap")
SCHEMA_DIRS = ("/etc/ldap/schema", "/etc/openldap/schema", "/usr/local/etc/openldap/schema")
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the NUL
MIN_TTL_S = 2


def find_slapd(slapd_path: str | Path | None = None) -> Path:
    """The slapd binary: ``slapd_path``, else ``$LLMTREE_SLAPD``, else PATH and the usual places.

    Raises ConfigError when there is none.
    """
    explicit = slapd_path or os.environ.get("LLMTREE_SLAPD")
    candidates = [str(explicit)] if explicit else [shutil.which("slapd") or "", *SLAPD_CANDIDATES]
    candidates = [candidate for candidate in candidates if candidate]
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise ConfigError(
        "slapd not found: install it with apt-get install slapd ldap-utils, or run make run"
        f" (looked for {', '.join(candidates)})"
    )


def templates_dir() -> Path:
    """Where the schema and config templates are: inside the wheel, else the repo's ``ldap/``."""
    packaged = Path(llmtree.__file__).parent / "_ldap"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "ldap"


def _first_dir(candidates: tuple[str, ...], pattern: str, what: str) -> Path:
    for candidate in candidates:
        if any(Path(candidate).glob(pattern)):
            return Path(candidate)
    raise ConfigError(f"{what} not found in {', '.join(candidates)}: apt-get install slapd")


def _write_private(path: Path, text: str) -> None:
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
        file.write(text)


def _tail(path: Path, num_bytes: int = 2000) -> str:
    try:
        return path.read_bytes()[-num_bytes:].decode(errors="replace").strip()
    except OSError:
        return ""


def _is_slapd_alive(pid: int) -> bool:
    """True if ``pid`` is a live slapd. An exited daemon stays a zombie until PID 1 reaps it
    (seconds in some containers), so ``kill -0`` alone is not enough: read /proc."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        return True  # no procfs: trust kill(0)
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and (proc / "comm").read_text().startswith("slap")
    except (OSError, IndexError):
        return False


class PrivateSlapd:
    """One private slapd, described by ``settings`` (``ldap_data_dir`` and ``ldap_url``).

    Construction does no I/O. ``nosync`` makes ``init`` turn fsync off (olcDbNoSync; tests only);
    ``slapd_path`` overrides ``find_slapd``'s search.
    """

    def __init__(
        self, settings: Settings, *, nosync: bool = False, slapd_path: str | Path | None = None
    ) -> None:
        url = urlsplit(settings.ldap_url)
        if url.scheme != "ldap":
            raise ConfigError(
                f"the private slapd serves plain ldap://, not {settings.ldap_url!r};"
                " set LLMTREE_LDAP_URL=ldap://127.0.0.1:3389"
            )
        self.settings = settings
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 389
        self.dir = settings.ldap_data_dir.absolute()
        self.slapd_d = self.dir / "slapd.d"
        self.run_dir = self.dir / "run"
        self.pid_file = self.run_dir / "slapd.pid"
        self.log_file = self.run_dir / "slapd.log"
        self.nosync = nosync
        self._slapd_path = slapd_path
        self._child: subprocess.Popen[bytes] | None = None

    @property
    def ldap_url(self) -> str:
        """The TCP URL as slapd's ``-h`` wants it (with the trailing slash)."""
        return f"ldap://{f'[{self.host}]' if ':' in self.host else self.host}:{self.port}/"

    def listen_urls(self) -> str:
        """slapd's ``-h``: TCP, plus ldapi (cn=config by peercred) if the socket path fits."""
        ldapi = self.run_dir / "ldapi"
        if len(os.fsencode(ldapi)) > MAX_SOCKET_PATH:
            logger.debug("ldapi socket path too long, serving TCP only: %s", ldapi)
            return self.ldap_url
        return f"{self.ldap_url} ldapi://{quote(str(ldapi), safe='')}"

    def is_initialized(self) -> bool:
        """True once ``init`` has built cn=config in the data dir."""
        return (self.slapd_d / "cn=config.ldif").is_file()

    def pid(self) -> int | None:
        """The pid of the live slapd of this data dir (from its pid file), or None."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _is_slapd_alive(pid) else None

    def is_running(self) -> bool:
        return self.pid() is not None

    # -- init --------------------------------------------------------------------------------
    def init(self, force: bool = False) -> None:
        """Build a fresh directory offline: cn=config, base DIT, service account, passwords.

        Raises ConfigError if slapd runs from the dir, if the dir holds data and ``force`` is
        False, if it holds no ``slapd.d`` (never wiped then), or if slapadd fails.
        """
        if (running := self.pid()) is not None:
            raise ConfigError(f"slapd runs from {self.dir} (pid {running}); stop it first")
        if self.dir.exists() and any(self.dir.iterdir()):
            if not force:
                raise ConfigError(
                    f"{self.dir} already holds an LDAP directory; re-run with --force to wipe it"
                    " (every node entry is lost), or set LLMTREE_LDAP_DIR elsewhere"
                )
            if not self.slapd_d.is_dir():
                raise ConfigError(f"refusing to wipe {self.dir}: it is not a slapd data dir")
            shutil.rmtree(self.dir)
        if any(char.isspace() for char in str(self.dir)):
            raise ConfigError(f"slapd cannot use {self.dir}: set LLMTREE_LDAP_DIR without spaces")
        slapd = find_slapd(self._slapd_path)
        for path in (self.dir, self.slapd_d, self.dir / "data", self.run_dir):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self._build(slapd)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        logger.info("initialised the LDAP directory %s in %s", self.settings.ldap_base, self.dir)

    def _build(self, slapd: Path) -> None:
        base = self.settings.ldap_base
        rdn_type, _, dc = base.split(",", 1)[0].partition("=")
        if rdn_type.strip().lower() != "dc" or not dc.strip():
            raise ConfigError(f"ldap_base {base!r} must start with dc=, e.g. dc=llmtree,dc=local")
        ttl = self.settings.node_ttl_s
        config = self._render(
            "config.ldif.in",
            run_dir=self.run_dir,
            data_dir=self.dir / "data",
            module_path=_first_dir(MODULE_DIRS, "back_mdb*", "slapd modules (back_mdb, dds)"),
            schema_dir=_first_dir(SCHEMA_DIRS, "core.ldif", "the OpenLDAP core schema"),
            llmtree_schema_uri=(templates_dir() / "llmtree-schema.ldif").resolve().as_uri(),
            uid=os.getuid(),
            gid=os.getgid(),
            base=base,
            admin_hash=self._new_secret(slapd, "admin"),
            nosync="TRUE" if self.nosync else "FALSE",
            default_ttl=max(ttl, MIN_TTL_S),
            min_ttl=MIN_TTL_S,
            dds_interval=1 if ttl < 20 else 5,
        )
        dit = self._render(
            "base.ldif.in", base=base, dc=dc.strip(), nodes_hash=self._new_secret(slapd, "nodes")
        )
        slapadd = slapd.with_name("slapadd")
        self._run([slapadd, "-n", "0", "-F", self.slapd_d, "-l", config])
        self._run([slapadd, "-q", "-b", base, "-F", self.slapd_d, "-l", dit])
        config.unlink()
        dit.unlink()

    def _new_secret(self, slapd: Path, name: str) -> str:
        """Write a random password to ``<dir>/<name>.secret`` (0600); return its {SSHA} hash.
        ``slappasswd -T`` hashes the whole file (hence no newline) and keeps it out of argv."""
        secret = self.dir / f"{name}.secret"
        _write_private(secret, secrets.token_urlsafe(24))
        return self._run([slapd.with_name("slappasswd"), "-h", "{SSHA}", "-T", secret]).strip()

    def _render(self, template: str, **values: object) -> Path:
        out = self.dir / template.removesuffix(".in")
        _write_private(out, Template((templates_dir() / template).read_text()).substitute(values))
        return out

    @staticmethod
    def _run(argv: list[str | Path]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"{argv[0]} failed: {exc}") from exc
        if done.returncode != 0:
            raise ConfigError(
                f"{Path(argv[0]).name} failed: {(done.stderr or done.stdout)[-2000:]}"
            )
        return done.stdout

    # -- run ---------------------------------------------------------------------------------
    def start(self, wait_s: float = 10.0) -> int:
        """Start slapd as a daemon (it forks; found by its pid file), wait until it answers.

        Idempotent: returns the pid of the one already running. Raises ConfigError when the dir
        is not initialised, the port is taken, slapd fails (with the reason) or is not ready
        within ``wait_s``.
        """
        if (running := self.pid()) is not None:
            return running
        self._prepare_run()
        with self.log_file.open("wb") as log:
            try:
                done = subprocess.run(
                    self._argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=wait_s
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise ConfigError(f"could not run slapd: {exc}") from exc
        if done.returncode != 0:
            raise ConfigError(
                f"slapd failed to start on {self.ldap_url} (exit {done.returncode}): "
                + self._diagnose()
            )
        self.wait_ready(wait_s)
        deadline = time.monotonic() + wait_s
        while (pid := self.pid()) is None:
            if time.monotonic() > deadline:
                raise ConfigError(f"slapd answers on {self.ldap_url} but wrote no {self.pid_file}")
            time.sleep(0.01)
        logger.info("slapd started: %s pid %d (data %s)", self.ldap_url, pid, self.dir)
        return pid

    def popen(self) -> subprocess.Popen[bytes]:
        """Start slapd as a foreground child; the caller calls ``wait_ready``, then ends it.

        ``-d none`` keeps it in the foreground and logs only errors, to ``run/slapd.log``.
        Raises ConfigError like ``start``.
        """
        if (running := self.pid()) is not None:
            raise ConfigError(f"slapd already runs from {self.dir} (pid {running})")
        self._prepare_run()
        with self.log_file.open("wb") as log:
            self._child = subprocess.Popen(
                self._argv("-d", "none"), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        return self._child

    def wait_ready(self, wait_s: float = 10.0) -> None:
        """Probe until an anonymous bind succeeds; ConfigError if the child exits or on timeout."""
        deadline = time.monotonic() + wait_s
        while True:
            if self._child is not None and self._child.poll() is not None:
                code = self._child.returncode
                raise ConfigError(f"slapd exited with code {code}: {self._diagnose()}")
            try:  # a fresh Server each time: ldap3 shuns an address that once failed
                server = ldap3.Server(
                    self.ldap_url.rstrip("/"), connect_timeout=1, get_info=ldap3.NONE
                )
                conn = ldap3.Connection(server, receive_timeout=1)
                if conn.bind():
                    conn.unbind()
                    return
            except Exception:  # noqa: BLE001 - anything means "not ready yet"
                pass
            if time.monotonic() > deadline:
                raise ConfigError(f"slapd did not answer on {self.ldap_url} within {wait_s:.0f} s")
            time.sleep(0.02)

    def stop(self, timeout_s: float = 10.0) -> bool:
        """SIGTERM the slapd of this dir and wait until it is gone; True if it was running.

        Raises ConfigError if it still lives after ``timeout_s``.
        """
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)  # stale
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _is_slapd_alive(pid):  # it removes its pid file before it exits
            if time.monotonic() > deadline:
                raise ConfigError(f"slapd pid {pid} did not stop within {timeout_s:.0f} s")
            time.sleep(0.01)
        self.pid_file.unlink(missing_ok=True)  # left behind only if it was killed hard
        logger.info("slapd stopped: pid %d", pid)
        return True

    def _diagnose(self) -> str:
        """Why slapd would not start: its log, else slaptest's verdict, else how to find out."""
        if log := _tail(self.log_file):
            return log
        try:
            self._run([find_slapd(self._slapd_path).with_name("slaptest"), "-F", self.slapd_d])
        except ConfigError as exc:
            return str(exc)
        return f"see what `{' '.join(self._argv('-d', 'none'))}` prints"

    def _argv(self, *extra: str) -> list[str]:
        slapd = str(find_slapd(self._slapd_path))
        return [slapd, "-F", str(self.slapd_d), "-h", self.listen_urls(), *extra]

    def _prepare_run(self) -> None:
        if not self.is_initialized():
            raise ConfigError(f"no LDAP directory in {self.dir}: run llmtree ldap init first")
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.pid_file.unlink(missing_ok=True)  # stale: pid() found no live slapd
        with socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET) as probe:
            probe.settimeout(0.5)
            if probe.connect_ex((self.host, self.port)) == 0:
                raise ConfigError(
                    f"port {self.port} on {self.host} is in use by another process;"
                    " pick another with LLMTREE_LDAP_URL=ldap://127.0.0.1:<port>"
                )
