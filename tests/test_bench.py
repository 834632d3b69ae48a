"""`pfe-study bench`: quick smoke runs of the evaluation and training benchmarks (timings are not tested)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pfe.bench.train import QUICK
from pfe.cli import main


def test_bench_eval_quick_writes_json_and_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "eval", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "eval_cpu_quick.json").read_text())
    names = {r["name"] for r in report["results"]}
    assert {"rank_metrics (ours)", "per-query NumPy loop"} <= names
    assert all(v <= 1e-12 for v in report["agreement"]["ours_vs_numpy_loop"].values())
    assert "| rank_metrics (ours) |" in (tmp_path / "eval_cpu_quick.md").read_text()
    assert "Speed-up" in capsys.readouterr().out


TRAIN_KEYS = (
    "baseline_img_s", "stage1_img_s", "stage2_img_s", "epoch_from_jpeg_img_s", "step_from_tensors_img_s",
    "eval_msmt_s", "stage1_vs_baseline", "stage2_vs_baseline", "epoch_from_jpeg_vs_step_from_tensors",
)


def test_bench_train_quick_on_cpu_writes_every_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real (tiny) run: ResNet18 at 64x32, a generated JPEG set; numbers positive, no timing thresholds."""
    assert main(["bench", "train", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_cpu_quick.json").read_text())
    assert report["errors"] == {}
    assert report["device"] == "cpu" and report["card"] == "cpu" and report["torch"] and report["quick"] is True
    for key in TRAIN_KEYS:
        assert isinstance(report[key], float) and report[key] > 0, key
    assert report["peak_mem_gb"] is None  # GPU memory only on cuda
    m = report["measurements"]
    assert all(m[k]["loss_finite"] for k in ("baseline", "stage1", "stage2", "stage2_separable"))
    assert m["epoch_device_cache"]["cache"] == "device" and m["epoch_workers"]["cache"] == "none"
    assert [e["epoch"] for e in m["epoch_device_cache"]["epochs"]] == [1, 2]
    for name in ("baseline", "stage1", "stage2"):
        profile = m[f"profile_{name}"]
        assert profile["busy_ms_per_step"] > 0 and profile["top"] and profile["top"][0]["ms_per_step"] > 0
        assert sum(r["share"] for r in profile["top"]) <= 1.0 + 1e-9
    assert "conv" in str(m["profile_baseline"]["top"])  # the convolutions are among the costliest
    assert report["acceptance"]["applies"] is False and set(report["acceptance"]["checks"]) >= {"stage2_vs_baseline"}
    markdown = (tmp_path / "bench_cpu_quick.md").read_text()
    assert "| PFE stage II" in markdown and "Acceptance" in markdown
    assert "bench_cpu_quick.json" in capsys.readouterr().out
    figure = tmp_path / "bench_cpu_quick.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure.unlink()  # `bench plot` draws it again from the JSON alone
    assert main(["bench", "plot", "--out", str(tmp_path)]) == 0 and figure.stat().st_size > 10_000
    # a report saved under measurement names since renamed (session 5's stage1_compiled) is still drawn and listed
    from pfe.bench.train_report import render_markdown

    report["measurements"] = {"stage1_compiled": m["stage1"], "baseline_compiled": m["baseline"]}
    (tmp_path / "bench_cpu_quick.json").write_text(json.dumps(report))
    figure.unlink()
    assert main(["bench", "plot", "--out", str(tmp_path)]) == 0 and figure.stat().st_size > 10_000
    assert "| stage1_compiled (as recorded) |" in render_markdown(report)


def test_bench_train_only_makes_the_named_measurements(tmp_path: Path) -> None:
    assert main(["bench", "train", "--quick", "--device", "cpu", "--out", str(tmp_path), "--only", "baseline,stage2"]) == 0
    report = json.loads((tmp_path / "bench_cpu_quick.json").read_text())
    assert set(report["measurements"]) == {"baseline", "stage2"} and report["errors"] == {}
    assert report["stage2_vs_baseline"] > 0 and report["setup"]["compile"] == "off"  # on a CPU, auto compiles nothing


def test_bench_train_only_refuses_an_unknown_name_before_measuring(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from pfe.bench.train import MEASUREMENTS, bench_configs
    from pfe.bench.train_report import THROUGHPUT_ROWS

    assert main(["bench", "train", "--quick", "--device", "cpu", "--out", str(tmp_path),
                 "--only", "stage1,stage1_autotune"]) == 2
    assert "unknown stage1_autotune" in capsys.readouterr().err and not list(tmp_path.iterdir())
    # every step the report names has a config and a row in the table and the figure
    configs = bench_configs(QUICK, torch.device("cpu"))
    steps = [m for m in MEASUREMENTS if not m.startswith(("epoch", "eval", "profile")) and m != "stage2_frozen_forward"]
    assert set(steps) <= set(configs) and set(steps) <= set(THROUGHPUT_ROWS)
    assert configs["stage1_max_autotune"].runtime.autotune == "max_autotune"
    assert configs["baseline_max_autotune_gemm"].runtime.autotune == "max_autotune_gemm"
    assert configs["baseline_coordinate_descent"].model.attention == "none"


def test_bench_plot_names_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "plot", "--out", str(tmp_path)]) == 2
    assert f"no bench_*.json in {tmp_path}" in capsys.readouterr().err
    (tmp_path / "bench_cuda.json").write_text('{"device": "cuda"}')
    assert main(["bench", "plot", "--out", str(tmp_path)]) == 2
    assert "bench_cuda.json is not a training report" in capsys.readouterr().err


def test_synth_set_generated_in_parts_loads_as_one_dataset(tmp_path: Path) -> None:
    from pfe.bench.train import make_synth_set
    from pfe.data.datasets import load_dataset

    root = make_synth_set(tmp_path / "synthreid", ids_train=5, images_per_id=4, ids_test=2, cameras=2, parts=2)
    data = load_dataset("synthreid", root)
    assert data.num_train_pids == 5 and len(data.train) == 20
    assert data.query and data.gallery
    assert not (tmp_path / "synthreid_parts").exists()


def test_cost_extrapolation_reproduces_a_recorded_step() -> None:
    """Three small recordings predict a fourth, larger one op by op (same kernels, FLOPs, bytes)."""
    from pfe.bench.cost import COUNT_AT, H100, extrapolate, record_ops, summarise_ops
    from pfe.bench.train import QUICK

    (b0, h0, w0), (b1, _, _), (_, h1, w1) = COUNT_AT["quick"]
    for name in ("stage2",):  # the step with the most kinds of ops (frozen copy, masks, upsampling, losses)
        recorded = [record_ops(name, QUICK, b, h, w) for b, h, w in COUNT_AT["quick"]]
        predicted = summarise_ops(extrapolate(*recorded, batches=(b0, b1), pixels=(h0 * w0, h1 * w1), batch=12,
                                              target_pixels=96 * 48), H100)
        direct = summarise_ops(record_ops(name, QUICK, 12, 96, 48), H100)
        assert predicted["kernels"] == direct["kernels"], name
        assert predicted["flops"] == pytest.approx(direct["flops"], rel=0.01), name
        assert predicted["bytes"] == pytest.approx(direct["bytes"], rel=0.02), name


def test_bench_cost_quick_separates_frozen_and_trained_work(tmp_path: Path) -> None:
    from pfe.bench.cost import STEPS

    assert main(["bench", "cost", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "cost_quick.json").read_text())
    steps = report["steps"]
    assert set(steps) == set(STEPS)
    for cost in steps.values():
        assert cost["flops"] > 0 and cost["bytes"] > 0 and cost["kernels"] > 0
    parts = {name: {(r["group"], r["pass"]) for r in cost["rows"]} for name, cost in steps.items()}
    # baseline: the backbone trains; stage II: it only runs forward, the side branches train
    assert ("backbone", "backward") in parts["baseline"] and ("side", "forward") not in parts["baseline"]
    assert ("backbone", "forward") in parts["stage2"] and ("backbone", "backward") not in parts["stage2"]
    assert ("side", "backward") in parts["stage2"] and ("optimizer", "update") in parts["stage2"]
    # a backward pass costs about twice its forward: a baseline step is about 3x a forward pass
    fwd = steps["stage2_frozen_forward"]["flops"]
    assert 2.5 * fwd < steps["baseline"]["flops"] < 3.5 * fwd
    # folding BN (and storing the frozen weights in bf16) moves fewer bytes than the checkpointed modules
    assert steps["stage2"]["bytes"] < steps["stage2_unfolded"]["bytes"]
    assert steps["stage2"]["kernels"] < steps["stage2_unfolded"]["kernels"]
    assert "| stage2 |" in (tmp_path / "cost_quick.md").read_text()


# aten ops that make the host wait for the device (a value or a data-dependent shape comes back)
SYNCING_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique2",
               "aten.unique_consecutive", "aten.is_nonzero", "aten.equal"}


@pytest.mark.parametrize("name, stage", [("baseline", 1), ("stage1", 1), ("stage2", 2), ("stage2_separable", 2)])
def test_training_steps_ask_the_device_for_nothing(name: str, stage: int) -> None:
    """The GPU configuration of each step (fused Adam, bf16 autocast, the epoch loop's loss bookkeeping)
    runs no op that would sync the host with a GPU: checked op by op on the CPU."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from pfe.bench.train import QUICK, bench_configs, build_step

    class Syncs(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if str(func._overloadpacket) in SYNCING_OPS:
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    device = torch.device("cpu")
    step = build_step(bench_configs(QUICK, device)[name], stage, QUICK, device, amp_dtype=torch.bfloat16, fused_adam=True)
    step.run(0)  # lazy state first (optimiser moments, the folded copy)
    with Syncs() as syncs:
        step.run(1)
        step.run(2)
    assert syncs.seen == []
    assert step.loss_finite()  # looked at after the steps, as the epoch loop does
