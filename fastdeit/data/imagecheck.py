"""Does an image decode? The one check shared by the loader's error path, the data verifier and
the shard packer, so all three call the same file bad for the same reason.

PIL's full decode (``Image.load``) is the reference: truncation only shows up there, not in
``Image.open`` (which reads the header). It is the decoder torchvision and timm use, so a file it
accepts is one the DeiT reference would train on; DALI decodes everything PIL does here
(baseline/progressive JPEG, grayscale and CMYK JPEGs, PNG).
"""
from __future__ import annotations

import io
from typing import Optional


def check_image_bytes(data: bytes) -> Optional[str]:
    """None if ``data`` fully decodes as an image, else the reason (exception type: message)."""
    from PIL import Image

    if not data:
        return "empty file"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Image.UnidentifiedImageError as e:  # its message holds our BytesIO's address: noise
        return f"{type(e).__name__}: not in an image format PIL recognises"
    except Exception as e:  # any decoder failure is a reason the pipeline would fail too
        return f"{type(e).__name__}: {e}"
    return None


def check_image_file(path: str) -> Optional[str]:
    """None if the file at ``path`` fully decodes, else the reason (read errors included)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return check_image_bytes(data)
