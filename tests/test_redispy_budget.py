"""redis-py's sync clients as the guard makes them (connections of ``budgeted()``): a call
that fails must leave alone the connections other calls hold, and so the replies they
wait for."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import RedisClusterException

from cluster import Cluster
from usage_guard.redispy import RedisScripts, _gives_up
from usage_guard.storage import Backend

#: Answers TRYAGAIN (as a node does while the call's slot is being migrated) the first time.
TRYAGAIN_ONCE = (
    "if redis.call('INCR', KEYS[1]) == 1 then "
    "return redis.error_reply('TRYAGAIN Multiple keys request during rehashing of slot') "
    "end return 'ran'"
)
CLOCK = "return redis.call('TIME')"  # as lua/clock.lua reads it
ECHO = "return ARGV[1]"


@pytest.mark.cluster
def test_a_connect_failing_after_a_tryagain_leaves_another_callers_connection_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py's cluster client tries a call again after TRYAGAIN on a connection from
    the pool; when connecting that one fails, it must not disconnect and release again
    the connection of its first try, which another thread took meanwhile: else the pool
    hands that one out twice, and a consume reads a clock reading's reply."""
    cluster = Cluster(tmp_path, masters=1)
    backend = Backend(cluster.url(), timeout=1.0)
    try:
        runner = backend.sync()
        assert isinstance(runner, RedisScripts)
        client: Any = runner.client
        admin = cluster.client(cluster.nodes[0])
        pool = client.get_node_from_key("{acme}").redis_connection.connection_pool
        taken: list[Any] = []
        tries = 0
        get_redis_connection = client.get_redis_connection

        def second_try_meets_a_busy_pool_and_a_hung_node(node: Any) -> Any:
            nonlocal tries
            tries += 1
            if tries == 2:
                # Another thread takes the connection the first try gave back, so this try
                # needs a new one, whose handshake the paused node does not answer in time.
                taken.append(pool.get_connection())
                admin.client_pause(300)
            return get_redis_connection(node)

        monkeypatch.setattr(
            client, "get_redis_connection", second_try_meets_a_busy_pool_and_a_hung_node
        )
        token = _gives_up.set(time.monotonic() + 0.1)  # a request's later call: budgeted
        try:
            with pytest.raises((redis.RedisError, RedisClusterException)):
                client.eval(TRYAGAIN_ONCE, 1, "{acme}:tries")
        finally:
            _gives_up.reset(token)
        monkeypatch.undo()
        assert tries == 2
        admin.ping()  # once the pause is over
        other = taken[0]
        other.send_command("PING")  # the other thread goes on with its connection
        assert other.read_response() == "PONG"

        # It reads the clock, whose reply is late (the node is busy) when the next call
        # takes a connection: that call must not get the one the other thread holds.
        admin.client_pause(200)
        other.send_command("EVAL", CLOCK, 0)
        assert client.eval(ECHO, 1, "{acme}:n", "consumed") == "consumed"
        assert len(other.read_response()) == 2  # [seconds, microseconds]
        pool.release(other)
    finally:
        backend.close()
        cluster.stop()
