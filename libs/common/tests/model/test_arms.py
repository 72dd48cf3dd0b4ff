"""A/B arms: assignment stable, follows the weights within sampling error, shadows apart."""

from __future__ import annotations

import ast
import math
import subprocess
import sys

import pytest

from pumpflow.common.model.arms import Arm, ArmError, ArmTable, UnknownArm, mint_fraction
from pumpflow.common.testing import base58_key

MINTS = [base58_key(f"mint{i}") for i in range(20_000)]


def table(*arms: Arm, **options) -> ArmTable:
    return ArmTable(arms, **options)


AB = table(
    Arm(name="control", model_id="entry", weight=0.7),
    Arm(name="treatment", model_id="entry-2", weight=0.3),
    Arm(name="candidate", model_id="entry-3", shadow=True),
)


def test_assignment_is_stable_across_tables_and_processes():
    again = table(*AB.arms)
    first = [AB.live_arm(m).name for m in MINTS[:500]]
    assert first == [again.live_arm(m).name for m in MINTS[:500]]
    # not Python's hash(): another interpreter (another hash seed) places mints alike
    code = (
        "from pumpflow.common.model.arms import mint_fraction; "
        f"print(repr([mint_fraction(m) for m in {MINTS[:50]!r}]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345"},
    ).stdout
    assert ast.literal_eval(out) == [mint_fraction(m) for m in MINTS[:50]]


def test_assignment_follows_the_weights_within_sampling_error():
    for weights in ((0.7, 0.3), (0.5, 0.5), (0.9, 0.1), (0.2, 0.8)):
        arms = AB.with_weights({"control": weights[0], "treatment": weights[1]})
        counts = {"control": 0, "treatment": 0}
        for mint in MINTS:
            counts[arms.live_arm(mint).name] += 1
        n = len(MINTS)
        for name, weight in zip(("control", "treatment"), weights, strict=True):
            share = weight / sum(weights)
            # 4 standard errors of a binomial share: fails by chance about once in 16,000
            assert abs(counts[name] / n - share) <= 4 * math.sqrt(share * (1 - share) / n), (
                weights,
                counts,
            )


def test_shadow_arms_score_every_token_and_never_take_live_traffic():
    live_names = set()
    for mint in MINTS[:2000]:
        route = AB.route(mint)
        assert route[0] is AB.live_arm(mint) and not route[0].shadow
        assert [a.name for a in route[1:]] == ["candidate"]
        live_names.add(route[0].name)
    assert live_names == {"control", "treatment"}
    assert "candidate" not in AB.shares()
    # a heavy weight on a shadow arm changes nothing
    heavy = AB.with_weights({"candidate": 100.0})
    assert all(heavy.live_arm(m).name == AB.live_arm(m).name for m in MINTS[:2000])


def test_a_weight_change_moves_only_the_mints_between_the_cut_points():
    after = AB.with_weights({"control": 0.6, "treatment": 0.4})
    moved = [m for m in MINTS if AB.live_arm(m).name != after.live_arm(m).name]
    # only control -> treatment, the mints between 0.6 and 0.7
    assert all(AB.live_arm(m).name == "control" for m in moved)
    assert all(0.6 <= mint_fraction(m) < 0.7 for m in moved)
    assert after.revision == AB.revision + 1


def test_promotion_makes_the_arm_live_for_all_and_shadows_the_live_ones():
    promoted = AB.promote("candidate")
    assert all(promoted.live_arm(m).name == "candidate" for m in MINTS[:500])
    assert {a.name for a in promoted.shadows} == {"control", "treatment"}
    assert promoted.shares() == {"candidate": 1.0}
    assert promoted.route(MINTS[0])[0].model_id == "entry-3"


def test_tables_round_trip_and_refuse_what_cannot_route():
    assert ArmTable.decode(AB.encode()) == AB
    with pytest.raises(ArmError, match="no live arm"):
        table(Arm(name="a", model_id="m", shadow=True))
    with pytest.raises(ArmError, match="distinct"):
        table(Arm(name="a", model_id="m"), Arm(name="a", model_id="n"))
    with pytest.raises(ArmError, match="weight"):
        table(Arm(name="a", model_id="m", weight=-1.0))
    with pytest.raises(ArmError, match="no arm 'nope'"):
        AB.with_weights({"nope": 1.0})
    with pytest.raises(ArmError, match="no live arm"):
        AB.with_weights({"control": 0.0, "treatment": 0.0})
    with pytest.raises(ArmError, match="unreadable"):
        ArmTable.decode(b"{")
    added = AB.with_arm(Arm(name="fourth", model_id="m4", weight=0.0))
    assert [a.name for a in added.arms][-1] == "fourth"
    assert [a.name for a in added.without_arm("fourth").arms] == [a.name for a in AB.arms]


def test_routes_looked_up_are_the_routes_placed_and_kept_within_bounds(monkeypatch):
    import pumpflow.common.model.arms as arms_module

    monkeypatch.setattr(arms_module, "PLACED_KEPT", 50)
    fresh = table(*AB.arms)
    for mint in MINTS[:120]:
        found = fresh.routes[mint]
        assert found is fresh.route(mint) is fresh.routes[mint]
        assert found[0] is fresh.live_arm(mint)
        assert len(fresh.routes) <= 50
    # the same mints again, placed anew once forgotten, land alike
    assert [fresh.routes[m] for m in MINTS[:120]] == [AB.route(m) for m in MINTS[:120]]


def test_a_route_shared_by_every_mint_is_the_route_each_mint_takes():
    one_live = table(Arm(name="a", model_id="m"), Arm(name="s", model_id="n", shadow=True))
    assert one_live.shared_route == (one_live.arm("a"), one_live.arm("s"))
    assert all(one_live.route(mint) is one_live.shared_route for mint in MINTS[:50])
    # a live arm of no weight takes no new mint, but keeps those it scored: no route is
    # every mint's
    weighed = AB.with_weights({"treatment": 0.0})
    assert all(weighed.route(m)[0].name == "control" for m in MINTS[:500])
    assert weighed.shared_route is None
    assert weighed.route_for(MINTS[0], "treatment")[0] is weighed.arm("treatment")
    assert AB.shared_route is None


def test_a_mint_keeps_the_arm_that_scored_it_across_share_changes():
    """Shares place new mints; a mint an arm scored stays with it while the arm is live
    (its weight 0 included: closed to new mints), so one token's predictions are one
    arm's however the shares move."""
    after = AB.with_weights({"control": 0.1, "treatment": 0.9})
    moved = [m for m in MINTS[:2000] if AB.live_arm(m).name != after.live_arm(m).name]
    assert moved  # the new cut would move these to treatment
    for mint in moved:
        assert after.route_for(mint, "control")[0] is after.arm("control")
        # a mint no arm scored yet is placed by the shares
        assert after.route_for(mint, None) is after.route(mint)
    closed = AB.with_weights({"control": 0.0})
    assert closed.route_for(MINTS[0], "control") == (closed.arm("control"), closed.arm("candidate"))
    assert all(closed.route_for(m, None)[0].name == "treatment" for m in MINTS[:500])


def test_an_arm_removed_or_shadowed_hands_its_mints_to_the_live_arms_by_their_hash():
    three = table(
        Arm(name="control", model_id="entry", weight=0.5),
        Arm(name="treatment", model_id="entry-2", weight=0.3),
        Arm(name="third", model_id="entry-4", weight=0.2),
        Arm(name="candidate", model_id="entry-3", shadow=True),
    )
    removed = three.without_arm("treatment")
    assert removed.revision == three.revision + 1
    assert [a.name for a in removed.arms] == ["control", "third", "candidate"]
    # its share goes to the others in proportion to their weights
    assert removed.shares() == pytest.approx({"control": 0.5 / 0.7, "third": 0.2 / 0.7})
    orphans = [m for m in MINTS[:3000] if three.live_arm(m).name == "treatment"]
    landed = {removed.route_for(m, "treatment")[0].name for m in orphans}
    assert landed == {"control", "third"}
    for mint in orphans:
        # where the shares place it now: the same in every replica and after a restart
        assert removed.route_for(mint, "treatment") is removed.route(mint)
    # a shadow keeps scoring every mint, live for none: a promotion takes them all
    promoted = three.promote("candidate")
    assert {promoted.route_for(m, "control")[0].name for m in MINTS[:200]} == {"candidate"}


def test_removing_an_arm_is_refused_when_nothing_would_route_or_it_is_unknown():
    with pytest.raises(ArmError, match="no arm 'nope'") as unknown:
        AB.without_arm("nope")
    assert isinstance(unknown.value, UnknownArm)
    alone = table(Arm(name="control", model_id="entry"))
    with pytest.raises(ArmError, match="'control' is the last arm"):
        alone.without_arm("control")
    with pytest.raises(ArmError, match="no live arm with a positive weight"):
        table(Arm(name="a", model_id="m"), Arm(name="s", model_id="m", shadow=True)).without_arm(
            "a"
        )
