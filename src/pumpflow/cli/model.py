"""``pumpflow model arms|load|set-arms|weights|promote|remove-arm|unload``: the model
service's A/B arms and models, from a shell.

Talks to a model replica's HTTP API (``--url``, default the local one) with the bearer
token of ``PUMPFLOW_API_TOKEN`` for a change. Any replica takes a change: it applies it
at once, stores it for the others (they follow within ``model_serving_refresh_s``) and
for a restart. The shares place new tokens; a token stays with the live arm that first
scored it until that arm is removed or made a shadow (``promote``).

``set-arms ARMS`` replaces the arms table in one change (``PUT /arms``; the JSON of the
setting ``model_arms``): how a model loaded comes to serve, in an arm of its own or as a
shadow. ``remove-arm NAME`` takes an arm out: its share of new tokens goes to the live arms left
in proportion to their weights, unless ``--weight ARM=W`` sets theirs in the same
change; its tokens go to the live arms left by their hash (the same place in every
replica). The last arm, or the only live one, is not removed. ``unload MODEL_ID`` drops
a model no arm serves (``--version V``: only if that version serves under the id).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse

from pumpflow.cli.api import api_token, failure, get_json, replica_url_argument, send_json


def weight(text: str) -> tuple[str, float]:
    """``ARM=WEIGHT``, a finite weight >= 0; anything else is the flag's error."""
    name, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not sep or not name or not number >= 0.0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"not ARM=WEIGHT (a weight >= 0): {text!r}")
    return name, number


def arms_table(text: str) -> list[dict]:
    """The arms as the setting ``model_arms`` gives them: a JSON list of objects, each
    an arm (the service checks their fields)."""
    try:
        arms = json.loads(text)
    except ValueError:
        arms = None
    if not isinstance(arms, list) or not arms or not all(isinstance(a, dict) for a in arms):
        raise argparse.ArgumentTypeError(
            'not a JSON list of arms: [{"name": ..., "model_id": ..., "weight": ...}, ...]'
        )
    return arms


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "model",
        help="the model service's A/B arms and models: show, load, set, weigh, promote, remove, "
        "unload",
        description=(
            "Show or change the model service's arms and models through a model replica's "
            "HTTP API; a change needs PUMPFLOW_API_TOKEN, is applied at once, and is stored "
            "for every replica and restart. The shares place new tokens: a token stays with "
            "the live arm that first scored it until that arm is removed or made a shadow. "
            "Exit status 0 done; 1 refused (the reason on one line) or no answer; 2 without "
            "the token."
        ),
    )
    actions = parser.add_subparsers(dest="model_action", metavar="<action>", required=True)
    shown = actions.add_parser("arms", help="show the arms: model, version, weight and share")
    replica_url_argument(shown, "model")
    load = actions.add_parser(
        "load", help="load a model file (its card beside it) under an id, checked as at start"
    )
    load.add_argument("model_id", help="the id arms name it by (an id loaded is replaced)")
    load.add_argument("path", help="the .onnx file, its card beside it, on the replicas' disk")
    load.add_argument(
        "--type",
        dest="model_type",
        choices=("classification", "regression"),
        help="the model's task, checked against its card (default: the card's)",
    )
    replica_url_argument(load, "model")
    table = actions.add_parser(
        "set-arms",
        help="set the whole arms table in one change (a model loaded serves once an arm names it)",
    )
    table.add_argument(
        "arms",
        type=arms_table,
        metavar="ARMS",
        help='a JSON list of arms, as the setting model_arms: [{"name": "control", '
        '"model_id": "entry", "weight": 0.8}, {"name": "mine", "model_id": "mine", '
        '"weight": 0.2}] ("shadow": true scores every token, never traded)',
    )
    replica_url_argument(table, "model")
    weights = actions.add_parser(
        "weights", help="set arms' weights (shares of new tokens; the others keep theirs)"
    )
    weights.add_argument(
        "weights", nargs="+", type=weight, metavar="ARM=WEIGHT", help="an arm's new weight"
    )
    replica_url_argument(weights, "model")
    promote = actions.add_parser(
        "promote", help="make an arm live for every token, the live ones its shadows"
    )
    promote.add_argument("arm", help="the arm's name")
    replica_url_argument(promote, "model")
    remove = actions.add_parser(
        "remove-arm",
        help="take an arm out: its share to the live arms left, its tokens placed among them",
    )
    remove.add_argument("arm", help="the arm's name")
    remove.add_argument(
        "--weight",
        dest="weights",
        action="append",
        type=weight,
        metavar="ARM=WEIGHT",
        help="an arm left's weight, set in the same change (repeatable; default: the arms "
        "left keep theirs, so the share removed goes to them in proportion)",
    )
    replica_url_argument(remove, "model")
    unload = actions.add_parser("unload", help="unload a model no arm serves")
    unload.add_argument("model_id", help="the model's id")
    unload.add_argument(
        "--version", help="unload it only if this version serves under the id (its card's)"
    )
    replica_url_argument(unload, "model")
    parser.set_defaults(handler=model_command)


def model_command(args: argparse.Namespace) -> int:
    url, action = args.url, args.model_action
    token = None
    if action != "arms":
        token = api_token("model")
        if not token:
            return 2
    try:
        if action == "arms":
            body = get_json(f"{url}/arms")
        elif action == "load":
            body = {"model_id": args.model_id, "path": args.path}
            if args.model_type is not None:
                body["model_type"] = args.model_type
            body = send_json(f"{url}/models", body, token)
            card = body["card"]
            print(
                f"loaded {args.model_id} version {card['version']} "
                f"(serving revision {body['revision']})"
            )
            return 0
        elif action == "set-arms":
            body = send_json(f"{url}/arms", {"arms": args.arms}, token, method="PUT")
        elif action == "weights":
            body = send_json(f"{url}/arms/weights", {"weights": dict(args.weights)}, token,
                             method="PUT")  # fmt: skip
        elif action == "promote":
            name = urllib.parse.quote(args.arm, safe="")
            body = send_json(f"{url}/arms/{name}/promote", {}, token)
        elif action == "remove-arm":
            name = urllib.parse.quote(args.arm, safe="")
            given = {"weights": dict(args.weights)} if args.weights else None
            body = send_json(f"{url}/arms/{name}", given, token, method="DELETE")
            placed = (
                "a shadow, it held no token; the live arms keep theirs"
                if body.get("removed", {}).get("shadow")
                else "its tokens go to the live arms left by their hash, the others keep theirs"
            )
            print(f"arm {args.arm} removed (serving revision {body['revision']}): {placed}")
        else:
            name = urllib.parse.quote(args.model_id, safe="")
            query = f"?{urllib.parse.urlencode({'version': args.version})}" if args.version else ""
            body = send_json(f"{url}/models/{name}{query}", None, token, method="DELETE")
            unloaded = body["unloaded"]
            print(
                f"unloaded {unloaded['model_id']} version {unloaded['version']} "
                f"(serving revision {body['revision']})"
            )
            return 0
    except OSError as exc:
        print(failure("model", url, exc, service="model"), file=sys.stderr)
        return 1
    print_arms(body)
    return 0


def print_arms(view: dict) -> None:
    """The arms of ``/arms`` (or a change's answer), one a line."""
    print(f"arms (serving revision {view['revision']}):")
    for arm in view["arms"]:
        made = f"model {arm['model_id']} version {arm['version']}"
        if arm["shadow"]:
            print(f"  {arm['name']}: {made}, shadow (scores every token, never traded)")
        else:
            print(f"  {arm['name']}: {made}, weight {arm['weight']:g}, "
                  f"{arm['share']:.0%} of new tokens")  # fmt: skip
