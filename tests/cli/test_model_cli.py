"""``pumpflow model``: the model service's arms and models, from a shell.

The CLI talks to a model service run embedded here, its HTTP API served on 127.0.0.1
(``services/model/tests/test_service_memory.py`` tests the routes themselves)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from pumpflow.cli.main import build_parser
from pumpflow.common.clock import ReplayClock
from pumpflow.common.model import read_model
from pumpflow.common.model.arms import Arm
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.runtime.http import create_app
from pumpflow.common.testing.servers import local_app
from pumpflow.model import DEFAULT_MODEL_PATH
from pumpflow.model.service import ModelService, ModelSettings

TOKEN = "cli-token"
START = 1_700_000_000.0
VERSION = read_model(DEFAULT_MODEL_PATH)[1].version


@contextlib.asynccontextmanager
async def model_replica() -> AsyncIterator[tuple[ModelService, str]]:
    """A model service serving the default model as ``entry``, and its HTTP address."""
    model = ModelService(
        ModelSettings.load(service="model", transport="memory", api_token=TOKEN),
        registry=CollectorRegistry(),
    )
    async with run_embedded([model], clock=ReplayClock(START)) as system:
        async with local_app(create_app(model, system.contexts["model"])) as base:
            yield model, base


async def pumpflow_model(base: str, *args: str) -> int:
    parsed = build_parser().parse_args(["model", *args, "--url", base])
    return await asyncio.to_thread(parsed.handler, parsed)


async def test_load_weigh_promote_and_show_the_arms(monkeypatch, capsys):
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    async with model_replica() as (model, base):
        assert await pumpflow_model(base, "load", "twin", str(DEFAULT_MODEL_PATH)) == 0
        assert capsys.readouterr().out == f"loaded twin version {VERSION} (serving revision 1)\n"
        assert set(model.manager.models()) == {"entry", "twin"}
        assert await pumpflow_model(base, "weights", "control=3") == 0
        capsys.readouterr()
        assert await pumpflow_model(base, "promote", "control") == 0
        assert capsys.readouterr().out == (
            "arms (serving revision 3):\n"
            f"  control: model entry version {VERSION}, weight 1, 100% of new tokens\n"
        )
        assert await pumpflow_model(base, "arms") == 0
        assert "control: model entry" in capsys.readouterr().out


async def test_remove_an_arm_and_unload_the_model_it_served(monkeypatch, capsys):
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    async with model_replica() as (model, base):
        assert await pumpflow_model(base, "load", "twin", str(DEFAULT_MODEL_PATH)) == 0
        arms = [
            {"name": "control", "model_id": "entry", "weight": 0.5},
            {"name": "twin", "model_id": "twin", "weight": 0.3},
            {"name": "third", "model_id": "entry", "weight": 0.2},
            {"name": "watch", "model_id": "twin", "shadow": True},
        ]
        await model.change(lambda serving: msgspec.structs.replace(serving, arms=_arms(arms)))
        capsys.readouterr()
        # the arm's model is served: refused, naming the arm
        assert await pumpflow_model(base, "unload", "twin") == 1
        said = capsys.readouterr().err
        assert said.startswith(f"pumpflow model: {base} refused it (409 Conflict): model 'twin'")
        assert "arm twin serves it" in said and "arm watch serves it" in said
        assert await pumpflow_model(base, "remove-arm", "twin") == 0
        assert capsys.readouterr().out == (
            "arm twin removed (serving revision 3): its tokens go to the live arms left by "
            "their hash, the others keep theirs\n"
            "arms (serving revision 3):\n"
            f"  control: model entry version {VERSION}, weight 0.5, 71% of new tokens\n"
            f"  third: model entry version {VERSION}, weight 0.2, 29% of new tokens\n"
            f"  watch: model twin version {VERSION}, shadow (scores every token, never traded)\n"
        )
        assert await pumpflow_model(base, "remove-arm", "watch", "--weight", "third=0.5") == 0
        assert "  third: model entry version" in capsys.readouterr().out
        assert [(a.name, a.weight) for a in model.processor.arms.arms] == [
            ("control", 0.5),
            ("third", 0.5),
        ]
        assert await pumpflow_model(base, "unload", "twin", "--version", VERSION) == 0
        assert capsys.readouterr().out == (
            f"unloaded twin version {VERSION} (serving revision 5)\n"
        )
        assert set(model.manager.models()) == {"entry"}


async def test_a_regression_model_is_loaded_as_its_card_says_without_type(
    monkeypatch, capsys, tmp_path
):
    sys.path.insert(0, str(Path(__file__).parents[2] / "services" / "model" / "tests"))
    from model_helpers import other_model

    path = other_model(tmp_path, model_id="ret", task="regression")
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    async with model_replica() as (model, base):
        assert await pumpflow_model(base, "load", "ret", str(path)) == 0, capsys.readouterr()
        assert model.manager.card("ret").task == "regression"
        # a type given is still checked against the card
        assert await pumpflow_model(base, "load", "ret", str(path), "--type", "classification") == 1
        assert "is a regression model, not classification" in capsys.readouterr().err


async def test_a_shadow_arm_removed_is_said_to_hold_no_token(monkeypatch, capsys, caplog):
    """A shadow scores beside the live arms and keeps no token: nothing is placed anew."""
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    async with model_replica() as (model, base):
        arms = [
            {"name": "control", "model_id": "entry"},
            {"name": "watch", "model_id": "entry", "shadow": True},
        ]
        await model.change(lambda serving: msgspec.structs.replace(serving, arms=_arms(arms)))
        capsys.readouterr()
        with caplog.at_level(logging.INFO, logger="pumpflow.model"):
            assert await pumpflow_model(base, "remove-arm", "watch") == 0
        assert capsys.readouterr().out == (
            "arm watch removed (serving revision 2): a shadow, it held no token; "
            "the live arms keep theirs\n"
            "arms (serving revision 2):\n"
            f"  control: model entry version {VERSION}, weight 1, 100% of new tokens\n"
        )
    said = [r.getMessage() for r in caplog.records if "removed at serving revision" in r.message]
    assert len(said) == 1 and "a shadow, it held no token" in said[0], said
    assert "its tokens go" not in said[0]


async def test_a_model_loaded_is_put_in_an_arm_by_setting_the_arms(monkeypatch, capsys):
    """A model loaded serves no token until an arm names it: ``set-arms`` gives the
    table (the JSON of the setting ``model_arms``) in one change."""
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    async with model_replica() as (model, base):
        assert await pumpflow_model(base, "load", "twin", str(DEFAULT_MODEL_PATH)) == 0
        capsys.readouterr()
        table = (
            '[{"name": "control", "model_id": "entry", "weight": 0.8},'
            ' {"name": "twin", "model_id": "twin", "weight": 0.2},'
            ' {"name": "watch", "model_id": "twin", "shadow": true}]'
        )
        assert await pumpflow_model(base, "set-arms", table) == 0
        assert capsys.readouterr().out == (
            "arms (serving revision 2):\n"
            f"  control: model entry version {VERSION}, weight 0.8, 80% of new tokens\n"
            f"  twin: model twin version {VERSION}, weight 0.2, 20% of new tokens\n"
            f"  watch: model twin version {VERSION}, shadow (scores every token, never traded)\n"
        )
        assert [(a.name, a.model_id) for a in model.serving.arms] == [
            ("control", "entry"), ("twin", "twin"), ("watch", "twin")
        ]  # fmt: skip
        # one the service cannot serve: refused with its reason, the arms untouched
        assert await pumpflow_model(base, "set-arms", '[{"name": "x", "model_id": "nope"}]') == 1
        assert "refused it (409 Conflict): arms name models not loaded" in capsys.readouterr().err
        assert model.serving.revision == 2


@pytest.mark.parametrize("given", ["", "{}", "[1]", "[{", '{"name": "control"}'])
def test_arms_that_are_no_json_list_of_arms_are_refused_as_the_flags_error(given, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["model", "set-arms", given])
    assert exit_.value.code == 2
    assert "a JSON list of arms" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["remove-arm", "nope"], "(404 Not Found): no arm 'nope'"),
        (["remove-arm", "control"], "(409 Conflict): arm 'control' is the last arm"),
        (["unload", "entry"], "(409 Conflict): model 'entry' is served: arm control serves it"),
        (["unload", "nope"], "(404 Not Found): no model 'nope' is loaded"),
    ],
)
async def test_a_refusal_is_one_line_naming_why_and_exits_1(monkeypatch, capsys, argv, said):
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    async with model_replica() as (model, base):
        assert await pumpflow_model(base, *argv) == 1
        assert model.serving.revision == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"pumpflow model: {base} refused it {said}"), err


async def test_a_change_without_the_token_is_not_sent(monkeypatch, capsys):
    monkeypatch.delenv("PUMPFLOW_API_TOKEN", raising=False)
    async with model_replica() as (model, base):
        assert await pumpflow_model(base, "remove-arm", "control") == 2
        assert model.serving.revision == 0
    assert capsys.readouterr().err == "pumpflow model: PUMPFLOW_API_TOKEN is not set\n"


@pytest.mark.parametrize("given", ["control", "control=", "=1", "control=x", "control=-1"])
def test_a_weight_that_is_not_arm_equals_a_weight_is_refused_as_the_flags_error(given, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["model", "weights", given])
    assert exit_.value.code == 2
    assert "ARM=WEIGHT" in capsys.readouterr().err


def _arms(arms: list[dict]) -> tuple[Arm, ...]:
    return tuple(msgspec.convert(a, Arm) for a in arms)
