"""The activity service's metrics, on the registry it is given."""

from __future__ import annotations

from prometheus_client import CollectorRegistry


async def test_transitions_recommendations_commands_and_tokens_are_counted(stack):
    s, tk = stack, stack.tokens
    registry = CollectorRegistry()
    svc = await s.activity(registry=registry)

    def value(name: str, **labels) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    await s.send(tk.created("A"))
    await s.send(tk.created("B"))
    await s.pump(["A"], 1, 30)
    status = await svc.status()
    assert status["tokens"]["active"] == 1 and status["tokens"]["new"] == 1
    assert value("pumpflow_activity_tokens", state="active") == 1
    await s.at(200)
    await svc.flush_subscriptions()
    assert value("pumpflow_activity_transitions_total", state="new") == 2
    assert value("pumpflow_activity_transitions_total", state="active") == 1
    assert value("pumpflow_activity_transitions_total", state="inactive") == 1
    recommendations = [e for e in s.lifecycle if e.data.state == e.data.previous_state]
    assert value("pumpflow_activity_priority_recommendations_total") == len(recommendations)
    assert value("pumpflow_activity_feed_commands_total", action="unsubscribe") == 1
    assert value("pumpflow_activity_feed_command_mints_total", action="unsubscribe") == 1
    await svc.stop()
