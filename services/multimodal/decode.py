"""Image bytes → a PIL image, refusing what is corrupt, unsupported or too large to decode."""

from __future__ import annotations

import io
import warnings

from services.errors import InvalidRequest
from services.settings import ImageSettings


def decode_image(data: bytes, settings: ImageSettings, param: str):
    """Open and fully decode an image (GIFs: the first frame); the size is checked from the
    header before any pixel is decoded, so a decompression bomb costs nothing."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > settings.max_bytes:
        raise InvalidRequest(f"image is larger than {settings.max_bytes} bytes", param=param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=None)
            if image.format not in settings.formats:
                raise InvalidRequest(f"image format {image.format} is not accepted; use one of "
                                     f"{', '.join(settings.formats)}", param=param)
            width, height = image.size
            if width * height > settings.max_pixels or width == 0 or height == 0:
                raise InvalidRequest(f"image is {width}x{height} pixels; the limit is "
                                     f"{settings.max_pixels} pixels", param=param)
            image.seek(0)
            image.load()
    except InvalidRequest:
        raise
    except Image.DecompressionBombError:
        raise InvalidRequest(f"image is too large to decode; the limit is {settings.max_pixels} "
                             "pixels", param=param) from None
    except UnidentifiedImageError:
        raise InvalidRequest("image data is not a readable image", param=param) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidRequest(f"image data is corrupt or truncated ({type(exc).__name__})",
                             param=param) from None
    return image
