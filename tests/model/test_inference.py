"""Every inference path predicts what eager predicts; unavailable paths fall back and say why."""

import pytest
import torch

from gtsrb import backends, inference, models


@pytest.fixture(scope="module")
def fixed_batch():
    torch.manual_seed(0)
    return torch.randn(64, 3, 32, 32)


@pytest.mark.parametrize("arch", sorted(models.ARCHS))
@pytest.mark.parametrize("path", ["jit", "compile"])
def test_optimised_paths_predict_like_eager(arch, path, fixed_batch):
    torch.manual_seed(1)
    model = models.build(arch).eval()
    with torch.inference_mode():
        for m in model.modules():  # non-trivial batch-norm statistics
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
        expected = model(fixed_batch)
    fn, used, fallback = inference.optimize(model, path, fixed_batch)
    assert used == path, fallback
    with torch.inference_mode():
        got = fn(fixed_batch)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


def test_compile_serves_small_batches_from_the_frozen_graph_and_any_batch_size(fixed_batch):
    torch.manual_seed(1)
    model = models.build("traffic_sign_net").eval()
    fn, used, fallback = inference.optimize(model, "compile", fixed_batch[:1])
    assert used == "compile", fallback
    with torch.inference_mode():
        for n in (1, inference.SMALL_BATCH - 1, inference.SMALL_BATCH, 37, 64):
            torch.testing.assert_close(fn(fixed_batch[:n]), model(fixed_batch[:n]), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("path", ["jit", "compile"])
def test_optimised_paths_refuse_another_image_size(path, fixed_batch):
    """The crop is fixed when the graph is built: a 40 px batch must not be cut to 30 px."""
    fn, used, _ = inference.optimize(models.build("traffic_sign_net").eval(), path, fixed_batch)
    assert used == path
    with pytest.raises(ValueError, match=r"expected 32 x 32 images, got \(40, 40\)"), torch.inference_mode():
        fn(torch.zeros(64, 3, 40, 40))


def test_allocator_tuning_is_reported():
    """glibc here: the call must succeed, and a second call changes nothing."""
    assert inference.tune_allocator() == "glibc heap keeps freed buffers"
    assert inference.tune_allocator() == "glibc heap keeps freed buffers"


def test_compile_falls_back_with_the_reason(fixed_batch, monkeypatch):
    """A machine without a C++ compiler cannot run Inductor: simulated by making compile fail."""

    def broken(*args, **kwargs):
        raise RuntimeError("InductorError: no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    model = models.build("traffic_sign_net").eval()
    _, used, fallback = inference.optimize(model, "compile", fixed_batch)
    assert used == "jit"
    assert "compile unavailable (RuntimeError: InductorError: no C++ compiler found)" in fallback


def test_backends_switch_the_convolution_kernel(fixed_batch):
    model = models.build("traffic_sign_net").eval()
    from gtsrb.evaluate import profile

    try:
        info = backends.select("openblas")
        assert info["onednn_enabled"] is False
        _, kernel = profile(model, fixed_batch)
        assert kernel != "aten::mkldnn_convolution"
        info = backends.select("acl")
        assert info["onednn_enabled"] is True
        _, kernel = profile(model, fixed_batch)
        assert kernel == "aten::mkldnn_convolution"
        assert ("Arm Compute Library" in info["kernels"]) == info["acl_available"]
    finally:
        torch.backends.mkldnn.enabled = True


def test_optimising_leaves_the_callers_model_as_it_was(fixed_batch):
    model = models.build("micronnet").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inference.optimize(model, "jit", fixed_batch)
    for k, v in model.state_dict().items():
        assert v.is_contiguous() and torch.equal(v, before[k]), k
