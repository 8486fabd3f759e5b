import shutil

import pytest

from metrics import METRICS, caption_statistics, score_captions, segment

REFERENCES = {"a": ["一个男人在骑马。", "男人骑着一匹马"], "b": ["两个小孩在草地上玩耍", "孩子们在草地上"]}


def test_identical_candidate_scores_one():
    scores = score_captions({"a": "一个男人在骑马", "b": "两个小孩在草地上玩耍"}, REFERENCES)
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert scores[name] == pytest.approx(1.0, abs=1e-6)
    assert scores["CIDEr-D"] > 1.0


def test_no_shared_word_scores_zero():
    scores = score_captions({"a": "狗跑", "b": "蓝天白云"}, REFERENCES)
    assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D"} <= set(scores)
    assert all(scores[name] == pytest.approx(0.0, abs=1e-6) for name in scores)


def test_jieba_is_applied_and_full_stop_stripped():
    assert segment("一个男人在骑马。") == "一个 男人 在 骑马"
    # unsegmented candidate with a full stop still matches word by word
    assert score_captions({"a": "一个男人在骑马。"}, {"a": ["一个 男人 在 骑马"]})["BLEU-4"] == pytest.approx(1.0)


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java, which this machine lacks")
def test_meteor_reads_chinese_as_utf8():
    # if Java read the words as ASCII, every character would be '?' and these would all match
    same = score_captions({"a": "男人在骑马"}, {"a": ["男人在骑马"]})["METEOR"]
    different = score_captions({"a": "女孩在游泳"}, {"a": ["男人在骑马"]})["METEOR"]
    assert same > 0.9 and different < 0.3


def test_all_metrics_reported():
    expected = set(METRICS) - (set() if shutil.which("java") else {"METEOR"})
    assert set(score_captions({"a": "男人在骑马"}, REFERENCES)) >= expected


def test_results_without_references_are_rejected():
    with pytest.raises(ValueError, match="no references"):
        score_captions({"zzz": "猫"}, REFERENCES)


def test_caption_statistics_count_length_unfinished_endings_and_copies():
    """一个 and 男人 never end the training captions (40 uses each): a caption ending on them is unfinished."""
    ix2word = ["</PAD>", "</EOS>", "</UNKNOWN>", "一个", "男人", "在", "骑马"]
    training = {"ix2word": ix2word, "caption": [[[3, 4, 5, 6]] * 40], "sentences": [["一个男人在骑马"]]}
    statistics = caption_statistics({"a": "一个男人在骑马。", "b": "男人在骑马", "c": "一个男人", "d": "一个"},
                                    training)
    assert statistics["mean_length"] == pytest.approx((4 + 3 + 2 + 1) / 4)
    assert statistics["unfinished"] == pytest.approx(2 / 4)  # 一个 and 男人 (40 uses, never an end)
    assert statistics["copied_from_training"] == pytest.approx(1 / 4)
