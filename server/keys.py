"""API keys and the tier each one grants.

Keys come from a TOML file with a ``[keys]`` table (``"k-ent-1" = "enterprise"``).
Without a file the server accepts one documented development key per tier:
``dev-enterprise``, ``dev-paid`` and ``dev-free``. Lookups hash the presented key
first, so the time a lookup takes does not depend on how much of a real key an
attacker guessed; keys never appear in logs.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from pathlib import Path

from ..core.errors import ConfigError
from ..core.tiers import Tier

__all__ = ["DEV_KEYS", "KeyStore"]

DEV_KEYS: dict[str, str] = {f"dev-{t.label}": t.label for t in Tier}


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class KeyStore:
    def __init__(self, keys: dict[str, str]) -> None:
        if not keys:
            raise ConfigError("the keys file defines no keys")
        self._by_digest: dict[bytes, tuple[bytes, Tier]] = {}
        self.first_key: dict[Tier, str] = {}  # one key per tier, for load generators acting as clients
        for key, tier_name in keys.items():
            try:
                tier = Tier.parse(str(tier_name))
            except ValueError as err:
                raise ConfigError(f"keys: {err}") from None
            digest = _digest(key)
            self._by_digest[digest] = (digest, tier)
            self.first_key.setdefault(tier, key)
        self.tiers_present = sorted({t for _, t in self._by_digest.values()})

    @classmethod
    def load(cls, path: Path | None) -> KeyStore:
        if path is None:
            return cls(DEV_KEYS)
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"keys file not found: {path}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: invalid TOML ({err})") from None
        keys = data.get("keys")
        if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
            raise ConfigError(f'{path}: expected a [keys] table mapping each key to a tier, e.g. "k1" = "paid"')
        return cls(keys)

    def tier_of(self, key: str) -> Tier | None:
        """The key's tier, or None; constant-time in the key's content."""
        digest = _digest(key)
        found = self._by_digest.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            return None
        return found[1]

    def __len__(self) -> int:
        return len(self._by_digest)
