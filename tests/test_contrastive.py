"""The contrastive reranker: its loss and retrieval metric, training on real shards, and loading as a scorer."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_SHAPES

from lit_dalle import Contrastive, EmbeddedShapes, TextImageDataModule
from lit_dalle.contrastive import contrastive_loss, retrieval_top1
from lit_dalle.evaluate import evaluation_set
from lit_dalle.rerank import clip_score, load_scorer, rank


def shapes_batch(split: str, num: int, seed: int = 7) -> tuple[list[str], torch.Tensor]:
    return evaluation_set(split, num, 32, seed=seed)


def test_contrastive_loss_is_symmetric_infonce_with_repeated_captions_as_positives():
    torch.manual_seed(0)
    logits = torch.randn(4, 4)
    captions = ["a", "b", "a", "c"]
    # Literal definition: the target of row i spreads evenly over the columns whose caption equals caption i.
    targets = torch.tensor([[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1]])
    rows = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    cols = -(targets * logits.t().log_softmax(dim=1)).sum(dim=1).mean()
    assert torch.allclose(contrastive_loss(logits, captions), (rows + cols) / 2)
    distinct = ["a", "b", "c", "d"]  # with no repeats it is CLIP's loss
    clip = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.t(), torch.arange(4))) / 2
    assert torch.allclose(contrastive_loss(logits, distinct), clip)


def test_retrieval_top1_counts_hits_per_pool():
    text = torch.eye(4)
    image = torch.eye(4)[[0, 1, 3, 2]]  # queries 2 and 3 find each other's image
    assert retrieval_top1(text, image, ["w", "x", "y", "z"], pool=4).item() == 0.5
    assert retrieval_top1(text, image, ["w", "x", "y", "y"], pool=4).item() == 1.0  # same caption: a hit
    assert retrieval_top1(text, image, ["w", "x", "y", "z"], pool=2).item() == 0.5  # pools [0, 1], [2, 3]
    assert retrieval_top1(text, image, ["w", "x", "y", "z"], pool=8).isnan()


def test_training_on_shards_learns_to_retrieve_and_the_checkpoint_is_a_scorer(trained_clip):
    scorer = load_scorer(str(trained_clip))
    for split in ("val", "heldout"):  # held out: colour-shape pairs never seen in training
        captions, images = shapes_batch(split, 200)
        accuracy = retrieval_top1(scorer.embed_texts(captions), scorer.embed_images(images), captions, pool=100)
        assert accuracy > 0.2, (split, accuracy)  # chance is ~0.01
    captions, images = shapes_batch("val", 64)
    matched = scorer.score(captions, images)
    shuffled = scorer.score(captions, images.roll(1, dims=0))
    assert (matched > shuffled).float().mean() > 0.8
    assert 0 < clip_score(scorer, captions, images) <= 100
    assert clip_score(scorer, captions, images) > clip_score(scorer, captions, images.roll(1, dims=0))


def test_rank_orders_by_score(trained_clip):
    scorer = load_scorer(str(trained_clip))
    captions, images = shapes_batch("val", 10)
    order, scores = rank(scorer, captions[0], images, batch_size=3)
    expected = scorer.score([captions[0]] * 10, images)
    assert torch.allclose(scores, expected.sort(descending=True).values, atol=1e-5)
    assert torch.equal(order, expected.argsort(descending=True))


def test_fit_trains_the_tokenizer_and_checkpoints_restore_it(tmp_path):
    data = TextImageDataModule(
        resolution=32, batch_size=16, val_batch_size=100, num_workers=0, augment="center",
        embedded=EmbeddedShapes(**SMALL_SHAPES),
    )  # fmt: skip
    model = Contrastive(image_size=32, text_len=16, embed_dim=32, text_width=32, text_heads=2, text_depth=1)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=2,
                        val_check_interval=3, check_val_every_n_epoch=None,
                        default_root_dir=tmp_path, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, datamodule=data)
    assert "val/retrieval_top1_of_100" in trainer.callback_metrics
    ckpt = next(tmp_path.rglob("*.ckpt"))
    assert (ckpt.parent / "tokenizer.json").is_file()
    loaded = load_scorer(str(ckpt))
    captions, images = shapes_batch("val", 4)
    with torch.no_grad():
        model.eval()
        assert torch.allclose(loaded.score(captions, images), model.score(captions, images), atol=1e-6)


def test_image_tower_loads_local_timm_weights(tmp_path):
    import timm

    source = timm.create_model("test_resnet", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    model = Contrastive(image_model="test_resnet", image_pretrained=str(tmp_path / "weights.pth"), embed_dim=16)
    loaded = model.image_tower.state_dict()
    trunk = [k for k in source.state_dict() if not k.startswith("fc.")]
    assert all(torch.equal(loaded[k], source.state_dict()[k]) for k in trunk)  # the classifier is replaced
    assert loaded["fc.weight"].shape == (16, source.fc.in_features)


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"configs/clip\.yaml"):
        load_scorer(str(tmp_path / "missing.ckpt"))
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_scorer(str(tmp_path))
    with pytest.raises(ValueError, match="init_temperature"):
        Contrastive(init_temperature=0.001, max_logit_scale=100)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        Contrastive().embed_images(torch.rand(3, 32, 32))


def test_reranked_choices_score_higher_and_match_their_captions_more_often(trained_clip):
    from lit_dalle.data.recognize import score_batch
    from lit_dalle.generate import select

    scorer = load_scorer(str(trained_clip))
    captions, images = shapes_batch("val", 64, seed=11)
    generator = torch.Generator().manual_seed(0)
    chosen, random_pick, chosen_scores, random_scores = [], [], [], []
    for i, caption in enumerate(captions):
        others = [j for j in torch.randperm(64, generator=generator).tolist() if j != i][:7]
        candidates = images[torch.tensor([i, *others])[torch.randperm(8, generator=generator)]]  # 8 candidates
        best = select(caption, candidates, top=1, scorer=scorer)
        guess = candidates[torch.randint(8, (1,), generator=generator)]
        chosen.append(best[0])
        random_pick.append(guess[0])
        chosen_scores.append(scorer.score([caption], best).item())
        random_scores.append(scorer.score([caption], guess).item())
    assert all(c >= r - 1e-6 for c, r in zip(chosen_scores, random_scores))  # the best of 8 beats any one of them
    reranked, at_random = score_batch(torch.stack(chosen), captions), score_batch(torch.stack(random_pick), captions)
    assert reranked["all"] > at_random["all"] + 0.25, (reranked, at_random)
    assert reranked["color"] > at_random["color"] and reranked["shape"] > at_random["shape"]


def save_tiny_hf_clip(folder):
    """A random CLIPModel with a CLIPProcessor (a tiny byte-level BPE vocabulary), as save_pretrained writes it."""
    import json

    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = {t: i for i, t in enumerate([*letters, *[c + "</w>" for c in letters], "<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    text = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=77, eos_token_id=vocab["<|endoftext|>"],
                          bos_token_id=vocab["<|startoftext|>"], pad_token_id=vocab["<|endoftext|>"])  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model.eval(), processor


def test_a_local_hugging_face_clip_scores_as_its_own_forward_does(tmp_path):
    model, processor = save_tiny_hf_clip(tmp_path)
    scorer = load_scorer(str(tmp_path))
    captions, images = shapes_batch("val", 5)
    scores = scorer.score(captions, images)
    inputs = processor(text=captions, images=list(images), do_rescale=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = model(**inputs).logits_per_text.diagonal() / model.logit_scale.exp()  # cosine of each pair
    assert torch.allclose(scores, reference, atol=1e-5)
    assert torch.allclose(scorer.embed_texts(captions).norm(dim=-1), torch.ones(5), atol=1e-5)
