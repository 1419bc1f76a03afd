import cv2
import numpy as np

from ctedge.core.preprocess import (
    AugmentConfig,
    PreprocessConfig,
    augment,
    gray_to_hu,
    has_annotation,
    letterbox,
    model_pixels,
    to_model_input,
    zero_centred,
)


def test_known_hu_gives_known_zero_centred_value():
    window = (-1000.0, 400.0)
    hu = np.array([-1000.0, -300.0, 400.0, -2000.0, 3000.0])
    np.testing.assert_allclose(zero_centred(hu, window, 0.25), [-0.25, 0.25, 0.75, -0.25, 0.75])


def test_gray_levels_span_the_window():
    np.testing.assert_allclose(gray_to_hu(np.array([0.0, 127.5, 255.0]), (-1000, 400)),
                               [-1000, -300, 400])


def test_backbone_sees_0_255_for_the_default_window():
    pixels = np.array([0.0, 51.0, 255.0])
    np.testing.assert_allclose(model_pixels(pixels, PreprocessConfig()), pixels, atol=1e-4)


def test_for_8bit_input_window_and_centre_compose_to_a_clip():
    """Gray 0-255 always spans the stored window, and the centre is shifted back
    before the backbone: whatever their values, the graph passes clip(g, 0, 255)."""
    pixels = np.array([-10.0, 0.0, 51.0, 200.0, 255.0, 300.0])
    for low, high, centre in ((-1000, 400, 0.25), (-600, -100, 0.5), (-1200, 600, 0.0)):
        config = PreprocessConfig(window_low=low, window_high=high, centre=centre)
        np.testing.assert_allclose(model_pixels(pixels, config), np.clip(pixels, 0, 255), atol=1e-3)


def test_the_window_acts_where_dicom_hu_become_gray_levels(tmp_path):
    """So a narrower window changes what the backbone sees only for DICOM input."""
    from ctedge.core.imageio import read_image
    from helpers import write_dicom

    path = write_dicom(tmp_path / "slice.dcm", np.array([[-1000.0, -600.0], [-300.0, 100.0]]))
    wide = read_image(path, (-1000.0, 400.0)).gray
    lung = read_image(path, (-1000.0, -200.0)).gray
    np.testing.assert_allclose(wide.ravel(), [0.0, 72.9, 127.5, 200.4], atol=0.5)
    np.testing.assert_allclose(lung.ravel(), [0.0, 127.5, 223.1, 255.0], atol=0.5)


def test_letterbox_keeps_the_whole_image_and_pads_black():
    wide = np.full((20, 40), 200, np.float32)
    square = letterbox(wide, 40)
    assert square.shape == (40, 40)
    assert square[:10].max() == 0 and square[30:].max() == 0
    assert np.all(square[10:30] == 200)


def test_model_input_is_three_equal_channels_of_the_requested_size():
    image = to_model_input(np.random.default_rng(0).uniform(0, 255, (100, 70)), 48)
    assert image.shape == (48, 48, 3) and image.dtype == np.float32
    assert np.array_equal(image[..., 0], image[..., 2])


def test_red_box_is_flagged_and_plain_gray_is_not():
    gray = np.random.default_rng(0).integers(0, 255, (128, 128), np.uint8)
    plain = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    marked = plain.copy()
    cv2.rectangle(marked, (20, 20), (90, 90), (0, 0, 255), 2)
    assert has_annotation(marked)
    assert not has_annotation(plain)


def test_augmentation_is_seeded_and_changes_the_image():
    image = to_model_input(np.random.default_rng(1).uniform(0, 255, (48, 48)), 48)
    config = AugmentConfig(rotation_deg=20, shift=0.1, zoom=0.1)
    a = augment(image, np.random.default_rng(5), config)
    b = augment(image, np.random.default_rng(5), config)
    assert a.shape == image.shape
    assert np.array_equal(a, b)
    assert not np.allclose(a, image)



def test_hu_to_gray_is_the_window_map_bit_for_bit_and_leaves_its_input_alone():
    """Computed in place for speed: the same float32 values as the plain formula, any input dtype."""
    from ctedge.core.imageio import hu_to_gray

    rng = np.random.default_rng(2)
    for hu in (rng.uniform(-3000, 3000, (64, 48)).astype(np.float32), rng.uniform(-3000, 3000, (8, 8)),
               rng.integers(-2048, 3000, (16, 16)).astype(np.int16)):
        before = hu.copy()
        plain = np.clip((hu.astype(np.float32) - -1000.0) / 1400.0, 0.0, 1.0) * 255.0
        gray = hu_to_gray(hu, (-1000.0, 400.0))
        assert gray.dtype == np.float32 and np.array_equal(gray, plain)
        assert np.array_equal(hu, before)


def test_a_square_image_is_only_resized_and_every_channel_is_the_gray():
    gray = np.random.default_rng(3).uniform(0, 255, (96, 96)).astype(np.float32)
    resized = cv2.resize(gray, (48, 48), interpolation=cv2.INTER_AREA)
    assert np.array_equal(letterbox(gray, 48), resized)
    image = to_model_input(gray, 48)
    assert image.shape == (48, 48, 3) and image.dtype == np.float32
    assert all(np.array_equal(image[..., c], resized) for c in range(3))
