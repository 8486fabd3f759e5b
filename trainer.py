"""The training loop of `main.py train`: the phases as data, read once from the options, and a loop that
reads top to bottom. checkpoints.py owns last.pth and best.pth, reporting.py what the run says."""
import dataclasses
import functools
import math
import os
import signal
import sys

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchnet.meter import AverageValueMeter

import config
import distributed
import retrieval
from beam_search import caption_features, check_search, most_captions
from captions import NO_HABITS
from checkpoints import CROSS_ENTROPY, FINE_TUNING, PRETRAINING, SELF_CRITICAL, Checkpoints, Progress, restore_random
from config import Config, UserError
from dataset import train_val_splits, training_views
from encoder import STAGE_COUNTS, Encoder, TrainingImages, image_caption_batches
from feature_reads import prefetch
from files import check_output_folder
from images import build_backbone, pick_device, weights_file
from metrics import METRICS, java_available, score_captions
from model import ENCODES_REGIONS, READS_REGIONS, build_model, check_fits
from reporting import Reporter
from self_critical import Discriminability, Reward, self_critical_loss, training_cider


@dataclasses.dataclass(frozen=True)
class Phase:
    """A phase of training: its epochs and learning rate, what it learns from, what it plots."""

    name: str
    epochs: int
    lr: float
    from_images: bool  # the backbone learns too: batches of images, encoded as they come
    per_image: bool  # each image once with sampled captions (self-critical), else every human caption
    measure: str  # what a step returns and the dashboard plots: loss or reward
    warmup_steps: int = 0  # of the lr (see warmup_factor): for the phase that starts from random weights
    extra_text: bool = True  # cross-entropy learns from the extra training text too (see CaptionSplit)
    dropout: bool = True  # the model learns in train mode (dropout on), else in eval mode


def phases(opt: Config):
    """The phases in their order, each starting from the best model so far; one of 0 epochs is skipped.
    With --pretrain-epoch the extra training text (e.g. machine translations) is learnt first, with
    the captions, and the later phases learn from the captions alone (COCO-CN's pre-training)."""
    finetune, pretrain = opt.finetune_encoder > 0, opt.pretrain_epoch > 0
    return [Phase(PRETRAINING, opt.pretrain_epoch, opt.lr, False, False, "loss", warmup_steps=opt.warmup_steps),
            Phase(CROSS_ENTROPY, opt.epoch, opt.lr, from_images=False, per_image=False, measure="loss",
                  warmup_steps=0 if pretrain else opt.warmup_steps, extra_text=not pretrain),
            Phase(FINE_TUNING, opt.finetune_epoch if finetune else 0, opt.lr, True, False, "loss",
                  extra_text=not pretrain),
            Phase(SELF_CRITICAL, opt.scst_epoch, opt.scst_lr, finetune, True, "reward", dropout=opt.scst_dropout)]


@dataclasses.dataclass
class Batch:
    """One batch on the device: the images' rows (b,), the model's inputs (features (b, ...), or
    images (b, 3, S, S) for the learning encoder), and for cross-entropy the captions (n, T), lengths
    (n,) and, when the batch holds whole images with all their captions, the image of each (n,)
    (else one input per caption: n = b)."""

    rows: np.ndarray
    inputs: torch.Tensor
    captions: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    image_of: torch.Tensor | None = None


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
    """A loss function of the model (and the learning encoder) as this module's forward: the call
    that DistributedDataParallel wraps to average the gradients of every process in backward."""

    def __init__(self, model, encoder=None):
        super().__init__()
        self.model, self.encoder = model, encoder

    def forward(self, loss_function, inputs, *args):
        """inputs: features, or with an encoder images (b, 3, S, S)."""
        if self.encoder is not None:
            inputs = self.encoder(inputs)  # (b, F) or (b, R, F)
        return loss_function(self.model, inputs, *args)


def cross_entropy_loss(model, features, captions, lengths, sampling=0.0, smoothing=0.0, image_of=None):
    """Cross-entropy of the captions, teacher-forced (scheduled sampling with probability `sampling`),
    label-smoothed by `smoothing`, with the model's own penalty, if any (image_of: see Batch)."""
    logits, targets, penalty = model(features, captions, lengths, sampling, image_of)  # (N, V), (N,)
    return torch.nn.functional.cross_entropy(logits, targets, label_smoothing=smoothing) + penalty


def warmup_factor(step, warmup_steps):
    """The lr of a phase's step (from 0) over the phase's lr: a linear rise over the first warmup_steps,
    then the inverse square root decay of Vaswani et al. (2017); 1 throughout when warmup_steps is 0."""
    if not warmup_steps:
        return 1.0
    step += 1
    return min(step / warmup_steps, math.sqrt(warmup_steps / step))


def check_options(opt: Config):
    """Refuse, in one line, training options that cannot work together (config checks each alone),
    output folders that cannot be written, and a new run over a finished one."""
    if opt.metric in METRICS and opt.eval_size <= 0:
        raise UserError(f"--metric={opt.metric} scores generated captions: it needs --eval-size > 0")
    if opt.metric == "METEOR" and not java_available():
        raise UserError("--metric=METEOR needs Java (apt-get install default-jre-headless)")
    if opt.scst_retrieval_weight and not opt.retrieval_ckpt:
        raise UserError("--scst-retrieval-weight: name the retrieval model with --retrieval-ckpt "
                        "(main.py retrieval writes it)")
    check_output_folder(opt.checkpoint_dir, "--checkpoint-dir")
    check_output_folder(opt.log_dir, "--log-dir")
    existing = [name for name in ("last.pth", "best.pth") if os.path.exists(os.path.join(opt.checkpoint_dir, name))]
    if existing and not opt.resume and not opt.overwrite:
        raise UserError(f"{opt.checkpoint_dir}/ holds a run ({', '.join(existing)}): continue it with --resume, "
                        "start another with --checkpoint-dir=NEW, or replace it with --overwrite")


def discriminability(opt: Config, split):
    """--scst-retrieval-weight's term of the reward: the frozen retrieval model of --retrieval-ckpt and the
    training photos' pooled features, loaded (and checked) before training starts."""
    model = retrieval.load(opt.retrieval_ckpt)
    _, pooled = retrieval.pooled_features(model, opt.caption_data_path)
    return Discriminability(model, pooled, split.ix2word, split.end)


@torch.no_grad()
def score_split(model, split, opt, device, process=0, processes=1, habits=NO_HABITS):
    """Validation loss, perplexity, top-5 word accuracy, and caption metrics on --eval-size images of a
    split, captioned by beam search whatever --decoding (each process takes its share; all get the same
    scores); the captions keep the training captions' `habits` (see caption_features)."""
    model.eval()
    total, correct, count = 0.0, 0, 0
    for _, features, captions, lengths in split.batches(opt.batch_size, process=process, processes=processes):
        logits, targets, _ = model(features.to(device).float(), captions.to(device), lengths)
        total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.topk(5, dim=1).indices == targets.unsqueeze(1)).any(1).sum().item()
        count += len(targets)
    total, correct, count = distributed.sums([total, correct, count])
    scores = {"val_loss": total / count, "perplexity": math.exp(total / count), "top5_accuracy": correct / count}
    rows = split.rows[:opt.eval_size]
    if len(rows):
        mine = rows[process::processes]  # this process's share of the images
        results = distributed.merged(caption_rows(model, split, mine, opt, device, habits))
        scores.update(distributed.from_process_0(lambda: score_captions(results, split.references(rows))))
    model.train()
    return scores


def caption_rows(model, split, rows, opt, device, habits):
    """rows -> {image_id: its caption by beam search}, their features read --batch-size rows at a time
    (30,000 val photos' regions at once would be 7.5 GB of float32)."""
    beam, captions = dataclasses.replace(opt, decoding="beam"), {}
    for start in range(0, len(rows), opt.batch_size):
        chunk = rows[start:start + opt.batch_size]
        features = split.stored_features_of(chunk).to(device).float()  # (B, F) or (B, R, F)
        beams = caption_features(model, features, split.ix2word, beam, n_best=1, habits=habits)
        captions.update((split.image_id(row), b[0][0]) for row, b in zip(chunk, beams))
    return captions


def check_training_data(opt: Config, split):
    """Before any work: that captions can be searched for in this vocabulary, and what fine-tuning will
    need, hours later, from the features' description."""
    check_search(1, opt.beam_size, len(split.ix2word) - 1 - len(split.banned), opt.min_len, opt.max_gen_len)
    if opt.finetune_encoder and opt.finetune_epoch + opt.scst_epoch:
        check_finetuning(opt, split.meta)
    if opt.pretrain_epoch and not split.has_extra_text:
        raise UserError(f"--pretrain-epoch={opt.pretrain_epoch}: {opt.caption_data_path} holds no extra training "
                        "text to pre-train on (data_preprocess.py process --extra-annotation-file=...)")


def check_finetuning(opt: Config, meta):
    """What fine-tuning needs: as many stages as asked for, the weights, the images."""
    stages = STAGE_COUNTS.get(meta["backbone"], 0)
    if opt.finetune_encoder > stages:
        raise UserError(f"--finetune-encoder={opt.finetune_encoder}: {meta['backbone']} has {stages} stages")
    if meta["weights"] != "none":
        weights_file(meta["backbone"], meta["weights"])  # there (or downloadable), its sha256 checked
    if not os.path.isdir(meta["img_path"]):
        raise UserError(f"{meta['img_path']}: the features' image folder is gone; fine-tuning reads the images")


def learning_encoder(opt: Config, meta, state, device):
    """The encoder of fine-tuning: the features' backbone with its pretrained weights, or a saved
    state of it, its last --finetune-encoder stages learning."""
    trunk = build_backbone(meta["backbone"], "none" if state else meta["weights"])
    if state:
        trunk.load_state_dict(state)
    grid = meta["grid"] if opt.model in READS_REGIONS else 0
    return Encoder(meta["backbone"], trunk, opt.finetune_encoder, grid).to(device, memory_format=torch.channels_last)


def sampling_probability(opt: Config, progress):
    """Scheduled sampling's probability in an epoch: from 0 in the first cross-entropy epoch up to
    --scheduled-sampling in the last (at once in a one-epoch run), and that in fine-tuning."""
    epochs = opt.epoch
    rise = 1.0 if progress.phase == FINE_TUNING or epochs == 1 else progress.phase_epoch / (epochs - 1)
    return opt.scheduled_sampling * rise


_debug_warned = set()


def debug_requested(path):
    """The book's hook: the file --debug-file exists -> ipdb. Only for a run on a terminal and a file
    of this user, so that nobody else, and no missing terminal, can stop a run (warned about once)."""
    if not path or not os.path.exists(path):
        return False
    if sys.stdin.isatty() and os.stat(path).st_uid == os.getuid():
        return True
    if path not in _debug_warned:
        print(f"warning: {path} exists, but ipdb only starts for a run on a terminal and a file of its own "
              "user; training goes on", file=sys.stderr)
        _debug_warned.add(path)
    return False


class Optimization:
    """How the weights learn in a phase: Adam over the model at the phase's lr and over the learning
    encoder's stages at --encoder-lr (the fused kernel: 3x faster on a CPU), gradients clipped to
    --grad-clip, losses scaled by the run's gradient scaler (float16 only). Each group's lr is its
    base_lr (decayed on plateaus) times the phase's warm-up at the step (see warmup_factor)."""

    def __init__(self, opt: Config, phase, model, encoder, scaler):
        groups = [{"params": list(model.parameters()), "lr": phase.lr, "base_lr": phase.lr}]
        if encoder is not None:
            groups.append({"params": [p for p in encoder.parameters() if p.requires_grad], "lr": opt.encoder_lr,
                           "base_lr": opt.encoder_lr})
        self.optimizer = torch.optim.Adam(groups, weight_decay=opt.weight_decay, fused=True)
        self.scaler = scaler
        self.grad_clip, self.warmup_steps = opt.grad_clip, phase.warmup_steps

    def schedule(self, phase_step):
        """Set each group's lr for the phase's step phase_step -> the model's lr."""
        factor = warmup_factor(phase_step, self.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return self.optimizer.param_groups[0]["lr"]

    def decay(self, factor, phase_step):
        """Multiply every base_lr by factor -> the model's lr at phase_step."""
        for group in self.optimizer.param_groups:
            group["base_lr"] *= factor
        return self.schedule(phase_step)

    def step(self, loss, progress):
        """Backpropagate loss and update the weights -> the loss's value; a NaN loss stops training."""
        if not torch.isfinite(loss):
            raise UserError(f"the loss became {loss.item()} at epoch {progress.epoch + 1}, step {progress.step}; "
                            "stopped. The last good checkpoint is kept; try a lower --lr")
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_([p for group in self.optimizer.param_groups for p in group["params"]],
                                       self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item()

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def restore(self, checkpoint):
        """The optimizer and scaler states of a last.pth (an older version's has no base_lr: no warm-up)."""
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        for group in self.optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        self.scaler.load_state_dict(checkpoint.get("scaler") or self.scaler.state_dict())


class Trainer:
    """Trains a caption model through its phases (see `phases`). After each epoch it validates, keeps
    best.pth by `--metric`, decays the lr and stops a phase early when the metric stalls. `progress`
    says where training is and last.pth holds it, so Ctrl-C, SIGTERM or a crash lose at most a batch.

    With --ema-decay the model that validates, goes into best.pth and starts the next phase is the
    moving average of the caption model's weights (`scored_model`; a fine-tuned backbone is not
    averaged); last.pth and best.pth hold the learning weights too.

    Under torchrun every process trains on its share of each batch (`--batch-size` is the batch of the
    whole run) and DistributedDataParallel averages the gradients; validation is shared out and
    gathered; process 0 alone writes checkpoints and reports.
    """

    def __init__(self, opt: Config):
        check_options(config.check(opt))
        self.opt = opt
        torch.manual_seed(opt.seed)
        self.device = pick_device(opt.use_gpu)
        distributed.start(self.device)
        self.process, self.processes = distributed.rank_and_size()
        self.train_split, self.val_split = train_val_splits(opt)
        self.views = training_views(opt, self.train_split)  # the training features of each view of the photos
        self.vocab = self.train_split.ix2word
        check_training_data(opt, self.train_split)
        check_fits(opt, len(self.vocab), self.train_split.feature_dim, self.device, copies=4 + bool(opt.ema_decay))
        self.model = build_model(opt, len(self.vocab), self.train_split.feature_dim).to(self.device)
        first = PRETRAINING if opt.pretrain_epoch else CROSS_ENTROPY
        self.phases, self.progress = phases(opt), Progress(phase=first, processes=self.processes)
        self.checkpoints, self.report = Checkpoints(opt, self.train_split, self.process), Reporter(opt, self.process)
        # CUDA: bfloat16 autocast (float16 with a gradient scaler where bfloat16 is missing)
        cuda = self.device.type == "cuda"
        self.half = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler(enabled=cuda and self.half == torch.float16)  # one for the whole run
        self.encoder = self.training_images = self.reward = None  # made when a phase needs them
        self.discriminability = discriminability(opt, self.train_split) if opt.scst_retrieval_weight else None
        self._prepare_phase()
        if opt.resume:
            self._resume()

    @property
    def phase(self) -> Phase:
        return next(phase for phase in self.phases if phase.name == self.progress.phase)

    # --- the loop ---------------------------------------------------------------------------------
    def train(self):
        """The phases from the current one on; each ends by its epoch count or an early stop."""
        self.report.configuration(self.opt, self.train_split.meta)
        with StopOnSignal() as stop:
            for later, phase in enumerate(self.phases[self.phases.index(self.phase):]):
                if later and not phase.epochs:
                    continue
                if later:
                    self.start_phase(phase)
                if not self._run_phase(stop):
                    self._save(self.checkpoints.last)
                    self.report.say(f"\n{stop.requested or 'stopped by another process'}: saved "
                                    f"{self.checkpoints.last}; continue with --resume")
                    break
        self.report.flush()
        distributed.finish()

    def _run_phase(self, stop):
        """The remaining epochs of the current phase; False when a stop was requested (a stop asked
        for during validation acts once last.pth is saved)."""
        while self.progress.phase_epoch < self.phase.epochs and not self._stalled():
            if not self.train_epoch(stop):
                return False
            self._end_epoch()
            if distributed.any_process(stop.requested):
                return False
        return True

    def start_phase(self, phase):
        """A phase starts from the best model so far (and its encoder), with a new Optimization."""
        # best.pth is this run's once it has a best score (with --overwrite it may still be the old run's)
        best = distributed.from_process_0(self.checkpoints.best_weights) if self.progress.best_score is not None else {}
        if best:
            self.checkpoints.keep_phase_best(self.progress.phase)  # the phase that ends
            self.model.load_state_dict(best["model"])
        self.progress = dataclasses.replace(self.progress, phase=phase.name, phase_epoch=0, batch=0, phase_step=0,
                                            epochs_without_improvement=0)
        self._prepare_phase(best.get("encoder"))
        self._save(self.checkpoints.last)
        learning = f", the last {self.opt.finetune_encoder} encoder stages learning" if self.encoder else ""
        reward = (f"; reward: CIDEr-D + {self.opt.scst_bleu_weight} x mean BLEU-1..4 - "
                  f"{self.opt.scst_diversity_weight} x CIDEr-D against the other samples + "
                  f"{self.opt.scst_retrieval_weight} x discriminability" if phase.per_image else "")
        self.report.say(f"{phase.name} phase: {phase.epochs} epochs from {self.checkpoints.best}{learning}{reward}")

    def train_epoch(self, stop):
        """One pass over the training data (every caption, or every image); False when a stop was requested."""
        opt, phase, progress = self.opt, self.phase, self.progress
        if len(self.views) > 1:
            self.train_split = self.train_split.with_features(self.views[progress.epoch % len(self.views)])
        self.model.train(phase.dropout)
        meter = AverageValueMeter()  # the dashboard shows this epoch's running mean
        step = (self.self_critical_step if phase.per_image
                else functools.partial(self.cross_entropy_step, sampling=self._sampling_probability()))
        batches, total = self._batches()
        bar = self.report.bar(batches, total, progress.batch,
                              f"{phase.name} epoch {progress.phase_epoch + 1}/{phase.epochs}")
        for batch in bar:
            if debug_requested(opt.debug_file):
                import ipdb
                ipdb.set_trace()
            self.optimization.schedule(progress.phase_step)
            meter.add(step(batch))
            if self.average is not None:
                self.average.update_parameters(self.model)
            progress.stepped()
            if progress.step % opt.plot_every == 0 and self.report.speaks:
                bar.set_postfix({phase.measure: f"{meter.value()[0]:.3f}"})
                self._plot(batch.rows[0], meter.value()[0])
            if distributed.any_process(stop.requested):
                return False
        return True

    def _end_epoch(self):
        """Validate, keep the best model, decay the lr when the metric stalls, save last.pth."""
        opt, progress = self.opt, self.progress
        progress.epoch, progress.phase_epoch, progress.batch = progress.epoch + 1, progress.phase_epoch + 1, 0
        scores = self.validate()
        self.report.validation(progress, scores)
        if opt.metric not in scores:
            self._save(self.checkpoints.last)
            raise UserError(f"--metric={opt.metric} could not be computed this epoch (see above); saved "
                            f"{self.checkpoints.last}: continue with --resume, or choose another --metric")
        improved = self.checkpoints.is_better(scores[opt.metric], progress.best_score)
        if improved:
            progress.best_score, progress.epochs_without_improvement = scores[opt.metric], 0
        else:
            progress.epochs_without_improvement += 1
            if opt.lr_patience and progress.epochs_without_improvement % opt.lr_patience == 0:
                lr = self.optimization.decay(opt.lr_decay, progress.phase_step)
                self.report.say(f"no improvement for {progress.epochs_without_improvement} epochs: lr -> {lr:.2e}")
                self.report.log("lr", lr, progress)
        self._save(self.checkpoints.last)  # first: what a resume needs (it writes best.pth if a kill came between)
        if improved:
            self._save(self.checkpoints.best)
        summary = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
        self.report.say(f"epoch {progress.epoch}: {summary}" + (" (best)" if improved else ""))
        if self._stalled():
            self.report.say(f"early stop of {progress.phase} training: no improvement of {opt.metric} "
                            f"for {opt.early_stop_patience} epochs")
            self.report.log("early_stop", progress.epoch, progress)

    def _stalled(self):
        """--early-stop-patience epochs without improvement: the phase is over."""
        patience = self.opt.early_stop_patience
        return bool(patience) and self.progress.epochs_without_improvement >= patience

    # --- steps ------------------------------------------------------------------------------------
    def cross_entropy_step(self, batch, sampling=0.0):
        """One cross-entropy step -> the loss."""
        with self._autocast():
            loss = self.objective(cross_entropy_loss, batch.inputs, batch.captions.to(self.device), batch.lengths,
                                  sampling, self.opt.label_smoothing, batch.image_of)
        return self.optimization.step(loss, self.progress)

    def self_critical_step(self, batch):
        """One self-critical step -> the mean reward of the sampled captions."""
        opt, split = self.opt, self.train_split
        if self.reward is None:  # CIDEr-D over the training captions, built once
            cider = training_cider(opt.caption_data_path, split.word_captions(), split.end, split.unknown)
            self.reward = Reward(cider, opt.scst_bleu_weight, opt.scst_diversity_weight, opt.scst_retrieval_weight,
                                 self.discriminability)
        with self._autocast():
            loss, reward = self.objective(self_critical_loss, batch.inputs, batch.rows.tolist(), self.reward,
                                          split.end, split.banned, opt.scst_samples, opt.max_gen_len,
                                          split.habits.unfinished if opt.ending_rule else ())
        self.optimization.step(loss, self.progress)
        return reward

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.half, enabled=self.device.type == "cuda")

    @property
    def scored_model(self):
        """The model that validates and is kept: the moving average of the weights, or the weights."""
        return self.model if self.average is None else self.average.module

    def validate(self):
        """Validation scores (see score_split), with the learning encoder's features when there is one."""
        val = self.val_split if self.encoder is None else self.encoder.encoded_split(self.val_split, self.opt,
                                                                                     self.device)
        return score_split(self.scored_model, val, self.opt, self.device, self.process, self.processes,
                           self.train_split.habits)

    # --- what a phase needs -----------------------------------------------------------------------
    def _prepare_phase(self, encoder_state=None):
        """The learning encoder (and its training images) when the phase learns from images, a new
        Optimization, a new moving average of the weights (--ema-decay; it copies the weights at its
        first step), and the objective DistributedDataParallel wraps."""
        opt, phase, meta = self.opt, self.phase, self.train_split.meta
        self.encoder = learning_encoder(opt, meta, encoder_state, self.device) if phase.from_images else None
        if phase.from_images:
            self.training_images = self.training_images or TrainingImages(self._learning_split(), meta["backbone"],
                                                                          opt.augment)
        self.optimization = Optimization(opt, phase, self.model, self.encoder, self.scaler)
        self.average = (AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(opt.ema_decay), use_buffers=True)
                        if opt.ema_decay else None)
        self.objective = distributed.parallel(_Objective(self.model, self.encoder), self.device,
                                              find_unused=phase.per_image)

    def _resume(self):
        """Go on from last.pth: its weights (and their moving average), optimizer, progress and random states."""
        checkpoint = self.checkpoints.resume(self.processes)
        self.progress = checkpoint["progress"]
        try:
            self.model.load_state_dict(checkpoint.get("training_model", checkpoint["model"]))
            self._prepare_phase(checkpoint.get("encoder"))
            if self.average is not None and "training_model" in checkpoint:
                self.average.module.load_state_dict(checkpoint["model"])
                # averaging goes on (n 1); at a phase start (no step yet: n 0) the next step's weights start it
                self.average.n_averaged.fill_(int(self.progress.phase_step > 0))
            self.optimization.restore(checkpoint)
            if checkpoint.get("random"):  # an older version's last.pth has none: the run goes on from a fresh state
                restore_random(checkpoint["random"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise UserError(f"{self.checkpoints.last}: built for another model configuration "
                            f"({str(error)[:200]})") from None
        for note in checkpoint["notes"]:
            self.report.say(note)

    def _batches(self):
        """This epoch's Batches from the current one on, and how many it has in all: each image once
        (self-critical); where encoding an image is work (a learning encoder, the transformer's) whole
        images with all their captions, as many as give about --batch-size captions; else --batch-size
        captions."""
        opt, split, per_image = self.opt, self._learning_split(), self.phase.per_image
        share = {"skip": self.progress.batch, "process": self.process, "processes": self.processes,
                 "block": opt.read_block}
        seed = opt.seed + self.progress.epoch
        by_image = per_image or opt.model in ENCODES_REGIONS or self.encoder is not None
        size = split.images_per_batch(opt.batch_size) if by_image and not per_image else opt.batch_size
        if self.encoder is not None:
            batches = image_caption_batches(self.training_images, split.row_batches(size, seed, **share), not per_image,
                                            opt.num_workers, self.device)
        elif by_image:  # the next batches are read while the model computes
            batches = prefetch((split.image_batches if per_image else split.grouped_batches)(size, seed, **share))
        else:
            batches = prefetch(split.batches(size, seed, **share))
        batches = (Batch(rows, inputs.to(self.device, non_blocking=True).float(), *rest)  # float32 on the device
                   for rows, inputs, *rest in batches)
        return batches, split.num_batches(size, by_image, self.processes)

    def _learning_split(self):
        """The training split as the phase learns from it: with or without its extra training text."""
        return self.train_split if self.phase.extra_text else self.train_split.without_extra_text()

    def _plot(self, row, value):
        """The loss (or reward) curve, a training photo with its human caption and what the model now says."""
        split, model = self.train_split, self.scored_model
        model.eval()
        features = (split.features_of([row]).to(self.device) if self.encoder is None
                    else self.encoder.features_of(split, [row], self.opt, self.device))  # (1, F) or (1, R, F)
        beams = caption_features(model, features, self.vocab, self.opt, n_best=most_captions(self.opt),
                                 habits=split.habits)[0]
        self.model.train(self.phase.dropout)
        self.report.training(self.progress, self.phase.measure, value,
                             (split.image_id(row), split.image_path(row), split.human_caption(row), beams))

    def _sampling_probability(self):
        probability = sampling_probability(self.opt, self.progress)
        if probability:
            self.report.log("scheduled_sampling", probability, self.progress)
        return probability

    def _save(self, path):
        training = {} if self.average is None else {"training_model": self.model.state_dict()}
        self.checkpoints.save(path, self.progress, self.scored_model, self.optimization, self.encoder, **training)
