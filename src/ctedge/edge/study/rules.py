"""Which series may be scored: rules on header data, given as data (like MONAI Deploy's
series selector, mercure's routing rules), so a site changes them without code.

``SeriesRules`` is frozen and checked when made; ``SeriesFacts`` is what the rules look
at, read from a series' first file or from a PACS's series-level answer (C-FIND, QIDO-RS)
before anything is retrieved. A fact that is unknown (None) passes, so a PACS that does
not return BodyPartExamined at series level filters nothing on it.

The defaults suit chest CT: Modality CT; ImageType ORIGINAL and PRIMARY, not LOCALIZER,
DERIVED or SECONDARY; BodyPartExamined naming the chest when present (DICOM's defined
terms CHEST, THORAX, CHESTABDOMEN, NECKCHEST..., and LUNG, TORSO, WHOLEBODY, TÓRAX,
TORACE as sites write them; it is optional and often blank, so a blank one passes);
SeriesDescription not naming a scout, a dose report or a MIP; SliceThickness
0.5-10 mm (no scanner reconstructs thinner; thicker is a slab); at least 8 slices (what a
patient's answer needs).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from ctedge.core.errors import CtedgeError

CHEST_BODY_PARTS = r"CHEST|THORA|LUNG|TORSO|WHOLE.?BODY|T.RAX|TORACE"
NOT_DIAGNOSTIC = r"SCOUT|TOPOGRAM|LOCALI[SZ]ER|SURVIEW|SCANOGRAM|DOSE (REPORT|INFO)|PATIENT PROTOCOL|\bM(IN)?IP\b"
REGEX_RULES = ("body_part", "description_include", "description_exclude")
LIST_RULES = ("modality", "image_type_require", "image_type_exclude")
BOUND_RULES = ("min_thickness_mm", "max_thickness_mm")
MAX_TEXT = 256  # of a header value matched (VR LO/CS allow 64; a hostile file may hold more)


@dataclass(frozen=True)
class SeriesFacts:
    """What the rules look at; None where it is unknown (passes every rule)."""

    modality: str | None = None
    image_type: tuple[str, ...] | None = None
    description: str | None = None
    body_part: str | None = None
    thickness_mm: float | None = None
    slices: int | None = None

    @classmethod
    def of_slices(cls, refs: list) -> SeriesFacts:
        """A series' facts from its slices' headers (``SliceRef``): the first file's values."""
        first = refs[0]
        return cls(modality=first.modality, image_type=first.image_type or None, description=first.description,
                   body_part=first.body_part, thickness_mm=first.thickness, slices=len(refs))


def _key(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True, kw_only=True)
class SeriesRules:
    """Which series are eligible; regexes match anywhere, ignoring case. Empty text or
    None turns a regex or bound rule off."""

    modality: tuple[str, ...] = ("CT",)
    image_type_require: tuple[str, ...] = ("ORIGINAL", "PRIMARY")
    image_type_exclude: tuple[str, ...] = ("LOCALIZER", "DERIVED", "SECONDARY")
    body_part: str | None = CHEST_BODY_PARTS
    body_part_required: bool = False  # a series without BodyPartExamined passes unless set
    description_include: str | None = None
    description_exclude: str | None = NOT_DIAGNOSTIC
    min_thickness_mm: float | None = 0.5
    max_thickness_mm: float | None = 10.0
    min_slices: int = 8

    def __post_init__(self) -> None:
        for name in LIST_RULES:
            value = getattr(self, name)
            if not isinstance(value, (str, list, tuple)):
                raise CtedgeError(f"{_key(name)}: must be a list of terms, not {value!r}", param="rules")
            items = value.split(",") if isinstance(value, str) else value
            object.__setattr__(self, name, tuple(str(v).strip().upper() for v in items if str(v).strip()))
        for name in REGEX_RULES:
            pattern = getattr(self, name) or None
            object.__setattr__(self, name, pattern)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as exc:
                    raise CtedgeError(f"{_key(name)}: {pattern!r} is not a regular expression ({exc})",
                                      param="rules") from None
        for name in BOUND_RULES:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise CtedgeError(f"{_key(name)}: must be a finite number of mm, 0 or more, not {value!r}",
                                  param="rules")
        low, high = self.min_thickness_mm, self.max_thickness_mm
        if low is not None and high is not None and low > high:
            raise CtedgeError(f"min-thickness-mm {low} is above max-thickness-mm {high}", param="rules")
        if isinstance(self.min_slices, bool) or not isinstance(self.min_slices, int) or self.min_slices < 1:
            raise CtedgeError(f"min-slices: must be a whole number, at least 1, not {self.min_slices!r}",
                              param="rules")
        if not isinstance(self.body_part_required, bool):
            raise CtedgeError(f"body-part-required: must be true or false, not {self.body_part_required!r}",
                              param="rules")
        if not self.modality:
            raise CtedgeError("modality: name at least one (e.g. CT)", param="rules")

    @classmethod
    def from_mapping(cls, values: dict[str, Any], base: SeriesRules | None = None) -> SeriesRules:
        """Rules from a TOML ``[rules]`` table or ``--rule`` pairs (keys with ``-`` or ``_``;
        text values are parsed: ``CT,PT``, ``8``, ``true``, empty for off), over ``base``."""
        known = {f.name: f for f in fields(cls)}
        changes = {}
        for key, value in values.items():
            name = str(key).strip().replace("-", "_")
            if name not in known:
                raise CtedgeError(f"unknown rule {key!r} (known: {', '.join(map(_key, known))})", param="rules")
            changes[name] = _parse(name, value) if isinstance(value, str) else value
        return cls(**{**asdict(base or cls()), **changes})

    @classmethod
    def from_pairs(cls, pairs: list[str], base: SeriesRules | None = None) -> SeriesRules:
        """Rules from ``KEY=VALUE`` texts (``--rule``), over ``base``."""
        values = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise CtedgeError(f"must be KEY=VALUE, not {pair!r}", param="rules")
            values[key.strip()] = value.strip()
        return cls.from_mapping(values, base)

    def to_dict(self) -> dict[str, Any]:
        return {_key(k): list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def rejection(self, facts: SeriesFacts) -> str | None:
        """Why a series is not eligible; None when it is."""
        for check in (self._modality, self._image_type, self._description, self._body_part, self._thickness):
            reason = check(facts)
            if reason:
                return reason
        if facts.slices is not None and facts.slices < self.min_slices:
            return f"{facts.slices} slice(s), fewer than min-slices {self.min_slices}"
        return None

    def _modality(self, facts: SeriesFacts) -> str | None:
        if facts.modality is not None and facts.modality.strip().upper() not in self.modality:
            return f"modality {facts.modality or 'missing'}, not {'/'.join(self.modality)}"
        return None

    def _image_type(self, facts: SeriesFacts) -> str | None:
        if not facts.image_type:  # a series without ImageType is accepted
            return None
        values = [v.strip().upper() for v in facts.image_type]
        bad = [v for v in values if v in self.image_type_exclude]
        if bad:
            return f"ImageType {'/'.join(values)} ({bad[0]})"
        missing = [v for v in self.image_type_require if v not in values]
        if missing:
            return f"ImageType {'/'.join(values)} is not {'/'.join(self.image_type_require)}"
        return None

    def _description(self, facts: SeriesFacts) -> str | None:
        if facts.description is None:
            return None
        text = facts.description[:MAX_TEXT]
        if self.description_exclude:
            found = re.search(self.description_exclude, text, re.IGNORECASE)
            if found:
                return f"SeriesDescription {facts.description!r} names a {found.group(0)} (description-exclude)"
        if self.description_include and not re.search(self.description_include, text, re.IGNORECASE):
            return f"SeriesDescription {facts.description!r} does not match description-include"
        return None

    def _body_part(self, facts: SeriesFacts) -> str | None:
        part = (facts.body_part or "").strip()[:MAX_TEXT]
        if not part:
            return "no BodyPartExamined (body-part-required)" if self.body_part_required and \
                facts.body_part is not None else None
        if self.body_part and not re.search(self.body_part, part, re.IGNORECASE):
            return f"BodyPartExamined {part!r} is not the chest (body-part)"
        return None

    def _thickness(self, facts: SeriesFacts) -> str | None:
        t, low, high = facts.thickness_mm, self.min_thickness_mm, self.max_thickness_mm
        if t is None or (low is None or t >= low) and (high is None or t <= high):
            return None
        return f"SliceThickness {t:g} mm outside {low if low is not None else 0:g}-" \
               f"{high if high is not None else math.inf:g} mm"


def _parse(name: str, text: str) -> Any:
    """A rule's value from text (a flag, or a TOML string)."""
    text = text.strip()
    if name in LIST_RULES or name in REGEX_RULES:
        return text
    if name in BOUND_RULES and text.lower() in ("", "none", "off"):
        return None
    try:
        if name == "body_part_required":
            return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}[text.lower()]
        return int(text) if name == "min_slices" else float(text)
    except (KeyError, ValueError):
        raise CtedgeError(f"{_key(name)}: {text!r} is not a valid value", param="rules") from None


DEFAULT_RULES = SeriesRules()
