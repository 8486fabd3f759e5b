"""The training loop: Adam over packed captions, a live dashboard, per-epoch validation,
best-model selection by a caption metric, and checkpoints that survive Ctrl-C and crashes."""
import dataclasses
import html
import json
import math
import os
import signal
import time

import torch
from torchnet.meter import AverageValueMeter
from torchvision.transforms.functional import to_tensor
from tqdm import tqdm

from beam_search import caption_features
from config import Config, UserError
from dataset import train_val_splits
from feature_extract import IMAGE_SIZE, UNREADABLE, load_image
from metrics import score_captions
from model import build_model, load_checkpoint, save_checkpoint
from self_critical import CorpusCider, reference_corpus, self_critical_loss
from visualize import Dashboard


class StopOnSignal:
    """Turn the first Ctrl-C or SIGTERM into a request to stop at the next batch."""

    def __enter__(self):
        self.requested = None
        self.previous = {sig: signal.signal(sig, self._request) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _request(self, signum, _frame):
        self.requested = signal.Signals(signum).name
        for sig, handler in self.previous.items():  # a second signal acts at once
            signal.signal(sig, handler)

    def __exit__(self, *_):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, opt: Config):
        self.opt = opt
        if opt.scst_epoch and opt.scst_samples < 2:
            raise UserError("--scst-samples must be at least 2: a sample's baseline is the others' mean reward")
        torch.manual_seed(opt.seed)
        self.device = torch.device("cuda" if opt.use_gpu and torch.cuda.is_available() else "cpu")
        self.train_split, self.val_split = train_val_splits(opt)
        self.vocab = self.train_split.data["ix2word"]
        self.model = build_model(opt, len(self.vocab), self.train_split.meta["feature_dim"]).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
        self.state = {"epoch": 0, "batch": 0, "step": 0, "best_score": None, "epochs_without_improvement": 0}
        self.last_path = os.path.join(opt.checkpoint_dir, "last.pth")
        self.best_path = os.path.join(opt.checkpoint_dir, "best.pth")
        if opt.resume:
            self._resume()
        os.makedirs(opt.log_dir, exist_ok=True)
        self.log_path = os.path.join(opt.log_dir, f"{opt.env}.metrics.jsonl")
        self.dashboard = Dashboard(opt.env, opt.vis_server, opt.vis_port,
                                   os.path.join(opt.log_dir, f"{opt.env}.visdom.log"), timeout=opt.vis_timeout)
        self.loss_meter = AverageValueMeter()
        self.cider = None  # CIDEr-D over the training captions, built when self-critical training starts

    def _resume(self):
        checkpoint = load_checkpoint(self.last_path)
        if checkpoint["ix2word"] != self.vocab:
            raise UserError(f"{self.last_path}: built for another vocabulary than {self.opt.caption_data_path}")
        if checkpoint["feature"]["feature_dim"] != self.train_split.meta["feature_dim"]:
            raise UserError(f"{self.last_path}: built for {checkpoint['feature']['feature_dim']}-d features, "
                            f"these are {self.train_split.meta['feature_dim']}-d")
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise UserError(f"{self.last_path}: built for another model configuration ({str(error)[:200]})") from None
        self.state = checkpoint["state"]
        print(f"resuming from {self.last_path} at epoch {self.state['epoch']}, batch {self.state['batch']}")

    def save(self, path):
        save_checkpoint(path, self.model, self.opt, self.train_split.data, self.train_split.meta,
                        optimizer=self.optimizer.state_dict(), state=self.state)

    def log(self, name, value):
        """One JSON line per value in the run's log (it survives without Visdom)."""
        record = {"epoch": self.state["epoch"], "step": self.state["step"], "name": name, "value": value,
                  "time": time.time()}
        with open(self.log_path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")

    # --- the loop ---------------------------------------------------------------------------------
    def train(self):
        opt = self.opt
        config = html.escape(json.dumps(dataclasses.asdict(opt), indent=1, ensure_ascii=False))
        self.dashboard.text(f"<pre>{config}</pre>", "config", "configuration")
        with StopOnSignal() as stop:
            while self.state["epoch"] < opt.epoch + opt.scst_epoch:
                if self.state["epoch"] == opt.epoch and self.state["batch"] == 0:
                    self._start_self_critical()
                if not self._train_epoch(stop):
                    self.save(self.last_path)
                    print(f"\n{stop.requested}: saved {self.last_path}; continue with --resume")
                    break
                if self._end_epoch():
                    if self.state["epoch"] >= opt.epoch or not opt.scst_epoch:
                        break
                    self.state["epoch"] = opt.epoch  # cross-entropy training stopped early: go on
        self.dashboard.flush()

    def _start_self_critical(self):
        """Self-critical training starts from the best cross-entropy model, with its own lr."""
        if os.path.isfile(self.best_path):
            self.model.load_state_dict(load_checkpoint(self.best_path)["model"])
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.opt.scst_lr,
                                          weight_decay=self.opt.weight_decay)
        self.state["epochs_without_improvement"] = 0
        print(f"self-critical training for {self.opt.scst_epoch} epochs from {self.best_path}; "
              f"reward: CIDEr-D + {self.opt.scst_bleu_weight} x mean BLEU-1..4")

    def _train_epoch(self, stop):
        """One pass over the training data; False when a stop was requested.

        Cross-entropy epochs go over every caption, self-critical ones over every image."""
        opt, split, state = self.opt, self.train_split, self.state
        self_critical = state["epoch"] >= opt.epoch
        self.model.train()
        self.loss_meter.reset()  # the dashboard shows this epoch's running mean
        seed = opt.seed + state["epoch"]
        if self_critical:
            batches = split.image_batches(opt.batch_size, seed=seed, skip=state["batch"])
            step, measure = self._self_critical_step, "reward"
        else:
            batches = split.batches(opt.batch_size, seed=seed, skip=state["batch"])
            step, measure = self._step, "loss"
        progress = tqdm(batches, total=split.num_batches(opt.batch_size, images=self_critical),
                        initial=state["batch"], unit="batch",
                        desc=f"epoch {state['epoch'] + 1}/{opt.epoch + opt.scst_epoch}")
        for batch in progress:
            if os.path.exists(opt.debug_file):
                import ipdb
                ipdb.set_trace()
            self.loss_meter.add(step(*batch))
            state["batch"] += 1
            state["step"] += 1
            if state["step"] % opt.plot_every == 0:
                progress.set_postfix({measure: f"{self.loss_meter.value()[0]:.3f}"})
                self._plot(batch[0][0], measure)
            if stop.requested:
                return False
        return True

    def _step(self, rows, features, captions, lengths):
        """One cross-entropy step -> the loss."""
        logits, targets = self.model(features.to(self.device), captions.to(self.device), lengths)  # (N, V), (N,)
        return self._update(torch.nn.functional.cross_entropy(logits, targets))

    def _self_critical_step(self, rows, features):
        """One self-critical step -> the mean reward of the sampled captions."""
        split = self.train_split
        if self.cider is None:
            unknown = split.data["word2ix"][split.data["unknown"]]
            captions = {int(row): split.data["caption"][row] for row in split.rows}
            self.cider = CorpusCider(reference_corpus(captions, split.end, unknown))
        loss, reward = self_critical_loss(self.model, features.to(self.device), rows.tolist(), self.cider,
                                          split.end, self.opt.scst_samples, self.opt.max_gen_len,
                                          self.opt.scst_bleu_weight)
        self._update(loss)
        return reward

    def _update(self, loss):
        """Backpropagate loss and take an optimizer step -> its value; a NaN loss stops training."""
        if not torch.isfinite(loss):
            raise UserError(f"the loss became {loss.item()} at epoch {self.state['epoch'] + 1}, step "
                            f"{self.state['step']}; stopped. The last good checkpoint is kept; try a lower --lr")
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.opt.grad_clip)
        self.optimizer.step()
        return loss.item()

    def _plot(self, row, measure):
        """Loss (or reward) curve, one training image with its human caption and what the model now says."""
        split, step = self.train_split, self.state["step"]
        value = self.loss_meter.value()[0]
        self.dashboard.line("train", step, value, measure)
        self.log(f"train_{measure}", value)
        image_id, human = split.data["ix2id"][row], split.data["sentences"][row][0]
        self.model.eval()
        features = torch.from_numpy(split.features[row:row + 1].astype("float32")).to(self.device)  # (1, F)
        beams = caption_features(self.model, features, self.vocab, split.end, self.opt, n_best=self.opt.beam_size)[0]
        self.model.train()
        generated = "".join(f"<li>{html.escape(text)} <small>({score:.2f})</small></li>" for text, score in beams)
        self.dashboard.text(f"<b>{html.escape(image_id)}</b><br>人工描述: {html.escape(human)}<br>"
                            f"模型描述 (step {step}):<ol>{generated}</ol>", "captions", "captions")
        try:
            image = load_image(os.path.join(split.meta["img_path"], image_id))
            self.dashboard.image(_to_display(image), human)
        except UNREADABLE:
            pass  # the image moved since extraction: the captions still show

    def _end_epoch(self):
        """Validate, select the best model, decay the lr, save; True when training should stop."""
        opt, state = self.opt, self.state
        state["epoch"] += 1
        state["batch"] = 0
        scores = self.validate()
        for name, value in scores.items():
            self.log(name, value)
            if name == "val_loss":
                self.dashboard.line("val", state["step"], value, "loss")
            else:
                window = "perplexity" if name == "perplexity" else "validation metrics"
                self.dashboard.line(name, state["epoch"], value, window, xlabel="epoch")
        score = scores[opt.metric] if opt.metric in scores else -scores["val_loss"]
        improved = state["best_score"] is None or score > state["best_score"]
        if improved:
            state["best_score"], state["epochs_without_improvement"] = score, 0
            self.save(self.best_path)
        else:
            state["epochs_without_improvement"] += 1
            if state["epochs_without_improvement"] % opt.lr_patience == 0:
                self._decay_lr()
        self.save(self.last_path)
        summary = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
        print(f"epoch {state['epoch']}: {summary}" + (" (best)" if improved else ""))
        self.dashboard.text(f"epoch {state['epoch']}: {html.escape(summary)}", "log", "log",
                            append=state["epoch"] > 1)
        stop = opt.early_stop_patience and state["epochs_without_improvement"] >= opt.early_stop_patience
        if stop:
            print(f"early stop: no improvement of {opt.metric} for {opt.early_stop_patience} epochs")
            self.log("early_stop", state["epoch"])
        return stop

    def _decay_lr(self):
        for group in self.optimizer.param_groups:
            group["lr"] *= self.opt.lr_decay
        lr = self.optimizer.param_groups[0]["lr"]
        print(f"no improvement for {self.state['epochs_without_improvement']} epochs: lr -> {lr:.2e}")
        self.log("lr", lr)

    @torch.no_grad()
    def validate(self):
        """Validation loss, perplexity, top-5 word accuracy, and caption metrics on eval_size images."""
        self.model.eval()
        total, correct, count = 0.0, 0, 0
        for _, features, captions, lengths in self.val_split.batches(self.opt.batch_size):
            logits, targets = self.model(features.to(self.device), captions.to(self.device), lengths)
            total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            correct += (logits.topk(5, dim=1).indices == targets.unsqueeze(1)).any(1).sum().item()
            count += len(targets)
        scores = {"val_loss": total / count, "perplexity": math.exp(total / count), "top5_accuracy": correct / count}
        rows = self.val_split.rows[:self.opt.eval_size]
        if len(rows):
            features = torch.from_numpy(self.val_split.features[rows].astype("float32")).to(self.device)  # (n, F)
            beams = caption_features(self.model, features, self.vocab, self.val_split.end, self.opt, n_best=1)
            results = {self.val_split.data["ix2id"][row]: b[0][0] for row, b in zip(rows, beams)}
            scores.update(score_captions(results, self.val_split.references(rows)))
        self.model.train()
        return scores


def _to_display(image):
    """PIL image -> (3, 224, 224) float tensor in 0..1 for the dashboard."""
    return to_tensor(image.resize((IMAGE_SIZE, IMAGE_SIZE)))
