"""The training loop of `main.py train`."""
import functools
import json
import math
import os
import signal
import sys
import time

import torch
from torchnet.meter import AverageValueMeter
from tqdm import tqdm

import distributed
from beam_search import caption_features
from config import Config, UserError
from dataset import train_val_splits
from images import pick_device
from metrics import HIGHER_IS_BETTER, METRICS, java_available, score_captions
from model import MODELS, build_model, load_checkpoint, save_checkpoint
from self_critical import CorpusCider, reference_corpus, self_critical_loss
from visualize import Dashboard

CROSS_ENTROPY, SELF_CRITICAL = "cross-entropy", "self-critical"
# Settings that fix which images validate and the order of the batches: a resumed run must keep them.
DATA_ORDER = ("seed", "batch_size", "caption_data_path", "val_caption_data_path", "val_fraction")


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


class _Objective(torch.nn.Module):
    """A loss function of the model as this module's forward: the call that DistributedDataParallel
    wraps to average the gradients of every process in backward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, loss_function, *args):
        return loss_function(self.model, *args)


class _NoDashboard:
    """The dashboard of a process other than 0: draws nothing."""

    def __getattr__(self, _name):
        return lambda *args, **kwargs: None


def cross_entropy_loss(model, features, captions, lengths, sampling=0.0):
    """Cross-entropy of the captions, teacher-forced (scheduled sampling with probability `sampling`),
    with the model's own penalty, if any."""
    logits, targets, penalty = model(features, captions, lengths, sampling)  # (N, V), (N,)
    return torch.nn.functional.cross_entropy(logits, targets) + penalty


def check_options(opt: Config):
    """Refuse, in one line, training options that cannot work together."""
    if opt.model not in MODELS:
        raise UserError(f"--model={opt.model}: choose one of {', '.join(MODELS)}")
    if opt.metric not in HIGHER_IS_BETTER:
        raise UserError(f"--metric={opt.metric}: unknown; choose one of {', '.join(HIGHER_IS_BETTER)}")
    if opt.metric in METRICS and opt.eval_size <= 0:
        raise UserError(f"--metric={opt.metric} scores generated captions: it needs --eval-size > 0")
    if opt.metric == "METEOR" and not java_available():
        raise UserError("--metric=METEOR needs Java (apt-get install default-jre-headless)")
    for name in ("lr_patience", "early_stop_patience", "epoch", "scst_epoch"):
        if getattr(opt, name) < 0:
            raise UserError(f"--{name} cannot be negative")
    if not 0.0 <= opt.scheduled_sampling <= 1.0:
        raise UserError(f"--scheduled-sampling={opt.scheduled_sampling}: a probability, between 0 and 1")
    if opt.scst_epoch and opt.scst_samples < 2:
        raise UserError("--scst-samples must be at least 2: a sample's baseline is the others' mean reward")


class Trainer:
    """Trains a caption model in two phases: `--epoch` cross-entropy epochs over every caption,
    then `--scst-epoch` self-critical epochs over every image, from the best model so far.

    After each epoch it validates, keeps best.pth by `--metric`, decays the lr and stops a
    phase early when the metric stalls. `state` says where training is (phase, epochs, batch):
    last.pth holds it, so Ctrl-C, SIGTERM or a crash lose at most one batch.

    Under torchrun every process trains on its share of each batch (`--batch-size` is the batch
    of the whole run) and DistributedDataParallel averages the gradients; validation is shared out
    and gathered; process 0 alone writes checkpoints, logs and the dashboard.
    """

    def __init__(self, opt: Config):
        check_options(opt)
        self.opt = opt
        torch.manual_seed(opt.seed)
        self.device = pick_device(opt.use_gpu)
        distributed.start(self.device)
        self.process, self.processes = distributed.rank_and_size()
        self.train_split, self.val_split = train_val_splits(opt)
        self.vocab = self.train_split.ix2word
        self.model = build_model(opt, len(self.vocab), self.train_split.feature_dim).to(self.device)
        self.optimizer = self._adam(opt.lr)
        self.state = {"phase": CROSS_ENTROPY, "epoch": 0, "phase_epoch": 0, "batch": 0, "step": 0,
                      "best_score": None, "epochs_without_improvement": 0, "processes": self.processes}
        self.last_path = os.path.join(opt.checkpoint_dir, "last.pth")
        self.best_path = os.path.join(opt.checkpoint_dir, "best.pth")
        if opt.resume:
            self._resume()
        self.objective = distributed.parallel(_Objective(self.model), self.device)
        self.log_path = os.path.join(opt.log_dir, f"{opt.env}.metrics.jsonl")
        if self.process == 0:
            os.makedirs(opt.log_dir, exist_ok=True)
            self.dashboard = Dashboard(opt.env, opt.vis_server, opt.vis_port,
                                       os.path.join(opt.log_dir, f"{opt.env}.visdom.log"), timeout=opt.vis_timeout)
        else:
            self.dashboard = _NoDashboard()
        self.loss_meter = AverageValueMeter()
        self.cider = None  # CIDEr-D over the training captions, built when self-critical training starts
        self.debug_warned = False

    def _adam(self, lr):
        """Adam over the model; the fused kernel (one pass over all weights) is 3x faster on CPU."""
        return torch.optim.Adam(self.model.parameters(), lr=lr, weight_decay=self.opt.weight_decay, fused=True)

    def _resume(self):
        checkpoint = distributed.from_process_0(lambda: load_checkpoint(self.last_path))
        if checkpoint["ix2word"] != self.vocab:
            raise UserError(f"{self.last_path}: built for another vocabulary than {self.opt.caption_data_path}")
        if checkpoint["feature"]["feature_dim"] != self.train_split.feature_dim:
            raise UserError(f"{self.last_path}: built for {checkpoint['feature']['feature_dim']}-d features, "
                            f"these are {self.train_split.feature_dim}-d")
        for name in DATA_ORDER:
            saved, now = checkpoint["config"].get(name), getattr(self.opt, name)
            if saved != now:
                raise UserError(f"--{name}={now} but {self.last_path} was trained with --{name}={saved}; it fixes "
                                "the validation images and the batch order: resume with the same value")
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise UserError(f"{self.last_path}: built for another model configuration ({str(error)[:200]})") from None
        self.state.update(checkpoint["state"])
        saved_processes = self.state["processes"]
        if saved_processes != self.processes and self.state["batch"]:
            self.say(f"{self.last_path} was written by {saved_processes} processes, this run has {self.processes}: "
                     f"the shares of the batches differ, so epoch {self.state['epoch'] + 1} starts again")
            self.state["batch"] = 0
        self.state["processes"] = self.processes
        self.say(f"resuming from {self.last_path} at epoch {self.state['epoch']}, batch {self.state['batch']} "
              f"({self.state['phase']})")

    def say(self, message):
        """Print, once for the whole run (from process 0)."""
        if self.process == 0:
            print(message)

    def save(self, path):
        """Write a checkpoint with the training state (process 0; the others hold the same)."""
        if self.process:
            return
        save_checkpoint(path, self.model, self.opt, self.train_split.ix2word, self.train_split.meta,
                        optimizer=self.optimizer.state_dict(), state=self.state)

    def log(self, name, value):
        """One JSON line per value in the run's log (it survives without Visdom); from process 0."""
        if self.process:
            return
        record = {"epoch": self.state["epoch"], "step": self.state["step"], "name": name, "value": value,
                  "time": time.time()}
        with open(self.log_path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")

    # --- the loop ---------------------------------------------------------------------------------
    def train(self):
        """Cross-entropy, then self-critical training; each phase ends by its epoch count or early stop."""
        self.dashboard.configuration(self.opt)
        with StopOnSignal() as stop:
            completed = self._run_phase(stop)
            if completed and self.state["phase"] == CROSS_ENTROPY and self.opt.scst_epoch:
                self._start_self_critical()
                completed = self._run_phase(stop)
            if not completed:
                self.save(self.last_path)
                self.say(f"\n{stop.requested or 'stopped by another process'}: saved {self.last_path}; "
                         "continue with --resume")
        self.dashboard.flush()
        distributed.finish()

    def _run_phase(self, stop):
        """The remaining epochs of the current phase; False when a stop was requested."""
        state = self.state
        epochs = self.opt.epoch if state["phase"] == CROSS_ENTROPY else self.opt.scst_epoch
        while state["phase_epoch"] < epochs:
            if not self._train_epoch(stop, epochs):
                return False
            if self._end_epoch():
                break
        return True

    def _start_self_critical(self):
        """Self-critical training starts from the best cross-entropy model, with its own lr."""
        best = distributed.from_process_0(
            lambda: load_checkpoint(self.best_path)["model"] if os.path.isfile(self.best_path) else None)
        if best is not None:
            self.model.load_state_dict(best)
        self.optimizer = self._adam(self.opt.scst_lr)
        self.state.update(phase=SELF_CRITICAL, phase_epoch=0, batch=0, epochs_without_improvement=0)
        self.save(self.last_path)
        self.say(f"self-critical training for {self.opt.scst_epoch} epochs from {self.best_path}; "
              f"reward: CIDEr-D + {self.opt.scst_bleu_weight} x mean BLEU-1..4")

    def _train_epoch(self, stop, epochs):
        """One pass over the training data; False when a stop was requested.

        Cross-entropy epochs go over every caption, self-critical ones over every image."""
        opt, split, state = self.opt, self.train_split, self.state
        self_critical = state["phase"] == SELF_CRITICAL
        self.model.train()
        self.loss_meter.reset()  # the dashboard shows this epoch's running mean
        seed = opt.seed + state["epoch"]
        share = {"skip": state["batch"], "process": self.process, "processes": self.processes}
        if self_critical:
            batches = split.image_batches(opt.batch_size, seed, **share)
            step, measure = self._self_critical_step, "reward"
        else:
            batches = split.batches(opt.batch_size, seed, **share)
            step, measure = functools.partial(self._step, sampling=self._sampling_probability()), "loss"
        progress = tqdm(batches, total=split.num_batches(opt.batch_size, self_critical, self.processes),
                        initial=state["batch"], unit="batch", disable=self.process != 0,
                        desc=f"{state['phase']} epoch {state['phase_epoch'] + 1}/{epochs}")
        for batch in progress:
            if self._debug_requested():
                import ipdb
                ipdb.set_trace()
            self.loss_meter.add(step(*batch))
            state["batch"] += 1
            state["step"] += 1
            if state["step"] % opt.plot_every == 0 and self.process == 0:
                progress.set_postfix({measure: f"{self.loss_meter.value()[0]:.3f}"})
                self._plot(batch[0][0], measure)
            if distributed.any_process(stop.requested):
                return False
        return True

    def _debug_requested(self):
        """The book's hook: --debug-file exists -> ipdb. Only for a terminal and a file of this user,
        so that nobody else, and no missing terminal, can stop a run."""
        path = self.opt.debug_file
        if not path or not os.path.exists(path):
            return False
        if sys.stdin.isatty() and os.stat(path).st_uid == os.getuid():
            return True
        if not self.debug_warned:
            print(f"warning: {path} exists, but ipdb only starts for a run on a terminal and a file of its own "
                  "user; training goes on", file=sys.stderr)
            self.debug_warned = True
        return False

    def _sampling_probability(self):
        """Scheduled sampling's probability this epoch: from 0 in the first cross-entropy epoch up to
        --scheduled-sampling in the last."""
        probability = self.opt.scheduled_sampling * self.state["phase_epoch"] / max(1, self.opt.epoch - 1)
        if probability:
            self.log("scheduled_sampling", probability)
        return probability

    def _step(self, rows, features, captions, lengths, sampling):
        """One cross-entropy step -> the loss."""
        return self._update(self.objective(cross_entropy_loss, features.to(self.device), captions.to(self.device),
                                           lengths, sampling))

    def _self_critical_step(self, rows, features):
        """One self-critical step -> the mean reward of the sampled captions."""
        split = self.train_split
        if self.cider is None:
            self.cider = CorpusCider(reference_corpus(split.word_captions(), split.end, split.unknown))
        loss, reward = self.objective(self_critical_loss, features.to(self.device), rows.tolist(), self.cider,
                                      split.end, split.banned, self.opt.scst_samples, self.opt.max_gen_len,
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
        split, value = self.train_split, self.loss_meter.value()[0]
        self.dashboard.line("train", self.state["step"], value, measure)
        self.log(f"train_{measure}", value)
        self.model.eval()
        features = split.features_of([row]).to(self.device)  # (1, F)
        beams = caption_features(self.model, features, self.vocab, self.opt, n_best=self.opt.beam_size)[0]
        self.model.train()
        self.dashboard.sample(split.image_id(row), split.image_path(row), split.human_caption(row), beams,
                              self.state["step"])

    def _end_epoch(self):
        """Validate, select the best model, decay the lr, save; True when the phase should stop early."""
        opt, state = self.opt, self.state
        state["epoch"] += 1
        state["phase_epoch"] += 1
        state["batch"] = 0
        scores = self.validate()
        for name, value in scores.items():
            self.log(name, value)
        self.dashboard.epoch(state["epoch"], state["step"], scores)
        improved = self._is_better(scores[opt.metric])
        if improved:
            state["best_score"], state["epochs_without_improvement"] = scores[opt.metric], 0
            self.save(self.best_path)
        else:
            state["epochs_without_improvement"] += 1
            if opt.lr_patience and state["epochs_without_improvement"] % opt.lr_patience == 0:
                self._decay_lr()
        self.save(self.last_path)
        summary = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
        self.say(f"epoch {state['epoch']}: {summary}" + (" (best)" if improved else ""))
        stop = opt.early_stop_patience and state["epochs_without_improvement"] >= opt.early_stop_patience
        if stop:
            self.say(f"early stop of {state['phase']} training: no improvement of {opt.metric} "
                  f"for {opt.early_stop_patience} epochs")
            self.log("early_stop", state["epoch"])
        return stop

    def _is_better(self, score):
        best = self.state["best_score"]
        if best is None:
            return True
        return score > best if HIGHER_IS_BETTER[self.opt.metric] else score < best

    def _decay_lr(self):
        for group in self.optimizer.param_groups:
            group["lr"] *= self.opt.lr_decay
        lr = self.optimizer.param_groups[0]["lr"]
        self.say(f"no improvement for {self.state['epochs_without_improvement']} epochs: lr -> {lr:.2e}")
        self.log("lr", lr)

    @torch.no_grad()
    def validate(self):
        """Validation loss, perplexity, top-5 word accuracy, and caption metrics on eval_size images
        (each process takes its share; all get the same scores)."""
        self.model.eval()
        total, correct, count = 0.0, 0, 0
        for _, features, captions, lengths in self.val_split.batches(self.opt.batch_size, process=self.process,
                                                                     processes=self.processes):
            logits, targets, _ = self.model(features.to(self.device), captions.to(self.device), lengths)
            total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            correct += (logits.topk(5, dim=1).indices == targets.unsqueeze(1)).any(1).sum().item()
            count += len(targets)
        total, correct, count = distributed.sums([total, correct, count])
        scores = {"val_loss": total / count, "perplexity": math.exp(total / count), "top5_accuracy": correct / count}
        rows = self.val_split.rows[:self.opt.eval_size]
        if len(rows):
            results = distributed.merged(self._caption(rows[self.process::self.processes]))
            scores.update(distributed.from_process_0(
                lambda: score_captions(results, self.val_split.references(rows))))
        self.model.train()
        return scores

    def _caption(self, rows):
        """{image_id: best caption} of val rows."""
        if not len(rows):
            return {}
        features = self.val_split.features_of(rows).to(self.device)  # (n, F)
        beams = caption_features(self.model, features, self.vocab, self.opt, n_best=1)
        return {self.val_split.image_id(row): b[0][0] for row, b in zip(rows, beams)}
