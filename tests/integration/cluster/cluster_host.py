"""A multi-node Ray cluster on this machine, for the cluster tests: run as a script, it starts a head node and
worker nodes with ``ray.cluster_utils.Cluster`` (every node on 127.0.0.1), prints one JSON line with the
cluster's address and node ids, then obeys JSON lines on stdin until stdin closes:

    {"remove": "<node id>"}   kill that node's processes (as a lost machine), answer {"removed": "<node id>"}

Its own process, because a process can be connected to one Ray only and the test session already runs one.
Nothing here connects a driver: the ``lorafleet workers`` processes under test do that.

    python cluster_host.py '{"workers": 2, "worker_resources": {"lorafleet_trainer": 1}}'
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: nodes bind to 127.0.0.1

from ray.cluster_utils import Cluster  # noqa: E402

LOOPBACK = "127.0.0.1"


def start(config: dict[str, Any]) -> tuple[Cluster, dict[str, Any]]:
    """The head (no trainer resource unless ``head_resources`` says so) and ``workers`` worker nodes."""
    common: dict[str, Any] = {"node_ip_address": LOOPBACK, "object_store_memory": 80 * 1024 * 1024}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **common,
            "num_cpus": config.get("head_cpus", 1),
            "resources": config.get("head_resources", {}),
            "include_dashboard": False,
        },
    )
    workers = [
        cluster.add_node(
            **common, num_cpus=config.get("worker_cpus", 1), resources=config.get("worker_resources", {})
        )
        for _ in range(config.get("workers", 2))
    ]
    cluster.wait_for_nodes()
    assert cluster.head_node is not None
    return cluster, {
        "address": cluster.address,
        "head": cluster.head_node.node_id,
        "workers": [node.node_id for node in workers],
    }


def serve(cluster: Cluster) -> None:
    """Answer commands from stdin until it closes."""
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        node_id = command["remove"]
        (node,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
        cluster.remove_node(node, allow_graceful=False)
        print(json.dumps({"removed": node_id}), flush=True)


def main() -> None:
    cluster, info = start(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
    print(json.dumps(info), flush=True)
    try:
        serve(cluster)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
