import h5py
import keras
import numpy as np
import pytest
from keras import layers

from ctedge.core.errors import CtedgeError
from ctedge.core.preprocess import PreprocessConfig
from ctedge.training.model import CTPreprocess, ModelConfig, backbone_of, build_backbone, build_model


def tiny(size: int = 64, **config) -> keras.Model:
    return build_model(ModelConfig(**{"weights": "none", "backbone": "tiny", "units": 32, **config}),
                       PreprocessConfig(image_size=size))


@pytest.fixture(scope="module")
def tiny_keras():
    """The tiny-backbone Keras classifier at 64 px (``model`` is the ONNX stand-in, conftest.py)."""
    return tiny()


def test_head_is_the_papers_on_efficientnetb3():
    model = build_model(ModelConfig(weights="none", units=32), PreprocessConfig(image_size=64))
    names = [layer.name for layer in model.layers]
    assert names[:3] == ["image", "ct_preprocess", "efficientnetb3"]
    assert backbone_of(model).count_params() > 10_000_000
    pool, flatten, dense, out = (model.get_layer(n) for n in
                                 ("head_pool", "head_flatten", "head_dense", "head_output"))
    assert isinstance(pool, layers.AveragePooling2D) and isinstance(flatten, layers.Flatten)
    assert dense.units == 32 and dense.activation.__name__ == "relu"
    assert out.units == 1 and out.activation.__name__ == "sigmoid"


def test_tiny_backbone_has_b3s_layer_names_at_a_fraction_of_its_size(tiny_keras):
    backbone = backbone_of(tiny_keras)
    names = {layer.name for layer in backbone.layers}
    assert {"stem_conv", "top_conv", *(f"block{i}a_project_conv" for i in range(1, 8))} <= names
    assert backbone.count_params() < 100_000
    assert backbone.output.shape[1] == 64 // 32  # the same stride-32 feature map as B3
    with pytest.raises(CtedgeError, match="tiny backbone has no pretrained weights"):
        build_backbone("imagenet", 64, "tiny")
    with pytest.raises(CtedgeError, match="backbone must be one of b3, tiny"):
        build_backbone("none", 64, "b7")


def test_pool_is_4x4_where_the_feature_map_allows(tiny_keras):
    assert tiny(128).get_layer("head_pool").pool_size == (4, 4)
    assert tiny_keras.get_layer("head_pool").pool_size == (2, 2)  # 64 px: a 2x2 feature map


def test_output_is_a_probability_per_image(tiny_keras):
    p = tiny_keras.predict(np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 3)), verbose=0)
    assert p.shape == (3, 1) and np.all((p >= 0) & (p <= 1))


def test_preprocessing_layer_survives_save_and_load(tmp_path):
    inputs = keras.Input((8, 8, 3))
    m = keras.Model(inputs, CTPreprocess(-1000.0, 400.0, 0.25)(inputs))
    m.save(tmp_path / "p.keras")
    loaded = keras.models.load_model(tmp_path / "p.keras")
    x = np.linspace(-20, 300, 192, dtype=np.float32).reshape(1, 8, 8, 3)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), np.clip(x, 0, 255), atol=1e-3)


def test_random_weights_train_the_backbone_and_pretrained_freeze_it(tiny_keras, trained_backbone):
    assert backbone_of(tiny_keras).trainable
    pretrained = tiny(48, weights=str(trained_backbone))
    assert not backbone_of(pretrained).trainable
    assert not [w for w in pretrained.trainable_weights if not w.path.startswith("head_")]


def test_fine_tuning_unfreezes_only_the_top_blocks():
    backbone = backbone_of(tiny(freeze_backbone=True, fine_tune_blocks=1))
    trainable = {layer.name for layer in backbone.layers if layer.trainable and layer.weights}
    assert trainable and all(n.startswith(("block7", "top_")) for n in trainable)
    assert not any(isinstance(backbone.get_layer(n), layers.BatchNormalization) for n in trainable)
    with pytest.raises(CtedgeError, match="^fine_tune_blocks must be 0-7, not 9"):
        tiny(fine_tune_blocks=9)


def test_local_weights_file_gets_the_imagenet_preprocessing(tmp_path):
    from keras.src.legacy.saving import legacy_h5_format

    source = build_backbone("none", 32)
    path = tmp_path / "efficientnetb3_notop.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, source)
    loaded = build_backbone(str(path), 32)
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
        build_backbone("imagenet", 32)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(CtedgeError, match="no such file"):
        build_backbone(str(tmp_path / "nope.h5"), 64)


def test_precise_batchnorm_sets_moving_stats_to_the_data_average():
    from ctedge.training.train import recalibrate_batchnorm

    inputs = keras.Input((4,))
    hidden = layers.Dense(3, name="dense")(inputs)
    model = keras.Model(inputs, layers.BatchNormalization(momentum=0.99)(hidden))
    x = np.random.default_rng(0).normal(5.0, 2.0, (64, 4)).astype("float32")
    assert recalibrate_batchnorm(model, x, batch_size=16) == 1
    expected = np.asarray(model.get_layer("dense")(x)).mean(axis=0)
    np.testing.assert_allclose(model.layers[-1].moving_mean.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert model.layers[-1].momentum == 0.99


def test_a_compiled_model_traces_its_training_step_once_and_loads_the_optimizer_state(tmp_path):
    """compile_model builds Adam before the first step: TensorFlow traces the step once (left
    to Keras, it made Adam's slots inside the first trace and traced twice), and weights saved
    after training load the optimizer's state too (a resume, a Hyperband warm start go on)."""
    from ctedge.training.train import compile_model

    def small() -> keras.Model:
        inputs = keras.Input((4,))
        model = keras.Model(inputs, layers.Dense(1, activation="sigmoid")(layers.Dense(3)(inputs)))
        compile_model(model, 1e-2)
        return model

    model, traces = small(), []
    step = model.train_step
    model.train_step = lambda data: traces.append(1) or step(data)
    x, y = np.random.default_rng(0).normal(size=(8, 4)).astype("float32"), np.array([0, 1] * 4, "float32")
    model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    assert len(traces) == 1
    model.save_weights(tmp_path / "trial.weights.h5")
    again = small()
    again.load_weights(tmp_path / "trial.weights.h5")
    assert int(again.optimizer.iterations.numpy()) == 4
    for saved, loaded in zip(model.optimizer.variables, again.optimizer.variables):
        np.testing.assert_array_equal(np.array(saved), np.array(loaded))


def test_train_backbone_on_pretrained_weights_keeps_batchnorm_statistics(trained_backbone):
    """--train-backbone with pretrained weights: a training step moves the
    convolutions but not BatchNorm's moving mean/variance."""
    from ctedge.training.train import compile_model

    model = tiny(32, weights=str(trained_backbone), freeze_backbone=False)
    norms = [layer for layer in backbone_of(model).layers if isinstance(layer, layers.BatchNormalization)]
    before = [[np.array(w) for w in layer.non_trainable_weights] for layer in norms]
    conv = np.array(backbone_of(model).get_layer("stem_conv").kernel)
    compile_model(model, 1e-2, eager=True)  # no graph tracing; BatchNorm's training flag is fit's either way
    assert model.run_eagerly
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    model.fit(x, np.array([0, 1, 0, 1], "float32"), epochs=1, batch_size=4, verbose=0)
    assert not np.array_equal(conv, np.array(backbone_of(model).get_layer("stem_conv").kernel))
    for layer, old in zip(norms, before):
        for weight, value in zip(layer.non_trainable_weights, old):
            np.testing.assert_array_equal(np.array(weight), value)
