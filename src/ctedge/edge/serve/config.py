"""The node's options: one dataclass, filled from flags or a TOML file (same names)."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ctedge.core.choices import LogFormat
from ctedge.core.errors import CtedgeError
from ctedge.edge.study.rules import DEFAULT_RULES, SeriesRules

AE_TITLE = re.compile(r"^[ -~]{1,16}$")  # DICOM AE: up to 16 printable ASCII characters
LOOPBACK = ("127.0.0.1", "::1")
LOG_FORMATS = LogFormat.values()

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


@dataclass(frozen=True)
class WebDestination:
    """Where results go by STOW-RS: ``dicomweb:URL``, the DICOMweb service's base (credentials
    in the URL or from ``--dicomweb-token``/``--dicomweb-user``; never in its name)."""

    url: str

    @classmethod
    def parse(cls, text: str, param: str = "destination") -> WebDestination:
        url = text.strip().removeprefix(WEB_PREFIX)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise CtedgeError(f"must be dicomweb:URL with an http(s) URL, e.g. dicomweb:http://pacs:8042/dicom-web, "
                              f"not {_without_password(text)!r}", param=param)
        return cls(url)

    def __str__(self) -> str:
        parts = urlsplit(self.url)
        return WEB_PREFIX + urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/"), "", ""))


WEB_PREFIX = "dicomweb:"


def _without_password(text: str) -> str:
    return re.sub(r"//[^/@]*@", "//…@", text)


def parse_destination(text: str) -> Destination | WebDestination:
    """``AET@HOST:PORT`` (C-STORE) or ``dicomweb:URL`` (STOW-RS)."""
    return WebDestination.parse(text) if text.strip().startswith(WEB_PREFIX) else Destination.parse(text)


def parse_poll(text: str) -> str:
    """A PACS to poll, checked: ``AET@HOST:PORT`` or ``dicomweb:URL``."""
    if text.strip().startswith(WEB_PREFIX):
        WebDestination.parse(text, "poll")
        return text.strip()
    try:
        Destination.parse(text)
    except CtedgeError:
        raise CtedgeError(f"must be AET@HOST:PORT or dicomweb:URL, not {text!r}", param="poll") from None
    return text.strip()


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
    destination: list[Destination | WebDestination] = field(default_factory=list)
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
    # the journal, its loops and what they promise (issue 25)
    incomplete_seconds: float = 600.0  # a study that may be incomplete waits this long for more
    no_partial: bool = False  # then: no answer at all, rather than a PARTIAL one
    retry_failed_every: float = 600.0  # a failed delivery is tried again this often, until sent
    keep_days: float | None = None  # retention: answered and delivered studies older than this go
    max_spool: int | None = None  # retention: ... and the oldest go while the spool is over this (bytes)
    destination_tls_ca: Path | None = None  # TLS to destinations: their CA (PEM)
    destination_tls_cert: Path | None = None  # ... and the node's client certificate, if they ask for one
    destination_tls_key: Path | None = None
    destination_timeout: float = 30.0  # seconds a destination may take to associate or answer
    classify_retries: int = 3  # tries of a classification that raised before its error is the answer
    disk_check_seconds: float = 5.0  # the disk watcher's period (free space; the end of a pause)
    retention_seconds: float = 60.0  # the retention loop's period
    loop_restart_seconds: float = 1.0  # first wait before a dead loop is restarted (doubling, 60 s at most)
    # what a peer may make the node hold (issue 25 item 5) and how it logs
    max_associations: int = 16  # negotiated associations at once
    max_associations_per_host: int | None = None  # from one host; default half of max_associations
    associate_seconds: float = 5.0  # connect -> association negotiated, or the socket is dropped
    idle_seconds: float = 30.0  # an association silent this long is aborted; one PDU must arrive within it
    max_instance_bytes: int = 256 << 20  # a larger instance gets 0xA700
    drain_seconds: float = 30.0  # on SIGTERM: what open associations get to finish
    log_format: str = LogFormat.text.value  # text (one line a record) or json (one object a line)
    # which series may be scored (issue 26 item 6)
    rules: SeriesRules = DEFAULT_RULES  # which series may be scored: the TOML's [rules] table, --rule
    # DICOMweb peers (issue 26 items 4 and 5): dicomweb: destinations and a dicomweb: poll source
    dicomweb_token: str | None = None  # bearer token for them
    dicomweb_user: str | None = None  # ... or basic auth; the password from CTEDGE_DICOMWEB_PASSWORD
    dicomweb_password: str | None = None
    poll: str | None = None  # a PACS asked for new CT studies: AET@HOST:PORT or dicomweb:URL
    poll_every: float = 60.0  # seconds between two polls
    poll_since: str | None = None  # the first poll's StudyDate (YYYYMMDD); default today

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
        if self.tls_ca and not all(tls):
            raise CtedgeError("checks senders' certificates on DICOM TLS, which needs --tls-cert and --tls-key too "
                              "(without them the node would speak plain DICOM)", param="tls_ca")
        self._check_guards()
        self._check_dicomweb()
        for path in (self.model, self.tls_cert, self.tls_key, self.tls_ca):
            if path is not None and not Path(path).is_file():
                raise CtedgeError(f"no such file: {path}")
        self._check_journal_options()

    def _check_journal_options(self) -> None:
        for name in ("incomplete_seconds", "retry_failed_every", "keep_days", "max_spool", "destination_timeout",
                     "disk_check_seconds", "retention_seconds", "loop_restart_seconds"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise CtedgeError(f"must be more than 0, not {value}", param=name)
        if self.classify_retries < 1:
            raise CtedgeError(f"must be at least 1, not {self.classify_retries}", param="classify_retries")
        client = [self.destination_tls_cert, self.destination_tls_key]
        if any(client) and not all(client):
            raise CtedgeError("needs both --destination-tls-cert and --destination-tls-key",
                              param="destination_tls_cert")
        if any(client) and self.destination_tls_ca is None:
            raise CtedgeError("needs --destination-tls-ca (the destinations' CA) too", param="destination_tls_cert")
        for path in (self.destination_tls_ca, *client):
            if path is not None and not Path(path).is_file():
                raise CtedgeError(f"no such file: {path}")

    def _check_guards(self) -> None:
        for name in ("max_associations", "max_instance_bytes"):
            if getattr(self, name) < 1:
                raise CtedgeError(f"must be at least 1, not {getattr(self, name)}", param=name)
        if not 1 <= self.per_host_limit <= self.max_associations:
            raise CtedgeError(f"must be 1 to --max-associations ({self.max_associations}), not "
                              f"{self.max_associations_per_host}", param="max_associations_per_host")
        for name in ("associate_seconds", "idle_seconds"):
            if not getattr(self, name) > 0:
                raise CtedgeError(f"must be more than 0, not {getattr(self, name)}", param=name)
        if self.drain_seconds < 0:
            raise CtedgeError(f"must be 0 or more, not {self.drain_seconds}", param="drain_seconds")
        if self.log_format not in LOG_FORMATS:
            raise CtedgeError(f"must be one of {', '.join(LOG_FORMATS)}, not {self.log_format!r}", param="log_format")

    def _check_dicomweb(self) -> None:
        if self.dicomweb_token and self.dicomweb_user:
            raise CtedgeError("and --dicomweb-user: give one", param="dicomweb_token")
        if not self.poll_every > 0:
            raise CtedgeError(f"must be more than 0, not {self.poll_every}", param="poll_every")
        if self.poll_since is not None and not re.fullmatch(r"(19|20)\d\d(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])",
                                                            str(self.poll_since)):
            raise CtedgeError(f"must be a date YYYYMMDD, not {self.poll_since!r}", param="poll_since")
        if self.poll is not None or any(isinstance(d, WebDestination) for d in self.destination):
            try:
                import httpx  # noqa: F401
                import python_multipart  # noqa: F401
            except ImportError as exc:
                raise CtedgeError(f"DICOMweb destinations and --poll need the pacs extra ({exc.name} is missing): "
                                  "pip install 'ctedge[serve]'", param="poll" if self.poll else "destination") from None

    @property
    def per_host_limit(self) -> int:
        """Associations one host may hold: ``max_associations_per_host``, else half of all."""
        if self.max_associations_per_host is not None:
            return self.max_associations_per_host
        return max(1, self.max_associations // 2)

    def admits(self, ae_title: str, address: str) -> bool:
        """Whether a calling AE from an address may associate."""
        if not self.allow:
            return address in LOOPBACK
        return any(peer.admits(ae_title, address) for peer in self.allow)


SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)B?$", re.IGNORECASE)
SIZES = ("min_free_disk", "max_study_bytes", "max_image_bytes", "max_instance_bytes", "max_spool")


def parse_size(text: str | int | None, param: str) -> int | None:
    """'2G', '500M', '1048576' (or a number) -> bytes."""
    if text is None or isinstance(text, int):
        return text
    match = SIZE.match(str(text).strip())
    if not match:
        raise CtedgeError(f"must be a size such as 2G, 500M or 1048576, not {text!r}", param=param)
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))


def _convert(name: str, value):
    if name in SIZES:
        return parse_size(value, name)
    if name == "allow":
        return [v if isinstance(v, Peer) else Peer.parse(v) for v in value]
    if name == "destination":
        return [v if isinstance(v, (Destination, WebDestination)) else parse_destination(v) for v in value]
    if name == "poll" and value is not None:
        return parse_poll(value)
    if name in ("model", "spool", "tls_cert", "tls_key", "tls_ca", "destination_tls_ca", "destination_tls_cert",
                "destination_tls_key") and value is not None:
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
