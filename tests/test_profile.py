"""`pfe-study profile`: Table V numbers for ResNet50 at 384x192, and the command line."""

from __future__ import annotations

import json

import pytest

from pfe.cli import main
from pfe.config import load_config
from pfe.model.profile import profile_model


@pytest.fixture(scope="module")
def paper_rows(tmp_path_factory) -> dict:
    """`pfe-study profile --json` with no config (the paper's setting), run once.

    TORCH_HOME points at an empty folder: profiling must never need (or load) weights, although
    the default config says pretrained: imagenet.
    """
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("no-weights")))
    import contextlib
    import io

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            assert main(["profile", "--json"]) == 0
    finally:
        mp.undo()
    return json.loads(buf.getvalue())


def test_table5_rows_match_the_paper(paper_rows) -> None:
    rows = {r["variant"]: r for r in paper_rows["rows"]}
    assert list(rows) == ["backbone", "tsam", "tsam+mfa", "tsam+mfa-dagger"]
    assert paper_rows["setting"]["backbone"] == "resnet50" and paper_rows["paper_setting"]
    assert rows["backbone"]["gmacs"] == pytest.approx(9.1, rel=0.03)  # ResNet50, last stride 1
    assert rows["backbone"]["params_m"] == pytest.approx(23.5, rel=0.01)
    assert rows["tsam+mfa-dagger"]["params_m"] == pytest.approx(25.5, rel=0.05)
    assert rows["tsam+mfa-dagger"]["gmacs"] == pytest.approx(9.9, rel=0.05)
    base = rows["backbone"]["params_m"]
    tsam_pct = 100 * (rows["tsam"]["params_m"] - base) / base
    dagger_pct = 100 * (rows["tsam+mfa-dagger"]["params_m"] - rows["tsam"]["params_m"]) / base
    assert tsam_pct == pytest.approx(6.0, abs=1.0)
    assert dagger_pct == pytest.approx(2.5, abs=1.0)
    assert paper_rows["overheads"]["tsam_params_pct"] == pytest.approx(tsam_pct)
    assert paper_rows["overheads"]["mfa_dagger_params_pct"] == pytest.approx(dagger_pct)
    # the separable 3x3 is what makes MFA-dagger cheaper than MFA
    assert rows["tsam+mfa"]["gmacs"] > rows["tsam+mfa-dagger"]["gmacs"] > rows["tsam"]["gmacs"]


def test_profile_of_one_config_and_classifier_heads_excluded() -> None:
    small = load_config(None, ["model.backbone=resnet18", "data.height=64", "data.width=32", "model.side=none", "model.attention=none"])
    got = profile_model(small)
    # torchvision resnet18 without fc: 11,176,512 parameters; + BNNeck of F5 (512 weights, 512 biases)
    assert got["params_m"] * 1e6 == pytest.approx(11_176_512 + 1024)
    assert got["gmacs"] > 0


def test_profile_command_line_table_and_config_file(tmp_path, capsys) -> None:
    config = tmp_path / "small.yaml"
    config.write_text("model:\n  backbone: resnet18\n  channels: 32\ndata:\n  height: 64\n  width: 32\n")
    assert main(["profile", str(config), "model.side=fa"]) == 0
    text = capsys.readouterr().out
    assert "| tsam+mfa-dagger |" in text and "resnet18" in text and "C = 32" in text and "side=fa" in text
    assert "paper" not in text.split("\n")[2]  # not the paper's setting: no paper columns
    # overrides without a config file
    assert main(["profile", "model.backbone=resnet18", "data.height=64", "data.width=32", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["variant"] for r in rows] == ["backbone", "tsam", "tsam+mfa", "tsam+mfa-dagger"]
    assert main(["profile", "model.backbone=nope"]) == 2
