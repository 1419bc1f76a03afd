"""The node's options: one dataclass, filled from flags or a TOML file (same names)."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path

from ctedge.core.errors import CtedgeError
from ctedge.edge.study.rules import DEFAULT_RULES, SeriesRules

AE_TITLE = re.compile(r"^[ -~]{1,16}$")  # DICOM AE: up to 16 printable ASCII characters
LOOPBACK = ("127.0.0.1", "::1")

ORTHANC_SNIPPET = '''"DicomModalities": {{ "ctedge": ["{ae}", "EDGE-BOX-IP", {port}] }}'''


@dataclass(frozen=True)
class Peer:
    """One allowed sender: an AE title and, optionally, the host it must come from."""

    ae_title: str
    host: str | None = None

    @classmethod
    def parse(cls, text: str) -> Peer:
        ae, _, host = text.partition("@")
        check_ae(ae.strip(), "allow")
        return cls(ae.strip(), _address(host.strip(), "allow") if host else None)

    def admits(self, ae_title: str, address: str) -> bool:
        return ae_title.strip() == self.ae_title and (self.host is None or self.host == address)


@dataclass(frozen=True)
class Destination:
    """Where results go: AET@HOST:PORT."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        match = re.fullmatch(r"(.+)@(.+):(\d+)", text.strip())
        if not match:
            raise CtedgeError(f"must be AET@HOST:PORT, not {text!r}", param="destination")
        ae, host, port = match.groups()
        check_ae(ae, "destination")
        return cls(ae, host, int(port))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def check_ae(ae: str, param: str) -> None:
    if not AE_TITLE.match(ae) or ae.strip() != ae or "\\" in ae:
        raise CtedgeError(f"{ae!r} is not an AE title (1-16 printable ASCII characters, no backslash)",
                          param=param)


def _address(host: str, param: str) -> str:
    """A host name or address as the IP address peers will be seen from."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        try:
            return socket.gethostbyname(host)
        except OSError:
            raise CtedgeError(f"unknown host {host!r}", param=param) from None


@dataclass(kw_only=True)
class ServeConfig:
    """Everything `ctedge serve` takes; see its --help."""

    model: Path
    ae_title: str = "CTEDGE"
    host: str = "127.0.0.1"  # interface both servers listen on
    dicom_port: int = 11112
    http_port: int = 8080
    allow: list[Peer] = field(default_factory=list)  # empty: loopback peers only
    destination: list[Destination] = field(default_factory=list)
    spool: Path = Path("ctedge-spool")
    quiet_seconds: float = 5.0
    max_study_instances: int = 3000
    min_free_disk: int = 1 << 30  # bytes
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    token: str | None = None
    runtime: str = "auto"
    precision: str | None = None
    provider: str = "auto"
    threads: int | None = None
    max_slices: int = 64
    queue_size: int = 8
    max_study_bytes: int = 1 << 30
    max_image_bytes: int = 50 << 20
    retries: int = 8  # sends of one result to one destination before it is set aside
    retry_seconds: float = 2.0  # first backoff; doubles, at most 5 minutes
    log_phi: bool = False
    secondary_capture: bool = False  # also send the answer as a Secondary Capture plot
    rules: SeriesRules = DEFAULT_RULES  # which series may be scored: the TOML's [rules] table, --rule

    def check(self) -> None:
        check_ae(self.ae_title, "ae_title")
        if self.quiet_seconds < 0:
            raise CtedgeError(f"must be 0 or more, not {self.quiet_seconds}", param="quiet_seconds")
        for name in ("max_study_instances", "queue_size", "max_study_bytes", "max_image_bytes", "retries",
                     "max_slices"):
            if getattr(self, name) < 1:
                raise CtedgeError(f"must be at least 1, not {getattr(self, name)}", param=name)
        tls = [self.tls_cert, self.tls_key]
        if any(tls) and not all(tls):
            raise CtedgeError("needs both --tls-cert and --tls-key", param="tls_cert")
        for path in (self.model, self.tls_cert, self.tls_key, self.tls_ca):
            if path is not None and not Path(path).is_file():
                raise CtedgeError(f"no such file: {path}")

    def admits(self, ae_title: str, address: str) -> bool:
        """Whether a calling AE from an address may associate."""
        if not self.allow:
            return address in LOOPBACK
        return any(peer.admits(ae_title, address) for peer in self.allow)


def _convert(name: str, value):
    if name == "allow":
        return [v if isinstance(v, Peer) else Peer.parse(v) for v in value]
    if name == "destination":
        return [v if isinstance(v, Destination) else Destination.parse(v) for v in value]
    if name in ("model", "spool", "tls_cert", "tls_key", "tls_ca") and value is not None:
        return Path(value)
    return value


def load_config(toml: Path | None, overrides: dict) -> ServeConfig:
    """Options from a TOML file (keys as the flags, ``-`` or ``_``), then flags given on the
    command line (``overrides``: only those set) on top."""
    values: dict = {}
    if toml is not None:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            values = {k.replace("-", "_"): v for k, v in tomllib.loads(Path(toml).read_text()).items()}
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise CtedgeError(f"{toml}: {exc}") from None
    known = {f.name for f in fields(ServeConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CtedgeError(f"{toml}: unknown option(s) {', '.join(unknown)}")
    overrides = dict(overrides)
    flag_rules = overrides.pop("rules", None) or []
    values.update({k: v for k, v in overrides.items() if v is not None and v != []})
    values["rules"] = _rules(values.get("rules", {}), flag_rules, toml)
    if "model" not in values:
        raise CtedgeError("no model given (argument MODEL or `model` in --config)")
    config = ServeConfig(**{k: _convert(k, v) for k, v in values.items()})
    config.check()
    return config


def _rules(table, pairs: list[str], toml: Path | None) -> SeriesRules:
    """The TOML's ``[rules]`` table, then ``--rule KEY=VALUE`` flags on top; a bad rule names
    where it came from."""
    if isinstance(table, SeriesRules):
        return SeriesRules.from_pairs(pairs, table)
    if not isinstance(table, dict):
        raise CtedgeError(f"{toml}: rules must be a table ([rules]), not {table!r}")
    try:
        base = SeriesRules.from_mapping(table)
    except CtedgeError as exc:
        raise CtedgeError(f"{toml}: [rules] {exc.detail}") from None
    return SeriesRules.from_pairs(pairs, base)
