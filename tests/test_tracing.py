"""TensorFlow traces each graph once: the training step of a fit, and the inference pass whatever the batch
sizes (a split's last batch is smaller). Each trace of a DenseNet121 costs seconds (bench/tracing.py)."""

import gc
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf

from histoflow.modeling import inference
from histoflow.modeling.architectures import compile_model
from histoflow.modeling.fitting import fit, validation_metrics


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(keras.layers.Rescaling(1.0)(inputs))
    pooled = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(pooled))


def _data(n: int, batch: int) -> tf.data.Dataset:
    rng = np.random.default_rng(n)
    x = rng.random((n, 8, 8, 3), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 2, n), 2)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def test_a_fit_traces_its_training_step_once():
    """Keras's TensorFlow trainer creates the optimizer's and the metrics' variables in the first trace of its
    step, and tf.function then traces it again; fit creates them before."""
    model = compile_model(_model(), 1e-3)
    traced = []
    step = model.train_step
    model.train_step = lambda data: traced.append(1) or step(data)
    result = fit(model, _data(36, 16), _data(12, 16), epochs=2, extra_callbacks=[], class_weight=None, patience=5,
                 lr_patience=5)
    assert result.epochs_run == 2 and len(traced) == 1
    assert int(model.optimizer.iterations.numpy()) == 2 * 3  # it trained: 3 batches an epoch


@pytest.mark.parametrize("tta", ["none", "dihedral8"])
def test_predictions_trace_the_model_once_for_any_batch_size(tta):
    model = _model()
    for data in (_data(12, 16), _data(36, 16), _data(5, 2)):  # one batch of 12; 16, 16, 4; 2, 2, 1
        got = inference.predict(model, data, tta)
        images = np.concatenate([x for x, _ in data.as_numpy_iterator()])
        views = [np.rot90(v, k, axes=(1, 2)) for v in (images, images[:, :, ::-1]) for k in range(4)]
        expected = np.mean([model.predict(v, verbose=0) for v in (views if tta == "dihedral8" else [images])], axis=0)
        np.testing.assert_allclose(got, expected, atol=1e-6)
    assert inference.forward(model).experimental_get_tracing_count() == 1


def test_the_dihedral_views_are_the_quarter_turns_of_the_images_then_of_their_mirrors():
    """In tf.image.rot90's order and direction (counter-clockwise), the first view the images themselves (the
    served model takes the features of the first view); in a graph, traced for any batch size, as served."""
    images = np.random.default_rng(0).random((3, 5, 5, 2), dtype=np.float32)
    expected = np.concatenate([np.rot90(v, k, axes=(1, 2)) for v in (images, images[:, :, ::-1]) for k in range(4)])
    np.testing.assert_array_equal(inference.dihedral_views(tf.constant(images)).numpy(), expected)
    np.testing.assert_array_equal(tf.image.rot90(images, 1).numpy(), expected[3:6])
    graph = tf.function(inference.dihedral_views, input_signature=[tf.TensorSpec((None, 5, 5, 2), tf.float32)])
    np.testing.assert_array_equal(graph(images[:2]).numpy().reshape(8, 2, 5, 5, 2),
                                  expected.reshape(8, 3, 5, 5, 2)[:, :2])


def test_a_model_with_several_outputs_gives_each_in_the_datasets_order():
    model = _model()
    both = keras.Model(model.inputs, [model.output, model.layers[-2].output])
    probabilities, features = inference.predict(both, _data(36, 16))
    assert probabilities.shape == (36, 2) and features.shape == (36, 4)
    np.testing.assert_allclose(probabilities, inference.predict(model, _data(36, 16)), atol=1e-6)


def test_validation_in_a_fit_is_keras_s_own_through_the_inference_graph():
    """A training run's fit validates every epoch through the network's inference graph, traced once and
    reused by evaluation, with the loss and metrics Keras's own validation gives; Keras traces no test step."""
    model = compile_model(_model(), 1e-3)
    val = _data(21, 8)  # batches of 8, 8, 5
    result = fit(model, _data(36, 16), val, epochs=2, extra_callbacks=[], class_weight=None, patience=5,
                 lr_patience=5, inference_validation=True)
    assert model.test_function is None
    keras_own = fit(compile_model(_model(), 1e-3), _data(36, 16), val, epochs=2, extra_callbacks=[],
                    class_weight=None, patience=5, lr_patience=5)  # the same model and data, validated by Keras
    assert set(result.history) == set(keras_own.history)
    for name in ("val_loss", "val_accuracy", "val_auc"):
        assert result.history[name] == pytest.approx(keras_own.history[name], rel=1e-5), name
    inference.predict(inference.feature_model(model), val)  # as evaluation runs it
    assert inference.forward(inference.feature_model(model)).experimental_get_tracing_count() == 1
    expected = model.evaluate(val, return_dict=True, verbose=0)
    got = validation_metrics(model, val)
    assert got == pytest.approx(expected, rel=1e-5) and set(got) == {"loss", "accuracy", "auc"}
    assert model.evaluate(val, return_dict=True, verbose=0) == pytest.approx(expected, rel=1e-6)  # state left clean


def test_a_model_s_traced_inference_graph_does_not_keep_it_alive():
    """The graph cache is keyed by model and holds it weakly: a process that trains several models in turn (the
    folds of a cross-validation) frees each, weights included, once it is dropped."""
    model = _model()
    inference.predict(model, _data(12, 16))
    dropped = weakref.ref(model)
    del model
    gc.collect()
    assert dropped() is None
