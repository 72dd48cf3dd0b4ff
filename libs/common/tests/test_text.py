import pytest

from pumpflow.common.text import counted


@pytest.mark.parametrize(
    ("count", "noun", "plural", "text"),
    [
        (1, "position", None, "1 position"),
        (0, "position", None, "0 positions"),
        (2, "position", None, "2 positions"),
        (12_345, "frame", None, "12,345 frames"),
        (-1, "tranche", None, "-1 tranches"),
        (1, "dead letter", None, "1 dead letter"),
        (3, "dead letter", None, "3 dead letters"),
        (1, "entry", "entries", "1 entry"),
        (2, "entry", "entries", "2 entries"),
        (1.0, "minute", None, "1 minute"),
        (1.5, "minute", None, "1.5 minutes"),
        (2_500_000.0, "minute", None, "2,500,000 minutes"),
        (0.25, "minute", None, "0.25 minutes"),
    ],
)
def test_counted_says_the_count_with_its_noun_singular_for_one_alone(count, noun, plural, text):
    assert counted(count, noun, plural) == text
