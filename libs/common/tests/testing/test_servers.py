"""Ports for servers a test starts."""

from __future__ import annotations

from pumpflow.common.testing import free_port


def test_free_ports_are_never_handed_out_twice():
    # the kernel offers closed ports again: among 2,000 draws, repeats are all but sure
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)
