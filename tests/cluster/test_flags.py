"""`--replicas` / `--ray-address` parsing and the ingress's admission over N replicas (no Ray needed)."""

from __future__ import annotations

import pytest

from server.cluster.flags import ClusterFlags, split_cluster_flags
from server.settings import ServerConfig


def test_cluster_flags_are_taken_off_the_server_argv():
    rest, flags = split_cluster_flags(["--port", "9000", "--replicas", "2", "--ray-address=ray://head:10001"])
    assert rest == ["--port", "9000"]
    assert flags == ClusterFlags(replicas=2, ray_address="ray://head:10001")
    assert split_cluster_flags(["--port", "1"]) == (["--port", "1"], ClusterFlags())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--replicas", "0"], "--replicas must be >= 1"),
        (["--replicas", "two"], "--replicas must be an integer"),
        (["--replicas"], "--replicas needs a value"),
        (["--ray-address", "auto"], "--ray-address needs --replicas"),
    ],
)
def test_bad_cluster_flags_name_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        split_cluster_flags(argv)


def test_serve_cli_reports_bad_cluster_flags(capsys):
    from server.cli import main

    assert main(["--replicas", "0"]) == 2
    assert "--replicas must be >= 1" in capsys.readouterr().err


def test_ingress_admits_what_all_replicas_hold():
    pytest.importorskip("ray")
    from server.cluster.launch import ingress_config

    config = ServerConfig(max_num_seqs=8, max_queue=4)
    assert ingress_config(config, 3).capacity == 3 * config.capacity


def test_router_flag_picks_the_policy():
    rest, flags = split_cluster_flags(["--replicas", "2", "--router", "ray"])
    assert rest == [] and flags.router == "ray"
    assert split_cluster_flags(["--replicas", "2"])[1].router is None  # the launcher's default: bounded
    with pytest.raises(ValueError, match="--router must be one of bounded, ray"):
        split_cluster_flags(["--replicas", "2", "--router", "random"])
    with pytest.raises(ValueError, match="--router needs --replicas"):
        split_cluster_flags(["--router", "ray"])
