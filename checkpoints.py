"""Where a training run is, and the one owner of its checkpoints: last.pth (resumable), best.pth
(the best model by --metric) and best-<phase>.pth (best.pth as each phase ended), written by process 0,
checked when a run resumes."""
import dataclasses
import os

import numpy as np
import torch

import distributed
from config import FIELDS, MODEL_OPTIONS, Config, UserError
from files import atomic_save, remove_leftovers
from metrics import HIGHER_IS_BETTER
from model import load_checkpoint, save_checkpoint

PRETRAINING, CROSS_ENTROPY, FINE_TUNING, SELF_CRITICAL = PHASES = (
    "pre-training", "cross-entropy", "fine-tuning", "self-critical")
ADDED_LATER = {"phase_step": 0}  # Progress fields an older last.pth lacks, with the value they resume at
# Settings that fix which images validate and the order of the batches: a resumed run must keep them.
DATA_ORDER = ("seed", "batch_size", "read_block", "caption_data_path", "val_caption_data_path", "val_fraction")


@dataclasses.dataclass
class Progress:
    """Where training is. last.pth holds it (as the dict `state`), so a stop loses at most one batch."""

    phase: str = CROSS_ENTROPY
    epoch: int = 0  # epochs done in all phases
    phase_epoch: int = 0  # epochs done in this phase
    batch: int = 0  # batches done in this epoch
    step: int = 0  # optimizer steps in all
    phase_step: int = 0  # optimizer steps in this phase (the lr warm-up counts them)
    best_score: float | None = None
    epochs_without_improvement: int = 0
    processes: int = 1  # of the launch that wrote it (their shares of a batch differ with another count)

    def stepped(self):
        """One more batch done, one more optimizer step."""
        self.batch, self.step, self.phase_step = self.batch + 1, self.step + 1, self.phase_step + 1


class Checkpoints:
    """last.pth and best.pth of `--checkpoint-dir`: what goes in them, the better-than rule, and the
    checks that a resumed run is the same run. Only process 0 writes; every process reads."""

    def __init__(self, opt: Config, split, process):
        self.opt, self.split, self.writer = opt, split, process == 0
        self.last = os.path.join(opt.checkpoint_dir, "last.pth")
        self.best = os.path.join(opt.checkpoint_dir, "best.pth")
        if self.writer:
            remove_leftovers(opt.checkpoint_dir)

    def keep_phase_best(self, phase):
        """best.pth as the phase that ends leaves it, kept as best-<phase>.pth (the cross-entropy bests of
        two seeds make an ensemble, say), written atomically: a kill leaves the old copy or the new."""
        if self.writer and os.path.isfile(self.best):
            with open(self.best, "rb") as file:
                atomic_save(file.read(), self.phase_best(phase), save=lambda data, out: out.write(data))

    def phase_best(self, phase):
        return os.path.join(self.opt.checkpoint_dir, f"best-{phase}.pth")

    def is_better(self, score, best):
        if best is None:
            return True
        return score > best if HIGHER_IS_BETTER[self.opt.metric] else score < best

    def save(self, path, progress, model, optimization, encoder=None, **training):
        """The model, everything generate needs, and what resuming needs: optimizer and gradient scaler
        (trainer.Optimization's state_dict), progress and random number generators (with the fine-tuned
        backbone, when there is one, and `training`: the weights that learn, where `model` is their
        moving average)."""
        if not self.writer:
            return
        trunk = {"encoder": encoder.trunk.state_dict()} if encoder is not None else {}
        save_checkpoint(path, model, self.opt, self.split.ix2word, self.split.meta, **optimization.state_dict(),
                        habits=self.split.habits, state=dataclasses.asdict(progress), random=random_state(),
                        **trunk, **training)

    def resume(self, processes):
        """last.pth, checked to continue this run: its vocabulary, features, data order and progress
        (its epoch again when it was written by another number of processes: their shares differ),
        with "notes" to say once it is loaded."""
        checkpoint = distributed.from_process_0(self._resumable)
        if checkpoint["ix2word"] != self.split.ix2word:
            raise UserError(f"{self.last}: built for another vocabulary than {self.opt.caption_data_path}")
        if checkpoint["feature"]["feature_dim"] != self.split.feature_dim:
            raise UserError(f"{self.last}: built for {checkpoint['feature']['feature_dim']}-d features, "
                            f"these are {self.split.feature_dim}-d")
        for name in (*MODEL_OPTIONS, *DATA_ORDER):
            saved, now = checkpoint["config"].get(name, FIELDS[name].default), getattr(self.opt, name)
            if saved != now:
                what = "shapes the model" if name in MODEL_OPTIONS else "fixes the validation images and batch order"
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag}={now} but {self.last} was trained with {flag}={saved}; it {what}: resume "
                                "with the same value")
        names = {field.name for field in dataclasses.fields(Progress)}
        state = checkpoint.get("state")
        state = {**ADDED_LATER, **state} if isinstance(state, dict) else state
        if not isinstance(state, dict) or not names <= set(state) or state["phase"] not in PHASES:
            raise UserError(f"{self.last}: holds no training state to resume from")
        progress = Progress(**{name: state[name] for name in names})
        counts = [getattr(progress, name) for name in names - {"phase", "best_score"}]
        if not all(isinstance(count, int) and count >= 0 for count in counts) or not isinstance(
                progress.best_score, (int, float, type(None))):
            raise UserError(f"{self.last}: its training state is damaged")
        notes = []
        if progress.processes != processes and progress.batch:
            notes.append(f"{self.last} was written by {progress.processes} processes, this run has {processes}: "
                         f"the shares of the batches differ, so epoch {progress.epoch + 1} starts again")
            progress.batch = 0
        progress.processes = processes
        notes.append(f"resuming from {self.last} at epoch {progress.epoch}, batch {progress.batch} ({progress.phase})")
        self._finish_best(checkpoint, progress)
        checkpoint["progress"], checkpoint["notes"] = progress, notes
        return checkpoint

    def _resumable(self):
        """last.pth; best.pth where a kill came before the first last.pth (both hold the whole state)."""
        if not os.path.isfile(self.last) and os.path.isfile(self.best):
            print(f"{self.last}: missing; resuming from {self.best}, which holds the same state")
            return load_checkpoint(self.best)
        return load_checkpoint(self.last)

    def _finish_best(self, checkpoint, progress):
        """A kill between the two saves of an improving epoch leaves last.pth, which holds that epoch's
        model, newer than best.pth: write best.pth from it."""
        improving_end = progress.phase_epoch and not progress.batch and not progress.epochs_without_improvement
        if not self.writer or not improving_end or progress.best_score is None:
            return
        best = (load_checkpoint(self.best).get("state") or {}) if os.path.isfile(self.best) else {}
        if (best.get("best_score"), best.get("epoch")) != (progress.best_score, progress.epoch):
            atomic_save(dict(checkpoint), self.best)

    def best_weights(self):
        """best.pth's model and encoder weights, without its optimizer state; {} before there is one."""
        if not os.path.isfile(self.best):
            return {}
        return {key: value for key, value in load_checkpoint(self.best).items() if key in ("model", "encoder")}


def random_state():
    """Every random number generator training draws from (dropout, sampling, augmentation), to resume
    the same run: torch's, CUDA's and numpy's global ones (numpy's as tensors, which torch.load's
    weights_only accepts)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                      "has_gauss": has_gauss, "gauss": gauss}}


def restore_random(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state["numpy"]
    np.random.set_state(("MT19937", saved["keys"].numpy().astype(np.uint32), saved["position"], saved["has_gauss"],
                         saved["gauss"]))
