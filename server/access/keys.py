"""API keys: the tier each one grants and the limits it runs under.

Keys come from a TOML file with a ``[keys]`` table. A key maps to its tier
(``"k-ent-1" = "enterprise"``) or to a table with the tier and per-key limits
(``"k-ent-2" = { tier = "enterprise", rps = 50, burst = 100, max_in_flight = 200 }``,
see :mod:`infer_plan.core.key_limits`). Without a file the server accepts one
documented development key per tier (``dev-enterprise``, ``dev-paid``, ``dev-free``),
and only on a loopback address (:class:`~.config.ServerConfig`).

Lookups hash the presented key first, so the time a lookup takes does not depend on
how much of a real key an attacker guessed. Keys never appear in logs, metrics or
error messages: a bad entry is named by its line in the file.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...core.errors import ConfigError
from ...core.key_limits import KeyLimits
from ...core.tiers import Tier

__all__ = ["DEV_KEYS", "KeyGrant", "KeyStore"]

DEV_KEYS: dict[str, str] = {f"dev-{t.label}": t.label for t in Tier}
_LIMIT_FIELDS = {"rps": float, "burst": float, "max_in_flight": int}
_NO_LIMITS = KeyLimits()


@dataclass(frozen=True, slots=True)
class KeyGrant:
    """What a presented key grants: its tier, its limits, and an id that stands for it (a digest, not the key)."""

    tier: Tier
    limits: KeyLimits
    key_id: str


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _entry(value: Any) -> tuple[str, KeyLimits]:
    """(tier name, limits) of one [keys] entry; ConfigError says what is wrong without naming the key."""
    if isinstance(value, str):
        return value, _NO_LIMITS
    if not isinstance(value, dict):
        raise ConfigError('expected a tier name or a table such as { tier = "paid", rps = 10 }')
    unknown = sorted(set(value) - {"tier", *_LIMIT_FIELDS})
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)}; known: tier, {', '.join(_LIMIT_FIELDS)}")
    tier = value.get("tier")
    if not isinstance(tier, str):
        raise ConfigError('needs tier = "enterprise" | "paid" | "free"')
    limits: dict[str, float | int] = {}
    for name, kind in _LIMIT_FIELDS.items():
        if name not in value:
            continue
        raw = value[name]
        if isinstance(raw, bool) or not isinstance(raw, int | float) or (kind is int and not isinstance(raw, int)):
            raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a number'}, not {raw!r}")
        limits[name] = kind(raw)
    return tier, KeyLimits(**limits)


def _entry_lines(text: str) -> dict[str, int]:
    """The line each key of the [keys] table is defined on, so an error can point there instead of at the key."""
    lines: dict[str, int] = {}
    section = ""
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            parsed = tomllib.loads(stripped)
        except tomllib.TOMLDecodeError:
            continue  # a line of a multi-line value: the entry's first line is the one to point at
        if stripped.startswith("["):
            section = stripped
            nested = parsed.get("keys")
            if isinstance(nested, dict) and len(nested) == 1:  # [keys."k-1"]: a sub-table per key
                lines.setdefault(next(iter(nested)), number)
        elif section == "[keys]" and len(parsed) == 1:
            lines.setdefault(next(iter(parsed)), number)
    return lines


class KeyStore:
    def __init__(self, keys: dict[str, Any], *, source: str = "keys", lines: dict[str, int] | None = None) -> None:
        if not keys:
            raise ConfigError(f"{source}: the [keys] table defines no keys")
        self._by_digest: dict[bytes, tuple[bytes, KeyGrant]] = {}
        self.first_key: dict[Tier, str] = {}  # one key per tier, for load generators acting as clients
        for position, (key, value) in enumerate(keys.items(), start=1):
            where = f"line {lines[key]}" if lines and key in lines else f"entry {position} of [keys]"
            try:
                tier_name, limits = _entry(value)
                tier = Tier.parse(tier_name)
            except (ConfigError, ValueError) as err:
                raise ConfigError(f"{source}, {where}: {err}") from None
            digest = _digest(key)
            self._by_digest[digest] = (digest, KeyGrant(tier, limits, digest.hex()[:32]))
            self.first_key.setdefault(tier, key)
        self.tiers_present = sorted({grant.tier for _, grant in self._by_digest.values()})
        self.limited = any(grant.limits.limited for _, grant in self._by_digest.values())

    @classmethod
    def load(cls, path: Path | None) -> KeyStore:
        if path is None:
            return cls(DEV_KEYS)
        try:
            text = path.read_bytes().decode("utf-8")
            data = tomllib.loads(text)
        except FileNotFoundError:
            raise ConfigError(f"keys file not found: {path}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: invalid TOML ({err})") from None
        keys = data.get("keys")
        if not isinstance(keys, dict):
            raise ConfigError(f'{path}: expected a [keys] table mapping each key to a tier, e.g. "k1" = "paid"')
        return cls(keys, source=str(path), lines=_entry_lines(text))

    def grant_of(self, key: str) -> KeyGrant | None:
        """What the key grants, or None; constant-time in the key's content."""
        digest = _digest(key)
        found = self._by_digest.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            return None
        return found[1]

    def tier_of(self, key: str) -> Tier | None:
        grant = self.grant_of(key)
        return None if grant is None else grant.tier

    def __len__(self) -> int:
        return len(self._by_digest)
