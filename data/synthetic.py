"""Synthetic benchmark: small medical-VQA scans whose answers are fixed by the pixels.

Med-Evo (arXiv 2603.07443) adapts a vision-language model at test time on an
unlabeled, *shifted* test set. To run that loop end to end on a CPU we need a
benchmark where (1) a tiny Qwen2.5-VL can learn something in minutes, (2) every
answer is determined by the image, and (3) the test images come from a different
"scanner" than the training images. This module writes one, in SLAKE's exact
on-disk format so that data/slake.py reads it:

    OUT/imgs/xmlab0/source.jpg         one 112x112 greyscale scan (stored as RGB JPEG)
    OUT/imgs/xmlab0/detection.json     SLAKE-style boxes: [{"liver": [x, y, w, h]}, ...]
    OUT/train.json                     source domain, labels used only to warm-start
    OUT/validate.json                  held-out split, source domain (does the base model see?)
    OUT/test.json                      target domain: the unlabeled set Med-Evo adapts to (reported tables only)
    OUT/dev.json                       target domain, other images: for choosing adaptation hyperparameters
    OUT/generator.json                 the arguments that produced the folder

    python -m data.synthetic --out DIR --seed 0 [--n-source-images 3000 --n-target-images 144 ...]

The world. Six scan types: chest X-Ray, chest CT, abdomen CT, abdomen MRI, head
CT, head MRI. Each modality has its own look, as real scans do:
  CT     dark air, a round body with a bright skin/bone ring, bright spine, dark lungs;
  MRI    no bright ring (cortical bone is dark), softer grey tones, a smooth
         intensity gradient across the image (coil bias field), slightly blurred;
  X-Ray  a frontal projection filling the frame: two tall dark lungs crossed by
         bright rib lines, a bright mediastinum/spine band, a bright heart shadow.
Organs sit where anatomy puts them, in the radiological convention: the image is
viewed from the patient's feet (axial) or front (X-Ray), so the PATIENT'S LEFT IS
THE IMAGE'S RIGHT. "left lung", "left kidney", "left hemisphere" are the patient's
and are drawn on the right half of the image; the liver (patient's right) is on
the image's upper left, the spleen on its upper right.

Findings: 40% of scans are normal; the others have one finding, either one or two
lesions (round blobs 11-17 px across at 112 px, about one 14-px ViT patch; bright
in lungs and on MRI, dark in the CT liver/kidney) in one organ, or an enlarged
heart (cardiomegaly, chest scans; heart width about 0.6 of the chest instead of
0.4). Some abdomens miss a kidney. Disease names follow the organ: lung ->
nodule, liver -> tumor, kidney -> cyst, brain -> tumor.

Questions copy SLAKE's wording and content types (Modality, Plane, Organ,
Position, Abnormality, Quantity, Size); CLOSED questions are yes/no and about half
the questions are CLOSED. Answers come from a vocabulary of 35 canonical phrases,
each with surface forms in PARAPHRASES (used by the warm start, so that sampled
answers vary in form as a real model's do).

Domains. Every image has its own patient size/position (scale, shift). Source
images (train, validate) use each modality's base look with +-10% contrast and
gamma jitter and mild noise. Target images (test, dev) come from a different
"scanner": anatomy about 5% larger (smaller field of view), a gamma curve and a
raised black level (washed-out contrast), more blur and about 3x the noise.
Findings stay visible, so the questions remain answerable. Calibration (a 1-block
ViT with 14-px patches trained from scratch on 2000 source images, two seeds):
source -> target accuracy, modality 100% -> 96%, body part 100% -> 90%, abnormal
or not 79% -> 72%, finding site 62% -> 52%: noticeably worse, far from useless.

Everything is a function of (seed, image index): the same seed gives byte-
identical files. The folder is written to a temporary sibling and renamed into
place at the end, so a half-written folder never passes for a finished one.
"""

import argparse
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from . import load_split

# -----------------------------------------------------------------------------
# the world: scan types, organs, findings

SCAN_TYPES = [  # (modality, body part, probability)
    ("X-Ray", "chest", 0.25), ("CT", "chest", 0.15), ("CT", "abdomen", 0.20),
    ("MRI", "abdomen", 0.15), ("CT", "head", 0.10), ("MRI", "head", 0.15),
]
MODALITIES = ("CT", "MRI", "X-Ray")
BODY_PARTS = ("chest", "abdomen", "head")
LOCATION = {"chest": "Lung", "abdomen": "Abdomen", "head": "Brain"}  # SLAKE's "location" field
PLANE = {"X-Ray": "coronal plane", "CT": "transverse plane", "MRI": "transverse plane"}
ORGANS = {  # organs named in questions, per body part (generic names)
    "chest": ("lung", "heart"), "abdomen": ("liver", "spleen", "kidney"), "head": ("brain",),
}
LARGEST_ORGAN = {"chest": "lung", "abdomen": "liver", "head": "brain"}
ORGAN_OF_SITE = {
    "left lung": "lung", "right lung": "lung", "liver": "liver", "left kidney": "kidney",
    "right kidney": "kidney", "left hemisphere": "brain", "right hemisphere": "brain", "heart": "heart",
}
DETECTED = ("left lung", "right lung", "heart", "liver", "spleen", "left kidney", "right kidney", "brain", "lesion")
DISEASE = {"lung": "nodule", "liver": "tumor", "kidney": "cyst", "brain": "tumor", "heart": "cardiomegaly"}
P_NORMAL = 0.4
P_CARDIOMEGALY = 0.4  # among abnormal chest scans; the rest have lung lesions
P_TWO_LESIONS = 0.3  # for the liver and lungs on CT
P_MISSING_KIDNEY = 0.2
SOURCE_SCALE = (0.90, 1.02)  # patient size / field of view, per image
TARGET_SCALE = (1.00, 1.08)  # the target scanner's smaller field of view: anatomy looks ~5% larger
MAX_SHIFT = 0.03  # patient position in the field of view

# the benchmark's size (the defaults of write_synthetic and of the CLI)
N_SOURCE_IMAGES = 3000  # train: labelled, source scanner, used only by the warm start
N_VALIDATE_IMAGES = 100  # validate: held out, source scanner
N_TARGET_IMAGES = 144  # test: the unlabeled target-scanner split Med-Evo adapts to (>= 7 x 144 = 1008 questions)
N_DEV_IMAGES = 144  # dev: target scanner, other images, for choosing adaptation hyperparameters
IMAGE_SIZE = 112
SPLITS = ("train", "validate", "test", "dev")

# intensities in [0, 1] of each structure, per scan type
PALETTE = {
    ("X-Ray", "chest"): {"background": 0.08, "torso": 0.55, "lung": 0.13, "rib": 0.32, "spine": 0.80,
                         "heart": 0.76, "lesion": 0.72},
    ("CT", "chest"): {"background": 0.03, "ring": 0.92, "body": 0.42, "lung": 0.07, "heart": 0.60,
                      "spine": 0.95, "sternum": 0.90, "lesion": 0.72},
    ("CT", "abdomen"): {"background": 0.03, "ring": 0.92, "body": 0.36, "liver": 0.62, "spleen": 0.55,
                        "kidney": 0.74, "spine": 0.95, "aorta": 0.66, "gas": 0.05, "liver lesion": 0.20,
                        "kidney lesion": 0.16},
    ("MRI", "abdomen"): {"background": 0.04, "fat": 0.62, "body": 0.42, "liver": 0.27, "spleen": 0.50,
                         "kidney": 0.58, "spine": 0.30, "aorta": 0.08, "gas": 0.06, "liver lesion": 0.92,
                         "kidney lesion": 0.95},
    ("CT", "head"): {"background": 0.03, "skull": 0.95, "brain": 0.42, "ventricle": 0.16, "lesion": 0.80},
    ("MRI", "head"): {"background": 0.03, "scalp": 0.70, "skull": 0.12, "brain": 0.52, "white matter": 0.66,
                      "ventricle": 0.20, "lesion": 0.95},
}


def organ_name(site):
    return ORGAN_OF_SITE[site]


def side_of(site):
    """'left'/'right' (the patient's side) for a paired site, else None."""
    first = site.split()[0]
    return first if first in ("left", "right") else None


def image_x(side, offset):
    """x of a structure `offset` from the midline on the patient's `side` (patient's left = image right)."""
    return 0.5 + offset if side == "left" else 0.5 - offset


# -----------------------------------------------------------------------------
# scenes: a list of ellipses to paint, plus the findings they show

def ellipse(name, cx, cy, rx, ry, value, angle=0.0):
    return {"name": name, "cx": cx, "cy": cy, "rx": rx, "ry": ry, "angle": angle, "value": value}


def inside(organ, x, y, margin):
    """Is the point (x, y) inside `organ` shrunk by `margin` on each side?"""
    return ((x - organ["cx"]) / (organ["rx"] - margin)) ** 2 + ((y - organ["cy"]) / (organ["ry"] - margin)) ** 2 <= 1.0


def lesion_fits(organ, lesion, placed, avoid):
    """Inside the organ, clear of the lesions already placed and of the `avoid` shapes."""
    x, y, r = lesion["cx"], lesion["cy"], lesion["rx"]
    apart = all((x - o["cx"]) ** 2 + (y - o["cy"]) ** 2 >= (2.3 * max(r, o["rx"])) ** 2 for o in placed)
    clear = all(((x - o["cx"]) / (o["rx"] + r)) ** 2 + ((y - o["cy"]) / (o["ry"] + r)) ** 2 > 1.0 for o in avoid)
    return inside(organ, x, y, 1.15 * r) and apart and clear


def place_lesions(rng, organ, n, radius_range, x_range, y_range, value, avoid=()):
    """n round lesions fully inside `organ`, centres in the given ranges, clear of each other and of `avoid`.

    Rejection sampling of the whole group (placing one at a time can paint the second into a corner).
    """
    for _ in range(10000):
        lesions = []
        for _ in range(n):
            r = rng.uniform(*radius_range)
            lesion = ellipse("lesion", rng.uniform(*x_range), rng.uniform(*y_range), r, r, value)
            if not lesion_fits(organ, lesion, lesions, avoid):
                break
            lesions.append(lesion)
        if len(lesions) == n:
            return lesions
    raise RuntimeError(f"synthetic: could not place {n} lesions in {organ['name']} (generator bug)")


def draw_findings(rng, modality, body_part):
    """What is wrong with this patient (independent of how it will be drawn)."""
    findings = {"abnormality": None, "site": None, "n_lesions": 0, "zone": None, "missing_kidney": None}
    if body_part == "abdomen" and rng.random() < P_MISSING_KIDNEY:
        findings["missing_kidney"] = rng.choice(["left kidney", "right kidney"])
    if rng.random() < P_NORMAL:
        return findings
    if body_part == "chest" and rng.random() < P_CARDIOMEGALY:
        findings.update(abnormality="cardiomegaly", site="heart")
        return findings
    if body_part == "chest":
        site = rng.choice(["left lung", "right lung"])
    elif body_part == "abdomen":
        kidneys = [k for k in ("left kidney", "right kidney") if k != findings["missing_kidney"]]
        site = "liver" if rng.random() < 0.5 else rng.choice(kidneys)
    else:
        site = rng.choice(["left hemisphere", "right hemisphere"])
    roomy = site == "liver" or (organ_name(site) == "lung" and modality == "CT")  # room for two lesions
    two = roomy and rng.random() < P_TWO_LESIONS
    findings.update(abnormality="lesion", site=site, n_lesions=2 if two else 1,
                    zone=rng.choice(["upper", "lower"]))
    return findings


def jittered(rng, value, amount=0.03):
    return value + rng.uniform(-amount, amount)


def lung_lesions(rng, lung, side, n, zone, value, heart):
    """Lesions in the outer two thirds of a lung, clear of the heart; for X-Rays in its upper or lower half."""
    inner = lung["cx"] - 0.3 * lung["rx"] if side == "left" else lung["cx"] + 0.3 * lung["rx"]
    outer = lung["cx"] + lung["rx"] if side == "left" else lung["cx"] - lung["rx"]
    if zone is None:
        y_range = (lung["cy"] - lung["ry"], lung["cy"] + lung["ry"])
    elif zone == "upper":
        y_range = (lung["cy"] - lung["ry"], lung["cy"] - 0.15 * lung["ry"])
    else:
        y_range = (lung["cy"] + 0.1 * lung["ry"], lung["cy"] + 0.7 * lung["ry"])
    return place_lesions(rng, lung, n, (0.06, 0.075), sorted((inner, outer)), y_range, value, avoid=[heart])


def chest_xray(rng, findings, palette):
    """Frontal chest radiograph: dark lungs with rib lines, bright spine band and heart shadow."""
    c = {k: jittered(rng, v) for k, v in palette.items()}
    shapes = [ellipse("torso", 0.5, 0.62, 0.50, 0.62, c["torso"])]
    lungs = {}
    for side in ("right", "left"):
        lung = ellipse(f"{side} lung", image_x(side, jittered(rng, 0.19, 0.01)), jittered(rng, 0.45, 0.02),
                       jittered(rng, 0.14, 0.01), jittered(rng, 0.27, 0.015), c["lung"])
        lungs[side] = lung
        shapes.append(lung)
    for side, lung in lungs.items():
        tilt = 0.35 if side == "left" else -0.35  # posterior ribs slope down laterally
        for k in range(5):
            y = lung["cy"] - 0.75 * lung["ry"] + k * 0.35 * lung["ry"]
            shapes.append(ellipse("rib", lung["cx"], y, 0.8 * lung["rx"], 0.011, c["rib"], tilt))
    shapes.append(ellipse("spine", 0.5, 0.60, 0.045, 0.62, c["spine"]))
    heart_rx = rng.uniform(0.19, 0.21) if findings["abnormality"] == "cardiomegaly" else rng.uniform(0.12, 0.14)
    heart = ellipse("heart", 0.55, jittered(rng, 0.68, 0.01), heart_rx, 0.11, c["heart"])
    shapes.append(heart)
    if findings["abnormality"] == "lesion":
        side = side_of(findings["site"])
        shapes += lung_lesions(rng, lungs[side], side, findings["n_lesions"], findings["zone"], c["lesion"], heart)
    return c["background"], shapes


def ct_body(rng, c):
    """Round body outline: a bright skin/bone ring around soft tissue."""
    rx, ry = jittered(rng, 0.44, 0.02), jittered(rng, 0.36, 0.02)
    return [ellipse("ring", 0.5, 0.5, rx, ry, c["ring"]), ellipse("body", 0.5, 0.5, rx - 0.04, ry - 0.04, c["body"])]


def chest_ct(rng, findings, palette):
    """Axial chest CT (anterior up): dark lungs, heart between them toward the patient's left, spine below."""
    c = {k: jittered(rng, v) for k, v in palette.items()}
    shapes = ct_body(rng, c)
    lungs = {}
    for side in ("right", "left"):
        lung = ellipse(f"{side} lung", image_x(side, jittered(rng, 0.19, 0.01)), jittered(rng, 0.49, 0.015),
                       jittered(rng, 0.15, 0.01), jittered(rng, 0.22, 0.015), c["lung"])
        lungs[side] = lung
        shapes.append(lung)
    big = findings["abnormality"] == "cardiomegaly"
    heart_rx = rng.uniform(0.15, 0.16) if big else rng.uniform(0.095, 0.105)
    heart = ellipse("heart", 0.55, 0.43, heart_rx, 0.13 if big else 0.10, c["heart"])
    shapes.append(heart)
    shapes.append(ellipse("spine", 0.5, 0.75, 0.055, 0.055, c["spine"]))
    shapes.append(ellipse("sternum", 0.5, 0.2, 0.03, 0.02, c["sternum"]))
    if findings["abnormality"] == "lesion":
        side = side_of(findings["site"])
        shapes += lung_lesions(rng, lungs[side], side, findings["n_lesions"], None, c["lesion"], heart)
    return c["background"], shapes


def abdomen(rng, findings, palette, modality):
    """Axial abdomen: liver upper left of the image, spleen upper right, kidneys beside the spine."""
    c = {k: jittered(rng, v) for k, v in palette.items()}
    if modality == "CT":
        shapes = ct_body(rng, c)
    else:
        rx, ry = jittered(rng, 0.44, 0.02), jittered(rng, 0.36, 0.02)
        shapes = [ellipse("fat", 0.5, 0.5, rx, ry, c["fat"]),  # MRI: bright fat rim, no bone ring
                  ellipse("body", 0.5, 0.5, rx - 0.035, ry - 0.035, c["body"])]
    organs = {
        "liver": ellipse("liver", jittered(rng, 0.35, 0.015), jittered(rng, 0.40, 0.015),
                         jittered(rng, 0.20, 0.01), jittered(rng, 0.16, 0.01), c["liver"]),
        "spleen": ellipse("spleen", jittered(rng, 0.74, 0.015), jittered(rng, 0.42, 0.015), 0.08, 0.11, c["spleen"]),
    }
    for side in ("right", "left"):
        if findings["missing_kidney"] != f"{side} kidney":
            organs[f"{side} kidney"] = ellipse(f"{side} kidney", image_x(side, jittered(rng, 0.19, 0.01)),
                                               jittered(rng, 0.69, 0.01), 0.09, 0.105, c["kidney"])
    shapes += list(organs.values())
    shapes.append(ellipse("spine", 0.5, 0.74, 0.055, 0.055, c["spine"]))
    shapes.append(ellipse("aorta", 0.54, 0.63, 0.025, 0.025, c["aorta"]))
    for _ in range(rng.randint(2, 5)):  # bowel gas: a few dots far smaller than any lesion
        r = rng.uniform(0.012, 0.02)
        shapes.append(ellipse("gas", rng.uniform(0.44, 0.62), rng.uniform(0.52, 0.58), r, r, c["gas"]))
    if findings["abnormality"] == "lesion":
        o = organs[findings["site"]]
        if findings["site"] == "liver":
            x_range, y_range = (o["cx"] - o["rx"], o["cx"] + o["rx"]), (o["cy"] - o["ry"], o["cy"] + o["ry"])
            shapes += place_lesions(rng, o, findings["n_lesions"], (0.06, 0.075), x_range, y_range, c["liver lesion"])
        else:  # a kidney cyst, near the kidney's centre
            shapes += place_lesions(rng, o, 1, (0.052, 0.058), (o["cx"] - 0.02, o["cx"] + 0.02),
                                    (o["cy"] - 0.03, o["cy"] + 0.03), c["kidney lesion"])
    return c["background"], shapes


def head(rng, findings, palette, modality):
    """Axial head: CT has a thick bright skull; MRI a bright scalp, dark skull, grey/white matter."""
    c = {k: jittered(rng, v) for k, v in palette.items()}
    rx, ry = jittered(rng, 0.36, 0.015), jittered(rng, 0.43, 0.015)
    if modality == "CT":
        shapes = [ellipse("skull", 0.5, 0.5, rx, ry, c["skull"])]
        brain = ellipse("brain", 0.5, 0.5, rx - 0.04, ry - 0.04, c["brain"])
        shapes.append(brain)
    else:
        shapes = [ellipse("scalp", 0.5, 0.5, rx, ry, c["scalp"]),
                  ellipse("skull", 0.5, 0.5, rx - 0.03, ry - 0.03, c["skull"])]
        brain = ellipse("brain", 0.5, 0.5, rx - 0.06, ry - 0.06, c["brain"])
        shapes += [brain, ellipse("white matter", 0.5, 0.5, rx - 0.14, ry - 0.14, c["white matter"])]
    ventricles = [ellipse("ventricle", image_x(side, 0.045), 0.48, 0.028, 0.09, c["ventricle"])
                  for side in ("right", "left")]
    shapes += ventricles
    if findings["abnormality"] == "lesion":  # in the patient's left (image right) or right hemisphere
        if side_of(findings["site"]) == "left":
            x_range = (0.5 + 0.1, 0.5 + brain["rx"])
        else:
            x_range = (0.5 - brain["rx"], 0.5 - 0.1)
        y_range = (brain["cy"] - brain["ry"], brain["cy"] + brain["ry"])
        shapes += place_lesions(rng, brain, 1, (0.06, 0.075), x_range, y_range, c["lesion"], avoid=ventricles)
    return c["background"], shapes


def placed(shape, scale, dx, dy):
    """A shape scaled about the image centre, then shifted."""
    return dict(shape, cx=0.5 + scale * (shape["cx"] - 0.5) + dx, cy=0.5 + scale * (shape["cy"] - 0.5) + dy,
                rx=scale * shape["rx"], ry=scale * shape["ry"])


BLUR_PX = {"CT": 0.3, "MRI": 0.8, "X-Ray": 0.6}  # each modality's own sharpness, in pixels at 112 px


def bias_field(rng, modality, strength):
    """Linear intensity gradient (ax, ay) across the image: MRI coil shading; none on CT/X-Ray."""
    if modality != "MRI":
        return (0.0, 0.0)
    return (rng.uniform(-strength, strength), rng.uniform(-strength, strength))


def source_look(rng, modality):
    """The source scanners: each modality's base look with +-10% contrast/gamma jitter and mild noise."""
    return {"gain": rng.uniform(0.9, 1.1), "offset": rng.uniform(-0.03, 0.03), "gamma": rng.uniform(0.9, 1.1),
            "blur_px": BLUR_PX[modality] + rng.uniform(-0.1, 0.2), "noise": rng.uniform(0.008, 0.02),
            "bias_field": bias_field(rng, modality, 0.4)}


def target_look(rng, modality):
    """The target scanner: washed-out contrast (gamma < 1, raised black level), more blur, ~3x the noise."""
    return {"gain": rng.uniform(0.84, 0.90), "offset": rng.uniform(0.05, 0.08), "gamma": rng.uniform(0.70, 0.80),
            "blur_px": BLUR_PX[modality] + 0.6, "noise": 0.04, "bias_field": bias_field(rng, modality, 0.6)}


def make_scene(seed, img_id, domain):
    """The full description of image `img_id`: scan type, findings, shapes, look. Deterministic in (seed, img_id)."""
    if domain not in ("source", "target"):
        raise ValueError(f"synthetic: unknown domain {domain!r}, expected 'source' or 'target'")
    rng = random.Random(f"synthetic-scene-{seed}-{img_id}")
    modality, body_part = rng.choices([s[:2] for s in SCAN_TYPES], weights=[s[2] for s in SCAN_TYPES])[0]
    findings = draw_findings(rng, modality, body_part)
    palette = PALETTE[(modality, body_part)]
    if body_part == "chest" and modality == "X-Ray":
        background, shapes = chest_xray(rng, findings, palette)
    elif body_part == "chest":
        background, shapes = chest_ct(rng, findings, palette)
    elif body_part == "abdomen":
        background, shapes = abdomen(rng, findings, palette, modality)
    else:
        background, shapes = head(rng, findings, palette, modality)
    scale = rng.uniform(*(SOURCE_SCALE if domain == "source" else TARGET_SCALE))
    dx, dy = rng.uniform(-MAX_SHIFT, MAX_SHIFT), rng.uniform(-MAX_SHIFT, MAX_SHIFT)
    shapes = [placed(s, scale, dx, dy) for s in shapes]
    look = source_look(rng, modality) if domain == "source" else target_look(rng, modality)
    return {"img_id": img_id, "domain": domain, "modality": modality, "body_part": body_part,
            "findings": findings, "background": background, "shapes": shapes, "look": look}


# -----------------------------------------------------------------------------
# rendering

def soft_ellipse(xx, yy, shape, size):
    """Coverage in [0, 1] of each pixel by an ellipse, with a ~1 px anti-aliased edge. (S, S)"""
    cos, sin = np.cos(shape["angle"]), np.sin(shape["angle"])
    dx, dy = xx - shape["cx"], yy - shape["cy"]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    d = np.sqrt((u / shape["rx"]) ** 2 + (v / shape["ry"]) ** 2)
    return np.clip((1.0 - d) * min(shape["rx"], shape["ry"]) * size + 0.5, 0.0, 1.0)


def gaussian_blur(img, sigma_px):
    """Separable Gaussian blur with edge padding. img (S, S) float."""
    if sigma_px <= 0:
        return img
    radius = int(np.ceil(3 * sigma_px))
    t = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (t / sigma_px) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(img, radius, mode="edge")
    rows = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="valid"), 1, padded)
    return np.apply_along_axis(lambda c: np.convolve(c, kernel, mode="valid"), 0, rows)


def render(scene, size, noise_rng):
    """Greyscale uint8 image (size, size) of a scene; noise_rng is a numpy Generator."""
    centers = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(centers, centers, indexing="ij")  # (S, S) each, in [0, 1]
    img = np.full((size, size), scene["background"], dtype=np.float64)
    for shape in scene["shapes"]:
        coverage = soft_ellipse(xx, yy, shape, size)
        img += coverage * (shape["value"] - img)
    look = scene["look"]
    ax, ay = look["bias_field"]
    img = img * (1.0 + ax * (xx - 0.5) + ay * (yy - 0.5))
    img = np.clip(look["gain"] * img + look["offset"], 0.0, 1.0) ** look["gamma"]
    img = gaussian_blur(img, look["blur_px"] * size / 112)
    img = img + noise_rng.normal(0.0, look["noise"], img.shape)
    return np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def detection_boxes(scene, size):
    """SLAKE-style detection.json: [{name: [x, y, w, h]}] in pixels, for organs and lesions."""
    boxes = []
    for shape in scene["shapes"]:
        if shape["name"] in DETECTED:
            x0, y0 = (shape["cx"] - shape["rx"]) * size, (shape["cy"] - shape["ry"]) * size
            w, h = 2 * shape["rx"] * size, 2 * shape["ry"] * size
            boxes.append({shape["name"]: [round(x0), round(y0), round(w), round(h)]})
    return boxes


# -----------------------------------------------------------------------------
# questions (wording after SLAKE's)

def present_sites(scene):
    """Sites (paired organs by side) drawn in this scene."""
    if scene["body_part"] == "chest":
        return ["left lung", "right lung", "heart"]
    if scene["body_part"] == "head":
        return ["left hemisphere", "right hemisphere"]
    kidneys = [k for k in ("left kidney", "right kidney") if k != scene["findings"]["missing_kidney"]]
    return ["liver"] + kidneys


def is_abnormal(subject, findings):
    """Is this organ or site (e.g. 'lung', 'left lung', 'heart') abnormal?"""
    site = findings["site"]
    if site is None:
        return False
    return subject == site or subject == organ_name(site)


def yes_no(flag):
    return "yes" if flag else "no"


def closed_questions(scene, rng):
    """{template: (question, answer, content_type)} for the yes/no questions that apply to this scene."""
    modality, body_part, findings = scene["modality"], scene["body_part"], scene["findings"]
    out = {}

    asked = modality if rng.random() < 0.5 else rng.choice([m for m in MODALITIES if m != modality])
    wording = {"CT": "Is this a CT scan?", "MRI": "Is this an MRI scan?", "X-Ray": "Is this an X-Ray image?"}
    out["is_modality"] = (wording[asked], yes_no(asked == modality), "Modality")

    asked = rng.choice(["transverse", "coronal"])
    out["is_plane"] = (f"Is this a {asked} section?", yes_no(PLANE[modality] == f"{asked} plane"), "Plane")

    asked = body_part if rng.random() < 0.5 else rng.choice([b for b in BODY_PARTS if b != body_part])
    out["is_region"] = (f"Is this a study of the {asked}?", yes_no(asked == body_part), "Organ")

    present = ORGANS[body_part]  # at most one kidney is ever missing
    absent = [o for b in BODY_PARTS if b != body_part for o in ORGANS[b]]
    asked = rng.choice(present) if rng.random() < 0.5 else rng.choice(absent)
    out["contains"] = (f"Does the picture contain the {asked}?", yes_no(asked in present), "Organ")

    abnormal = findings["abnormality"] is not None
    wording, means_abnormal = rng.choice([("Are there abnormalities in this image?", True),
                                          ("Does the patient have any abnormalities?", True),
                                          ("Is this image normal?", False), ("Does this image look normal?", False)])
    out["abnormal_any"] = (wording, yes_no(abnormal == means_abnormal), "Abnormality")

    subjects = {"chest": ["lung", "left lung", "right lung", "heart"], "head": ["brain"],
                "abdomen": ["liver", "kidney"] + [s for s in present_sites(scene) if "kidney" in s]}[body_part]
    sick = [s for s in subjects if is_abnormal(s, findings)]
    subject = rng.choice(sick) if sick and rng.random() < 0.6 else rng.choice(subjects)
    wording, means_abnormal = rng.choice([("Is the {} healthy?", False), ("Does the {} look normal?", False),
                                          ("Is the {} abnormal?", True), ("Does the {} look abnormal?", True)])
    out["organ_health"] = (wording.format(subject), yes_no(is_abnormal(subject, findings) == means_abnormal),
                           "Abnormality")

    sites = [s for s in present_sites(scene) if s != "heart"]
    site = findings["site"] if findings["abnormality"] == "lesion" and rng.random() < 0.7 else rng.choice(sites)
    has_lesion = findings["abnormality"] == "lesion" and site == findings["site"]
    out["lesion_in_site"] = (f"Is there a lesion in the {site}?", yes_no(has_lesion), "Position")

    if body_part == "chest":
        big = findings["abnormality"] == "cardiomegaly"
        means_big = rng.random() < 0.5
        wording = rng.choice(["Is the heart enlarged?", "Does the patient have cardiomegaly?"]) if means_big \
            else "Is the heart size normal?"
        out["heart_enlarged"] = (wording, yes_no(big == means_big), "Size")
    return out


def open_questions(scene, rng):
    """{template: (question, answer, content_type)} for the open questions that apply to this scene."""
    modality, body_part, findings = scene["modality"], scene["body_part"], scene["findings"]
    site = findings["site"]
    out = {
        "modality": (rng.choice(["What modality is used to take this image?", "What kind of scan is this?",
                                 "Which imaging modality is shown?"]), modality, "Modality"),
        "plane": (rng.choice(["In what plane is this image scanned?", "What is the scanning plane of this image?"]),
                  PLANE[modality], "Plane"),
        "body_part": (rng.choice(["Which part of the body does this image belong to?", "Which body region is shown?"]),
                      body_part, "Organ"),
        "largest": ("What is the largest organ in the picture?", LARGEST_ORGAN[body_part], "Size"),
        "lesion_count": (rng.choice(["How many lesions are in the image?",
                                     "How many lesions are there in this image?"]),
                         str(findings["n_lesions"]), "Quantity"),
    }
    if body_part == "chest":
        out["organ_count"] = ("How many lungs are in the image?", "2", "Quantity")
        side = rng.choice(["left", "right"])
        out["organ_at"] = (f"Which lung is on the {side} side of the image?",
                           "left lung" if side == "right" else "right lung", "Position")
    if body_part == "abdomen":
        kidneys = [s for s in present_sites(scene) if "kidney" in s]
        out["organ_count"] = ("How many kidneys are in the image?", str(len(kidneys)), "Quantity")
        places = [("upper left", "liver"), ("upper right", "spleen")]
        places += [("lower right" if k == "left kidney" else "lower left", k) for k in kidneys]
        place, organ = rng.choice(places)
        out["organ_at"] = (f"Which organ is in the {place} of the image?", organ, "Position")
    if site is not None:
        out["abnormal_organ"] = (rng.choice(["Which organ is abnormal?", "Which organ is abnormal in this image?"]),
                                 organ_name(site), "Abnormality")
        out["disease"] = (rng.choice(["What disease is shown in the image?",
                                      "What abnormality is seen in this image?"]),
                          DISEASE[organ_name(site)], "Abnormality")
        out["where"] = (rng.choice(["Where is the lesion?", "Where is the abnormality located?"])
                        if site != "heart" else "Where is the abnormality located?", site, "Position")
    if findings["abnormality"] == "lesion":
        question = {"lung": "Which side of the lung is abnormal?", "kidney": "Which side is the abnormal kidney on?",
                    "brain": "Which hemisphere is abnormal?", "liver": None}[organ_name(site)]
        if question is not None:
            out["side"] = (question, side_of(site), "Position")
        if modality == "X-Ray":
            out["lung_zone"] = ("Which part of the lung is the nodule located in?",
                                f"{findings['zone']} {site}", "Position")
    return out


def scene_questions(scene, rng):
    """7-9 distinct questions for one image, about half of them CLOSED."""
    closed, opened = closed_questions(scene, rng), open_questions(scene, rng)
    n_total = rng.choice([7, 8, 9])
    n_closed = rng.choice([n_total // 2, (n_total + 1) // 2])
    picked = [("CLOSED",) + closed[k] for k in rng.sample(sorted(closed), min(n_closed, len(closed)))]
    picked += [("OPEN",) + opened[k] for k in rng.sample(sorted(opened), min(n_total - len(picked), len(opened)))]
    rng.shuffle(picked)
    return picked


def annotation_records(scene, rng, first_qid):
    """SLAKE-format question entries for one image."""
    records = []
    for offset, (answer_type, question, answer, content_type) in enumerate(scene_questions(scene, rng)):
        records.append({
            "img_id": scene["img_id"], "img_name": f"xmlab{scene['img_id']}/source.jpg", "question": question,
            "answer": answer, "q_lang": "en", "location": LOCATION[scene["body_part"]], "modality": scene["modality"],
            "answer_type": answer_type, "base_type": "vqa", "content_type": content_type,
            "triple": ["vhead", "_", "_"], "qid": first_qid + offset,
        })
    return records


# -----------------------------------------------------------------------------
# answer surface forms (for the warm start)

PARAPHRASES = {  # canonical answer -> surface forms; each form keeps every word of the canonical answer
    "yes": ["yes", "Yes", "yes.", "yes, it is"],
    "no": ["no", "No", "no.", "no, it is not"],
    "CT": ["CT", "ct scan", "a CT scan", "computed tomography (CT)"],
    "MRI": ["MRI", "mri scan", "an MRI", "magnetic resonance imaging (MRI)"],
    "X-Ray": ["X-Ray", "x-ray", "an x-ray image", "plain X-ray film"],
    "transverse plane": ["transverse plane", "the transverse plane", "transverse plane (axial)",
                         "axial, transverse plane"],
    "coronal plane": ["coronal plane", "the coronal plane", "coronal plane view", "frontal, coronal plane"],
    "chest": ["chest", "the chest", "chest region", "thorax (chest)"],
    "abdomen": ["abdomen", "the abdomen", "abdomen region", "upper abdomen"],
    "head": ["head", "the head", "head region", "brain and head"],
    "lung": ["lung", "the lung", "lung tissue", "the lung field"],
    "heart": ["heart", "the heart", "heart shadow", "cardiac silhouette (heart)"],
    "liver": ["liver", "the liver", "liver parenchyma", "hepatic region, liver"],
    "spleen": ["spleen", "the spleen", "spleen region", "splenic area (spleen)"],
    "kidney": ["kidney", "the kidney", "kidney region", "renal, kidney"],
    "brain": ["brain", "the brain", "brain tissue", "brain parenchyma"],
    "left lung": ["left lung", "the left lung", "lung, left", "left lung region"],
    "right lung": ["right lung", "the right lung", "lung, right", "right lung region"],
    "left kidney": ["left kidney", "the left kidney", "kidney, left", "left kidney region"],
    "right kidney": ["right kidney", "the right kidney", "kidney, right", "right kidney region"],
    "left hemisphere": ["left hemisphere", "the left hemisphere", "left cerebral hemisphere", "hemisphere, left"],
    "right hemisphere": ["right hemisphere", "the right hemisphere", "right cerebral hemisphere", "hemisphere, right"],
    "upper left lung": ["upper left lung", "the upper left lung", "left upper lung", "upper lobe of left lung"],
    "lower left lung": ["lower left lung", "the lower left lung", "left lower lung", "lower lobe of left lung"],
    "upper right lung": ["upper right lung", "the upper right lung", "right upper lung", "upper lobe of right lung"],
    "lower right lung": ["lower right lung", "the lower right lung", "right lower lung", "lower lobe of right lung"],
    "left": ["left", "the left", "left side", "on the left"],
    "right": ["right", "the right", "right side", "on the right"],
    "nodule": ["nodule", "a nodule", "lung nodule", "pulmonary nodule"],
    "tumor": ["tumor", "a tumor", "tumor (mass)", "solid tumor"],
    "cyst": ["cyst", "a cyst", "renal cyst", "simple cyst"],
    "cardiomegaly": ["cardiomegaly", "Cardiomegaly", "cardiomegaly (enlarged heart)", "mild cardiomegaly"],
    "0": ["0", "0.", "zero (0)", "0 in total"],
    "1": ["1", "1.", "one (1)", "only 1"],
    "2": ["2", "2.", "two (2)", "there are 2"],
}


def paraphrase(answer, rng):
    """A surface form of a canonical answer: the canonical one with probability 0.5, else another."""
    if answer not in PARAPHRASES:
        raise ValueError(f"synthetic.paraphrase: {answer!r} is not a canonical answer of the synthetic benchmark")
    forms = PARAPHRASES[answer]
    if rng.random() < 0.5:
        return forms[0]
    return rng.choice(forms[1:])


# -----------------------------------------------------------------------------
# writing the benchmark folder

def split_plan(n_source_images, n_validate_images, n_target_images, n_dev_images):
    """[(split, domain, img_ids)]: train and validate from the source scanner, test and dev from the target one."""
    n_train_end = n_source_images
    n_val_end = n_train_end + n_validate_images
    n_test_end = n_val_end + n_target_images
    return [("train", "source", range(0, n_train_end)),
            ("validate", "source", range(n_train_end, n_val_end)),
            ("test", "target", range(n_val_end, n_test_end)),
            ("dev", "target", range(n_test_end, n_test_end + n_dev_images))]


def write_image(folder, scene, seed, image_size):
    noise_rng = np.random.default_rng([seed, scene["img_id"]])
    pixels = render(scene, image_size, noise_rng)
    folder.mkdir(parents=True)
    Image.fromarray(pixels).convert("RGB").save(folder / "source.jpg", format="JPEG", quality=95)
    (folder / "detection.json").write_text(json.dumps(detection_boxes(scene, image_size)), encoding="utf-8")


def write_contents(folder, seed, n_source_images, n_validate_images, n_target_images, n_dev_images, image_size):
    qid = 0
    for split, domain, img_ids in split_plan(n_source_images, n_validate_images, n_target_images, n_dev_images):
        records = []
        for img_id in img_ids:
            scene = make_scene(seed, img_id, domain)
            write_image(folder / "imgs" / f"xmlab{img_id}", scene, seed, image_size)
            question_rng = random.Random(f"synthetic-questions-{seed}-{img_id}")
            new = annotation_records(scene, question_rng, qid)
            qid += len(new)
            records += new
        (folder / f"{split}.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
    config = {"generator": "data.synthetic", "seed": seed, "n_source_images": n_source_images,
              "n_validate_images": n_validate_images, "n_target_images": n_target_images,
              "n_dev_images": n_dev_images, "image_size": image_size,
              "domains": {"train": "source", "validate": "source", "test": "target", "dev": "target"}}
    (folder / "generator.json").write_text(json.dumps(config, indent=1), encoding="utf-8")


def check_counts(**counts):
    for flag, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"synthetic: {flag} must be a positive integer, got {value!r}")


def write_synthetic(out_dir, seed=0, n_source_images=N_SOURCE_IMAGES, n_target_images=N_TARGET_IMAGES,
                    image_size=IMAGE_SIZE, n_validate_images=N_VALIDATE_IMAGES, n_dev_images=N_DEV_IMAGES):
    """Write the benchmark folder `out_dir` (must not exist yet) and return its Path."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"synthetic: seed must be a non-negative integer, got {seed!r}")
    check_counts(n_source_images=n_source_images, n_target_images=n_target_images,
                 n_validate_images=n_validate_images, n_dev_images=n_dev_images, image_size=image_size)
    if image_size < 28:
        raise ValueError(f"synthetic: image_size must be at least 28 (two 14-px patches), got {image_size}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"synthetic: {out_dir} already exists; remove it or choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        write_contents(partial, seed, n_source_images, n_validate_images, n_target_images, n_dev_images, image_size)
        partial.chmod(0o755)  # mkdtemp makes it private
        os.rename(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir


def main():
    parser = argparse.ArgumentParser(description="Write the synthetic medical-VQA benchmark (SLAKE format).")
    parser.add_argument("--out", required=True, help="folder to create (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-source-images", type=int, default=N_SOURCE_IMAGES, help="train images (source scanner)")
    parser.add_argument("--n-validate-images", type=int, default=N_VALIDATE_IMAGES,
                        help="validate images (source scanner)")
    parser.add_argument("--n-target-images", type=int, default=N_TARGET_IMAGES, help="test images (target scanner)")
    parser.add_argument("--n-dev-images", type=int, default=N_DEV_IMAGES,
                        help="dev images (target scanner): for choosing adaptation hyperparameters")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    args = parser.parse_args()
    out = write_synthetic(args.out, seed=args.seed, n_source_images=args.n_source_images,
                          n_target_images=args.n_target_images, image_size=args.image_size,
                          n_validate_images=args.n_validate_images, n_dev_images=args.n_dev_images)
    for split in SPLITS:
        load_split("synthetic", out, split)


if __name__ == "__main__":
    main()
