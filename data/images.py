"""Images: read one image file as the 8-bit RGB picture the vision tower sees, or fail naming the file.

Every stage reads images through `open_image` (rollout.py re-exports it), and `data.check_images_open`
decodes a whole split with it before any model loads, so what is checked is exactly what is used.

High bit depth. Medical scans exported from DICOM are often 16-bit greyscale PNG or TIFF (PIL modes
I;16, I;16B, I;16L, I;16N), sometimes 32-bit integer or float (I, F). PIL's `convert("RGB")` clips such
pixels at 255, so a 12- or 16-bit scan comes out (nearly) all white. We window them to 8 bits first,
with a per-image **min-max** window:

    out = round((x - min) * 255 / (max - min))          (a constant image, max == min, becomes all 0)

Why min-max rather than a percentile window (e.g. 0.5 %-99.5 %): nothing is clipped, so the brightest
structures (bone, contrast agent, metal, often what a question is about) keep their detail, the order
of grey levels is kept exactly, the result needs no tuning constant and can be checked by hand. The
price: one very bright or dark outlier pixel compresses the contrast of the rest. The DICOM window
(centre / width) that a radiologist would use is not stored in a PNG, so no window is "the" right one.

Anything PIL cannot decode, a mode we cannot turn into RGB, or a float image with NaN or infinity is
a ValueError whose message names the file. 8-bit images (L, RGB, RGBA, P, ...) go through
`convert("RGB")` unchanged, as before.
"""

import numpy as np
from PIL import Image

HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# what PIL raises on unreadable, truncated or unsupported files (UnidentifiedImageError is an OSError)
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def window_to_8bit(pixels):
    """uint8 pixels from a high-bit-depth array by the min-max window above (constant -> all 0)."""
    pixels = np.asarray(pixels, dtype=np.float64)
    lo, hi = pixels.min(), pixels.max()
    if hi == lo:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round((pixels - lo) * 255.0 / (hi - lo)).astype(np.uint8)


def open_image(path):
    """The image at `path` as an 8-bit RGB PIL image (high-bit-depth greyscale windowed min-max first).

    An image already in memory (a PIL RGB image, e.g. the monitor's grey control image) is passed through.
    """
    if isinstance(path, Image.Image) and path.mode == "RGB":
        return path
    try:
        with Image.open(path) as image:
            if image.mode not in HIGH_BIT_MODES:
                return image.convert("RGB")
            mode, pixels = image.mode, np.asarray(image)
    except READ_ERRORS as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    if pixels.ndim != 2:
        raise ValueError(f"cannot read image {path}: mode {mode} gave pixels of shape {pixels.shape}, expected 2-D")
    if not np.isfinite(pixels).all():
        raise ValueError(f"cannot read image {path}: its {mode} pixels include NaN or infinity")
    return Image.fromarray(window_to_8bit(pixels)).convert("RGB")
