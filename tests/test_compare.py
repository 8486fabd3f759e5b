"""main.py compare: two systems' scores on the same images, B - A with a paired-bootstrap interval, and
per-image wins; the scores are evaluate's, and a difference is called only when the resamples agree."""
import json
import random

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu

from main import compare
from metrics import image_statistics, paired_bootstrap, score_captions, score_of, segment

REFERENCES = {f"{n}.jpg": [f"一个{who}在{where}{what}" for who, where, what in
                           zip(("男人", "女人", "孩子", "老人", "男孩"), ("草地上", "街道上", "水里", "雪地上", "海边"),
                               ("跑步", "骑车", "游泳", "滑雪", "玩耍"))][n % 5:] + [f"第{n}张照片里有{n}只狗"]
              for n in range(40)}


def results(chooser):
    return {image_id: chooser(image_id, captions) for image_id, captions in REFERENCES.items()}


def write(path, captions):
    path.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in captions.items()], ensure_ascii=False),
                    encoding="utf-8")
    return str(path)


GOOD = results(lambda image_id, captions: captions[-1])  # names its own photo
GENERIC = results(lambda image_id, captions: "一个男人在草地上跑步")


def test_each_score_is_evaluates_and_bleu_from_the_summed_statistics_is_pycocoevalcaps():
    for system in (GOOD, GENERIC):
        statistics = image_statistics(system, REFERENCES)
        scores = score_captions(system, REFERENCES)
        for name in ("CIDEr-D", "BLEU-4", "ROUGE-L"):
            assert score_of(name, statistics[name]) == pytest.approx(scores[name], rel=1e-9)
    truths = {i: [segment(r) for r in REFERENCES[i]] for i in GENERIC}
    half = dict(list(GENERIC.items())[:20])
    bleu, _ = Bleu(4).compute_score({i: truths[i] for i in half}, {i: [segment(c)] for i, c in half.items()})
    weights = np.array([[1] * 20 + [0] * 20])  # a "resample" of the first 20 images
    assert score_of("BLEU-4", image_statistics(GENERIC, REFERENCES)["BLEU-4"], weights)[0] == pytest.approx(bleu[3])


def test_a_system_against_itself_differs_by_nothing_and_ties_everywhere():
    statistics = image_statistics(GENERIC, REFERENCES)
    table = paired_bootstrap(statistics, statistics, resamples=200)
    assert all(table[name]["interval"] == (0.0, 0.0) for name in ("CIDEr-D", "BLEU-4", "ROUGE-L"))
    assert table["images"] == {"wins": 0, "ties": 40, "losses": 0}


def test_a_better_system_has_an_interval_above_zero_and_a_mixed_one_reaches_zero():
    generic, good = image_statistics(GENERIC, REFERENCES), image_statistics(GOOD, REFERENCES)
    table = paired_bootstrap(generic, good, resamples=1000, seed=1)
    for name in ("CIDEr-D", "BLEU-4"):
        low, high = table[name]["interval"]
        assert 0 < low <= table[name]["difference"] <= high
    assert table["images"]["wins"] > 30
    random.seed(3)
    mixed = {i: (GOOD if random.random() < 0.5 else GENERIC)[i] for i in REFERENCES}
    coin = paired_bootstrap(image_statistics(mixed, REFERENCES), image_statistics(
        {i: (GENERIC if mixed[i] == GOOD[i] else GOOD)[i] for i in REFERENCES}, REFERENCES), resamples=1000)
    low, high = coin["CIDEr-D"]["interval"]
    assert low < 0 < high  # half better, half worse: no call
    again = paired_bootstrap(generic, good, resamples=1000, seed=1)
    assert again == table and paired_bootstrap(generic, good, resamples=1000, seed=2) != table


def test_the_command_prints_the_table_and_refuses_what_it_cannot_compare_in_one_line(tmp_path, capsys):
    references = tmp_path / "val.json"
    references.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in REFERENCES.items()],
                                     ensure_ascii=False), encoding="utf-8")
    a, b = write(tmp_path / "a.json", GENERIC), write(tmp_path / "b.json", GOOD)
    compare(results=f"{a},{b}", annotation_file=str(references), resamples=200, metrics_path=str(tmp_path / "m.json"))
    out = capsys.readouterr().out
    assert "40 images" in out and "CIDEr-D per image, B against A:" in out
    assert json.load(open(tmp_path / "m.json"))["images"]["wins"] > 30
    fewer = write(tmp_path / "fewer.json", dict(list(GOOD.items())[:39]))
    for given, message in ((a, "give two results files"), (f"{a},{fewer}", "caption different images"),
                           (f"{a},{tmp_path / 'none.json'}", "none.json")):
        with pytest.raises(SystemExit, match=message):
            compare(results=given, annotation_file=str(references))
    before = open(a, "rb").read()
    with pytest.raises(SystemExit, match="a.json"):  # --metrics-path over an input
        compare(results=f"{a},{b}", annotation_file=str(references), metrics_path=a)
    assert open(a, "rb").read() == before
