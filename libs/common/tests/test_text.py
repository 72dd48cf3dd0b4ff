import pytest

from pumpflow.common.text import counted, due_to_say


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


def test_a_repeated_faults_line_is_due_at_its_first_then_each_thousandth():
    one_at_a_time = [n for n in range(1, 3002) if due_to_say(n - 1, n)]
    assert one_at_a_time == [1, 1000, 2000, 3000]
    # counted by batches: due as the count passes a mark, not only when it lands on one
    assert due_to_say(0, 4) and due_to_say(998, 1003) and due_to_say(1999, 2000)
    assert not due_to_say(4, 998) and not due_to_say(1000, 1999) and not due_to_say(0, 0)
