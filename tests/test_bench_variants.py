"""bench.decode's method variants: a suffix changes one setting of the method it names, in any order."""

from __future__ import annotations

from bench.decode import method_variant
from decoding.settings import DecodingSettings


def test_suffixes_set_their_settings_and_combine() -> None:
    plain = DecodingSettings()
    assert method_variant("rapid", plain) == ("rapid", DecodingSettings(method="rapid"))
    base, settings = method_variant("sd+all-tokens", plain)
    assert base == "sd" and settings.method == "sd" and not settings.draft_vocabulary
    for name in ("rapid+lookup+g7", "rapid+g7+lookup"):
        base, settings = method_variant(name, plain)
        assert (base, settings.method, settings.lookup_in_rapid, settings.gamma) == ("rapid", "rapid", True, 7), name
    assert plain.gamma != 7 and not plain.lookup_in_rapid  # the defaults themselves are left alone
