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


def test_serve_lets_every_admitted_request_reach_the_ingress_at_once(tmp_path):
    """Serve's default (5 ongoing requests per replica) made 16 clients reach the engines 5 at a
    time; the ingress must take all it admits, and more, so overflow gets the API's own 503."""
    pytest.importorskip("ray")
    from server.cluster.ingress import build_application
    from server.cluster.launch import ingress_config

    config = ServerConfig(max_num_seqs=16, max_queue=8)
    admits = ingress_config(config, 2)
    app = build_application(config, tmp_path, 2, store_actor=None, ingress_config=admits)
    assert app._bound_deployment.max_ongoing_requests > admits.capacity == 2 * config.capacity


def test_replica_threads_follow_its_cpu_share(monkeypatch):
    ray = pytest.importorskip("ray")
    from server.cluster import replica

    for share, threads in [(0.4, 1), (0.8, 1), (1.0, 1), (1.5, 2), (2.0, 2), (4.0, 4)]:
        context = type("Context", (), {"get_assigned_resources": lambda self, s=share: {"CPU": s}})()
        monkeypatch.setattr(ray, "get_runtime_context", lambda c=context: c)
        assert replica.compute_threads() == threads, share
