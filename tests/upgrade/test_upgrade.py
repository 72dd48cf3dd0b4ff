"""Upgrades in place: what a released version stored or queued decodes with this code.

Each directory under ``fixtures/`` holds the samples a release encoded
(``scripts/upgrade_fixtures.py <commit>`` writes them from a checkout of that commit):
every keyed consumer's record and state, trading's token views, the model's serving and
cards, heartbeats, a refused event's identity, and one event of each registered type.
After an upgrade the new code reads them from Redis, Postgres and the queues, so each
must decode here with every field it had, at its value.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from . import samples

FIXTURES = Path(__file__).parent / "fixtures"
RELEASES = sorted(p for p in FIXTURES.iterdir() if p.is_dir())


def _cases():
    for release in RELEASES:
        for name, codec, raw, expected in samples.fixtures(release):
            yield pytest.param(name, codec, raw, expected, id=f"{release.name}-{name}")


def test_there_are_fixtures_of_a_release():
    assert RELEASES, "no release's fixtures: scripts/upgrade_fixtures.py <commit> writes them"


@pytest.mark.parametrize(("name", "codec", "raw", "expected"), list(_cases()))
def test_a_release_s_sample_decodes_with_every_field(name, codec, raw, expected):
    if codec != "event":
        assert name in samples.PERSISTED, f"{name}: no longer read by this code; say how"
    decoded = samples.decoder(name, codec)(raw)
    assert samples.differences(expected, samples.named(decoded), dropped_ok=False) == []


def test_the_samples_of_this_code_decode_with_it(tmp_path):
    # what the next release's tests will decode: every type and event of this code
    names = samples.write(tmp_path)
    assert set(samples.PERSISTED) <= set(names)
    assert samples.check(tmp_path, dropped_ok=False) == {}


def test_a_field_out_of_place_is_told():
    struct = {"__struct__": {"entry": 1.25, "score": 2.25}}
    swapped = {"__struct__": {"entry": 2.25, "score": 1.25}}
    assert samples.differences(struct, swapped, dropped_ok=False) == [
        ".entry: 1.25 decoded as 2.25",
        ".score: 2.25 decoded as 1.25",
    ]
    added = {"__struct__": {"entry": 1.25, "score": 2.25, "new": 0}}
    assert samples.differences(struct, added, dropped_ok=False) == []
    lost = {"__struct__": {"entry": 1.25}}
    assert samples.differences(struct, lost, dropped_ok=False) == [
        ".score: lost (the reader has no such field)"
    ]
    assert samples.differences(struct, lost, dropped_ok=True) == []
