"""The training loop of `main.py train`."""
import functools
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch
from torchnet.meter import AverageValueMeter
from tqdm import tqdm

import config
import distributed
from beam_search import caption_features, check_search
from config import Config, UserError
from dataset import train_val_splits
from encoder import Encoder, TrainingImages, image_caption_batches
from files import check_output_folder
from images import build_backbone, encode_images, pick_device
from metrics import HIGHER_IS_BETTER, METRICS, java_available, score_captions
from model import build_model, load_checkpoint, save_checkpoint
from self_critical import CorpusCider, reference_corpus, self_critical_loss
from visualize import Dashboard

CROSS_ENTROPY, FINE_TUNING, SELF_CRITICAL = "cross-entropy", "fine-tuning", "self-critical"
PHASES = (CROSS_ENTROPY, FINE_TUNING, SELF_CRITICAL)
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


def _random_state():
    """Every random number generator training draws from (dropout, sampling, augmentation), to resume
    the same run: torch's, CUDA's and numpy's global ones (numpy's as tensors, which torch.load's
    weights_only accepts)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                      "has_gauss": has_gauss, "gauss": gauss}}


def _restore_random(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state["numpy"]
    np.random.set_state(("MT19937", saved["keys"].numpy().astype(np.uint32), saved["position"], saved["has_gauss"],
                         saved["gauss"]))


class _Objective(torch.nn.Module):
    """A loss function of the model (and the learning encoder) as this module's forward: the call
    that DistributedDataParallel wraps to average the gradients of every process in backward."""

    def __init__(self, model, encoder=None):
        super().__init__()
        self.model, self.encoder = model, encoder

    def forward(self, loss_function, inputs, *args):
        """inputs: features; with an encoder (images (b, 3, S, S), the image of each caption (n,) or None)."""
        if self.encoder is not None:
            images, image_of = inputs
            inputs = self.encoder(images)  # (b, F) or (b, R, F)
            if image_of is not None:
                inputs = inputs[image_of]  # (n, ...): all captions of an image share its one encoding
        return loss_function(self.model, inputs, *args)


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
    """Refuse, in one line, training options that cannot work together (config checks each alone),
    output folders that cannot be written, and a new run over a finished one."""
    if opt.metric in METRICS and opt.eval_size <= 0:
        raise UserError(f"--metric={opt.metric} scores generated captions: it needs --eval-size > 0")
    if opt.metric == "METEOR" and not java_available():
        raise UserError("--metric=METEOR needs Java (apt-get install default-jre-headless)")
    check_output_folder(opt.checkpoint_dir, "--checkpoint-dir")
    check_output_folder(opt.log_dir, "--log-dir")
    existing = [name for name in ("last.pth", "best.pth") if os.path.exists(os.path.join(opt.checkpoint_dir, name))]
    if existing and not opt.resume and not opt.overwrite:
        raise UserError(f"{opt.checkpoint_dir}/ holds a run ({', '.join(existing)}): continue it with --resume, "
                        "start another with --checkpoint-dir=NEW, or replace it with --overwrite")


class Trainer:
    """Trains a caption model in up to three phases, each from the best model so far: `--epoch`
    cross-entropy epochs over every caption (stored features); with `--finetune-encoder`,
    `--finetune-epoch` cross-entropy epochs from the images with the backbone's last stages
    learning too; then `--scst-epoch` self-critical epochs over every image (from the images when
    the encoder learns).

    After each epoch it validates, keeps best.pth by `--metric`, decays the lr and stops a
    phase early when the metric stalls. `state` says where training is (phase, epochs, batch):
    last.pth holds it, so Ctrl-C, SIGTERM or a crash lose at most one batch.

    Under torchrun every process trains on its share of each batch (`--batch-size` is the batch
    of the whole run) and DistributedDataParallel averages the gradients; validation is shared out
    and gathered; process 0 alone writes checkpoints, logs and the dashboard.
    """

    def __init__(self, opt: Config):
        check_options(config.check(opt))
        self.opt = opt
        torch.manual_seed(opt.seed)
        self.device = pick_device(opt.use_gpu)
        distributed.start(self.device)
        self.process, self.processes = distributed.rank_and_size()
        self.train_split, self.val_split = train_val_splits(opt)
        self.vocab = self.train_split.ix2word
        check_search(1, opt.beam_size, len(self.vocab) - 1 - len(self.train_split.banned), opt.min_len,
                     opt.max_gen_len)
        self.model = build_model(opt, len(self.vocab), self.train_split.feature_dim).to(self.device)
        self.encoder = None  # the learning encoder of fine-tuning, from its phase on
        self.training_images = None  # and the images it reads
        self.state = {"phase": CROSS_ENTROPY, "epoch": 0, "phase_epoch": 0, "batch": 0, "step": 0,
                      "best_score": None, "epochs_without_improvement": 0, "processes": self.processes}
        self.last_path = os.path.join(opt.checkpoint_dir, "last.pth")
        self.best_path = os.path.join(opt.checkpoint_dir, "best.pth")
        # CUDA: bfloat16 autocast (float16 with a gradient scaler where bfloat16 is missing)
        cuda = self.device.type == "cuda"
        self.half = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler(enabled=cuda and self.half == torch.float16)
        self._new_optimizer()
        if opt.resume:
            self._resume()
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

    def _new_optimizer(self):
        """Adam for the current phase: the model at its lr, the encoder's learning stages at
        --encoder-lr; the fused kernel (one pass over all weights) is 3x faster on CPU."""
        opt = self.opt
        groups = [{"params": list(self.model.parameters()),
                   "lr": opt.scst_lr if self.state["phase"] == SELF_CRITICAL else opt.lr}]
        if self.encoder is not None:
            groups.append({"params": [p for p in self.encoder.parameters() if p.requires_grad], "lr": opt.encoder_lr})
        self.optimizer = torch.optim.Adam(groups, weight_decay=opt.weight_decay, fused=True)
        self.objective = distributed.parallel(_Objective(self.model, self.encoder), self.device,
                                              find_unused=self.state["phase"] == SELF_CRITICAL)

    def _set_encoder(self, state=None):
        """From fine-tuning on, the learning encoder: the features' backbone with its pretrained
        weights, or a saved state of it; None before."""
        opt, meta = self.opt, self.train_split.meta
        if not opt.finetune_encoder or self.state["phase"] == CROSS_ENTROPY:
            return
        trunk = build_backbone(meta["backbone"], "none" if state else meta["weights"])
        if state:
            trunk.load_state_dict(state)
        grid = meta["grid"] if opt.model == "attention" else 0
        self.encoder = Encoder(meta["backbone"], trunk, opt.finetune_encoder, grid).to(
            self.device, memory_format=torch.channels_last)
        if self.training_images is None:
            self.training_images = TrainingImages(self.train_split, meta["backbone"], opt.augment)

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
        if not isinstance(checkpoint.get("state"), dict) or not set(self.state) <= set(checkpoint["state"]):
            raise UserError(f"{self.last_path}: holds no training state to resume from")
        self.state.update(checkpoint["state"])
        try:
            self.model.load_state_dict(checkpoint["model"])
            self._set_encoder(checkpoint.get("encoder"))
            self._new_optimizer()
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scaler.load_state_dict(checkpoint.get("scaler") or self.scaler.state_dict())
            random_state = checkpoint.get("random")
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise UserError(f"{self.last_path}: built for another model configuration ({str(error)[:200]})") from None
        if random_state:  # written by an older version without it: the run goes on from a fresh state
            _restore_random(random_state)
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
        encoder = {"encoder": self.encoder.trunk.state_dict()} if self.encoder is not None else {}
        save_checkpoint(path, self.model, self.opt, self.train_split.ix2word, self.train_split.meta,
                        optimizer=self.optimizer.state_dict(), state=self.state, scaler=self.scaler.state_dict(),
                        random=_random_state(), **encoder)

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
        """The phases from the current one on; each ends by its epoch count or early stop."""
        self.dashboard.configuration(self.opt, self.train_split.meta)
        with StopOnSignal() as stop:
            completed = self._run_phase(stop)
            for phase in PHASES[PHASES.index(self.state["phase"]) + 1:]:
                if completed and self._epochs(phase):
                    self._start_phase(phase)
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
        epochs = self._epochs(state["phase"])
        while state["phase_epoch"] < epochs:
            if not self._train_epoch(stop, epochs):
                return False
            if self._end_epoch():
                break
            if distributed.any_process(stop.requested):  # asked during validation: last.pth is saved
                return False
        return True

    def _epochs(self, phase):
        opt = self.opt
        return {CROSS_ENTROPY: opt.epoch, FINE_TUNING: opt.finetune_epoch if opt.finetune_encoder else 0,
                SELF_CRITICAL: opt.scst_epoch}[phase]

    def _start_phase(self, phase):
        """A phase starts from the best model so far (and its encoder), with a new optimizer."""
        best = distributed.from_process_0(self._best_weights)
        if best:
            self.model.load_state_dict(best["model"])
        self.state.update(phase=phase, phase_epoch=0, batch=0, epochs_without_improvement=0)
        self._set_encoder(best.get("encoder"))
        self._new_optimizer()
        self.save(self.last_path)
        learning = f", the last {self.opt.finetune_encoder} encoder stages learning" if self.encoder else ""
        reward = (f"; reward: CIDEr-D + {self.opt.scst_bleu_weight} x mean BLEU-1..4"
                  if phase == SELF_CRITICAL else "")
        self.say(f"{phase} phase: {self._epochs(phase)} epochs from {self.best_path}{learning}{reward}")

    def _best_weights(self):
        """best.pth's model and encoder weights, without its optimizer state; {} before there is one."""
        if not os.path.isfile(self.best_path):
            return {}
        return {key: value for key, value in load_checkpoint(self.best_path).items() if key in ("model", "encoder")}

    def _train_epoch(self, stop, epochs):
        """One pass over the training data; False when a stop was requested.

        Cross-entropy epochs go over every caption, self-critical ones over every image."""
        opt, state = self.opt, self.state
        self_critical = state["phase"] == SELF_CRITICAL
        self.model.train()
        self.loss_meter.reset()  # the dashboard shows this epoch's running mean
        if self_critical:
            step, measure = self._self_critical_step, "reward"
        else:
            step, measure = functools.partial(self._step, sampling=self._sampling_probability()), "loss"
        batches, total = self._batches(self_critical)
        progress = tqdm(batches, total=total, initial=state["batch"], unit="batch", disable=self.process != 0,
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

    def _batches(self, self_critical):
        """This epoch's batches from the current one on, on the device, and how many it has in all:
        cross-entropy (rows, inputs, captions, lengths), self-critical (rows, inputs). inputs are
        features, or images for the learning encoder (see _Objective)."""
        opt, split, device = self.opt, self.train_split, self.device
        seed = opt.seed + self.state["epoch"]
        share = {"skip": self.state["batch"], "process": self.process, "processes": self.processes}
        if self.encoder is None:
            if self_critical:
                batches = split.image_batches(opt.batch_size, seed, **share)
            else:
                batches = split.batches(opt.batch_size, seed, **share)
            batches = ((rows, features.to(device, non_blocking=True), *rest) for rows, features, *rest in batches)
            return batches, split.num_batches(opt.batch_size, self_critical, self.processes)
        # from images, whole images at a time: as many as give about --batch-size captions
        images_per_batch = opt.batch_size if self_critical else max(1, round(opt.batch_size * len(split.rows)
                                                                             / len(split.pairs)))
        row_batches = split.row_batches(images_per_batch, seed, **share)
        batches = image_caption_batches(self.training_images, row_batches, not self_critical, opt.num_workers, device)
        return batches, self.state["batch"] + len(row_batches)

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
        --scheduled-sampling in the last, and that in fine-tuning."""
        phase_epoch, epochs = self.state["phase_epoch"], self.opt.epoch
        rise = 1.0 if self.state["phase"] == FINE_TUNING or epochs == 1 else phase_epoch / (epochs - 1)
        probability = self.opt.scheduled_sampling * rise
        if probability:
            self.log("scheduled_sampling", probability)
        return probability

    def _step(self, rows, inputs, captions, lengths, sampling):
        """One cross-entropy step -> the loss."""
        with self._autocast():
            loss = self.objective(cross_entropy_loss, inputs, captions.to(self.device), lengths, sampling)
        return self._update(loss)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.half, enabled=self.device.type == "cuda")

    def _self_critical_step(self, rows, inputs):
        """One self-critical step -> the mean reward of the sampled captions."""
        split = self.train_split
        if self.cider is None:
            self.cider = CorpusCider(reference_corpus(split.word_captions(), split.end, split.unknown))
        with self._autocast():
            loss, reward = self.objective(self_critical_loss, inputs, rows.tolist(), self.cider, split.end,
                                          split.banned, self.opt.scst_samples, self.opt.max_gen_len,
                                          self.opt.scst_bleu_weight)
        self._update(loss)
        return reward

    def _update(self, loss):
        """Backpropagate loss and take an optimizer step -> its value; a NaN loss stops training."""
        if not torch.isfinite(loss):
            raise UserError(f"the loss became {loss.item()} at epoch {self.state['epoch'] + 1}, step "
                            f"{self.state['step']}; stopped. The last good checkpoint is kept; try a lower --lr")
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_([p for group in self.optimizer.param_groups for p in group["params"]],
                                       self.opt.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item()

    def _plot(self, row, measure):
        """Loss (or reward) curve, one training image with its human caption and what the model now says."""
        split, value = self.train_split, self.loss_meter.value()[0]
        self.dashboard.line("train", self.state["step"], value, measure)
        self.log(f"train_{measure}", value)
        self.model.eval()
        features = self._features(split, [row])  # (1, F)
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
        val = self.val_split
        if self.encoder is not None:  # features from the encoder as it is now
            encoded = self._features(val, val.rows).cpu().numpy()  # (n, F) or (n, R, F)
            features = np.zeros((max(val.rows) + 1, *encoded.shape[1:]), np.float16)
            features[val.rows] = encoded
            val = val.with_features(features)
        total, correct, count = 0.0, 0, 0
        for _, features, captions, lengths in val.batches(self.opt.batch_size, process=self.process,
                                                          processes=self.processes):
            logits, targets, _ = self.model(features.to(self.device), captions.to(self.device), lengths)
            total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            correct += (logits.topk(5, dim=1).indices == targets.unsqueeze(1)).any(1).sum().item()
            count += len(targets)
        total, correct, count = distributed.sums([total, correct, count])
        scores = {"val_loss": total / count, "perplexity": math.exp(total / count), "top5_accuracy": correct / count}
        rows = val.rows[:self.opt.eval_size]
        if len(rows):
            results = distributed.merged(self._caption(val, rows[self.process::self.processes]))
            scores.update(distributed.from_process_0(lambda: score_captions(results, val.references(rows))))
        self.model.train()
        return scores

    def _caption(self, split, rows):
        """{image_id: best caption} of a split's rows."""
        if not len(rows):
            return {}
        beams = caption_features(self.model, split.features_of(rows).to(self.device), self.vocab, self.opt, n_best=1)
        return {split.image_id(row): b[0][0] for row, b in zip(rows, beams)}

    def _features(self, split, rows):
        """Features of a split's rows on the device: the stored ones, or the learning encoder's of the
        images -> (b, F) or (b, R, F)."""
        if self.encoder is None:
            return split.features_of(rows).to(self.device)
        paths = [split.image_path(row) for row in rows]
        encoded = encode_images(self.encoder.trunk, self.train_split.meta["backbone"], paths, self.device,
                                self.opt.batch_size, self.opt.num_workers, self.encoder.grid)
        return torch.cat([pooled if regions is None else regions for pooled, regions, _ in encoded]).to(self.device)
