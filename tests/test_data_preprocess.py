import json
import os
import stat

import numpy as np
import pytest
import torch

from captions import EOS, PAD, UNKNOWN, load_caption_data, tokenize, unfinished_words
from config import UserError
from data_preprocess import process
from dataset import CaptionSplit

ENTRIES = [
    {"image_id": "a.jpg", "caption": ["一个男人在草地上跑步。", "男人在跑步", " 草地上的男人\n", "。", "跑步的男人"]},
    {"image_id": "b.jpg", "caption": ["两只狗在草地上玩耍。", "狗在玩", "草地上有两只狗", "两只狗", "狗在草地上"]},
]


def write(path, entries):
    path.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return str(path)


def test_vocabulary_indices_and_round_trip(tmp_path):
    annotations, out = write(tmp_path / "a.json", ENTRIES), str(tmp_path / "c.pth")
    process(annotation_file=annotations, caption_data_path=out, min_appear=2)
    data = torch.load(out, weights_only=True)
    assert data["ix2word"][:3] == [PAD, EOS, UNKNOWN]
    assert all(data["word2ix"][w] == i for i, w in enumerate(data["ix2word"]))
    assert data["ix2id"] == ["a.jpg", "b.jpg"] and data["id2ix"] == {"a.jpg": 0, "b.jpg": 1}
    assert len(data["caption"][0]) == 4  # "。" alone is empty after cleaning: skipped
    # words seen once became </UNKNOWN>; frequent ones decode back to the sentence
    decoded = ["".join(data["ix2word"][i] for i in c) for c in data["caption"][1]]
    assert "狗在草地上" in decoded
    assert data["sentences"][0][2] == "草地上的男人"


def test_jieba_words_without_punctuation_and_spaces():
    assert tokenize("一个 男人在骑马。\n") == ["一个", "男人", "在", "骑马"]


def test_max_words_and_truncation(tmp_path):
    annotations, out = write(tmp_path / "a.json", ENTRIES), str(tmp_path / "c.pth")
    process(annotation_file=annotations, caption_data_path=out, min_appear=1, max_words=3, max_caption_len=2)
    data = torch.load(out, weights_only=True)
    assert len(data["ix2word"]) == 6
    assert max(len(c) for captions in data["caption"] for c in captions) == 2


def test_val_split_shares_the_training_vocabulary(tmp_path):
    train, val = str(tmp_path / "t.pth"), str(tmp_path / "v.pth")
    process(annotation_file=write(tmp_path / "t.json", ENTRIES), caption_data_path=train, min_appear=1)
    process(annotation_file=write(tmp_path / "v.json", [{"image_id": "c.jpg", "caption": ["男人和猫"]}]),
            caption_data_path=val, vocab_from=train)
    t, v = torch.load(train, weights_only=True), torch.load(val, weights_only=True)
    assert t["ix2word"] == v["ix2word"]
    assert [t["ix2word"][i] for i in v["caption"][0][0]] == ["男人", UNKNOWN, UNKNOWN]  # 和, 猫: not in training


def test_mixed_scripts_emoji_and_long_captions_do_not_crash(tmp_path):
    entries = [{"image_id": "x.jpg", "caption": ["一个穿NBA球衣的男人拿着iPhone 12 😀", "狗" * 200]}]
    out = str(tmp_path / "c.pth")
    process(annotation_file=write(tmp_path / "a.json", entries), caption_data_path=out, min_appear=1,
            max_caption_len=20)
    data = torch.load(out, weights_only=True)
    words = [data["ix2word"][i] for i in data["caption"][0][0]]
    assert "NBA" in words and "😀" in words
    assert len(data["caption"][0][1]) == 20


@pytest.mark.parametrize("content, problem", [
    ("[{", "not valid JSON"),
    ('{"image_id": "a.jpg"}', "expected a list"),
    ("[]", "the annotation list is empty"),
    ('[{"caption": ["猫"]}]', "entry 0: missing or empty image_id"),
    ('[{"image_id": "b.jpg", "caption": []}]', "none of its 1 images has a caption"),
    ('[{"image_id": "a.jpg", "caption": ["猫", 3]}]', "entry 0: caption 1 is a int"),
    ('[{"image_id": "a.jpg", "caption": "猫"}]', "entry 0: caption must be"),
    ('[{"image_id": "a.jpg", "caption": ["猫"]}, {"image_id": "a.jpg", "caption": ["狗"]}]', "entry 1: image_id"),
    ('[{"image_id": "../secret.jpg", "caption": ["猫"]}]', "entry 0: image_id '../secret.jpg' points outside"),
    ('[{"image_id": "a/../../b.jpg", "caption": ["猫"]}]', "entry 0: image_id 'a/../../b.jpg' points outside"),
    ('[{"image_id": "/etc/passwd", "caption": ["猫"]}]', "entry 0: image_id '/etc/passwd' points outside"),
])
def test_bad_annotation_files_name_file_entry_and_problem(tmp_path, content, problem):
    annotations = tmp_path / "bad.json"
    annotations.write_text(content, encoding="utf-8")
    out = tmp_path / "c.pth"
    with pytest.raises(SystemExit) as exit_info:
        process(annotation_file=str(annotations), caption_data_path=str(out))
    assert str(annotations) in str(exit_info.value) and problem in str(exit_info.value)
    assert list(tmp_path.iterdir()) == [annotations]  # no partial output


def test_existing_output_survives_a_failed_run(tmp_path):
    out = tmp_path / "c.pth"
    process(annotation_file=write(tmp_path / "a.json", ENTRIES), caption_data_path=str(out))
    before = out.read_bytes()
    with pytest.raises(SystemExit):
        process(annotation_file=write(tmp_path / "b.json", [{"image_id": 1}]), caption_data_path=str(out))
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "c.pth"]


def test_missing_annotation_option_is_explained():
    with pytest.raises(SystemExit, match="--annotation-file"):
        process()


def test_files_get_the_usual_permissions(tmp_path):
    """Written atomically through a private temporary file, yet readable as the umask allows."""
    previous = os.umask(0o022)
    try:
        process(annotation_file=write(tmp_path / "a.json", ENTRIES), caption_data_path=str(tmp_path / "c.pth"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "c.pth").st_mode) == 0o644


EXTRA = [{"image_id": "b.jpg", "caption": ["两条小狗在绿色的草坪上奔跑。"]},
         {"image_id": "z.jpg", "caption": ["不在主文件里的图片"]}]


def test_extra_text_is_learned_from_but_never_a_reference(tmp_path):
    out = str(tmp_path / "c.pth")
    process(annotation_file=write(tmp_path / "a.json", ENTRIES),
            extra_annotation_file=write(tmp_path / "x.json", EXTRA), caption_data_path=out, min_appear=1)
    data = torch.load(out, weights_only=True)
    assert data["extra_caption"][0] == []  # a.jpg has no extra text; z.jpg is not an image of the file
    [extra] = data["extra_caption"][1]
    assert "".join(data["ix2word"][i] for i in extra) == "两条小狗在绿色的草坪上奔跑"  # its words are in the vocabulary
    assert data["sentences"][1] == [s.rstrip("。") for s in ENTRIES[1]["caption"]]
    split = CaptionSplit(data, np.zeros((2, 4), np.float16), {"img_path": str(tmp_path)}, [0, 1])
    assert split.pairs == [(0, i) for i in range(4)] + [(1, i) for i in range(6)]  # cross-entropy reads it
    captions, lengths = split.captions_of([(1, 5)])
    assert captions[0, :lengths[0] - 1].tolist() == extra and captions[0, lengths[0] - 1] == data["word2ix"][EOS]
    assert split.word_captions()[1] == data["caption"][1]  # the self-critical reward's references: no extra text
    assert split.references([1]) == {"b.jpg": data["sentences"][1]}


@pytest.mark.parametrize("files, problem", [
    ("{x},", "an empty file name in the list"),
    ("{other}", "captions none of the images of --annotation-file"),
    ("{x},{missing}", "missing.json"),
    ("{x},{annotations}", "is --annotation-file itself: it adds nothing"),
])
def test_unusable_extra_text_is_one_line_and_writes_nothing(tmp_path, files, problem):
    names = {"x": write(tmp_path / "x.json", EXTRA), "missing": str(tmp_path / "missing.json"),
             "annotations": str(tmp_path / "a.json"),
             "other": write(tmp_path / "other.json", [{"image_id": "q.jpg", "caption": ["猫"]}])}
    annotations, out = write(tmp_path / "a.json", ENTRIES), tmp_path / "c.pth"
    with pytest.raises(SystemExit) as exit_info:
        process(annotation_file=annotations, extra_annotation_file=files.format(**names), caption_data_path=str(out))
    assert problem in str(exit_info.value) and "\n" not in str(exit_info.value)
    assert not out.exists()


@pytest.mark.parametrize("extra", [[5, None], [[3], [[1]]], [[["q"]], [[1]]], [[[1, 10 ** 6]], [[1]]], {"a": 1}])
def test_damaged_extra_text_in_a_caption_file_is_one_line(tmp_path, extra):
    out = str(tmp_path / "c.pth")
    process(annotation_file=write(tmp_path / "a.json", ENTRIES), caption_data_path=out, min_appear=1)
    data = torch.load(out, weights_only=True)
    torch.save({**data, "extra_caption": extra}, out)
    with pytest.raises(UserError, match="its extra training text does not match its images and vocabulary"):
        load_caption_data(out)


def test_unfinished_words_are_those_the_captions_almost_never_end_on():
    """一个 (3) never ends a caption, 的 (4) once in 400 uses; 狗 (5) ends most of its; 跑 (6) never
    ends one but is seen too rarely to tell."""
    ix2word = [PAD, EOS, UNKNOWN, "一个", "的", "狗", "跑"]
    captions = [[[3, 4, 5]] * 199 + [[5, 4]], [[3, 6, 5]] * 5, [[2, 4, 5]] * 199]
    assert unfinished_words(captions, ix2word) == [3, 4]
    assert unfinished_words([[[3, 2]] * 40], ix2word) == [3]  # </UNKNOWN> is never one of them
