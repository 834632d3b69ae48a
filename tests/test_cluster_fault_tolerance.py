"""A worker node dies mid-trial on a multi-node Ray cluster; the study still completes, recorded once.

Ray's test cluster (``ray.cluster_utils.Cluster``, real raylets on this machine): a head with 0 CPUs
and two worker nodes with 1 CPU each, so every trial lands on a worker. A tiny real study (ResNet18,
64x32, a tiny generated synthreid; one stage I shared by one stage-II trial) runs through
``run_study`` with the cluster's address, against a real ``mlflow server`` on 127.0.0.1 (the runner
refuses a SQLite file on a cluster). When the stage-II trial's first epoch checkpoint is registered,
a ``tune.Callback`` removes the worker node it runs on. Callbacks run in the driver's main thread,
which is where ``Cluster.remove_node`` must be called (DESIGN.md, "Measured on these machines").

Storage: the runner also refuses a local path on a cluster. These "nodes" share this machine's
disk, so the study's local storage folder really is shared: ``PFE_STORAGE_SHARED=1`` is the
runner's explicit setting for "this path is shared by every node" (cluster/README.md, section 4).

Why ``on_checkpoint`` and not ``on_trial_result``: Tune registers a result's checkpoint after the
result callbacks; a node removed inside ``on_trial_result`` makes Tune restart the trial from the
checkpoint before (none, after its first epoch), i.e. from scratch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from ray import tune

from pfe.data.synth import generate_synthreid
from pfe.errors import ConfigError
from pfe.study.mlflow_server import start_mlflow_server
from pfe.study.runner import _check_resources, run_study
from pfe.study.spec import load_study

STAGE1_EPOCHS, STAGE2_EPOCHS = 2, 3
STUDY = """\
name: nodeloss
description: one stage I and one stage-II trial on a two-worker test cluster; a worker is removed mid-trial
base:
  overrides:
    data.dataset: synthreid
    data.root: {data}
    data.height: 64
    data.width: 32
    data.ids_per_batch: 4
    data.images_per_id: 4
    data.workers: 0
    model.backbone: resnet18
    model.pretrained: none
    model.attention: none
    model.channels: 16
    model.side_dim: 32
    stage1.epochs: {stage1}
    stage1.milestones: [1]
    stage2.epochs: {stage2}
    stage2.milestones: [1]
    eval.batch_size: 32
    eval.sets: [F5, F2_F3_F4_F5]
    runtime.device: cpu
    runtime.progress: false
variants:
  side: {{model.side: side, stage2.loss: independent, stage2.w_ro: 0.0}}
resources: {{cpu: 1, gpu: 0}}
max_failures: 2
tracking: {{uri: "{uri}"}}
storage: {storage}
report: {{rows: variant, values: [rank1]}}
"""


class RemoveNodeMidTrial(tune.Callback):
    """Removes the worker node running the stage-II trial once its first epoch checkpoint is
    registered, and records what Tune did next."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.last: dict[str, dict[str, Any]] = {}
        self.removed_node: str | None = None
        self.results_after: list[tuple[int, int, str]] = []  # (stage, epoch, node) of the trial after the removal
        self.failures = 0

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks; a Cluster holds locks
        return {}

    def _node_of(self, pid: int) -> str:
        table = self.cluster.global_state.actor_table(None)
        (node,) = {a["Address"]["NodeID"] for a in table.values() if a.get("Pid") == pid and a["State"] == "ALIVE"}
        return node

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.last[trial.trial_id] = result
        if self.removed_node and trial.config["pfe"]["role"] == "trial" and not result.get("pfe_final"):
            self.results_after.append((result["pfe_stage"], result["pfe_epoch"], self._node_of(result["pid"])))

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        result = self.last.get(trial.trial_id, {})
        if self.removed_node or trial.config["pfe"]["role"] != "trial" or result.get("pfe_epoch") != 1:
            return
        node_id = self._node_of(result["pid"])
        (node,) = [n for n in self.cluster.worker_nodes if n.node_id == node_id]
        self.cluster.remove_node(node)  # in the main thread: Tune calls callbacks from its control loop
        self.removed_node = node_id

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.failures = max(self.failures, trial.num_failures)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Any]:
    """Head (0 CPUs) + two 1-CPU workers, in a private Ray temp dir: the cluster's address file must
    not make another process's plain ``ray.init()`` on this machine join it."""
    saved = dict(os.environ)
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    os.environ["RAY_TMPDIR"] = ray_tmp
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PFE_STORAGE", "PFE_DATA"):
        os.environ.pop(name, None)
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # a Ray left connected by another test would be used by the runner instead of this cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):
            c.add_node(num_cpus=1)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        os.environ.clear()
        os.environ.update(saved)  # the runner sets TUNE_* variables in its (this) process
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_node_removed_mid_trial_resumes_on_other_node(cluster: Any, tmp_path: Path) -> None:
    data = tmp_path / "synthreid"
    generate_synthreid(data, ids_train=8, ids_test=6, images_per_id=4, cameras=2, seed=0)
    server = start_mlflow_server(
        f"sqlite:///{tmp_path / 'server.db'}",
        artifacts_destination=str(tmp_path / "artifacts"),
        log_path=tmp_path / "mlflow-server.log",
    )
    with server:
        study = tmp_path / "nodeloss.yaml"
        study.write_text(
            STUDY.format(
                data=data, uri=server.url, storage=tmp_path / "ray_results", stage1=STAGE1_EPOCHS, stage2=STAGE2_EPOCHS
            )
        )
        os.environ["PFE_STORAGE_SHARED"] = "1"  # one machine: the local storage folder IS shared by the nodes
        remover = RemoveNodeMidTrial(cluster)
        outcome = run_study(load_study(study), address=cluster.address, max_concurrent=1, callbacks=[remover])

        # the node ran the trial, went away, and the trial went on from its checkpoint on the other node
        assert remover.removed_node, "no node was removed: the trial never reached its first epoch checkpoint"
        assert remover.failures >= 1
        assert remover.results_after, "no result after the node was removed"
        stage, epoch, node = remover.results_after[0]
        assert (stage, epoch) == (2, 2), remover.results_after  # resumed after epoch 1, not from scratch
        assert node != remover.removed_node
        assert [e for s, e, _ in remover.results_after if s == 2] == list(range(2, STAGE2_EPOCHS + 1))
        assert outcome.ok and outcome.finished == ["side seed 0"], outcome.summary()

        client = MlflowClient(server.url)
        runs = client.search_runs([client.get_experiment_by_name("nodeloss").experiment_id], max_results=100)
        assert sorted(r.data.tags["pfe.role"] for r in runs) == ["stage1", "study", "trial"]  # one run per trial
        for run in runs:
            tags, role = run.data.tags, run.data.tags["pfe.role"]
            assert run.info.status == "FINISHED", (role, run.info.status)
            if role == "study":
                continue
            epochs = STAGE1_EPOCHS if role == "stage1" else STAGE2_EPOCHS
            assert tags["pfe.status"] == "finished"
            assert tags["pfe.epochs_done"] == tags["pfe.epochs_asked"] == str(epochs)
            assert tags["pfe.checkpoint"].startswith(str(tmp_path / "ray_results"))
            stage = 1 if role == "stage1" else 2
            per_epoch = [
                k for k in run.data.metrics if k.startswith(f"train/stage{stage}/") or k.endswith(f"/stage{stage}")
            ]
            assert f"train/stage{stage}/loss" in per_epoch
            for key in run.data.metrics:
                steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
                expected = list(range(1, epochs + 1)) if key in per_epoch else [epochs]
                assert steps == expected, (role, key, steps)  # one point per (metric, epoch), every epoch
        trial = next(r for r in runs if r.data.tags["pfe.role"] == "trial")
        assert {"rank1", "mAP", "eval/F2_F3_F4_F5/rank1"} <= set(trial.data.metrics)

    # the runner's resource check on a cluster: GPUs it lacks now are requested from the autoscaler, not refused
    import ray

    ray.init(address=cluster.address)
    spec = load_study(study)
    spec.resources.gpu = 1
    assert _check_resources(spec, cluster.address) is True
    assert autoscaler_demand(cluster) == [{"CPU": 1.0, "GPU": 1.0}]
    with pytest.raises(ConfigError, match="resources.gpu"):  # without an address it is this machine's Ray: refused
        _check_resources(spec, None)


def autoscaler_demand(cluster: Any) -> list[dict[str, float]]:
    """The standing ``request_resources`` demand, read back from the GCS (autoscaler v1's wire format,
    which ``Cluster`` runs)."""
    import json

    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []
