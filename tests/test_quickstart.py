"""The quickstart's orchestration: stage order, the configs it writes, reuse of finished stages, resume.

The stages' commands are recorded instead of run (each is tested on its own elsewhere; the full pipeline
takes ~25 minutes, measured in the README); the configs the quickstart writes are parsed by the real CLI.
"""

from __future__ import annotations

import pytest
import yaml

import lit_dalle.quickstart as qs
from lit_dalle.cli import main


@pytest.fixture
def recorded(monkeypatch):
    calls = []
    monkeypatch.setattr(qs, "_run", lambda args, root: calls.append(args))
    monkeypatch.setattr("lit_dalle.data.embedded.ensure_embedded", lambda cfg: calls.append(["data"]))
    return calls


def test_stages_run_in_order_with_the_configs_they_need(recorded, tmp_path, monkeypatch, capsys):
    qs.quickstart(root=str(tmp_path), prior_minutes=10.0)
    assert [c[0] for c in recorded] == ["data", "fit", "fit", "tokenize", "fit", "generate", "evaluate"]
    assert [c[2] for c in recorded if c[0] == "fit"] == [f"runs/quickstart/{s}.yaml" for s in ("dvae", "clip", "prior")]
    assert "--trainer.max_time=00:00:10:00" in recorded[4]
    assert all(not a.startswith("--ckpt_path") for c in recorded for a in c)  # nothing to resume yet
    prior = yaml.safe_load((tmp_path / "runs/quickstart/prior.yaml").read_text())
    assert prior["data"]["init_args"]["train_shards"] == "runs/tokens/train"
    samplers = [c for c in prior["trainer"]["callbacks"] if c["class_path"].endswith("SampleLogger")]
    assert len(samplers) == 1 and samplers[0]["init_args"]["scorer"].startswith("runs/clip")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # the written config is one the CLI accepts as it is
        main(["fit", "--config", "runs/quickstart/prior.yaml", "--print_config"])
    assert "SampleLogger" in capsys.readouterr().out


def test_finished_stages_are_reused_and_an_interrupted_one_resumes(recorded, tmp_path, monkeypatch):
    qs.quickstart(root=str(tmp_path))
    recorded.clear()
    qs.quickstart(root=str(tmp_path))
    assert recorded == []  # everything was done
    last = tmp_path / "runs/prior/checkpoints/last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"")
    qs.quickstart(root=str(tmp_path), redo=["prior"])
    assert [c[0] for c in recorded] == ["fit"] and "--ckpt_path=runs/prior/checkpoints/last.ckpt" in recorded[0]


def test_a_failed_stage_is_not_marked_done(tmp_path, monkeypatch):
    def failing(args, root):
        if args[0] == "tokenize":
            raise RuntimeError("stage command failed")

    monkeypatch.setattr(qs, "_run", failing)
    monkeypatch.setattr("lit_dalle.data.embedded.ensure_embedded", lambda cfg: None)
    with pytest.raises(RuntimeError):
        qs.quickstart(root=str(tmp_path))
    assert sorted(p.stem for p in (tmp_path / "runs/quickstart").glob("*.done")) == ["clip", "data", "dvae"]
    with pytest.raises(ValueError, match="stages are"):
        qs.quickstart(root=str(tmp_path), redo=["dave"])
