"""The one owner of what a training run says: printed lines, the JSONL metrics log, progress bars and
the Visdom dashboard, from process 0 only (the others are silent)."""
import json
import os
import time

from tqdm import tqdm

from visualize import Dashboard


class Reporter:
    """Everything a run reports; on a process other than 0 every method does nothing."""

    def __init__(self, opt, process):
        self.speaks = process == 0
        self.log_path = os.path.join(opt.log_dir, f"{opt.env}.metrics.jsonl")
        replay_log = os.path.join(opt.log_dir, f"{opt.env}.visdom.log")
        self.dashboard = Dashboard(opt.env, opt.vis_server, opt.vis_port, replay_log,
                                   timeout=opt.vis_timeout) if self.speaks else None

    def say(self, message):
        """Print, once for the whole run."""
        if self.speaks:
            print(message)

    def log(self, name, value, progress):
        """One JSON line per value in the run's log (it survives without Visdom)."""
        if not self.speaks:
            return
        record = {"epoch": progress.epoch, "step": progress.step, "name": name, "value": value, "time": time.time()}
        with open(self.log_path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def bar(self, iterable, total, initial, description):
        """A progress bar over an epoch's batches (none on the other processes)."""
        return tqdm(iterable, total=total, initial=initial, unit="batch", disable=not self.speaks, desc=description)

    # --- the dashboard ---
    def configuration(self, opt, features):
        if self.speaks:
            self.dashboard.configuration(opt, features)

    def training(self, progress, measure, value, sample):
        """A point of the loss (or reward) curve, logged too, and a training photo with its captions:
        sample = (image_id, image_path, human caption, the model's n-best)."""
        if self.speaks:
            self.dashboard.line("train", progress.step, value, measure)
            self.log(f"train_{measure}", value, progress)
            self.dashboard.sample(*sample, progress.step)

    def validation(self, progress, scores):
        """An epoch's validation scores: logged, plotted and printed."""
        for name, value in scores.items():
            self.log(name, value, progress)
        if self.speaks:
            self.dashboard.epoch(progress.epoch, progress.step, scores)

    def flush(self):
        if self.speaks:
            self.dashboard.flush()
