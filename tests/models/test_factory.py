"""The network factory: architectures, the classification head, normalisation, encoder weight sources."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch
from safetensors.torch import save_file

from busi_mtl.models import factory
from busi_mtl.models.factory import EncoderWeightsError, build_model


@pytest.mark.parametrize("arch", factory.ARCHS)
def test_every_architecture_gives_mask_and_class_logits(arch):
    decoder = [64, 32, 16, 8, 4] if arch in ("unet", "unetplusplus") else None
    net = build_model(arch, "resnet18", decoder_channels=decoder, head_hidden=[32])
    masks, logits = net(torch.rand(2, 1, 64, 64))
    assert masks.shape == (2, 1, 64, 64) and logits.shape == (2, 3)


def test_head_sizes_are_configurable():
    linears = lambda net: [m for m in net.head.modules() if isinstance(m, torch.nn.Linear)]  # noqa: E731
    assert [m.out_features for m in linears(build_model(encoder_name="resnet18", head_hidden=[]))] == [3]
    deep = build_model(encoder_name="resnet18", head_hidden=[64, 32], head_dropout=0.5)
    assert [(m.in_features, m.out_features) for m in linears(deep)] == [(512, 64), (64, 32), (32, 3)]


@pytest.mark.parametrize("arch", factory.ATTENTION_ARCHS)
def test_scse_decoder_attention(arch):
    net = build_model(arch, "resnet18", decoder_channels=[64, 32, 16, 16, 16], decoder_attention_type="scse")
    scse = [m for m in net.seg.decoder.modules() if type(m).__name__ == "SCSEModule"]
    assert scse  # the attention is in the decoder, not silently dropped
    masks, logits = net(torch.rand(2, 1, 64, 64))
    assert masks.shape == (2, 1, 64, 64) and logits.shape == (2, 3)
    plain = build_model(arch, "resnet18", decoder_channels=[64, 32, 16, 16, 16])
    assert not [m for m in plain.seg.decoder.modules() if type(m).__name__ == "SCSEModule"]


def test_decoder_attention_refused_where_the_decoder_has_none():
    with pytest.raises(ValueError, match=r"decoder_attention_type='scse'.*model\.arch='fpn'"):
        build_model("fpn", "resnet18", decoder_attention_type="scse")
    with pytest.raises(ValueError, match="needs decoder channels >= 16"):
        build_model("unet", "resnet18", decoder_channels=[64, 32, 16, 8, 4], decoder_attention_type="scse")


def test_drop_path_is_stochastic_depth_in_a_timm_encoder():
    kwargs = {"encoder_name": "tu-efficientnet_lite0", "decoder_channels": [64, 32, 16, 16, 16]}
    net = build_model(**kwargs, drop_path_rate=0.2)
    rates = [m.drop_prob for m in net.seg.encoder.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) <= 0.2 and max(rates) > 0.15  # timm ramps it up towards the deepest block
    plain = build_model(**kwargs)
    assert not [m for m in plain.seg.encoder.modules() if type(m).__name__ == "DropPath"]
    assert net.state_dict().keys() == plain.state_dict().keys()  # no weights: state dicts load either way
    x = torch.rand(2, 1, 64, 64)
    torch.manual_seed(0)
    net.train()
    assert not torch.equal(net(x)[0], net(x)[0])  # blocks dropped at random in training
    net.eval()
    assert torch.equal(net(x)[0], net(x)[0])


def test_drop_path_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match=r"drop_path_rate=0\.2 needs a timm encoder.*'resnet18'"):
        build_model(encoder_name="resnet18", drop_path_rate=0.2)
    with pytest.raises(ValueError, match=r"drop_path_rate=1\.0: must be in \[0, 1\)"):
        build_model(encoder_name="tu-efficientnet_lite0", drop_path_rate=1.0)


def test_unknown_arch():
    with pytest.raises(ValueError, match=r"model\.arch='segformer'"):
        build_model("segformer")


def test_normalisation_is_part_of_the_network_and_its_state():
    net = build_model(encoder_name="resnet18").eval()
    x = torch.rand(1, 1, 64, 64)
    before = net(x)[1]
    net.set_normalization(0.3, 0.1)
    assert not torch.allclose(before, net(x)[1])
    state = net.state_dict()
    assert state["pixel_mean"].item() == pytest.approx(0.3) and state["pixel_std"].item() == pytest.approx(
        0.1
    )


def _encoder_state(in_channels: int = 1, name: str = "resnet18") -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    return smp.encoders.get_encoder(name, in_channels=in_channels).state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_encoder_weights_load(tmp_path, suffix):
    state = _encoder_state()
    path = tmp_path / f"encoder{suffix}"
    if suffix == ".pth":
        torch.save({f"encoder.{k}": v for k, v in state.items()}, path)  # prefixed keys are accepted
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    net = build_model(encoder_name="resnet18", encoder_weights=str(path))
    for key, value in net.seg.encoder.state_dict().items():
        torch.testing.assert_close(value, state[key], msg=key)


def test_rgb_imagenet_style_weights_are_summed_to_one_channel(tmp_path):
    state = _encoder_state(in_channels=3)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)  # torchvision classifier
    path = tmp_path / "resnet18_rgb.pth"
    torch.save(state, path)
    net = build_model(encoder_name="resnet18", encoder_weights=str(path))
    torch.testing.assert_close(net.seg.encoder.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))


def test_weights_for_another_encoder_are_refused(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(_encoder_state(name="resnet34"), path)
    with pytest.raises(EncoderWeightsError, match=r"does not fit encoder.*unexpected.*model\.encoder_name"):
        build_model(encoder_name="resnet18", encoder_weights=str(path))


def test_pickled_objects_are_not_executed(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": object.__new__(torch.nn.ReLU)}, path)
    with pytest.raises(EncoderWeightsError, match="cannot be read as a state dict"):
        build_model(encoder_name="resnet18", encoder_weights=str(path))


def test_missing_local_file(tmp_path):
    with pytest.raises(EncoderWeightsError, match="file not found"):
        build_model(encoder_name="resnet18", encoder_weights=str(tmp_path / "none.pth"))


def test_offline_imagenet_download_gives_actionable_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co' (no network)")

    monkeypatch.setattr(smp.encoders, "hf_hub_download", offline)
    with pytest.raises(EncoderWeightsError) as err:
        build_model(encoder_name="resnet18", encoder_weights="imagenet")
    message = str(err.value)
    assert "imagenet" in message and "resnet18" in message
    assert "model.encoder_weights=null" in message and ".safetensors" in message
    assert isinstance(err.value.__cause__, ConnectionError)


def test_mask_guided_pooling_reads_the_predicted_lesion():
    net = build_model(encoder_name="resnet18", head_hidden=[], mask_pooling=True).eval()
    assert net.head.layers[-1].in_features == 2 * 512
    x = torch.rand(2, 1, 64, 64)
    _, before = net(x)
    with torch.no_grad():
        net.seg.segmentation_head[0].bias.add_(5.0)  # a different predicted mask ...
    _, after = net(x)
    assert not torch.allclose(before, after)  # ... changes what the classifier pools
    _, logits = net(x)
    logits.sum().backward()
    assert net.seg.segmentation_head[0].weight.grad is None  # the mask weights are detached
    assert net.seg.encoder.conv1.weight.grad is not None
