"""The shared decode check against PIL and hand-made bad files."""
import io

from PIL import Image

from fastdeit.data.imagecheck import check_image_bytes, check_image_file


def _jpeg(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_good_jpeg_and_png_pass(tmp_path):
    assert check_image_bytes(_jpeg()) is None
    buf = io.BytesIO()
    Image.new("L", (8, 8), 3).save(buf, format="PNG")
    assert check_image_bytes(buf.getvalue()) is None
    path = tmp_path / "ok.jpg"
    path.write_bytes(_jpeg())
    assert check_image_file(str(path)) is None


def test_truncated_empty_and_garbage_fail_with_a_reason(tmp_path):
    data = _jpeg((200, 150))
    assert "truncated" in check_image_bytes(data[: len(data) // 2]).lower()
    assert check_image_bytes(b"") == "empty file"
    assert check_image_bytes(b"not an image at all").startswith("UnidentifiedImageError")
    assert check_image_file(str(tmp_path / "missing.jpg")).startswith("FileNotFoundError")
