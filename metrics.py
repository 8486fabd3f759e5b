"""Caption scores as AI Challenger 2017 computed them: jieba words, then the coco-caption metrics."""
import os
import shutil
import sys

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from captions import tokenize

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
        # Java must read the words as UTF-8, or every Chinese character becomes '?'.
        os.environ["JAVA_TOOL_OPTIONS"] = "-Dfile.encoding=UTF-8"
        scores["METEOR"], _ = Meteor().compute_score(truths, candidates)
    return {name: float(scores[name]) for name in METRICS if name in scores}


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
