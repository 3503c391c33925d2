"""``python -m lit_dalle quickstart``: the whole pipeline on the embedded data, one command, one CPU laptop.

Stages, each a real run of the library's own commands with the shipped configs (their TensorBoard logs
under ``runs/<stage>/lightning_logs``):

1. data: the embedded shapes dataset (tar shards in the cache);
2. dvae: ``fit --config configs/dvae.yaml`` (``runs/dvae``);
3. clip: ``fit --config configs/clip.yaml``, the contrastive reranker (``runs/clip``);
4. tokenize: the DVAE's tokens of every split (``runs/tokens``);
5. prior: ``fit --config configs/prior.yaml`` on those tokens, with reranked sample grids logged at each
   validation (``runs/prior``);
6. samples: ``generate`` with reranking (best 4 of 16) for seen and held-out captions
   (``runs/quickstart/samples.png``) and ``evaluate`` (``runs/quickstart/metrics.json``, a table printed).

A stage that finished is skipped on the next run (``runs/quickstart/<stage>.done``); a training stage that
was interrupted resumes from its ``last.ckpt``. The time limits shorten the shipped configs' ``max_time``
so that the whole run fits the budget on 2 CPU cores; the configs used are written to
``runs/quickstart/*.yaml``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lit_dalle.cli import shipped_config

__all__ = ["quickstart"]

STAGES = ("data", "dvae", "clip", "tokenize", "prior", "samples")


def _minutes(value: float) -> str:
    seconds = int(value * 60)
    return f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _run(args: list[str], root: Path) -> None:
    command = [sys.executable, "-m", "lit_dalle", *args]
    print("  $ python -m lit_dalle " + " ".join(args), flush=True)
    result = subprocess.run(command, cwd=root, check=False)
    if result.returncode:
        raise RuntimeError(f"stage command failed with exit code {result.returncode}: {' '.join(command)}")


def _fit(stage: str, config: dict[str, Any], root: Path, minutes: float, extra: list[str]) -> None:
    """``fit`` with ``config`` (written to runs/quickstart/<stage>.yaml); resumes from last.ckpt when present."""
    path = root / "runs" / "quickstart" / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    args = ["fit", "--config", str(path.relative_to(root)), f"--trainer.max_time={_minutes(minutes)}", *extra]
    last = root / "runs" / stage / "checkpoints" / "last.ckpt"
    if last.is_file():
        print(f"  resuming from {last}")
        args.append(f"--ckpt_path={last.relative_to(root)}")
    _run(args, root)


def _config(name: str) -> dict[str, Any]:
    return yaml.safe_load(Path(shipped_config(f"configs/{name}.yaml")).read_text())


def _captions() -> list[str]:
    """Three captions of seen and three of held-out attribute combinations (fixed)."""
    from lit_dalle.data import shapes

    seen = [s.caption for s in shapes.generate("val", 3, seed=5)]
    return seen + [s.caption for s in shapes.generate("heldout", 3, seed=5)]


def quickstart(
    root: str = ".",
    dvae_minutes: float = 9.0,
    clip_minutes: float = 2.0,
    prior_minutes: float = 10.0,
    num_captions: int = 50,
    device: str = "cpu",
    redo: list[str] | None = None,
) -> dict[str, Any]:
    """Run data -> DVAE -> contrastive model -> tokenize -> Prior -> reranked samples and metrics.

    Args:
        root: folder the ``runs/`` tree is written in (a second run there reuses finished stages).
        dvae_minutes: time limit of the DVAE training (its config stops at 3,000 updates before that on
            an idle 2-core CPU).
        clip_minutes: time limit of the contrastive model's training.
        prior_minutes: time limit of the Prior's training.
        num_captions: captions per split for ``evaluate`` (seen and held-out; best of 1, 4, 16).
        device: where sampling and evaluation run ("cpu", "cuda"); training follows the configs.
        redo: stages to run again even if finished (names: data dvae clip tokenize prior samples).
    """
    unknown = set(redo or []) - set(STAGES)
    if unknown:
        raise ValueError(f"--redo {sorted(unknown)}: stages are {', '.join(STAGES)}")
    base = Path(root).resolve()
    marks = base / "runs" / "quickstart"
    marks.mkdir(parents=True, exist_ok=True)
    dvae_ckpt, clip_ckpt = "runs/dvae/checkpoints/last.ckpt", "runs/clip/checkpoints/last.ckpt"
    prior_ckpt = "runs/prior/checkpoints/last.ckpt"
    timings: dict[str, float] = {}
    started = time.time()

    def stage(index: int, name: str, about: str) -> bool:
        done = marks / f"{name}.done"
        if done.is_file() and name not in (redo or []):
            print(f"[{index}/{len(STAGES)}] {name}: done before ({json.loads(done.read_text())['seconds']} s), reused")
            return False
        print(f"[{index}/{len(STAGES)}] {name}: {about}", flush=True)
        return True

    def finish(name: str, since: float) -> None:
        timings[name] = round(time.time() - since, 1)
        (marks / f"{name}.done").write_text(json.dumps({"seconds": timings[name]}))

    if stage(1, "data", "the embedded shapes dataset (tar shards)"):
        t = time.time()
        from lit_dalle.data.embedded import EmbeddedShapes, ensure_embedded

        ensure_embedded(EmbeddedShapes(resolution=64))
        finish("data", t)
    if stage(2, "dvae", f"training the DVAE (at most {dvae_minutes:g} min)"):
        t = time.time()
        _fit("dvae", _config("dvae"), base, dvae_minutes, [])
        finish("dvae", t)
    if stage(3, "clip", f"training the contrastive reranker (at most {clip_minutes:g} min)"):
        t = time.time()
        _fit("clip", _config("clip"), base, clip_minutes, [])
        finish("clip", t)
    if stage(4, "tokenize", "encoding every split with the DVAE"):
        t = time.time()
        _run(["tokenize", "--dvae", dvae_ckpt, "--out", "runs/tokens", "--resolution", "64", "--device", device], base)
        finish("tokenize", t)
    if stage(5, "prior", f"training the Prior on the tokens (at most {prior_minutes:g} min)"):
        t = time.time()
        config = _config("prior")
        config["data"]["init_args"].update(train_shards="runs/tokens/train", val_shards="runs/tokens/val")
        sampler = {"captions": _captions(), "num_samples": 8, "top": 4, "scorer": clip_ckpt}
        callbacks = config["trainer"]["callbacks"]
        entry = next((c for c in callbacks if c["class_path"].endswith("SampleLogger")), None)
        if entry is None:
            callbacks.append(entry := {"class_path": "lit_dalle.callbacks.SampleLogger", "init_args": {}})
        entry.setdefault("init_args", {}).update(sampler)  # reranked grids of fixed seen and held-out captions
        _fit("prior", config, base, prior_minutes, [])
        finish("prior", t)
    if stage(6, "samples", "reranked samples (best 4 of 16) and evaluation"):
        t = time.time()
        grid = ["--num-samples", "16", "--top", "4", "--rerank", clip_ckpt, "--out", "runs/quickstart/samples.png"]
        _run(["generate", "--ckpt", prior_ckpt, "--prompt", json.dumps(_captions()), *grid, "--device", device], base)
        _run(["evaluate", "--ckpt", prior_ckpt, "--rerank", clip_ckpt, "--out", "runs/quickstart/metrics.json",
              "--num-captions", str(num_captions), "--device", device], base)  # fmt: skip
        finish("samples", t)
    total = round(time.time() - started, 1)
    summary = {"root": str(base), "seconds": total, "stages": timings,
               "samples": str(marks / "samples.png"), "metrics": str(marks / "metrics.json")}  # fmt: skip
    print(json.dumps(summary, indent=1))
    return summary
