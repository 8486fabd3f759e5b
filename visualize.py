"""What the toolkit draws: the training dashboard in Visdom, and attention maps.

The dashboard can never slow down or stop training. Every call is written to a replay log
first (visdom's own log format). A background thread then posts it to the server with a
timeout, dropping updates when the server falls behind. With no server, the log alone
keeps the run: `python main.py replay`.
"""
import contextlib
import dataclasses
import functools
import html
import json
import math
import queue
import subprocess
import sys
import threading

import numpy as np
import requests
import visdom
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.functional import to_tensor

from config import UserError
from images import IMAGE_SIZE, UNREADABLE, seen_photo


class _QueuedVisdom(visdom.Visdom):
    """A Visdom client whose HTTP posts go to a queue instead of blocking the caller."""

    def __init__(self, outbox, **kwargs):
        self.outbox = outbox
        super().__init__(use_incoming_socket=False, raise_exceptions=False, **kwargs)

    def _handle_post(self, url, data=None):
        with contextlib.suppress(queue.Full):  # the server is slower than training: skip this update
            self.outbox.put_nowait((url, data))
        return ""


FEATURE_SETTINGS = ("backbone", "weights", "grid", "img_path")  # options that extraction, not training, decided


class Dashboard:
    """Loss, metrics, the current image with its human and generated captions, and a run log."""

    def __init__(self, env, server, port, log_file, timeout=2.0, online=True):
        self.address, self.timeout = f"{server}:{port}", timeout
        self.online = online and self._reachable()
        if online and not self.online:
            print(f"warning: no Visdom server at {self.address}; training goes on, and the dashboard is "
                  f"recorded in {log_file} (python main.py replay --log={log_file})", file=sys.stderr)
        self.outbox = queue.Queue(maxsize=200)
        self.vis = _QueuedVisdom(self.outbox, server=server, port=port, env=env,
                                 log_to_filename=log_file, offline=not self.online)
        self.failed = False
        self.windows = set()  # titles of the line windows created so far
        self.sender = threading.Thread(target=self._send_forever, daemon=True)
        self.sender.start()

    def _reachable(self):
        try:
            requests.get(self.address, timeout=self.timeout)
            return True
        except requests.RequestException:
            return False

    def _send_forever(self):
        while True:
            url, data = self.outbox.get()
            try:
                requests.post(url, data=data, timeout=self.timeout)
            except requests.RequestException as error:
                if not self.failed:
                    print(f"warning: Visdom stopped answering ({type(error).__name__}); training goes on",
                          file=sys.stderr)
                self.failed = True
            finally:
                self.outbox.task_done()

    def flush(self, seconds=5.0):
        """Give queued updates a few seconds to reach the server (at the end of a run)."""
        finished = threading.Thread(target=self.outbox.join, daemon=True)
        finished.start()
        finished.join(seconds)

    def line(self, name, x, y, title, xlabel="iteration"):
        """Append a point to line `name` of the window called `title` (created on first use)."""
        update = "append" if title in self.windows else None  # append also adds a new line
        self.windows.add(title)
        self.vis.line(X=np.array([x]), Y=np.array([y]), win=title, name=name, update=update,
                      opts={"title": title, "showlegend": True, "xlabel": xlabel})

    def image(self, image, title, win="image"):
        """image (3, H, W) in 0..1, titled (the photo: with its human caption)."""
        self.vis.image(image, win=win, opts={"title": title, "caption": title})

    def text(self, html, win, title, append=False):
        self.vis.text(html, win=win, append=append, opts={"title": title})

    # --- what training shows ---
    def configuration(self, opt, features):
        """The run's options, with what the features really are (their backbone, weights, grid and
        image folder, not the training command's defaults for them)."""
        settings = {**dataclasses.asdict(opt), **{key: features[key] for key in FEATURE_SETTINGS}}
        text = html.escape(json.dumps(settings, indent=1, ensure_ascii=False))
        self.text(f"<pre>{text}</pre>", "config", "configuration")

    def sample(self, image_id, image_path, human, generated, step):
        """One training photo titled with its human caption, the model's n-best [(caption, score,
        attention)], and where the best caption looked, word by word (attention models)."""
        items = "".join(f"<li>{html.escape(text)} <small>({score:.2f})</small></li>" for text, score, _ in generated)
        self.text(f"<b>{html.escape(image_id)}</b><br>人工描述: {html.escape(human)}<br>"
                  f"模型描述 (step {step}):<ol>{items}</ol>", "captions", "captions")
        try:
            photo = seen_photo(image_path)
        except UNREADABLE:
            return  # the image moved since extraction: the captions still show
        self.image(to_tensor(photo), human)  # (3, 224, 224) in 0..1
        attention = generated[0][2] if generated else None
        if attention and cjk_font():
            figure = attention_figure(photo, attention)
            self.image(to_tensor(figure), f"attention: {generated[0][0]}", win="attention")

    def epoch(self, epoch, step, scores):
        """Validation scores of an epoch: loss against steps, the rest against epochs, and a log line."""
        for name, value in scores.items():
            if name == "val_loss":
                self.line("val", step, value, "loss")
            else:
                self.line(name, epoch, value, "perplexity" if name == "perplexity" else "validation metrics",
                          xlabel="epoch")
        summary = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
        self.text(f"epoch {epoch}: {html.escape(summary)}", "log", "log", append=epoch > 1)


@functools.cache
def cjk_font():
    """A font file with Chinese characters, found through fontconfig; None if there is none."""
    try:
        listed = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    files = sorted(line.split(":")[0] for line in listed.splitlines() if line.strip())
    return next((f for f in files if "zenhei" in f), files[0] if files else None)


TITLE_HEIGHT = 28


def attention_figure(photo, attention, columns=5):
    """The photo, then one panel per word: its region weights upsampled over the photo (bright
    where the model looked), titled with the word. attention: [(word, (G*G,) weights)] -> PIL image."""
    font_file = cjk_font()
    if font_file is None:
        raise UserError("no font with Chinese characters for the attention maps; "
                        "install one (apt-get install fonts-wqy-zenhei)")
    font = ImageFont.truetype(font_file, 20)
    photo = photo.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))
    panels = [("", photo)] + [(word, _highlight(photo, weights)) for word, weights in attention]
    rows = math.ceil(len(panels) / columns)
    figure = Image.new("RGB", (columns * IMAGE_SIZE, rows * (IMAGE_SIZE + TITLE_HEIGHT)), "white")
    draw = ImageDraw.Draw(figure)
    for index, (title, panel) in enumerate(panels):
        x, y = index % columns * IMAGE_SIZE, index // columns * (IMAGE_SIZE + TITLE_HEIGHT)
        figure.paste(panel, (x, y + TITLE_HEIGHT))
        draw.text((x + 6, y + 3), title, fill="black", font=font)
    return figure


def _highlight(photo, weights):
    """weights (G*G,) of the regions, row by row -> the photo dimmed where the weight is low."""
    grid = math.isqrt(len(weights))
    weights = np.asarray(weights, dtype=np.float32).reshape(grid, grid)
    heat = Image.fromarray(np.uint8(255 * weights / max(weights.max(), 1e-8))).resize(photo.size, Image.BILINEAR)
    shade = 0.2 + 0.8 * np.asarray(heat, dtype=np.float32)[..., None] / 255  # (H, W, 1) in 0.2..1
    return Image.fromarray(np.uint8(np.asarray(photo, dtype=np.float32) * shade))


def replay(log_file, server, port):
    """Post a recorded dashboard log to a running Visdom server -> the environments it was recorded in."""
    client = visdom.Visdom(server=server, port=port, use_incoming_socket=False, raise_exceptions=True)
    client.replay_log(log_file)
    with open(log_file, encoding="utf-8") as file:
        return sorted({json.loads(line)[1].get("eid") for line in file if line.strip()} - {None})
