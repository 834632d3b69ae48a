"""Study files: the paper's studies expand to the right trials; bad files fail before anything runs."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pfe.cli import main
from pfe.errors import ConfigError
from pfe.study.spec import load_study, stage1_config
from pfe.study.tracking import check_cluster_rules
from pfe.study.uris import (
    TrackingError,
    absolute_sqlite_uri,
    check_ray_address,
    check_reachable,
    is_shared_storage,
    mask_text,
    mask_uri,
    split_credentials,
)

STUDIES = Path(__file__).resolve().parent.parent / "studies"

# study -> (trials, trials with a stage II, stage-I runs) per seed, as the paper's tables need them
EXPECTED = {
    "table1": (6, 2, 4),  # ResNet50, +FAB, +SEB, +TSAM (F5 only), +SEB+MFA, +TSAM+MFA: 4 attention stage Is
    "table2": (4, 3, 1),  # ResNet50+TSAM, +side, +FA, +MFA: one shared stage I
    "table3": (6, 6, 1),  # {independent, uniform, cascade} x {side, mfa}: 6 stage-II variants, 1 stage I
    "fig7_alpha": (6, 6, 1),
    "fig7_wro": (5, 5, 1),
    "fig8": (1, 1, 1),
    "table4": (24, 12, 24),  # 3 backbones x {baseline, +TSAM+MFA} x 4 datasets; TSAM changes stage I
    "table6": (16, 16, 16),  # the final model with 4 backbones on 4 datasets
    "search_alpha_wro": (1, 1, 1),  # one base trial; 24 Optuna samples share its stage I
    "quickstart": (6, 6, 1),
}


def test_every_study_file_is_covered() -> None:
    assert {p.stem for p in STUDIES.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_study_expands_to_the_papers_trials(name: str) -> None:
    spec = load_study(STUDIES / f"{name}.yaml")
    trials = spec.expand()
    n_trials, n_stage2, n_stage1 = EXPECTED[name]
    assert len(trials) == n_trials
    assert sum(t.has_stage2 for t in trials) == n_stage2
    assert len(spec.stage1_groups()) == n_stage1
    assert len({t.trial_id for t in trials}) == n_trials  # stable, distinct ids
    for trial in trials:
        cfg = trial.cfg
        assert trial.trial_id == cfg.config_hash()
        assert stage1_config(cfg).stage1_key() == trial.stage1_key
        if name == "quickstart":
            continue
        # the paper's recipe throughout
        assert (cfg.data.height, cfg.data.width) == (384, 192)
        assert (cfg.stage1.epochs, cfg.stage2.epochs) == (120, 80)
        assert cfg.model.pretrained == "imagenet" and cfg.model.last_stride == 1
        assert (cfg.data.ids_per_batch, cfg.data.images_per_id) == (8, 4)
        if name in ("table1", "table2", "table3", "fig7_alpha", "fig7_wro", "fig8", "search_alpha_wro"):
            assert (cfg.data.dataset, cfg.data.cuhk03_split) == ("cuhk03np", "detected")
        if name in ("table1", "table2", "table3"):
            assert cfg.stage2.w_ro == 0.0  # region overlap off (the paper for II and III, the design notes for I)
        expected_t = [5.0, 4.0, 3.0] if cfg.data.dataset == "msmt17" else [10.0, 8.0, 6.0]
        assert cfg.stage2.temperatures == expected_t
    assert spec.report.values


def test_table6_other_backbones_are_table4s_pfe_trials() -> None:
    """Table VI's stronger-backbone rows train nothing new: they are Table IV's +TSAM+MFA trials."""
    table4 = {t.trial_id for t in load_study(STUDIES / "table4.yaml").expand() if t.variant.endswith("+TSAM+MFA")}
    table6 = {t.trial_id for t in load_study(STUDIES / "table6.yaml").expand() if t.variant != "PFE (ResNet50)"}
    assert len(table6) == 12 and table6 == table4


def test_table_rows_are_the_papers() -> None:
    t1 = load_study(STUDIES / "table1.yaml")
    rows = {t.variant: (t.cfg.model.attention, t.cfg.model.side) for t in t1.expand()}
    assert rows == {
        "ResNet50": ("none", "none"),
        "ResNet50+FAB": ("fab", "none"),
        "ResNet50+SEB": ("seb", "none"),
        "ResNet50+TSAM": ("tsam", "none"),
        "ResNet50+SEB+MFA": ("seb", "mfa"),
        "ResNet50+TSAM+MFA": ("tsam", "mfa"),
    }
    groups = t1.stage1_groups()
    shared = sorted(sorted(t.variant for t in members) for members in groups.values())
    assert ["ResNet50+SEB", "ResNet50+SEB+MFA"] in shared and ["ResNet50+TSAM", "ResNet50+TSAM+MFA"] in shared
    t3 = load_study(STUDIES / "table3.yaml")
    combos = {(t.cfg.stage2.loss, t.cfg.model.side) for t in t3.expand()}
    assert combos == {(loss, side) for loss in ("independent", "uniform", "cascade") for side in ("side", "mfa")}
    t2 = load_study(STUDIES / "table2.yaml")
    assert [t.cfg.model.side for t in t2.expand()] == ["none", "side", "fa", "mfa"]
    search = load_study(STUDIES / "search_alpha_wro.yaml")
    assert search.search is not None and search.search.num_samples == 24 and search.search.scheduler is not None
    assert not search.search_touches_stage1()


def test_dry_run_prints_trials_and_groups_and_runs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PFE_DATA", str(tmp_path / "no-data-here"))  # checks the study, not the data
    assert main(["run", str(STUDIES / "table3.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "total: 6 trials (6 with a stage II), 1 stage-I runs" in out
    assert "stage2.loss=uniform model.side=mfa" in out and "shared by 6" in out
    assert f"sqlite:///{tmp_path}/mlflow.db" in out  # the default store: absolute, in the working directory
    assert not list(tmp_path.iterdir())  # no store, no ray_results, no data
    assert main(["run", str(STUDIES / "search_alpha_wro.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model.alpha: uniform(0.0, 0.2)" in out and "total: 24 trials (shared stage I), 1 stage-I runs" in out


def _write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """\
name: t
variants:
  A: {model.side: mfa}
  B: {model.side: fa}
"""


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        (BASE + "  C: {model.attenton: fab}\n", ["variants.C", "model.attenton", "unknown"]),
        (BASE + "  C: {model.alpha: 2.0}\n", ["variants.C", "model.alpha", "less than or equal to 1"]),
        (BASE + "  C: {model: {side: sideways}}\n", ["variants.C", "model.side"]),
        (BASE + "repeat: 3\n", ["repeat", "unknown study field"]),
        (BASE + "resources: {cpu: 1, gpus: 1}\n", ["resources.gpus", "unknown study field"]),
        (BASE + "axes: {model.alfa: [0.1, 0.2]}\n", ["axes", "model.alfa", "unknown config key", "model.alpha"]),
        (BASE + "axes: {model.alpha: []}\n", ["axes", "no values"]),
        (BASE + "axes: {model.side: [fa]}\n", ["variants.A", "model.side", "also an axis"]),
        (BASE + "axes: {model.alpha: [0.1, 7]}\n", ["axes", "model.alpha"]),
        (BASE + "rules: [{when: {data.datset: msmt17}, set: {stage2.w_ro: 0}}]\n", ["rules[0].when", "data.datset"]),
        (BASE + "base: {file: missing.yaml}\n", ["base.file", "missing.yaml", "is not a file"]),
        (BASE + "base: {overrides: {stage1.epochs: 0}}\n", ["base.overrides", "stage1.epochs"]),
        (BASE + "report: {rows: model.alpha}\n", ["report", "model.alpha", "axis key"]),
        (BASE + "search: {space: {model.alpha: {type: uniform, low: 0.5, high: 0.1}}, num_samples: 2}\n",
         ["search.space.model.alpha", "high"]),
        (BASE + "search: {space: {model.alpha: {type: uniform, low: 0.0, high: 3.0}}, num_samples: 2}\n",
         ["search.space.model.alpha=3.0", "model.alpha"]),
        ("name: 'bad name!'\n", ["name", "pattern"]),
        ("- just\n- a list\n", ["must be a mapping"]),
        (BASE + "  A2: {model.side: mfa}\n", ["'A'", "'A2'", "same experiment"]),
    ],
)
def test_bad_study_names_file_and_dotted_key(tmp_path: Path, text: str, needles: list[str]) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_study(path)
    message = str(err.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_bad_study_stops_the_cli_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, BASE + "  C: {stage2.los: cascade}\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "variants.C" in err and "stage2.los" in err


def test_base_file_overrides_axes_rules_and_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text("data: {dataset: cuhk03np, root: rel/data}\nstage1: {epochs: 3}\n")
    path = _write(
        tmp_path,
        """\
name: grid
base: {file: configs/base.yaml, overrides: {model: {backbone: resnet18}}}
variants:
  mfa: {model.side: mfa}
  none: {model.side: none}
axes:
  data.dataset: [msmt17, cuhk03np]
rules:
  - when: {data.dataset: msmt17}
    set: {stage2.temperatures: [5, 4, 3]}
  - when: {data.dataset: [msmt17, market1501], model.side: none}
    set: {stage1.epochs: 4}
repeats: {seeds: [3, 7]}
tracking: {uri: "sqlite:///sub/store.db", experiment: exp}
storage: results
report: {rows: variant, columns: [data.dataset]}
""",
    )
    spec = load_study(path)
    trials = spec.expand()
    assert len(trials) == 2 * 2 * 2
    assert spec.tracking_uri == f"sqlite:///{tmp_path}/sub/store.db" and spec.experiment == "exp"
    assert spec.storage_path == str(tmp_path / "results")
    by = {(t.variant, t.axes["data.dataset"], t.seed): t.cfg for t in trials}
    assert by[("mfa", "msmt17", 3)].stage2.temperatures == [5.0, 4.0, 3.0]
    assert by[("mfa", "cuhk03np", 3)].stage2.temperatures == [10.0, 8.0, 6.0]
    assert by[("none", "msmt17", 7)].stage1.epochs == 4 and by[("mfa", "msmt17", 7)].stage1.epochs == 3
    assert by[("none", "cuhk03np", 7)].runtime.seed == 7
    assert all(c.model.backbone == "resnet18" for c in by.values())
    assert all(c.data.root == str(tmp_path / "rel" / "data") for c in by.values())  # absolute: Tune moves cwd
    # mfa and none share a stage I per (dataset, seed) unless a rule changed the stage-I recipe
    assert by[("mfa", "cuhk03np", 3)].stage1_key() == by[("none", "cuhk03np", 3)].stage1_key()
    assert by[("mfa", "msmt17", 3)].stage1_key() != by[("none", "msmt17", 3)].stage1_key()
    assert len(spec.stage1_groups()) == 2 * 2 + 2
    # trial ids are stable across loads
    assert [t.trial_id for t in load_study(path).expand()] == [t.trial_id for t in trials]


def test_masking_and_cluster_rules(tmp_path: Path) -> None:
    uri = "https://alice:hunter2@mlflow.lab:5000/?token=abc"
    assert mask_uri(uri) == "https://alice:***@mlflow.lab:5000/?token=***"
    assert mask_uri("https://tok123@host") == "https://***@host"
    assert mask_uri("sqlite:////a/b.db") == "sqlite:////a/b.db"
    assert "hunter2" not in mask_text(f"cannot reach {uri}: refused", [uri])
    assert split_credentials(uri) == ("https://mlflow.lab:5000/?token=abc", "alice", "hunter2")
    assert absolute_sqlite_uri("sqlite:///x.db").startswith("sqlite:////")
    # local: anything goes
    check_cluster_rules("sqlite:////tmp/m.db", str(tmp_path), None)
    # a cluster: no SQLite / file store, no local storage path
    with pytest.raises(ConfigError, match="local sqlite store"):
        check_cluster_rules("sqlite:////tmp/m.db", "s3://bucket/x", "head:6379")
    with pytest.raises(ConfigError, match="local file store"):
        check_cluster_rules(str(tmp_path / "mlruns"), "s3://bucket/x", "head:6379")
    with pytest.raises(ConfigError, match="not shared") as err:
        check_cluster_rules(uri, str(tmp_path), "head:6379")
    assert "hunter2" not in str(err.value)
    check_cluster_rules(uri, "s3://bucket/x", "head:6379")
    assert is_shared_storage("gs://b/p") and not is_shared_storage(str(tmp_path))


def test_a_dead_ray_address_stops_at_once_instead_of_retrying() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ConfigError, match=rf"--address {address}: no Ray head answers there"):
            check_ray_address(address, timeout=3)
    with pytest.raises(ConfigError, match="use host:port"):
        check_ray_address("head-node")
    with socket.socket() as s:  # a listening port passes, as do auto and local
        s.bind(("127.0.0.1", 0))
        s.listen()
        check_ray_address(f"127.0.0.1:{s.getsockname()[1]}")
    check_ray_address("auto")
    check_ray_address(None)


def test_unreachable_tracking_server_is_named_masked() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    uri = f"http://bob:s3cret@127.0.0.1:{port}"
    with pytest.raises(TrackingError) as err:
        check_reachable(uri, timeout=3)
    assert f"http://bob:***@127.0.0.1:{port}" in str(err.value) and "s3cret" not in str(err.value)
    assert "unreachable" in str(err.value)


def test_a_synthreid_of_other_sizes_than_the_studys_is_refused_before_ray(tmp_path: Path) -> None:
    from pfe.data.synth import generate_synthreid
    from pfe.errors import DataError
    from pfe.study.runner import prepare_data

    generate_synthreid(tmp_path / "synthreid", ids_train=4, ids_test=4, images_per_id=4, cameras=2)
    study = f"""\
name: sizes
base: {{overrides: {{data: {{dataset: synthreid, root: {tmp_path / "synthreid"}}}}}}}
synthetic: {{ids_train: 4, ids_test: 4, images_per_id: 4, cameras: CAMERAS}}
"""
    same = load_study(_write(tmp_path, study.replace("CAMERAS", "2")))
    prepare_data(same, same.expand())  # the set there is the one asked for
    other = load_study(_write(tmp_path, study.replace("CAMERAS", "3")))
    with pytest.raises(DataError, match=r"study.yaml: synthetic: asks for another set .*cameras 2 there, 3 asked"):
        prepare_data(other, other.expand())
