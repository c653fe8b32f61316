"""A throwaway Redis Cluster on loopback that tests can break: kill, pause, reshard.

``Cluster(directory, masters=3, replicas=1)`` starts ``masters * (1 + replicas)``
``redis-server`` processes on free ports (never 6379), assigns the slots by hand
(faster than ``redis-cli --cluster create``: about 2 s, the time a fresh master
waits before it accepts writes) and returns once every node agrees on the
layout and every replica is in sync. ``stop()`` stops them all by pid.
With ``password`` every node requires it (replicas use it too).
"""

from __future__ import annotations

import os
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import redis

from conftest import RedisProcess, wait_for

SLOTS = 16384


class Cluster:
    def __init__(
        self,
        directory: Path,
        *,
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 1000,
        password: str | None = None,
    ) -> None:
        self.nodes: list[RedisProcess] = []
        self.password = password
        self._clients: dict[int, redis.Redis] = {}
        auth = ("--requirepass", password, "--masterauth", password) if password else ()
        try:
            for i in range(masters * (1 + replicas)):
                self.nodes.append(
                    RedisProcess(
                        directory / str(i),
                        *("--cluster-enabled", "yes"),
                        *("--cluster-node-timeout", str(node_timeout_ms)),
                        *("--cluster-config-file", str(directory / f"nodes-{i}.conf")),
                        # A new replica syncs at once instead of waiting 5 s for others.
                        *("--repl-diskless-sync-delay", "0"),
                        *auth,
                    )
                )
            self._bootstrap(masters)
        except BaseException:
            self.stop()
            raise

    # -- reading the cluster ------------------------------------------------------

    def client(self, node: RedisProcess) -> redis.Redis:
        """A plain (non-cluster) client on one node, kept until ``stop()``."""
        if node.port not in self._clients:
            self._clients[node.port] = redis.Redis(
                port=node.port, password=self.password, decode_responses=True, socket_timeout=2
            )
        return self._clients[node.port]

    def url(self, *seeds: RedisProcess) -> str:
        """The ``redis+cluster://`` URL naming ``seeds`` (all nodes by default)."""
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in seeds or self.nodes)
        return f"redis+cluster://{hosts}"

    def master_of(self, slot: int) -> RedisProcess:
        """The node serving ``slot``, as the first node alive sees it."""
        return self._node(self._owner_seen_by(self._alive()[0], slot))

    def masters(self) -> list[RedisProcess]:
        return [node for node in self._alive() if self._role(node) == "master"]

    def replicas_of(self, master: RedisProcess) -> list[RedisProcess]:
        master_id = self._command(master, "CLUSTER MYID")
        # redis-py parses CLUSTER REPLICAS into {"host:port": {...}}.
        replicas = self._command(master, "CLUSTER REPLICAS", master_id)
        return [self._node(int(address.rsplit(":", 1)[1])) for address in replicas]

    # -- faults ---------------------------------------------------------------------

    def kill(self, master: RedisProcess, timeout: float = 15) -> tuple[RedisProcess, float]:
        """SIGKILL ``master``; return its promoted replica and when (monotonic) it took over."""
        replicas = self.replicas_of(master)
        master.process.kill()
        master.process.wait(timeout=10)
        return self._promotion(replicas, timeout)

    def pause(self, master: RedisProcess, timeout: float = 15) -> tuple[RedisProcess, float]:
        """SIGSTOP ``master`` until a replica is promoted, then SIGCONT it (it comes back
        as a replica); return the promoted replica and when it took over."""
        replicas = self.replicas_of(master)
        os.kill(master.process.pid, signal.SIGSTOP)
        try:
            return self._promotion(replicas, timeout)
        finally:
            os.kill(master.process.pid, signal.SIGCONT)

    def migrate_slot(
        self, slot: int, to: RedisProcess, *, batch: int = 100, hold: float = 0.0
    ) -> None:
        """Move ``slot`` and its keys to ``to`` the way ``redis-cli --cluster reshard`` does.

        ``hold`` keeps the slot half-moved that many more seconds after its keys have
        moved, like a slot whose keys take that long to move, without filling it.
        """
        source = self.master_of(slot)
        if source is to:
            return
        src_id = self._command(source, "CLUSTER MYID")
        dst_id = self._command(to, "CLUSTER MYID")
        self._command(to, "CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        self._command(source, "CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        auth = ("AUTH", self.password) if self.password else ()
        while keys := self._command(source, "CLUSTER GETKEYSINSLOT", slot, batch):
            self._command(
                source, "MIGRATE", "127.0.0.1", to.port, "", 0, 5000, *auth, "KEYS", *keys
            )
        time.sleep(hold)
        # The target first, so the slot is never left without an owner that knows it.
        for node in [to, source, *(m for m in self.masters() if m not in (to, source))]:
            self._command(node, "CLUSTER SETSLOT", slot, "NODE", dst_id)
        wait_for(
            lambda: all(self._owner_seen_by(node, slot) == to.port for node in self._alive()),
            what=f"every node to see slot {slot} on {to.port}",
        )

    def stop(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        for node in self.nodes:
            if node.process.poll() is None:
                os.kill(node.process.pid, signal.SIGCONT)  # a paused node cannot stop
            node.stop()

    # -- internals ------------------------------------------------------------------

    def _command(self, node: RedisProcess, *args: Any) -> Any:
        """``execute_command`` on ``node`` (redis-py leaves it untyped)."""
        return self.client(node).execute_command(*args)  # type: ignore[no-untyped-call]

    def _bootstrap(self, masters: int) -> None:
        primaries = self.nodes[:masters]
        per = SLOTS // masters
        for i, node in enumerate(primaries):
            high = SLOTS - 1 if i == masters - 1 else (i + 1) * per - 1
            self._command(node, "CLUSTER ADDSLOTSRANGE", i * per, high)
            self._command(node, "CLUSTER SET-CONFIG-EPOCH", i + 1)
        for node in self.nodes[1:]:
            self._command(self.nodes[0], "CLUSTER MEET", "127.0.0.1", node.port)
        total = len(self.nodes)
        for node in self.nodes:
            wait_for(partial(self._knows, node, total), what="every node to know every other")
        for i, node in enumerate(self.nodes[masters:]):
            master_id = self._command(primaries[i % masters], "CLUSTER MYID")
            self._command(node, "CLUSTER REPLICATE", master_id)
        for node in self.nodes:
            wait_for(
                partial(self._settled, node, total - masters), timeout=30, what="cluster ready"
            )

    def _knows(self, node: RedisProcess, nodes: int) -> bool:
        """``node`` knows all ``nodes`` (itself included)."""
        return int(self._info(node)["cluster_known_nodes"]) == nodes

    def _settled(self, node: RedisProcess, replicas: int) -> bool:
        """``node`` is ``ok``, sees all ``replicas`` and, if a replica, is in sync."""
        if self._info(node)["cluster_state"] != "ok":
            return False
        # redis-py parses CLUSTER NODES into {"host:port": {"flags": ..., ...}}.
        known = self._command(node, "CLUSTER NODES").values()
        if sum("slave" in peer["flags"] for peer in known) != replicas:
            return False
        info = self.client(node).info("replication")
        return bool(info["role"] == "master" or info["master_link_status"] == "up")

    def _promotion(
        self, replicas: list[RedisProcess], timeout: float
    ) -> tuple[RedisProcess, float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for replica in replicas:
                if self._role(replica) == "master":
                    return replica, time.monotonic()
            time.sleep(0.01)
        raise TimeoutError("no replica was promoted")

    def _role(self, node: RedisProcess) -> str:
        return str(self._command(node, "ROLE")[0])

    def _info(self, node: RedisProcess) -> dict[str, Any]:
        # redis-py parses CLUSTER INFO into a dict.
        return dict(self._command(node, "CLUSTER INFO"))

    def _owner_seen_by(self, node: RedisProcess, slot: int) -> int:
        """The port of the master serving ``slot``, as ``node`` sees it."""
        for low, high, master, *_ in self._command(node, "CLUSTER SLOTS"):
            if low <= slot <= high:
                return int(master[1])
        raise LookupError(f"no node serves slot {slot}")

    def _alive(self) -> list[RedisProcess]:
        return [node for node in self.nodes if node.process.poll() is None]

    def _node(self, port: int) -> RedisProcess:
        return next(node for node in self.nodes if node.port == port)
