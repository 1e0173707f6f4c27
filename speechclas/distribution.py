"""Where a training runs: one device, every local device (MirroredStrategy) or several machines
(MultiWorkerMirroredStrategy configured by TF_CONFIG).

`place` is called before any other TensorFlow call of a training: the
multi-worker strategy reads TF_CONFIG and starts its servers when it is made,
and logical CPU devices can only be configured before TensorFlow starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping

import tensorflow as tf

logger = logging.getLogger(__name__)

KINDS = ("none", "mirrored", "multi_worker")


class DistributionError(RuntimeError):
    """The configured distribution cannot run here, or the cluster failed while training."""


@dataclasses.dataclass(frozen=True)
class Placement:
    """The strategy a training runs under and this process's part in it."""

    kind: str
    strategy: tf.distribute.Strategy  # the default strategy for kind "none"
    is_chief: bool = True  # writes the run folder and the exports
    task: str = "chief"  # this process in words, for logs ("worker 1 of 2")

    @property
    def distributed_strategy(self) -> tf.distribute.Strategy | None:
        """The strategy to run steps and input under, None on one device."""
        return None if self.kind == "none" else self.strategy

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def describe_failure(self, error: Exception) -> DistributionError:
        """What the run fails with when the cluster's collectives fail: a peer died or stopped answering."""
        first_line = _telling_line(str(error)) or type(error).__name__
        return DistributionError(
            f"distribution={self.kind}: the training stopped at a collective operation on {self.task}: another "
            f"worker died or stopped answering ({type(error).__name__}: {first_line[:300]}). The run is left "
            "unfinished; restart every worker (start_checkpoint= the run's ckpts/ resumes it)")


def _telling_line(message: str) -> str:
    """The line of a collective's error that names the cause (TensorFlow's first says "Graph execution error")."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if any(word in line.lower() for word in ("peer", "connection", "deadline", "timed out", "unavailable")):
            return line
    return lines[0] if lines else ""


def place(kind: str, replicas: int = 0, timeout_s: float = 600.0,
          environ: Mapping[str, str] | None = None) -> Placement:
    """The placement of `kind` (none, mirrored, multi_worker).

    mirrored: `replicas` GPUs (0: every local GPU); where there is no GPU, `replicas`
    logical CPU devices (0 or 1: one), which is for tests, not speed. multi_worker:
    TF_CONFIG names the cluster and this task; collectives that wait longer than
    `timeout_s` for a peer fail the training instead of hanging it.
    """
    if kind == "none":
        return Placement("none", tf.distribute.get_strategy())
    if kind == "mirrored":
        return Placement("mirrored", tf.distribute.MirroredStrategy(devices=_local_devices(replicas)),
                         task=f"{max(replicas, 1)} local devices")
    if kind == "multi_worker":
        return _multi_worker(environ if environ is not None else os.environ, timeout_s)
    raise DistributionError(f"distribution must be one of {', '.join(KINDS)}, not {kind!r}")


def _local_devices(replicas: int) -> list[str]:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        count = replicas or len(gpus)
        if count > len(gpus):
            raise DistributionError(f"replicas={replicas} but this machine has {len(gpus)} GPUs")
        return [f"/gpu:{i}" for i in range(count)]
    count = max(replicas, 1)
    if count > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
        except RuntimeError:
            if len(tf.config.list_logical_devices("CPU")) < count:
                raise DistributionError(
                    f"distribution=mirrored with replicas={replicas} on CPUs needs {count} logical CPU devices, "
                    "which TensorFlow sets only before it starts: train in a fresh process (speechclas-train)"
                ) from None
        logger.info("No GPU: mirroring over %d logical CPU devices (for tests; it does not add cores)", count)
    return [f"/cpu:{i}" for i in range(count)]


def cluster_task(environ: Mapping[str, str]) -> tuple[dict, str, int]:
    """TF_CONFIG's cluster, task type and index, checked enough for a message a person can act on."""
    raw = environ.get("TF_CONFIG", "").strip()
    if not raw:
        raise DistributionError("distribution=multi_worker needs TF_CONFIG, the cluster description "
                                '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}')
    try:
        described = json.loads(raw)
        cluster, task = described["cluster"], described["task"]
        task_type, index = str(task["type"]), int(task["index"])
        members = cluster[task_type]
    except (ValueError, KeyError, TypeError) as exc:
        raise DistributionError(f"TF_CONFIG is not a cluster description with cluster and task ({exc})") from None
    if not 0 <= index < len(members):
        raise DistributionError(f"TF_CONFIG task {task_type} {index} is not in its cluster ({len(members)} {task_type}s)")
    return cluster, task_type, index


def _multi_worker(environ: Mapping[str, str], timeout_s: float) -> Placement:
    cluster, task_type, index = cluster_task(environ)
    # The chief is the "chief" task, or worker 0 when the cluster names none (TensorFlow's rule).
    is_chief = task_type == "chief" or (task_type == "worker" and index == 0 and "chief" not in cluster)
    workers = sum(len(cluster.get(kind, ())) for kind in ("chief", "worker"))
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_s)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    task = f"{task_type} {index} of {workers} workers"
    logger.info("multi_worker: %s, %d replicas in all", task, strategy.num_replicas_in_sync)
    return Placement("multi_worker", strategy, is_chief=is_chief, task=task)
