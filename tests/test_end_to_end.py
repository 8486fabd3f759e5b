"""The whole pipeline on the demo data: train, generate, evaluate."""
import json
import os

import torch
from conftest import options

from beam_search import caption_features
from dataset import train_val_splits
from main import evaluate, generate, train
from model import build_model, load_checkpoint, model_from_checkpoint, save_checkpoint


def test_train_generate_evaluate(demo, tmp_path, capsys):
    train(**options(demo, epoch=4, lr=3e-3))
    assert sorted(os.listdir(demo.checkpoint_dir)) == ["best.pth", "last.pth"]
    records = [json.loads(line) for line in open(os.path.join(demo.log_dir, "caption.metrics.jsonl"))]
    names = {r["name"] for r in records}
    assert {"train_loss", "val_loss", "perplexity", "top5_accuracy", "CIDEr-D", "BLEU-4"} <= names
    losses = [r["value"] for r in records if r["name"] == "val_loss"]
    assert losses[-1] < losses[0]
    # no Visdom server: what the dashboard would have shown is in the replay log
    recorded = [json.loads(line)[1] for line in open(os.path.join(demo.log_dir, "caption.visdom.log"))]
    windows = {message.get("win") for message in recorded}
    assert {"loss", "captions", "image", "config", "log", "validation metrics"} <= windows
    assert any("人工描述" in str(message) for message in recorded)

    images = os.path.join(demo.img_path, "val_000*.jpg")
    capsys.readouterr()
    generate(**options(demo, img=images, output=str(tmp_path / "out.json")))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 10 and all(line.split("\t")[0].endswith(".jpg") for line in lines)
    captions = [line.split("\t")[1] for line in lines]
    assert all(captions) and not any(" " in c for c in captions)
    assert [e["image_id"] for e in json.load(open(tmp_path / "out.json"))] == [f"val_{i:04d}.jpg" for i in range(10)]
    assert captions == captions_of_extracted_features(demo, [f"val_{i:04d}.jpg" for i in range(10)])

    trained = evaluate_checkpoint(demo, tmp_path, os.path.join(demo.checkpoint_dir, "best.pth"), "trained")
    untrained_path = str(tmp_path / "untrained.pth")
    checkpoint = torch.load(os.path.join(demo.checkpoint_dir, "best.pth"), weights_only=True)
    model = build_model(demo, len(checkpoint["ix2word"]), checkpoint["feature"]["feature_dim"])
    save_checkpoint(untrained_path, model, demo, checkpoint["ix2word"], checkpoint["feature"])
    untrained = evaluate_checkpoint(demo, tmp_path, untrained_path, "untrained")
    assert trained["CIDEr-D"] > untrained["CIDEr-D"] and trained["BLEU-1"] > untrained["BLEU-1"]


def captions_of_extracted_features(opt, image_ids):
    """What the best model says from the features that extraction stored for these images."""
    _, val = train_val_splits(opt)
    row_of = {val.image_id(row): row for row in val.rows}
    checkpoint_path = os.path.join(opt.checkpoint_dir, "best.pth")
    checkpoint = load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint, checkpoint_path)
    features = val.features_of([row_of[image_id] for image_id in image_ids])  # (N, F)
    return [beams[0][0] for beams in caption_features(model, features, checkpoint["ix2word"], opt)]


def evaluate_checkpoint(opt, folder, checkpoint, name):
    results, metrics = str(folder / f"{name}.results.json"), str(folder / f"{name}.metrics.json")
    evaluate(**options(opt, model_ckpt=checkpoint, output=results, metrics_path=metrics))
    assert len(json.load(open(results))) == 30
    scores = json.load(open(metrics))
    # scoring an existing results file gives the same numbers
    evaluate(**options(opt, results=results, metrics_path=metrics + ".again"))
    assert json.load(open(metrics + ".again")) == scores
    return scores
