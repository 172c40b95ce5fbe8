"""What an image will cost to decode, read from its header alone, and the limits on it.

Pillow opens an image lazily: format, size and mode come from the header and no pixel is decoded
until `load()`. A progressive JPEG's decode cost also grows with its scans (each one is a pass
over every block of the image), which no header states; they are counted with one pass over the
bytes. Every limit here is checked for all of a request's images before any of them is decoded.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np

from services.errors import InvalidRequest
from services.settings import ImageSettings

# PNG text chunks (metadata, never read here) inflate as the image is opened, before any limit
# of ours: Pillow's default allows 64 MB of them an image (~0.15 s of a decode thread, 8 images
# a request). 8 MiB keeps any real metadata (XMP, EXIF as text) and bounds that to an eighth.
PNG_TEXT_BYTES = 8 << 20


def _bound_png_text() -> None:
    from PIL import PngImagePlugin

    PngImagePlugin.MAX_TEXT_MEMORY = min(PngImagePlugin.MAX_TEXT_MEMORY, PNG_TEXT_BYTES)


@dataclass(frozen=True)
class ImageHeader:
    """An image's format and size as its header declares them; `scans` is 0 but for JPEGs."""

    format: str
    width: int
    height: int
    scans: int = 0
    # whether decoding turns it a quarter (an EXIF orientation of 5 to 8 swaps its rows and
    # columns); None where the header cannot tell (a PNG's EXIF may come after its pixels)
    turned: bool | None = False

    @property
    def pixels(self) -> int:
        return self.width * self.height


def jpeg_scans(data: bytes) -> int:
    """Start-of-scan markers (0xFF 0xDA) in a JPEG: never fewer than the scans a decoder runs
    (inside entropy-coded data a 0xFF byte is always followed by 0x00 or by a marker). Counted
    with numpy, five times faster than `bytes.count` on a photo."""
    octets = np.frombuffer(data, np.uint8)
    return int(np.count_nonzero((octets[:-1] == 0xFF) & (octets[1:] == 0xDA)))


def read_header(data: bytes, settings: ImageSettings, param: str) -> ImageHeader:
    """The header of `data`, refused when its format, size or scans are over the limits."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > settings.max_bytes:
        raise InvalidRequest(f"image is larger than {settings.max_bytes} bytes", param=param)
    _bound_png_text()
    with pillow_errors(settings, param):
        # only the accepted formats' parsers see the bytes (a camera's JPEG with an embedded
        # preview opens as MPO, through the JPEG plugin: it is a JPEG, decoded as one)
        with Image.open(io.BytesIO(data), formats=settings.formats) as image:
            header = ImageHeader(_format(image), *image.size, turned=_turned(image, data))
    if header.format == "JPEG":
        header = replace(header, scans=jpeg_scans(data))
    check_header(header, settings, param)
    return header


def _turned(image, data: bytes) -> bool | None:
    """Whether `ImageOps.exif_transpose` will swap the image's sides, from what its header
    holds: a JPEG's and a WebP's EXIF are read when they are opened; a PNG's eXIf chunk may
    follow its pixels (read only by decoding them), so one that has any is not known."""
    if image.format == "PNG":  # (ImageMagick writes EXIF as a "Raw profile type exif" text)
        return None if b"eXIf" in data or b"Raw profile type exif" in data else False
    if image.format == "GIF":
        return False  # no EXIF
    if image.format not in ("JPEG", "MPO", "WEBP"):
        return None  # a format whose EXIF this does not read (TIFF's tags, say)
    if "exif" not in image.info:
        return False
    return image.getexif().get(0x0112, 1) in (5, 6, 7, 8)


def _format(image) -> str:
    return "JPEG" if image.format == "MPO" else str(image.format)


@contextmanager
def pillow_errors(settings: ImageSettings, param: str) -> Iterator[None]:
    """Pillow's verdicts on the caller's bytes as 400s naming `param` (its bomb warning off:
    our own pixel limits come first)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except Image.DecompressionBombError:
        raise InvalidRequest(f"image is too large to decode; the limit is {settings.max_pixels} "
                             "pixels", param=param) from None
    except UnidentifiedImageError:
        raise InvalidRequest(f"image data is not a readable image in an accepted format "
                             f"({', '.join(settings.formats)})", param=param) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidRequest(f"image data is corrupt or truncated ({type(exc).__name__})",
                             param=param) from None
    except (KeyError, IndexError, TypeError, ZeroDivisionError, struct.error) as exc:
        # a format plugin tripping on crafted bytes: still the image's fault, not a 500
        raise InvalidRequest(f"image data could not be read ({type(exc).__name__})",
                             param=param) from None


def check_header(header: ImageHeader, settings: ImageSettings, param: str) -> None:
    """Refuse one image over the format, pixel or scan limits."""
    if header.format not in settings.formats:
        raise InvalidRequest(f"image format {header.format} is not accepted; use one of "
                             f"{', '.join(settings.formats)}", param=param)
    if header.pixels > settings.max_pixels or header.pixels == 0:
        raise InvalidRequest(f"image is {header.width}x{header.height} pixels; the limit is "
                             f"{settings.max_pixels} pixels", param=param)
    if header.scans > settings.max_jpeg_scans:
        raise InvalidRequest(f"JPEG has {header.scans} start-of-scan markers; the limit is "
                             f"{settings.max_jpeg_scans} (settings images.max_jpeg_scans)",
                             param=param)


def check_request_pixels(headers: list[ImageHeader], params: list[str],
                         settings: ImageSettings) -> None:
    """Refuse a request whose images decode to more pixels together than the limit, naming
    the image that crosses it."""
    total = 0
    for header, param in zip(headers, params):
        total += header.pixels
        if total > settings.max_request_pixels:
            raise InvalidRequest(f"the request's images decode to more than "
                                 f"{settings.max_request_pixels} pixels together (this image "
                                 f"brings them to {total})", param=param)
