"""``evaluate``: blur, the scorer-based FID / IS features, best-of-N reranking and the JSON it writes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import good_record
from test_prior import dvae_ckpt, trained  # noqa: F401  (module fixtures: a tiny trained Prior)

from lit_dalle.cli import main
from lit_dalle.evaluate import ScorerFeatures, _image_metrics, blur, evaluation_set
from lit_dalle.rerank import load_scorer


def test_blur_is_a_gaussian_of_the_radius_as_standard_deviation():
    image = torch.zeros(1, 3, 65, 65)
    image[..., 32, 32] = 1.0
    assert torch.equal(blur(image, 0), image)
    for radius in (1.0, 2.0, 4.0):
        kernel = blur(image, radius)[0, 0]
        assert kernel.sum().item() == pytest.approx(1.0, abs=1e-4)  # mass kept
        offsets = (torch.arange(65) - 32.0) ** 2
        variance = (kernel.sum(dim=0) * offsets).sum().item()  # second moment along a row
        assert variance == pytest.approx(radius**2, rel=0.05)


def test_fid_with_scorer_features_is_zero_for_identical_sets_and_grows_with_blur(trained_clip):
    scorer = load_scorer(str(trained_clip))
    _, real = evaluation_set("val", 60, 32)
    _, other = evaluation_set("heldout", 60, 32)
    same = _image_metrics(real, real, [0.0], ScorerFeatures(scorer), None, None)["fid"]["0"]
    assert abs(same) < 1e-3
    differs = _image_metrics(real, other, [0.0], ScorerFeatures(scorer), None, None)["fid"]["0"]
    blurred = _image_metrics(real, blur(real, 2.0), [0.0], ScorerFeatures(scorer), None, None)["fid"]["0"]
    assert 0 < differs < blurred  # a heavy blur is further from the data than another split of it


def test_evaluate_writes_best_of_n_metrics_for_seen_and_heldout(trained, trained_clip, tmp_path):  # noqa: F811
    _, _, _, ckpt = trained
    out = tmp_path / "metrics.json"
    main(["evaluate", "--ckpt", str(ckpt), "--rerank", str(trained_clip), "--out", str(out), "--num-captions", "12",
          "--best-of", "[1, 4]", "--blur-radii", "[0, 2]", "--batch-size", "4"])  # fmt: skip
    results = json.loads(out.read_text())
    assert set(results["splits"]) == {"val", "heldout"}
    for split in results["splits"].values():
        assert split["reference"]["real images"]["all"] > 0.95  # the recogniser reads the real images
        one, four = split["best_of_1"], split["best_of_4"]
        assert four["clip_score"] >= one["clip_score"]  # the best of 4 includes the first sample
        assert set(four["fid"]) == set(four["is"]) == {"0", "2"}
        assert all(v >= 1.0 - 1e-6 for v in four["is"].values())  # IS = exp(KL) >= 1
        assert set(one["attributes"]) == {"color", "shape", "size", "relation", "count", "all"}


def test_evaluate_on_shards_and_bad_settings(trained, make_shards, tmp_path):  # noqa: F811
    shards = make_shards([good_record(f"k{i}", seed=i, caption=f"Photo {i}") for i in range(5)])
    captions, images = evaluation_set("val", 3, 32, data=shards[0])
    assert captions == ["photo 0", "photo 1", "photo 2"] and images.shape == (3, 3, 32, 32)
    _, _, _, ckpt = trained
    out = tmp_path / "m.json"
    main(["evaluate", "--ckpt", str(ckpt), "--data", shards[0], "--num-captions", "2", "--blur-radii", "[]",
          "--out", str(out)])  # fmt: skip
    entry = json.loads(out.read_text())["splits"]["data"]["best_of_1"]
    assert entry["attributes"] is None  # captions of other data have no attributes to check
    with pytest.raises(ValueError, match="needs --rerank"):
        main(["evaluate", "--ckpt", str(ckpt), "--best-of", "[1, 4]"])
    with pytest.raises(ValueError, match="--features"):
        main(["evaluate", "--ckpt", str(ckpt)])
    with pytest.raises(ImportError, match="torch-fidelity"):
        main(["evaluate", "--ckpt", str(ckpt), "--features", "inception"])
