"""Model selection, interruption, resume and failure handling of `main.py train`."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, command_line, options
from test_dataset import with_extra_text

import dataset
import trainer
from images import features_path
from main import train
from model import checksum, load_checkpoint
from trainer import Trainer, cross_entropy_loss, debug_requested, warmup_factor


def test_best_checkpoint_lr_decay_and_early_stop(demo, tmp_path, monkeypatch):
    """A metric that improves, then stalls: best.pth from the right epoch, lr decayed, early stop."""
    cider = iter([0.1, 0.3, 0.2, 0.25, 0.2, 0.9])
    monkeypatch.setattr(Trainer, "validate", lambda self: {"val_loss": 1.0, "CIDEr-D": next(cider)})
    train(**options(demo, tmp_path, epoch=6, lr=1e-3, lr_patience=2, lr_decay=0.5, early_stop_patience=3))
    best = load_checkpoint(str(tmp_path / "checkpoints" / "best.pth"))
    last = load_checkpoint(str(tmp_path / "checkpoints" / "last.pth"))
    assert best["state"]["epoch"] == 2 and best["state"]["best_score"] == 0.3
    assert last["state"]["epoch"] == 5  # stopped after 3 epochs without improvement, never saw 0.9
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-4)  # decayed once, after epoch 4
    log = [json.loads(line) for line in open(tmp_path / "logs" / "caption.metrics.jsonl")]
    assert [(r["epoch"], r["value"]) for r in log if r["name"] == "lr"] == [(4, pytest.approx(5e-4))]
    assert [r["value"] for r in log if r["name"] == "early_stop"] == [5]


def start_training(opt, tmp_path, *extra):
    args = command_line(options(opt, tmp_path, plot_every=1, epoch=2))
    return subprocess.Popen([sys.executable, "main.py", "train", *args, *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_steps(tmp_path, count, process):
    log = tmp_path / "logs" / "caption.metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if log.exists() and sum(1 for line in open(log) if '"train_loss"' in line) >= count:
            return
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_resumable_checkpoint(demo, tmp_path, sig):
    process = start_training(demo, tmp_path)
    wait_for_steps(tmp_path, 3, process)
    process.send_signal(sig)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert f"{sig.name}: saved" in output
    saved = load_checkpoint(str(tmp_path / "checkpoints" / "last.pth"))
    assert saved["state"]["epoch"] == 0 and 3 <= saved["state"]["step"] == saved["state"]["batch"]
    assert saved["optimizer"]["state"]  # Adam moments are kept

    args = command_line(options(demo, tmp_path, epoch=1, resume=True, eval_size=0, metric="val_loss"))
    resumed = subprocess.run([sys.executable, "main.py", "train", *args],
                             cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    assert f"at epoch 0, batch {saved['state']['batch']}" in resumed.stdout
    done = load_checkpoint(str(tmp_path / "checkpoints" / "last.pth"))["state"]
    assert done["epoch"] == 1 and done["step"] == 120 * 5 // demo.batch_size + 1  # every batch exactly once


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(demo, tmp_path):
    train(**options(demo, tmp_path, epoch=1, eval_size=0, metric="val_loss"))
    last = tmp_path / "checkpoints" / "last.pth"
    before = last.read_bytes()
    poisoned = tmp_path / "poisoned.pth"
    poisoned.write_bytes(open(demo.caption_data_path, "rb").read())
    source = features_path(demo.caption_data_path)
    features = np.load(source)
    features[:] = np.nan
    np.save(features_path(str(poisoned)), features)
    with open(source.replace(".npy", ".json")) as file:
        meta = file.read()
    open(features_path(str(poisoned)).replace(".npy", ".json"), "w").write(meta)
    with pytest.raises(SystemExit, match="the loss became nan .* last good checkpoint is kept"):
        train(**options(demo, tmp_path, caption_data_path=str(poisoned), val_caption_data_path="", epoch=1,
                        overwrite=True))
    assert last.read_bytes() == before


def test_broken_checkpoints_are_clear_errors_and_never_run_code(demo, tmp_path):
    train(**options(demo, tmp_path, epoch=1, eval_size=0, metric="val_loss"))
    good = tmp_path / "checkpoints" / "last.pth"
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(Exception, match="truncated.pth: not a readable checkpoint"):
        load_checkpoint(str(truncated))
    not_checkpoint = tmp_path / "dict.pth"
    torch.save({"weights": torch.zeros(2)}, not_checkpoint)
    with pytest.raises(Exception, match="not a checkpoint: missing model"):
        load_checkpoint(str(not_checkpoint))

    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(Exception, match="evil.pth: not a readable checkpoint"):
        load_checkpoint(str(evil))
    assert not marker.exists()


def test_resume_with_another_vocabulary_is_refused(demo, tmp_path):
    train(**options(demo, tmp_path, epoch=1, eval_size=0, metric="val_loss"))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.pth", weights_only=True)
    checkpoint["ix2word"] = checkpoint["ix2word"] + ["新词"]
    checkpoint["checksum"] = checksum(checkpoint)  # saved so, not damaged
    torch.save(checkpoint, tmp_path / "checkpoints" / "last.pth")
    with pytest.raises(SystemExit, match="another vocabulary"):
        train(**options(demo, tmp_path, epoch=2, resume=True))


@pytest.mark.parametrize("setting, value", [("hidden_size", 256), ("heads", 2), ("model", "attention"),
                                            ("dropout", 0.1)])
def test_resume_with_another_model_option_is_refused(demo, tmp_path, setting, value):
    """--heads changes no weight's shape, and was once taken: every option that shapes the model is compared."""
    train(**options(demo, tmp_path, epoch=1, eval_size=0, metric="val_loss", model="transformer", d_model=64))
    flag = "--" + setting.replace("_", "-")
    with pytest.raises(SystemExit, match=f"{flag}={value} but .*last.pth was trained with {flag}=.*shapes the model"):
        train(**options(demo, tmp_path, epoch=2, resume=True, **{"model": "transformer", "d_model": 64,
                                                                 setting: value}))


def scripted_validation(monkeypatch, name, values):
    """Validation that reports the given values of `name`, one per epoch, and records them."""
    values = iter(values)
    monkeypatch.setattr(Trainer, "validate", lambda self: {"val_loss": 1.0, "CIDEr-D": 0.0, name: next(values)})


def test_early_stop_on_the_last_cross_entropy_epoch_still_runs_self_critical_training(demo, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, "CIDEr-D", [0.5, 0.1, 0.1, 0.6])
    train(**options(demo, tmp_path, epoch=3, early_stop_patience=2, scst_epoch=1, plot_every=1))
    log = [json.loads(line) for line in open(tmp_path / "logs" / "caption.metrics.jsonl")]
    assert [r["value"] for r in log if r["name"] == "early_stop"] == [3]
    assert {r["epoch"] for r in log if r["name"] == "train_reward"} == {3}  # the self-critical epoch ran
    last = load_checkpoint(str(tmp_path / "checkpoints" / "last.pth"))["state"]
    assert (last["phase"], last["epoch"], last["best_score"]) == ("self-critical", 4, 0.6)


def test_val_loss_selects_the_lowest(demo, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, "val_loss", [3.0, 2.0, 1.0, 1.5])
    train(**options(demo, tmp_path, epoch=4, metric="val_loss", lr_patience=0))
    best = load_checkpoint(str(tmp_path / "checkpoints" / "best.pth"))["state"]
    assert (best["epoch"], best["best_score"]) == (3, 1.0)
    last = load_checkpoint(str(tmp_path / "checkpoints" / "last.pth"))
    assert last["optimizer"]["param_groups"][0]["lr"] == demo.lr  # --lr-patience=0: never decayed


@pytest.mark.parametrize("changes, message", [
    ({"metric": "CIDEr"}, "--metric=CIDEr: choose one of CIDEr-D, BLEU-1"),
    ({"metric": "BLEU-4", "eval_size": 0}, "--metric=BLEU-4 scores generated captions: it needs --eval-size > 0"),
    ({"lr_patience": -1}, "--lr-patience=-1: must be >= 0"),
])
def test_impossible_selection_options_are_refused(demo, tmp_path, changes, message):
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        train(**options(demo, tmp_path, **changes))
    assert not (tmp_path / "checkpoints").exists()


def test_meteor_without_java_is_refused(demo, tmp_path, monkeypatch):
    monkeypatch.setattr("metrics.shutil.which", lambda name: None)
    with pytest.raises(SystemExit, match="--metric=METEOR needs Java"):
        train(**options(demo, tmp_path, metric="METEOR"))


@pytest.mark.parametrize("setting, value", [("seed", 1), ("val_fraction", 0.2), ("batch_size", 16)])
def test_resume_refuses_another_data_order(demo, tmp_path, setting, value):
    run = options(demo, tmp_path, epoch=1, eval_size=0, metric="val_loss", val_caption_data_path="")
    train(**run)
    flag = "--" + setting.replace("_", "-")
    with pytest.raises(SystemExit, match=f"{flag}={value} but .*last.pth was trained with {flag}="):
        train(**{**run, "epoch": 2, "resume": True, setting: value})


def test_debug_file_of_a_run_without_terminal_is_ignored_with_a_warning(demo, tmp_path, capsys):
    debug_file = tmp_path / "debugc"
    debug_file.touch()
    train(**options(demo, tmp_path, epoch=1, eval_size=0, metric="val_loss", debug_file=str(debug_file)))
    assert load_checkpoint(str(tmp_path / "checkpoints" / "last.pth"))["state"]["epoch"] == 1
    assert capsys.readouterr().err.count(f"warning: {debug_file} exists, but ipdb only starts") == 1


class Terminal:
    def isatty(self):
        return True


def test_debug_file_starts_ipdb_only_for_its_owner_on_a_terminal(demo, tmp_path, monkeypatch):
    debug_file = tmp_path / "debugc"
    monkeypatch.setattr("sys.stdin", Terminal())
    assert not debug_requested(str(debug_file))  # no file
    debug_file.touch()
    assert debug_requested(str(debug_file))
    monkeypatch.setattr("os.getuid", lambda: os.stat(debug_file).st_uid + 1)
    assert not debug_requested(str(debug_file))  # another user's file


def test_scheduled_sampling_rises_from_exactly_todays_training(demo, tmp_path):
    """--scheduled-sampling=P: the first cross-entropy epoch is plain teacher forcing (the same losses
    to the last bit), the last one feeds the model's own words with probability P."""
    losses = {}
    for probability in (0.0, 0.5):
        folder = tmp_path / str(probability)
        train(**options(demo, folder, epoch=2, eval_size=0, metric="val_loss", scheduled_sampling=probability))
        log = [json.loads(line) for line in open(folder / "logs" / "caption.metrics.jsonl")]
        losses[probability] = [r["value"] for r in log if r["name"] == "val_loss"]
        schedule = [(r["epoch"], r["value"]) for r in log if r["name"] == "scheduled_sampling"]
    assert schedule == [(1, 0.5)]  # logged in epoch 2 only; 0 before
    assert losses[0.5][0] == losses[0.0][0]
    assert losses[0.5][1] != losses[0.0][1]


def test_resume_with_another_number_of_processes_starts_the_epoch_again(demo, tmp_path, capsys):
    """A last.pth written mid-epoch by 2 processes, resumed by 1: the shares of the batches differ,
    so the epoch restarts from its first batch (with a message) and every caption is seen."""
    train(**options(demo, tmp_path, epoch=1, eval_size=0, metric="val_loss"))
    last = tmp_path / "checkpoints" / "last.pth"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["state"].update(epoch=0, phase_epoch=0, batch=5, step=5, processes=2)
    torch.save(checkpoint, last)
    capsys.readouterr()
    train(**options(demo, tmp_path, epoch=1, eval_size=0, metric="val_loss", resume=True))
    assert "written by 2 processes, this run has 1" in capsys.readouterr().out
    done = load_checkpoint(str(last))["state"]
    assert (done["epoch"], done["processes"]) == (1, 1)
    assert done["step"] == 5 + 120 * 5 // demo.batch_size + 1  # the whole epoch after the 5 steps taken


def test_the_warm_up_rises_linearly_then_falls_as_one_over_the_square_root():
    assert [warmup_factor(step, 4) for step in (0, 1, 3, 15, 63)] == [0.25, 0.5, 1.0, 0.5, 0.25]
    assert {warmup_factor(step, 0) for step in (0, 10, 10_000)} == {1.0}


def test_training_warms_the_lr_up_step_by_step_and_decays_the_warmed_lr(demo, tmp_path, monkeypatch):
    """Cross-entropy from random weights warms up; self-critical training, from a trained model, does not."""
    seen, self_critical = [], []
    def lr(self):
        return self.optimization.optimizer.param_groups[0]["lr"]

    monkeypatch.setattr(Trainer, "cross_entropy_step", lambda self, batch, sampling=0.0: seen.append(lr(self)) or 1.0)
    monkeypatch.setattr(Trainer, "self_critical_step", lambda self, batch: self_critical.append(lr(self)) or 1.0)
    monkeypatch.setattr(Trainer, "validate", lambda self: {"val_loss": 1.0, "CIDEr-D": 0.1})  # never improves after 1
    train(**options(demo, tmp_path, epoch=3, lr=1e-2, warmup_steps=10_000, lr_patience=1, lr_decay=0.5,
                    early_stop_patience=0, scst_epoch=1, scst_lr=3e-4))
    assert self_critical and set(self_critical) == {3e-4}
    per_epoch = len(seen) // 3
    expected = [1e-2 * (step + 1) / 10_000 * (0.5 if step >= 2 * per_epoch else 1) for step in range(len(seen))]
    assert seen == pytest.approx(expected)  # decayed once: after epoch 2, the first without improvement
    last = load_checkpoint(str(tmp_path / "checkpoints" / "last.pth"))
    assert last["state"]["phase_step"] == len(self_critical)
    assert last["optimizer"]["param_groups"][0]["base_lr"] == pytest.approx(3e-4 * 0.5)  # decayed after its epoch


def test_label_smoothing_is_the_mix_of_the_target_loss_and_the_mean_over_the_vocabulary():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 9), torch.randint(0, 9, (6,))

    def model(features, captions, lengths, sampling, image_of):
        return logits, targets, torch.tensor(0.0)

    log_probs = logits.log_softmax(-1)
    nll, uniform = -log_probs[torch.arange(6), targets].mean(), -log_probs.mean()
    assert cross_entropy_loss(model, None, None, None, smoothing=0.2).item() == pytest.approx(
        (0.8 * nll + 0.2 * uniform).item(), rel=1e-6)
    assert cross_entropy_loss(model, None, None, None).item() == pytest.approx(nll.item(), rel=1e-6)


def test_pre_training_learns_the_extra_text_then_the_captions_alone(demo, tmp_path, monkeypatch):
    """--pretrain-epoch: its epochs read every caption and the extra text, warmed up; the cross-entropy
    epochs after it read the captions alone, from the pre-trained best, at the full lr."""
    opt, data = with_extra_text(demo, tmp_path)
    seen = []  # (phase, captions of the batch that hold the extra text 5 6 7, lr)

    def record(self, batch, sampling=0.0):
        extra = sum(row[:3].tolist() == [5, 6, 7] for row in batch.captions)
        lr = self.optimization.optimizer.param_groups[0]["lr"]
        seen.append((self.progress.phase, len(batch.captions), extra, lr))
        return 1.0

    monkeypatch.setattr(Trainer, "cross_entropy_step", record)
    monkeypatch.setattr(Trainer, "validate", lambda self: {"val_loss": 1.0, "CIDEr-D": 0.1})
    train(**options(opt, tmp_path, pretrain_epoch=1, epoch=1, warmup_steps=3))
    phases = [phase for phase, *_ in seen]
    assert phases == sorted(phases, key=["pre-training", "cross-entropy"].index) and len(set(phases)) == 2
    captions = sum(map(len, data["caption"]))
    extra = sum(len(rows) for rows in data["extra_caption"])
    assert sum(n for phase, n, _, _ in seen if phase == "pre-training") == captions + extra
    assert sum(e for phase, _, e, _ in seen if phase == "pre-training") == extra
    assert sum(n for phase, n, _, _ in seen if phase == "cross-entropy") == captions
    assert sum(e for phase, _, e, _ in seen if phase == "cross-entropy") == 0
    assert seen[0][3] == pytest.approx(demo.lr / 3)  # the warm-up is pre-training's
    assert {lr for phase, *_, lr in seen if phase == "cross-entropy"} == {demo.lr}


def test_pre_training_without_extra_text_is_refused_before_any_work(demo, tmp_path):
    with pytest.raises(SystemExit, match="--pretrain-epoch=2: .* holds no extra training text"):
        train(**options(demo, tmp_path, pretrain_epoch=2))


def test_validation_reads_a_batch_of_features_at_a_time_and_captions_every_image(demo, tmp_path, monkeypatch):
    """AI Challenger's 30,000 val photos' regions would not fit in memory at once: validation reads
    --batch-size rows at a time (training batches too), and still captions and scores --eval-size images."""
    reads, scored = [], {}
    stored, score = dataset.CaptionSplit.stored_features_of, trainer.score_captions

    def recorded_read(self, rows):
        reads.append(len(rows))
        return stored(self, rows)

    def recorded_score(results, references):
        scored.update(results)
        return score(results, references)

    monkeypatch.setattr(dataset.CaptionSplit, "stored_features_of", recorded_read)
    monkeypatch.setattr(trainer, "score_captions", recorded_score)
    train(**options(demo, tmp_path, epoch=1, batch_size=8, eval_size=20))
    assert max(reads) <= 8
    assert len(scored) == 20 and all(isinstance(caption, str) for caption in scored.values())


def test_the_moving_average_validates_is_kept_and_resumes(demo, tmp_path, monkeypatch):
    """--ema-decay=d: what validates and goes into the checkpoints is the average of the weights after
    each step (the first step's weights, then average = d * average + (1 - d) * weights); last.pth keeps
    the learning weights too, and a run stopped after an epoch and resumed ends where one run does."""
    decay, steps, validated = 0.7, [], []
    step = trainer.Optimization.step

    def recorded_step(self, loss, progress):
        value = step(self, loss, progress)
        steps.append([p.detach().clone() for p in self.optimizer.param_groups[0]["params"]])
        return value

    def recorded_validation(model, *args, **kwargs):
        validated.append([p.detach().clone() for p in model.parameters()])
        return {"val_loss": 1.0}

    monkeypatch.setattr(trainer.Optimization, "step", recorded_step)
    monkeypatch.setattr(trainer, "score_split", recorded_validation)
    settings = dict(eval_size=0, metric="val_loss", lr_patience=0, early_stop_patience=0, ema_decay=decay)
    train(**options(demo, tmp_path / "whole", epoch=2, **settings))
    average = steps[0]
    for weights in steps[1:]:
        average = [decay * a + (1 - decay) * w for a, w in zip(average, weights)]
    last = load_checkpoint(str(tmp_path / "whole" / "checkpoints" / "last.pth"))
    names = list(last["training_model"])  # the parameters' order: model.parameters() has no buffers here
    assert all(torch.allclose(mine, theirs, atol=1e-6) for mine, theirs in zip(validated[-1], average))
    assert all(torch.allclose(last["model"][name], theirs, atol=1e-6) for name, theirs in zip(names, average))
    assert all(torch.equal(last["training_model"][name], theirs) for name, theirs in zip(names, steps[-1]))
    assert not torch.equal(last["model"][names[0]], last["training_model"][names[0]])

    train(**options(demo, tmp_path / "resumed", epoch=1, **settings))
    train(**options(demo, tmp_path / "resumed", epoch=2, resume=True, **settings))
    resumed = load_checkpoint(str(tmp_path / "resumed" / "checkpoints" / "last.pth"))
    for key in ("model", "training_model"):
        assert all(torch.allclose(resumed[key][name], last[key][name], atol=1e-6) for name in names), key


def test_a_run_stopped_as_a_phase_starts_resumes_to_the_same_average(demo, tmp_path, monkeypatch):
    """last.pth written as self-critical training starts holds an average that has not stepped yet: the
    resumed run starts it afresh, and ends where one run does."""
    settings = dict(eval_size=0, metric="val_loss", lr_patience=0, early_stop_patience=0, ema_decay=0.7, epoch=1,
                    scst_epoch=1, scst_bleu_weight=0.0)
    train(**options(demo, tmp_path / "whole", **settings))
    epoch = Trainer.train_epoch

    def killed_in_self_critical_training(self, stop):
        if self.progress.phase == "self-critical":
            raise KeyboardInterrupt  # as a kill: the files stay as start_phase left them
        return epoch(self, stop)

    monkeypatch.setattr(Trainer, "train_epoch", killed_in_self_critical_training)
    with pytest.raises(KeyboardInterrupt):
        train(**options(demo, tmp_path / "killed", **settings))
    monkeypatch.setattr(Trainer, "train_epoch", epoch)
    train(**options(demo, tmp_path / "killed", resume=True, **settings))
    whole, resumed = (load_checkpoint(str(tmp_path / run / "checkpoints" / "last.pth")) for run in ("whole", "killed"))
    assert resumed["state"]["phase"] == "self-critical" and resumed["state"]["phase_step"] > 0
    for key in ("model", "training_model"):
        assert all(torch.allclose(resumed[key][name], whole[key][name], atol=1e-6) for name in whole[key]), key
