"""tests/redis_servers.py does what it says: real servers, checked with redis-py itself."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.redis_servers import (
    RedisCluster,
    RedisServer,
    RedisStartError,
    RedisTLSServer,
    RedisUnavailable,
)

redis = pytest.importorskip("redis")
Retry = pytest.importorskip("redis.retry").Retry
NoBackoff = pytest.importorskip("redis.backoff").NoBackoff


def _keys_on_every_master(cluster: RedisCluster, prefix: str) -> dict[RedisServer, str]:
    """One key per master (by ``CLUSTER KEYSLOT``), named ``prefix-N``."""
    found: dict[RedisServer, str] = {}
    for number in itertools.count():
        key = f"{prefix}-{number}"
        found.setdefault(cluster.master_for_key(key), key)
        if len(found) == 3:
            return found
    raise AssertionError("unreachable")


def _two_keys(cluster: RedisCluster) -> tuple[str, str]:
    keys = list(_keys_on_every_master(cluster, "test_redis_servers:kill").values())
    return keys[0], keys[1]


def _no_retries(cluster: RedisCluster) -> Any:
    """A cluster client that reports a dead node at once instead of retrying around it
    (its replica could take over meanwhile)."""
    return redis.RedisCluster.from_url(cluster.url, retry=Retry(NoBackoff(), 0), socket_timeout=2)


def test_a_standalone_server_stores_and_reads(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = redis.Redis.from_url(redis_server.url)
    client.set("test_redis_servers:standalone", "value")
    assert client.get("test_redis_servers:standalone") == b"value"
    # No persistence configured, as the servers are throwaway.
    assert client.config_get("save")["save"] == ""
    assert client.config_get("appendonly")["appendonly"] == "no"


def test_a_killed_server_restarts_empty_on_the_same_port(fresh_redis_server: RedisServer) -> None:
    port = fresh_redis_server.port
    client = redis.Redis.from_url(fresh_redis_server.url, socket_timeout=2)
    client.set("k", "v")
    fresh_redis_server.kill()
    assert not fresh_redis_server.running
    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()
    fresh_redis_server.start()
    assert fresh_redis_server.port == port
    assert client.ping()  # the same client reconnects: same address
    assert client.get("k") is None  # no persistence: it came back empty


def test_stop_kills_the_server_and_frees_its_port(fresh_redis_server: RedisServer) -> None:
    pid = fresh_redis_server.pid
    assert pid is not None
    fresh_redis_server.stop()
    assert not fresh_redis_server.running
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", fresh_redis_server.port))


def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    try:
        with pytest.raises(RedisStartError, match="Bad directive"):
            RedisServer(tmp_path / "bad", args=["--no-such-option", "yes"])
    except RedisUnavailable as missing:
        pytest.skip(str(missing))


def test_tls_needs_the_ca_and_refuses_plain_connections(redis_tls_server: RedisTLSServer) -> None:
    assert redis_tls_server.url == f"rediss://127.0.0.1:{redis_tls_server.port}/0"
    client = redis.Redis.from_url(redis_tls_server.url, ssl_ca_certs=redis_tls_server.ca_file)
    client.set("test_redis_servers:tls", "value")
    assert client.get("test_redis_servers:tls") == b"value"
    # The certificate is really checked: without the CA it is not trusted.
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(redis_tls_server.url, retry=Retry(NoBackoff(), 0)).ping()
    # And the port speaks TLS only.
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis(
            host="127.0.0.1", port=redis_tls_server.port, retry=Retry(NoBackoff(), 0)
        ).ping()


def test_the_cluster_serves_keys_on_all_three_masters(redis_cluster: RedisCluster) -> None:
    masters = redis_cluster.masters()
    assert len(masters) == 3
    assert len(redis_cluster.startup_nodes) == 6
    assert {redis_cluster.replica_of(master) for master in masters} == set(redis_cluster.replicas())
    keys = _keys_on_every_master(redis_cluster, "test_redis_servers:spread")
    assert set(keys) == set(masters)
    by_url = redis.RedisCluster.from_url(redis_cluster.url)
    by_nodes = redis.RedisCluster(
        startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in redis_cluster.startup_nodes]
    )
    for master, key in keys.items():
        by_url.set(key, master.port)
        assert by_nodes.get(key) == str(master.port).encode()
        # redis-py's own slot map agrees with master_for_key.
        assert by_url.get_node_from_key(key).port == master.port


def test_a_failover_promotes_the_replica_and_keeps_the_data(redis_cluster: RedisCluster) -> None:
    key = "test_redis_servers:failover"
    client = redis.RedisCluster.from_url(redis_cluster.url)
    client.set(key, "kept")
    master = redis_cluster.master_for_key(key)
    replica = redis_cluster.replica_of(master)
    assert redis_cluster.failover(replica) is replica
    assert replica.command("ROLE")[0] == "master"
    assert redis_cluster.master_for_key(key) is replica
    assert redis_cluster.replica_of(replica) is master  # the old master follows it
    assert client.get(key) == b"kept"  # the same client follows the MOVED
    assert redis.RedisCluster.from_url(redis_cluster.url).get(key) == b"kept"


@pytest.mark.reliability
def test_a_killed_master_fails_its_slots_until_its_replica_takes_over(
    redis_cluster: RedisCluster,
) -> None:
    victim_key, other_key = _two_keys(redis_cluster)
    victim = redis_cluster.master_for_key(victim_key)
    replica = redis_cluster.replica_of(victim)
    client = _no_retries(redis_cluster)
    client.set(victim_key, "before")
    redis_cluster.wait_replicated(victim)  # its replica has it
    redis_cluster.kill(victim)
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            client.set(victim_key, "during")
        assert client.set(other_key, "still served")  # only the dead master's slots fail
        redis_cluster.wait_ok(timeout=20)  # its replica took over
        assert redis_cluster.master_for_key(victim_key) is replica
        assert _no_retries(redis_cluster).get(victim_key) == b"before"
        redis_cluster.restart(victim)
        assert victim.running
        assert redis_cluster.replica_of(replica) is victim  # it came back as the replica
    finally:
        redis_cluster.heal()


@pytest.mark.reliability
def test_without_auto_failover_a_killed_master_is_down_until_it_restarts(tmp_path: Path) -> None:
    try:
        cluster = RedisCluster(tmp_path / "cluster", auto_failover=False)
    except RedisUnavailable as missing:
        pytest.skip(str(missing))
    with cluster:
        victim_key, other_key = _two_keys(cluster)
        victim = cluster.master_for_key(victim_key)
        cluster.kill(victim)
        cluster.wait_failed(victim)
        client = _no_retries(cluster)
        with pytest.raises(redis.exceptions.ConnectionError):
            client.set(victim_key, "during")
        assert client.set(other_key, "still served")
        assert cluster.master_for_key(victim_key) is victim  # no replica took over
        assert cluster.problems()
        cluster.restart(victim)
        assert _no_retries(cluster).set(victim_key, "after")
        assert _no_retries(cluster).get(victim_key) == b"after"
