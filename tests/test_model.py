import h5py
import keras
import numpy as np
import pytest
from keras import layers

from ctedge.errors import CtedgeError
from ctedge.model import CTPreprocess, ModelConfig, build_backbone, build_model
from ctedge.preprocess import PreprocessConfig


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(weights="none", units=32), PreprocessConfig(image_size=64))


def test_head_is_the_papers(model):
    names = [layer.name for layer in model.layers]
    assert names[:3] == ["image", "ct_preprocess", "efficientnetb3"]
    pool, flatten, dense, out = (model.get_layer(n) for n in
                                 ("head_pool", "head_flatten", "head_dense", "head_output"))
    assert isinstance(pool, layers.AveragePooling2D) and isinstance(flatten, layers.Flatten)
    assert dense.units == 32 and dense.activation.__name__ == "relu"
    assert out.units == 1 and out.activation.__name__ == "sigmoid"


def test_pool_is_4x4_where_the_feature_map_allows():
    big = build_model(ModelConfig(weights="none"), PreprocessConfig(image_size=128))
    assert big.get_layer("head_pool").pool_size == (4, 4)


def test_output_is_a_probability_per_image(model):
    p = model.predict(np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 3)), verbose=0)
    assert p.shape == (3, 1) and np.all((p >= 0) & (p <= 1))


def test_preprocessing_layer_survives_save_and_load(tmp_path):
    inputs = keras.Input((8, 8, 3))
    m = keras.Model(inputs, CTPreprocess(-1000.0, 400.0, 0.25)(inputs))
    m.save(tmp_path / "p.keras")
    loaded = keras.models.load_model(tmp_path / "p.keras")
    x = np.linspace(-20, 300, 192, dtype=np.float32).reshape(1, 8, 8, 3)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), np.clip(x, 0, 255), atol=1e-3)


def test_random_weights_train_the_backbone_and_pretrained_freeze_it(model):
    assert model.get_layer("efficientnetb3").trainable


def test_fine_tuning_unfreezes_only_the_top_blocks():
    m = build_model(ModelConfig(weights="none", freeze_backbone=True, fine_tune_blocks=1),
                    PreprocessConfig(image_size=64))
    backbone = m.get_layer("efficientnetb3")
    trainable = {layer.name for layer in backbone.layers if layer.trainable and layer.weights}
    assert trainable and all(n.startswith(("block7", "top_")) for n in trainable)
    assert not any(isinstance(backbone.get_layer(n), layers.BatchNormalization) for n in trainable)
    with pytest.raises(CtedgeError, match="fine-tune-blocks"):
        build_model(ModelConfig(weights="none", fine_tune_blocks=9), PreprocessConfig(image_size=64))


def test_local_weights_file_gets_the_imagenet_preprocessing(tmp_path):
    from keras.src.legacy.saving import legacy_h5_format

    source = build_backbone("none", 64)
    path = tmp_path / "efficientnetb3_notop.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, source)
    loaded = build_backbone(str(path), 64)
    rescalings = [layer for layer in loaded.layers if isinstance(layer, layers.Rescaling)]
    assert len(rescalings) == 2  # 1/255 and Keras's extra ImageNet-only stddev rescaling
    np.testing.assert_array_equal(loaded.get_layer("stem_conv").get_weights()[0],
                                  source.get_layer("stem_conv").get_weights()[0])


def test_failed_imagenet_download_explains_the_offline_route(monkeypatch):
    from keras.src.applications import efficientnet

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(efficientnet.file_utils, "get_file", offline)
    with pytest.raises(CtedgeError, match="--weights /path/to/efficientnetb3_notop.h5"):
        build_backbone("imagenet", 64)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(CtedgeError, match="no such file"):
        build_backbone(str(tmp_path / "nope.h5"), 64)


def test_precise_batchnorm_sets_moving_stats_to_the_data_average():
    from ctedge.train import recalibrate_batchnorm

    inputs = keras.Input((4,))
    hidden = layers.Dense(3, name="dense")(inputs)
    model = keras.Model(inputs, layers.BatchNormalization(momentum=0.99)(hidden))
    x = np.random.default_rng(0).normal(5.0, 2.0, (64, 4)).astype("float32")
    assert recalibrate_batchnorm(model, x, batch_size=16) == 1
    expected = np.asarray(model.get_layer("dense")(x)).mean(axis=0)
    np.testing.assert_allclose(model.layers[-1].moving_mean.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert model.layers[-1].momentum == 0.99
