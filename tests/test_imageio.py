import cv2
import numpy as np
import pytest

from ctedge.core.errors import UnreadableImage
from ctedge.core.imageio import hu_to_gray, read_image
from helpers import gray_image, write_dicom


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_lossless_gray_formats_round_trip(tmp_path, suffix):
    image = gray_image()
    path = tmp_path / f"a{suffix}"
    cv2.imwrite(str(path), image)
    decoded = read_image(path)
    np.testing.assert_array_equal(decoded.gray, image.astype(np.float32))
    assert decoded.colour is None


def test_jpeg_reads_close_to_source(tmp_path):
    image = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    cv2.imwrite(str(tmp_path / "a.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert np.abs(read_image(tmp_path / "a.jpg").gray - image).mean() < 2.0


def test_rgb_and_rgba_keep_colour_and_give_gray(tmp_path):
    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[:, :, 2] = 200  # red in BGR
    cv2.imwrite(str(tmp_path / "rgb.png"), rgb)
    rgba = np.dstack([rgb, np.full((20, 20), 255, np.uint8)])
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    for name in ("rgb.png", "rgba.png"):
        decoded = read_image(tmp_path / name)
        assert decoded.colour.shape == (20, 20, 3)
        assert decoded.gray.shape == (20, 20)
        assert 55 < decoded.gray.mean() < 65  # 0.299 * 200


def test_16_bit_png_is_scaled_to_0_255(tmp_path):
    image = np.tile(np.array([[0, 65535], [32896, 257]], np.uint16), (8, 8))  # 16 px: the smallest side read
    cv2.imwrite(str(tmp_path / "deep.png"), image)
    np.testing.assert_allclose(read_image(tmp_path / "deep.png").gray, np.tile([[0, 255], [128, 1]], (8, 8)))


def test_dicom_is_converted_through_hounsfield_units(tmp_path):
    hu = np.array([[-1000, 400], [-300, 1000]], np.float32)
    path = write_dicom(tmp_path / "slice.dcm", hu, slope=2.0, intercept=-2048.0)
    gray = read_image(path).gray
    np.testing.assert_allclose(gray, hu_to_gray(hu, (-1000, 400)), atol=1e-4)
    np.testing.assert_allclose(gray, [[0, 255], [127.5, 255]], atol=1e-4)


def test_dicom_found_by_marker_without_suffix(tmp_path):
    path = write_dicom(tmp_path / "slice", np.full((4, 4), -1000.0))
    assert read_image(path).kind == "dicom"


def test_dicom_without_rescale_tags_is_refused_by_name(tmp_path):
    path = write_dicom(tmp_path / "raw.dcm", np.zeros((4, 4)), rescale=False)
    with pytest.raises(UnreadableImage, match="raw.dcm.*RescaleSlope"):
        read_image(path)


@pytest.mark.parametrize("name,content,reason", [
    ("empty.png", b"", "empty"),
    ("text.png", b"this is not an image\n", "not a readable image"),
    ("broken.dcm", b"\0" * 40, "DICOM"),
])
def test_bad_files_raise_with_their_name(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UnreadableImage, match=reason) as info:
        read_image(tmp_path / name)
    assert name in str(info.value)


def test_truncated_png_is_unreadable(tmp_path):
    cv2.imwrite(str(tmp_path / "full.png"), gray_image(64))
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImage, match="cut.png"):
        read_image(tmp_path / "cut.png")
