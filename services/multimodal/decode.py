"""Image bytes → a PIL image, decoded in small blocks so a deadline can stop it part-way.

Pillow's decoders pull their input through the file object in blocks; the one here raises
`DecodeStopped` from `read` once the caller says stop, which ends the decode between two blocks
(libjpeg runs a progressive JPEG's scans as their bytes arrive, so a block costs at most a few
scans). Headers were checked first (`services.multimodal.header`), so what is decoded here is
within the size and scan limits.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from services.multimodal.header import pillow_errors
from services.settings import ImageSettings

# Bytes handed to the decoder between two checks of the deadline.
BLOCK_BYTES = 16 * 1024


class DecodeStopped(Exception):
    """Decoding stopped part-way because the caller's deadline passed or it gave up."""


class _StoppableBytes(io.BytesIO):
    """In-memory bytes whose `read` raises `DecodeStopped` once `stop()` is true."""

    def __init__(self, data: bytes, stop: Callable[[], bool]):
        super().__init__(data)
        self.stop = stop

    def read(self, size: int | None = -1) -> bytes:
        if self.stop():
            raise DecodeStopped
        return super().read(size)


def decode_image(data: bytes, settings: ImageSettings, param: str,
                 stop: Callable[[], bool] = lambda: False):
    """Fully decode an image whose header passed the limits (GIFs: the first frame)."""
    from PIL import Image, ImageOps

    with pillow_errors(settings, param):  # DecodeStopped is none of Pillow's: it passes
        image = Image.open(_StoppableBytes(data, stop), formats=settings.formats)
        image.decodermaxblock = BLOCK_BYTES
        image.seek(0)
        image.load()
        # a phone's portrait photo is stored sideways with an EXIF orientation: the model sees
        # it upright, as a viewer shows it (the pixel count, so every limit, is the same)
        ImageOps.exif_transpose(image, in_place=True)
    if image.mode.startswith("I"):
        image = _eight_bit(image)
    return image


def _eight_bit(image):
    """A 16-bit greyscale image (a 16-bit PNG, Pillow's `I;16`) as 8-bit, its top byte:
    mistral-common converts to RGB by Pillow's `convert`, which clips values at 255 (a scan
    turned all white). A 32-bit `I` image of unknown range is scaled only when its values go
    past 8 bits."""
    sixteen = image.mode.startswith("I;16")
    image = image.convert("I")
    if sixteen or image.getextrema()[1] > 255:
        image = image.point(lambda v: v / 256)
    return image.convert("L")
