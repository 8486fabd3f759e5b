"""A small captioning dataset made on the spot (no downloads): coloured shapes on plain
backgrounds, five Chinese captions each, in AI Challenger format.

    python demo_data.py make --out=data/demo --num-train=400 --num-val=60
"""
import json
import os
import random

import fire
from PIL import Image, ImageDraw

COLORS = {"红色": (220, 30, 30), "绿色": (30, 170, 50), "蓝色": (40, 70, 220), "黄色": (240, 210, 20),
          "紫色": (140, 40, 170)}
BACKGROUNDS = {"白色": (245, 245, 245), "黑色": (15, 15, 15), "灰色": (128, 128, 128)}
SHAPES = ("圆形", "正方形", "三角形")
SIZES = {"大": 80, "小": 35}  # half the shape's width, in pixels of a 224 x 224 image
PHRASINGS = (
    "一个{size}{color}{shape}在{background}的背景上",
    "{background}背景上有一个{color}的{shape}",
    "图中是一个{size}的{color}{shape}",
    "{color}的{shape}，背景是{background}的",
    "一个{color}{shape}放在{background}背景中间",
)


def draw(shape, color, background, half, center):
    """A 224 x 224 RGB picture of one shape."""
    image = Image.new("RGB", (224, 224), BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    x, y = center
    box = (x - half, y - half, x + half, y + half)
    if shape == "圆形":
        pen.ellipse(box, fill=COLORS[color])
    elif shape == "正方形":
        pen.rectangle(box, fill=COLORS[color])
    else:
        pen.polygon([(x, y - half), (x - half, y + half), (x + half, y + half)], fill=COLORS[color])
    return image


def make_split(out, name, count, rng):
    entries = []
    for number in range(count):
        words = {"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)),
                 "background": rng.choice(list(BACKGROUNDS)), "size": rng.choice(list(SIZES))}
        half = SIZES[words["size"]] + rng.randint(-5, 5)
        center = (112 + rng.randint(-100 + half, 100 - half) // 2, 112 + rng.randint(-100 + half, 100 - half) // 2)
        image_id = f"{name}_{number:04d}.jpg"
        draw(words["shape"], words["color"], words["background"], half, center).save(
            os.path.join(out, "images", image_id), quality=95)
        entries.append({"url": "", "image_id": image_id, "caption": [p.format(**words) + "。" for p in PHRASINGS]})
    with open(os.path.join(out, f"{name}.json"), "w", encoding="utf-8") as file:
        json.dump(entries, file, ensure_ascii=False, indent=1)


def make(out="data/demo", num_train=400, num_val=60, seed=0):
    """Write out/images/*.jpg, out/train.json and out/val.json."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    make_split(out, "train", num_train, rng)
    make_split(out, "val", num_val, rng)
    print(f"{out}: {num_train} training and {num_val} validation images with 5 captions each")


if __name__ == "__main__":
    fire.Fire({"make": make})
