"""Regenerate every file of ``sample_jobs/`` from scratch, deterministically.

    python sample_jobs/make_samples.py

Writes, next to this script:

- ``images/``        small images drawn with Pillow (JPEG, PNG, GIF, WebP), plus
                     two files whose extension lies about their format and one
                     text file named ``.jpg``;
- ``captions.jsonl`` one image-caption job per real image;
- ``eval.jsonl``     text-only evaluation prompts;
- ``broken.jsonl``   good jobs mixed with one of each kind of broken line;
- ``README.md``      what each file is.

Running it twice gives byte-identical files: nothing depends on the clock,
randomness or directory order. (Output can differ between Pillow versions,
whose encoders and default font change.)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
IMAGES = HERE / "images"

MODEL = "claude-3.5-sonnet"
CAPTION_SYSTEM = "You write one-sentence alt text for images."
CAPTION_PROMPT = "Describe this image in one sentence."
EVAL_SYSTEM = "You are a careful assistant. Answer briefly and exactly."

# --------------------------------------------------------------------------
# drawing helpers

RGB = tuple[int, int, int]


def font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def lerp(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def vertical_gradient(size: tuple[int, int], top: RGB, bottom: RGB) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    for y in range(h):
        draw.line([(0, y), (w, y)], fill=lerp(top, bottom, y / max(h - 1, 1)))
    return img


def horizontal_gradient(size: tuple[int, int], left: RGB, right: RGB) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    for x in range(w):
        draw.line([(x, 0), (x, h)], fill=lerp(left, right, x / max(w - 1, 1)))
    return img


def centered_text(
    draw: ImageDraw.ImageDraw, size: tuple[int, int], text: str, fill: RGB | int, px: int = 12
) -> None:
    f = font(px)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
    x = (size[0] - (right - left)) // 2 - left
    y = (size[1] - (bottom - top)) // 2 - top
    draw.text((x, y), text, fill=fill, font=f)


# --------------------------------------------------------------------------
# the images: (file name, what it shows) -> Image


def red_circle() -> Image.Image:
    img = Image.new("RGB", (96, 96), "white")
    ImageDraw.Draw(img).ellipse([12, 12, 84, 84], fill=(220, 30, 30), outline="black", width=2)
    return img


def blue_square() -> Image.Image:
    img = Image.new("RGB", (96, 96), (240, 240, 240))
    ImageDraw.Draw(img).rectangle([20, 20, 76, 76], fill=(30, 70, 200))
    return img


def green_triangle() -> Image.Image:
    img = Image.new("RGB", (100, 90), "white")
    ImageDraw.Draw(img).polygon([(50, 8), (92, 82), (8, 82)], fill=(40, 160, 60))
    return img


def sunset_gradient() -> Image.Image:
    img = vertical_gradient((160, 120), (255, 140, 40), (90, 20, 110))
    draw = ImageDraw.Draw(img)
    draw.ellipse([60, 70, 100, 110], fill=(255, 220, 90))
    draw.rectangle([0, 95, 160, 120], fill=(20, 20, 50))
    return img


def ocean_waves() -> Image.Image:
    img = vertical_gradient((160, 100), (150, 210, 250), (10, 60, 140))
    draw = ImageDraw.Draw(img)
    for row in range(4):
        y0 = 40 + row * 15
        pts = [(x, y0 + 5 * math.sin((x + row * 9) / 8)) for x in range(0, 161, 4)]
        draw.line(pts, fill=(235, 245, 255), width=2)
    return img


def night_sky() -> Image.Image:
    img = Image.new("RGB", (128, 96), (10, 12, 40))
    draw = ImageDraw.Draw(img)
    for i in range(30):  # a fixed, pseudo-random star field
        x, y = (i * 37) % 128, (i * 53) % 70
        draw.point([(x, y), (x + 1, y)], fill=(255, 255, 210))
    draw.ellipse([92, 8, 116, 32], fill=(245, 245, 220))
    draw.ellipse([100, 6, 122, 28], fill=(10, 12, 40))  # crescent moon
    draw.polygon([(0, 96), (40, 60), (80, 96)], fill=(25, 30, 25))
    return img


def checkerboard() -> Image.Image:
    img = Image.new("L", (96, 96), 255)
    draw = ImageDraw.Draw(img)
    for r in range(8):
        for c in range(8):
            if (r + c) % 2:
                draw.rectangle([c * 12, r * 12, c * 12 + 11, r * 12 + 11], fill=0)
    return img


def rainbow_stripes() -> Image.Image:
    colors = [
        (228, 3, 3),
        (255, 140, 0),
        (255, 237, 0),
        (0, 128, 38),
        (36, 64, 142),
        (115, 41, 130),
    ]
    img = Image.new("RGB", (120, 90))
    draw = ImageDraw.Draw(img)
    for i, col in enumerate(colors):
        draw.rectangle([0, i * 15, 120, i * 15 + 14], fill=col)
    return img


def stop_sign() -> Image.Image:
    size = (100, 100)
    img = Image.new("RGB", size, (200, 220, 235))
    draw = ImageDraw.Draw(img)
    pts = [
        (
            50 + 42 * math.cos(math.radians(22.5 + 45 * k)),
            50 + 42 * math.sin(math.radians(22.5 + 45 * k)),
        )
        for k in range(8)
    ]
    draw.polygon(pts, fill=(200, 20, 30), outline="white", width=3)
    centered_text(draw, size, "STOP", "white", px=20)
    return img


def hello_world_text() -> Image.Image:
    size = (140, 60)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([2, 2, 137, 57], outline=(60, 60, 60))
    centered_text(draw, size, "Hello, world!", (0, 0, 0), px=16)
    return img


def warning_sign() -> Image.Image:
    size = (110, 100)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.polygon([(55, 6), (104, 94), (6, 94)], fill=(255, 205, 0), outline="black", width=3)
    draw.rectangle([51, 36, 59, 70], fill="black")
    draw.ellipse([50, 76, 60, 86], fill="black")
    return img


def bar_chart() -> Image.Image:
    img = Image.new("RGB", (140, 100), "white")
    draw = ImageDraw.Draw(img)
    draw.line([(15, 88), (135, 88)], fill="black")
    draw.line([(15, 88), (15, 8)], fill="black")
    for i, h in enumerate([30, 55, 42, 70, 20]):
        x = 24 + i * 22
        draw.rectangle([x, 88 - h, x + 14, 87], fill=(70, 130, 180))
    draw.text((20, 2), "Sales", fill="black", font=font(10))
    return img


def smiley_face() -> Image.Image:
    img = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.ellipse([6, 6, 90, 90], fill=(255, 215, 0, 255), outline=(0, 0, 0, 255), width=2)
    draw.ellipse([30, 30, 40, 42], fill=(0, 0, 0, 255))
    draw.ellipse([56, 30, 66, 42], fill=(0, 0, 0, 255))
    draw.arc([26, 40, 70, 74], start=20, end=160, fill=(0, 0, 0, 255), width=3)
    return img


def house() -> Image.Image:
    img = Image.new("RGB", (120, 100), (170, 215, 250))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 86, 120, 100], fill=(80, 170, 60))
    draw.rectangle([30, 50, 90, 88], fill=(210, 180, 140), outline="black")
    draw.polygon([(24, 52), (60, 20), (96, 52)], fill=(150, 40, 40), outline="black")
    draw.rectangle([54, 66, 66, 88], fill=(100, 60, 30))
    draw.rectangle([36, 58, 48, 70], fill=(250, 250, 200), outline="black")
    draw.rectangle([72, 58, 84, 70], fill=(250, 250, 200), outline="black")
    return img


def tree() -> Image.Image:
    img = Image.new("RGB", (90, 120), (235, 245, 255))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 108, 90, 120], fill=(90, 160, 70))
    draw.rectangle([39, 70, 51, 110], fill=(110, 70, 35))
    draw.ellipse([12, 14, 78, 80], fill=(30, 130, 50))
    return img


def traffic_light() -> Image.Image:
    img = Image.new("RGB", (64, 128), (210, 225, 240))
    draw = ImageDraw.Draw(img)
    draw.rounded_rectangle([14, 6, 50, 122], radius=8, fill=(35, 35, 35))
    for i, col in enumerate([(230, 30, 30), (90, 70, 0), (0, 70, 20)]):
        draw.ellipse([21, 12 + i * 37, 43, 34 + i * 37], fill=col)
    return img


def concentric_rings() -> Image.Image:
    img = Image.new("RGB", (100, 100), "white")
    draw = ImageDraw.Draw(img)
    for i, col in enumerate(
        [(0, 0, 0), (255, 255, 255), (200, 0, 0), (255, 255, 255), (200, 0, 0)]
    ):
        r = 46 - i * 9
        draw.ellipse([50 - r, 50 - r, 50 + r, 50 + r], fill=col)
    return img


def grayscale_ramp() -> Image.Image:
    img = Image.new("L", (128, 48))
    draw = ImageDraw.Draw(img)
    for x in range(128):
        draw.line([(x, 0), (x, 48)], fill=x * 2)
    return img


def purple_diamond() -> Image.Image:
    img = horizontal_gradient((100, 100), (250, 240, 255), (220, 200, 240))
    ImageDraw.Draw(img).polygon([(50, 6), (94, 50), (50, 94), (6, 50)], fill=(120, 40, 170))
    return img


def yellow_star() -> Image.Image:
    img = Image.new("RGB", (100, 100), (20, 30, 90))
    pts = []
    for k in range(10):
        r = 44 if k % 2 == 0 else 18
        a = math.radians(-90 + 36 * k)
        pts.append((50 + r * math.cos(a), 52 + r * math.sin(a)))
    ImageDraw.Draw(img).polygon(pts, fill=(255, 220, 0))
    return img


def open_sign() -> Image.Image:
    size = (120, 56)
    img = Image.new("RGB", size, (20, 20, 20))
    draw = ImageDraw.Draw(img)
    draw.rounded_rectangle([4, 4, 115, 51], radius=10, outline=(255, 60, 120), width=3)
    centered_text(draw, size, "OPEN", (255, 90, 150), px=22)
    return img


def arrow_right() -> Image.Image:
    img = Image.new("RGB", (120, 64), "white")
    ImageDraw.Draw(img).polygon(
        [(8, 24), (72, 24), (72, 8), (112, 32), (72, 56), (72, 40), (8, 40)], fill=(0, 120, 110)
    )
    return img


def pie_chart() -> Image.Image:
    img = Image.new("RGB", (100, 100), "white")
    draw = ImageDraw.Draw(img)
    start = -90.0
    for share, col in [(0.5, (66, 133, 244)), (0.3, (234, 67, 53)), (0.2, (251, 188, 5))]:
        end = start + 360 * share
        draw.pieslice([8, 8, 92, 92], start=start, end=end, fill=col, outline="white")
        start = end
    return img


def mountain_landscape() -> Image.Image:
    img = vertical_gradient((160, 100), (120, 180, 240), (220, 235, 250))
    draw = ImageDraw.Draw(img)
    draw.polygon([(0, 100), (50, 30), (100, 100)], fill=(100, 100, 110))
    draw.polygon([(40, 44), (50, 30), (60, 44), (50, 40)], fill="white")
    draw.polygon([(60, 100), (115, 40), (160, 90), (160, 100)], fill=(80, 85, 95))
    draw.rectangle([0, 92, 160, 100], fill=(60, 130, 60))
    return img


def blinking_dot() -> list[Image.Image]:
    frames = []
    for col in [(230, 30, 30), (255, 255, 255)]:
        img = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(img).ellipse([16, 16, 48, 48], fill=col, outline=(120, 120, 120))
        frames.append(img)
    return frames


# (file name, Pillow format, save options, draw function)
ImageSpec = tuple[str, str, dict, Callable[[], Image.Image | list[Image.Image]]]

IMAGE_SPECS: list[ImageSpec] = [
    ("red-circle.png", "PNG", {}, red_circle),
    ("blue-square.png", "PNG", {}, blue_square),
    ("green-triangle.gif", "GIF", {}, green_triangle),
    ("sunset-gradient.jpg", "JPEG", {"quality": 80}, sunset_gradient),
    ("ocean-waves.jpg", "JPEG", {"quality": 75}, ocean_waves),
    ("night-sky.webp", "WEBP", {"quality": 80, "method": 6}, night_sky),
    ("checkerboard-gray.png", "PNG", {}, checkerboard),
    ("rainbow-stripes.gif", "GIF", {}, rainbow_stripes),
    ("stop-sign.jpg", "JPEG", {"quality": 85}, stop_sign),
    ("hello-world-text.png", "PNG", {}, hello_world_text),
    ("warning-sign.webp", "WEBP", {"lossless": True}, warning_sign),
    ("bar-chart.png", "PNG", {}, bar_chart),
    ("smiley-face-transparent.png", "PNG", {}, smiley_face),
    ("house.gif", "GIF", {}, house),
    ("tree.webp", "WEBP", {"quality": 75, "method": 6}, tree),
    ("traffic-light.jpg", "JPEG", {"quality": 80}, traffic_light),
    ("concentric-rings.webp", "WEBP", {"lossless": True}, concentric_rings),
    ("grayscale-ramp.jpeg", "JPEG", {"quality": 80}, grayscale_ramp),
    ("purple-diamond.png", "PNG", {}, purple_diamond),
    ("yellow-star.gif", "GIF", {}, yellow_star),
    ("open-sign.jpg", "JPEG", {"quality": 85}, open_sign),
    ("arrow-right.webp", "WEBP", {"quality": 80, "method": 6}, arrow_right),
    ("pie-chart.png", "PNG", {}, pie_chart),
    ("mountain-landscape.jpg", "JPEG", {"quality": 75}, mountain_landscape),
    ("blinking-dot-animated.gif", "GIF", {}, blinking_dot),
    # Extension lies about the format: batchrunner must sniff the bytes.
    ("mislabeled-really-png.jpg", "PNG", {}, yellow_star),
    ("mislabeled-really-webp.png", "WEBP", {"quality": 80, "method": 6}, house),
]

NOT_AN_IMAGE = "not-an-image.jpg"
NOT_AN_IMAGE_TEXT = "This is a plain text file pretending to be a JPEG image.\n"

MAX_IMAGE_BYTES = 8 * 1024


def save_image(name: str, fmt: str, options: dict, draw: Callable) -> None:
    drawn = draw()
    path = IMAGES / name
    if isinstance(drawn, list):  # animated GIF
        drawn[0].save(
            path, fmt, save_all=True, append_images=drawn[1:], duration=500, loop=0, **options
        )
        return
    if fmt == "JPEG" and drawn.mode not in ("RGB", "L"):
        drawn = drawn.convert("RGB")
    if fmt == "GIF" and drawn.mode == "RGB":
        drawn = drawn.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    drawn.save(path, fmt, **options)


def write_images() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    for old in sorted(IMAGES.iterdir()):
        if old.is_file():
            old.unlink()
    for name, fmt, options, draw in IMAGE_SPECS:
        save_image(name, fmt, options, draw)
        size = (IMAGES / name).stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise SystemExit(f"{name} is {size} bytes, over {MAX_IMAGE_BYTES}")
    (IMAGES / NOT_AN_IMAGE).write_bytes(NOT_AN_IMAGE_TEXT.encode())


# --------------------------------------------------------------------------
# job lines


def dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False)


def image_block(file: str) -> dict:
    return {"type": "image", "source": {"type": "path", "path": f"images/{file}"}}


def text_block(text: str) -> dict:
    return {"type": "text", "text": text}


def caption_messages(file: str) -> list[dict]:
    return [{"role": "user", "content": [image_block(file), text_block(CAPTION_PROMPT)]}]


def native_caption(custom_id: str, file: str) -> dict:
    return {
        "custom_id": custom_id,
        "instruction": CAPTION_SYSTEM,
        "messages": caption_messages(file),
        "temperature": 0.2,
    }


def batches_caption(custom_id: str, file: str) -> dict:
    return {
        "custom_id": custom_id,
        "params": {
            "model": MODEL,
            "system": CAPTION_SYSTEM,
            "max_tokens": 200,
            "messages": caption_messages(file),
            "temperature": 0.2,
        },
    }


def caption_jobs() -> list[dict]:
    jobs = []
    for i, (name, *_rest) in enumerate(IMAGE_SPECS):
        custom_id = "caption-" + name.rsplit(".", 1)[0]
        # every fifth job, and the mislabeled ones, in Message Batches shape
        if i % 5 == 4 or name.startswith("mislabeled"):
            jobs.append(batches_caption(custom_id, name))
        else:
            jobs.append(native_caption(custom_id, name))
    return jobs


SUMMARY_TEXT = (
    "The city council met on Tuesday to discuss the new bike lanes on Main Street. "
    "Supporters said the lanes made cycling safer and brought more customers to local shops. "
    "Opponents complained about the loss of forty parking spaces. The council voted 5 to 2 "
    "to keep the lanes and to review parking again in six months."
)

EVAL_PROMPTS: list[str] = [
    # arithmetic
    "What is 17 * 23? Answer with the number only.",
    "What is 1001 - 457? Answer with the number only.",
    "What is 144 divided by 12? Answer with the number only.",
    "What is 2 to the power of 10? Answer with the number only.",
    "What is 15% of 240? Answer with the number only.",
    "What is the sum of the integers from 1 to 100? Answer with the number only.",
    # reasoning
    "A bat and a ball cost $1.10 in total. The bat costs $1.00 more than the ball. "
    "How much does the ball cost, in cents? Answer with the number only.",
    "If all bloops are razzies and all razzies are lazzies, are all bloops lazzies? Answer yes or no.",
    "Alice is taller than Bob. Bob is taller than Carol. Who is the shortest? Answer with the name only.",
    "A train leaves at 14:50 and the trip takes 1 hour 25 minutes. At what time does it arrive (HH:MM)?",
    "I have 3 apples, eat one, then buy a dozen more. How many apples do I have? Answer with the number only.",
    "What comes next in the sequence 2, 6, 12, 20, 30, ...? Answer with the number only.",
    "If today is Wednesday, what day of the week will it be in 10 days? Answer with the day only.",
    # short factual
    "What is the chemical symbol for gold?",
    "What is the capital of Australia? Answer with the city only.",
    "How many continents are there on Earth, by the most common convention? Answer with the number only.",
    "What is the boiling point of water at sea level in degrees Celsius? Answer with the number only.",
    "Who wrote the play 'Romeo and Juliet'? Answer with the name only.",
    "What is the largest planet in the Solar System? Answer with one word.",
    "How many sides does a hexagon have? Answer with the number only.",
    # summarisation
    "Summarise the following in one sentence:\n\n" + SUMMARY_TEXT,
    "Give three keywords (comma-separated) for this text:\n\n" + SUMMARY_TEXT,
    "Summarise in at most ten words: 'The quick brown fox jumps over the lazy dog' is a sentence "
    "that contains every letter of the English alphabet and is used to test typewriters and fonts.",
    "Rewrite this as a single short headline: 'Scientists have found that regular walking of "
    "thirty minutes a day lowers the risk of heart disease by a fifth, a ten-year study reports.'",
    "Translate to French and give only the translation: 'The library opens at nine.'",
    "Classify the sentiment of this review as positive, negative or neutral: "
    "'The food was cold and the waiter ignored us.' Answer with one word.",
]


def eval_jobs() -> list[dict]:
    jobs = []
    for i, prompt in enumerate(EVAL_PROMPTS):
        custom_id = f"eval-{i + 1:03d}"
        # content as a plain string on even jobs, as a text block on odd ones
        content: str | list[dict] = prompt if i % 2 == 0 else [text_block(prompt)]
        messages = [{"role": "user", "content": content}]
        if i % 3 == 2:  # every third job in Message Batches shape
            jobs.append(
                {
                    "custom_id": custom_id,
                    "params": {
                        "model": MODEL,
                        "system": EVAL_SYSTEM,
                        "max_tokens": 256,
                        "messages": messages,
                        "temperature": 0,
                    },
                }
            )
        else:
            jobs.append(
                {
                    "custom_id": custom_id,
                    "instruction": EVAL_SYSTEM,
                    "messages": messages,
                    "temperature": 0,
                }
            )
    return jobs


def text_job(custom_id: str, prompt: str) -> dict:
    return {
        "custom_id": custom_id,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
    }


# (raw line, what batchrunner should make of it)
BROKEN_LINES: list[tuple[str, str]] = [
    (dumps(text_job("good-text", "What is 2 + 2? Answer with the number only.")), "good: succeeds"),
    (
        '{"custom_id": "bad-json", "messages": [{"role": "user", "content": "hi"}',
        "invalid JSON (truncated): `invalid_job`, custom_id `line-2`",
    ),
    (
        dumps([text_job("bad-array", "An array is not a job.")]),
        "a JSON array, not an object: `invalid_job`, custom_id `line-3`",
    ),
    (
        dumps({"custom_id": "bad-no-messages", "instruction": "Be brief.", "temperature": 0}),
        "`messages` missing: `invalid_job`",
    ),
    ("", "blank line: skipped, no result"),
    (
        dumps(batches_caption("good-image", "red-circle.png")),
        "good (Message Batches shape, image path): succeeds",
    ),
    (
        dumps(
            {
                "custom_id": "bad-system-role",
                "messages": [
                    {"role": "system", "content": "You are a pirate."},
                    {"role": "user", "content": "Say hello."},
                ],
                "temperature": 0,
            }
        ),
        "a message with role `system`: `invalid_job`",
    ),
    (
        dumps(native_caption("bad-missing-image", "does-not-exist.png")),
        "image path that does not exist: `invalid_job`",
    ),
    (
        dumps(native_caption("bad-not-an-image", NOT_AN_IMAGE)),
        "text file named `.jpg`: `invalid_job` (media type comes from bytes)",
    ),
    (
        dumps(text_job("good-text", "This line reuses an earlier custom_id.")),
        "duplicate custom_id `good-text`: `invalid_job` for this line; line 1 is unaffected",
    ),
    (
        dumps(text_job("bad-temperature", "Say hello.") | {"temperature": 3}),
        "`temperature: 3` (allowed 0 to 1): `invalid_job`",
    ),
    (
        dumps(
            {
                "custom_id": "good-native-blocks",
                "instruction": EVAL_SYSTEM,
                "messages": [{"role": "user", "content": [text_block("Name a primary colour.")]}],
                "temperature": 0,
            }
        ),
        "good: succeeds",
    ),
]


def write_jsonl(name: str, lines: list[str]) -> None:
    (HERE / name).write_bytes("".join(line + "\n" for line in lines).encode())


# --------------------------------------------------------------------------
# README


def readme(captions: list[dict], evals: list[dict]) -> str:
    n_img = len(IMAGE_SPECS)
    n_cap_batches = sum("params" in j for j in captions)
    n_eval_batches = sum("params" in j for j in evals)
    broken_rows = "\n".join(
        f"| {n} | {what} |" for n, (_line, what) in enumerate(BROKEN_LINES, start=1)
    )
    return f"""# Sample jobs

Example inputs for `batchrunner`, all generated by `make_samples.py`
(do not edit by hand; change the script and rerun it).

| file | what it is |
|---|---|
| `images/` | {n_img} small images drawn with Pillow (JPEG, PNG, GIF incl. one animated, WebP lossy and lossless, grayscale, RGBA), each under 8 KB; `mislabeled-really-png.jpg` and `mislabeled-really-webp.png` have extensions that lie about their format; `not-an-image.jpg` is a text file |
| `captions.jsonl` | {len(captions)} image-caption jobs, one per image, images given by `path` relative to this folder; {n_cap_batches} in Message Batches shape (`params`), the rest Segmind native, `temperature: 0.2` |
| `eval.jsonl` | {len(evals)} text-only evaluation prompts (arithmetic, reasoning, short facts, summarisation), `eval-001`...; {n_eval_batches} in Message Batches shape; `content` a string in odd-numbered jobs and text blocks in even ones; `temperature: 0` |
| `broken.jsonl` | {len(BROKEN_LINES)} lines: 3 good jobs, one blank line, and one of each kind of broken line (table below) |
| `make_samples.py` | regenerates everything above, byte for byte |

Try them without an API key:

```
python -m batchrunner sample_jobs/captions.jsonl --simulate
python -m batchrunner sample_jobs/eval.jsonl --simulate
python -m batchrunner sample_jobs/broken.jsonl --simulate   # exits 1: some jobs errored
```

Regenerate (deterministic; needs Pillow):

```
python sample_jobs/make_samples.py
```

## `broken.jsonl`, line by line

| line | expected outcome |
|---|---|
{broken_rows}
"""


def main() -> None:
    write_images()
    captions = caption_jobs()
    evals = eval_jobs()
    write_jsonl("captions.jsonl", [dumps(j) for j in captions])
    write_jsonl("eval.jsonl", [dumps(j) for j in evals])
    write_jsonl("broken.jsonl", [line for line, _what in BROKEN_LINES])
    (HERE / "README.md").write_bytes(readme(captions, evals).encode())
    print(
        f"wrote {len(IMAGE_SPECS) + 1} images, {len(captions)} captions, "
        f"{len(evals)} eval jobs, {len(BROKEN_LINES)} broken.jsonl lines to {HERE}"
    )


if __name__ == "__main__":
    main()
