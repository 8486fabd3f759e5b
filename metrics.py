"""Caption scores as AI Challenger 2017 computed them: jieba words, then the coco-caption metrics."""
import contextlib
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor
from pycocoevalcap.rouge.rouge import Rouge

from captions import clean, tokenize, unfinished_words

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
# Which way is better for each score training can select best.pth by.
HIGHER_IS_BETTER = {"val_loss": False, "perplexity": False, "top5_accuracy": True, **dict.fromkeys(METRICS, True)}
_warned_no_java = False


def segment(sentence):
    """'一个男人在骑马。' -> '一个 男人 在 骑马' (jieba words joined by spaces)."""
    return " ".join(tokenize(sentence))


def score_captions(results, references):
    """results {image_id: caption}, references {image_id: [captions]} -> {metric: score in 0..1}.

    Every image of `results` must have references. METEOR needs Java; without it, it is left out.
    """
    missing = [image_id for image_id in results if image_id not in references]
    if missing:
        raise ValueError(f"{len(missing)} results have no references, e.g. {missing[0]!r}")
    candidates = {image_id: [segment(caption) or "</EMPTY>"] for image_id, caption in results.items()}
    truths = {image_id: [segment(ref) for ref in references[image_id]] for image_id in results}
    bleu, _ = Bleu(4).compute_score(truths, candidates, verbose=0)
    scores = dict(zip(METRICS[:4], bleu))
    scores["ROUGE-L"], _ = Rouge().compute_score(truths, candidates)
    scores["CIDEr-D"], _ = Cider().compute_score(truths, candidates)
    if java_available():
        scorer = None
        try:
            scorer = Meteor()
            scores["METEOR"], _ = scorer.compute_score(truths, candidates)
        except (OSError, ValueError) as error:  # Java died: a broken pipe, or b'' read as a score
            print(f"METEOR skipped: its Java process failed ({error!r})", file=sys.stderr)
        finally:
            if scorer is not None:
                scorer.close()
    return {name: float(scores[name]) for name in METRICS if name in scores}


class Meteor(meteor.Meteor):
    """pycocoevalcap's METEOR with its Java in a session of its own, out of reach of the Ctrl-C or SIGTERM
    sent to the trainer's process group, reading words as UTF-8 (or every Chinese character becomes '?')."""

    def __init__(self):
        self.meteor_cmd = ["java", "-jar", "-Xmx2G", meteor.METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"]
        self.meteor_p = subprocess.Popen(
            self.meteor_cmd, cwd=os.path.dirname(os.path.abspath(meteor.__file__)), start_new_session=True,
            env={**os.environ, "JAVA_TOOL_OPTIONS": "-Dfile.encoding=UTF-8"},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.lock = threading.Lock()

    def close(self):
        """Stop Java and reap it; without the lock, which a failed compute_score leaves held."""
        process = getattr(self, "meteor_p", None)  # None when Popen failed
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout):
            with contextlib.suppress(OSError):  # unflushed bytes to a dead process
                pipe.close()

    __del__ = close


def java_available():
    global _warned_no_java
    if shutil.which("java"):
        return True
    if not _warned_no_java:
        print("METEOR skipped: it needs Java (apt-get install default-jre-headless)", file=sys.stderr)
        _warned_no_java = True
    return False


def format_table(scores):
    """Scores as a two-column table on the 0-1 scale."""
    return "\n".join(f"{name:<8} {scores[name]:.4f}" for name in METRICS if name in scores)


def caption_statistics(results, training):
    """What the averages hide, of results {image_id: caption} against a training caption file's data:
    the mean length in jieba words, the share of captions that end on a word the training captions
    (almost) never end on (unfinished, e.g. 一个), and the share copied verbatim from a training caption."""
    captions = [clean(caption) for caption in results.values()]
    ix2word = training["ix2word"]
    unfinished = {ix2word[ix] for ix in unfinished_words(training["caption"], ix2word)}
    seen = {sentence for sentences in training["sentences"] for sentence in sentences}
    words = [tokenize(caption) for caption in captions]
    return {"mean_length": sum(map(len, words)) / len(words),
            "unfinished": sum(bool(w) and w[-1] in unfinished for w in words) / len(words),
            "copied_from_training": sum(caption in seen for caption in captions) / len(captions)}


# --- paired comparison of two systems on the same images (Koehn, 2004) ------------------------------
def image_statistics(results, references):
    """What each image adds to a score, images in the order of `results`: CIDEr-D and ROUGE-L per image
    (the scores are their means) and BLEU's sufficient statistics (the score is a function of their sum):
    {"CIDEr-D": (N,), "ROUGE-L": (N,), "BLEU-4": (N, 10): test length, closest reference length, guessed
    and correct 1..4-grams}, as pycocoevalcap counts them."""
    images = list(results)
    candidates = {image_id: [segment(results[image_id]) or "</EMPTY>"] for image_id in images}
    truths = {image_id: [segment(ref) for ref in references[image_id]] for image_id in images}
    _, cider = Cider().compute_score(truths, candidates)
    _, rouge = Rouge().compute_score(truths, candidates)
    scorer = BleuScorer(n=4)
    for image_id in images:
        scorer += (candidates[image_id][0], truths[image_id])
    bleu = [[comps["testlen"], scorer._single_reflen(comps["reflen"], "closest", comps["testlen"]),
             *comps["guess"], *comps["correct"]] for comps in scorer.ctest]
    return {"CIDEr-D": np.asarray(cider, dtype=np.float64), "ROUGE-L": np.asarray(rouge, dtype=np.float64),
            "BLEU-4": np.asarray(bleu, dtype=np.float64)}


def bleu4(statistics):
    """BLEU-4 of summed sufficient statistics (..., 10), as pycocoevalcap's corpus BLEU computes it."""
    testlen, reflen, guess, correct = statistics[..., 0], statistics[..., 1], statistics[..., 2:6], statistics[..., 6:]
    precision = np.prod((correct + 1e-15) / (guess + 1e-9), axis=-1) ** 0.25
    ratio = (testlen + 1e-15) / (reflen + 1e-9)
    return precision * np.where(ratio < 1, np.exp(1 - 1 / ratio), 1.0)


def score_of(name, statistics, weights=None):
    """A score from image_statistics' `statistics` of it, each image counted by `weights` (R, N) (a
    bootstrap resample per row; None: each once) -> the score, or (R,) scores."""
    counts = np.ones(len(statistics)) if weights is None else weights
    if name == "BLEU-4":
        return bleu4(counts @ statistics)
    return counts @ statistics / len(statistics)


def paired_bootstrap(first, second, resamples=1000, seed=0):
    """Two systems' image_statistics on the same images (and any other per-image score whose mean is the
    score, e.g. R@1) -> per score (each system's score, the difference second - first, and its 95%
    interval over `resamples` resamples of the images, the same images for both: Koehn's paired
    bootstrap), and per-image CIDEr-D wins, ties, losses of second."""
    images = len(first["CIDEr-D"])
    weights = np.random.default_rng(seed).multinomial(images, np.full(images, 1 / images), size=resamples)  # (R, N)
    table = {}
    for name in first:
        differences = score_of(name, second[name], weights) - score_of(name, first[name], weights)
        low, high = np.percentile(differences, [2.5, 97.5])
        table[name] = {"first": float(score_of(name, first[name])), "second": float(score_of(name, second[name])),
                       "difference": float(score_of(name, second[name]) - score_of(name, first[name])),
                       "interval": (float(low), float(high))}
    delta = second["CIDEr-D"] - first["CIDEr-D"]
    table["images"] = {"wins": int((delta > 1e-9).sum()), "ties": int((abs(delta) <= 1e-9).sum()),
                       "losses": int((delta < -1e-9).sum())}
    return table
