"""Ports for servers a test starts."""

from __future__ import annotations

from pumpflow.common.testing import free_port, servers


def test_free_ports_are_never_handed_out_twice():
    # the kernel offers closed ports again: among 2,000 draws, repeats are all but sure
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)


def test_xdist_workers_of_one_run_get_disjoint_ports(monkeypatch):
    # each worker is a process with its own memory of the ports it gave
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    ports_of = {}
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        monkeypatch.setattr(servers, "_HANDED_OUT", set())
        # 600 each among the ~14,000 ports bind() offers: without a split, shared ones
        # are all but sure
        ports_of[worker] = [free_port() for _ in range(600)]

    assert not set(ports_of["gw0"]) & set(ports_of["gw1"])
    for worker, ports in ports_of.items():
        assert len(set(ports)) == len(ports)
        assert {servers._port_share(port, 2) for port in ports} == {int(worker[2:])}
