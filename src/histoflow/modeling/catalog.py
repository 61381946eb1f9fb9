"""What a model can be built from: the backbones (their keras.applications constructor, the three layers the
fusion head taps, the input scaling their weights expect, their weights file), their stages and widths, and
the optimizers. Plain data, read by the settings' validation without loading Keras and by
histoflow.modeling.architectures to build the models.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backbone:
    """A keras.applications backbone with its three tap layers (strides 8, 16, 32) and input scaling."""

    application: str  # the keras.applications constructor
    taps: tuple[str, str, str]
    scaling: str  # torch | tf | raw255 | caffe (keras.applications' preprocess_input modes)
    min_size: int
    weights_file: str  # the file Keras fetches into $KERAS_HOME/models for weights="imagenet"


BACKBONES: dict[str, Backbone] = {
    "densenet121": Backbone(
        "DenseNet121",
        ("conv3_block12_concat", "conv4_block24_concat", "conv5_block16_concat"),
        "torch", 32, "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "mobilenet": Backbone(
        "MobileNet",
        ("conv_pw_5_relu", "conv_pw_11_relu", "conv_pw_13_relu"),
        "tf", 32, "mobilenet_{alpha}_{rows}_tf_no_top.h5"),
    "mobilenet_v2": Backbone(
        "MobileNetV2",
        ("block_5_add", "block_12_add", "out_relu"),
        "tf", 32, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{rows}_no_top.h5"),
    "efficientnet_b0": Backbone(
        "EfficientNetB0",
        ("block3b_add", "block5c_add", "top_activation"),
        "raw255", 32, "efficientnetb0_notop.h5"),
    "resnet50v2": Backbone(
        "ResNet50V2",
        ("conv2_block3_out", "conv3_block4_out", "post_relu"),
        "tf", 32, "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "vgg16": Backbone(
        "VGG16",
        ("block3_conv3", "block4_conv3", "block5_conv3"),
        "caffe", 32, "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "inception_v3": Backbone(
        "InceptionV3",
        ("mixed2", "mixed7", "mixed10"),
        "tf", 75, "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "xception": Backbone(
        "Xception",
        ("block4_sepconv2_bn", "block13_sepconv2_bn", "block14_sepconv2_act"),
        "tf", 71, "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"),
}
# Which of a backbone's taps the fusion head fuses: every one (the seeds' multi-scale fusion), or the last
# block's alone (its ablation).
FUSION_TAPS = ("all", "last")
BACKBONE_BLOCKS = 3  # stages that unfrozen_blocks counts, from the top: the layers after each tap but the last
ALPHA_BACKBONES = {"mobilenet": (0.25, 0.5, 0.75, 1.0), "mobilenet_v2": (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)}
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
