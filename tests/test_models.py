"""fmn.models: ResNet key compatibility, FMN shapes per local layer and backbone, stage freezing,
pretrained loading, and the reference vs kernel backends of the mixing network."""
import copy

import pytest
import torch

from fmn.losses import batch_hard_triplet, cross_entropy, ranking_loss
from fmn.models import LOCAL_LAYERS, build_model, build_resnet, load_pretrained
from fmn_kernels import backend as kbackend

H, W = 64, 32


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_fmn(backbone="resnet18", local_layer="pool1", num_classes=6, **kw):
    kw.setdefault("base_width", 8)
    return build_model("fmn", num_classes, backbone=backbone, local_layer=local_layer, input_size=(H, W), **kw)


@pytest.mark.parametrize(
    "name,params", [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)]
)
def test_resnet_matches_torchvision_parameter_count(name, params):
    net = build_resnet(name)
    assert sum(p.numel() for p in net.parameters()) == params


def test_resnet50_state_dict_uses_torchvision_names():
    keys = set(build_resnet("resnet50", base_width=8).state_dict())
    for k in [
        "conv1.weight", "bn1.running_mean", "bn1.num_batches_tracked",
        "layer1.0.conv3.weight", "layer1.0.bn3.bias", "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_var", "layer3.5.conv2.weight", "layer4.2.bn3.weight",
        "fc.weight", "fc.bias",
    ]:
        assert k in keys, k
    keys18 = set(build_resnet("resnet18", base_width=8).state_dict())
    assert "layer2.0.downsample.0.weight" in keys18 and "layer1.0.conv3.weight" not in keys18
    assert "layer4.1.bn2.running_mean" in keys18


SHAPE_CASES = [("resnet18", layer) for layer in LOCAL_LAYERS] + [
    (backbone, "pool1") for backbone in ("resnet34", "resnet50", "resnet101")
] + [("resnet50", "res4")]


@pytest.mark.parametrize("backbone,local_layer", SHAPE_CASES)
def test_fmn_shapes(backbone, local_layer):
    torch.manual_seed(0)
    model = tiny_fmn(backbone, local_layer, base_width=4)
    dim = model.feature_dim
    expected_dim = 4 * 8 * (4 if backbone in ("resnet50", "resnet101") else 1)
    assert dim == expected_dim
    stride = {"pool1": 4, "res2": 4, "res3": 8, "res4": 16}[local_layer]
    assert model.mask_hw == (H // stride, W // stride)
    assert model.lan.names == ("layer1", "layer2", "layer3", "layer4")[LOCAL_LAYERS[local_layer]:]
    x = torch.randn(2, 3, H, W)
    model.train()
    out = model(x)
    assert set(out) == {"grn_logits", "grn_feat"} and out["grn_logits"].shape == (2, 6)
    model.set_stage(2)
    out = model(x, return_mask=True)
    assert out["lan_logits"].shape == (2, 6) and out["lan_feat"].shape == (2, dim)
    assert out["mask"].shape == (2, *model.mask_hw) and bool((out["mask"] >= 1).all())
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert set(out) == {"grn", "lan"} and out["grn"].shape == (2, dim) and out["lan"].shape == (2, dim)


def test_fmn_full_size_pool1_mask_is_quarter_resolution():
    model = build_model("fmn", 10, backbone="resnet18", input_size=(256, 128), base_width=4)
    assert model.mask_hw == (64, 32) and model.mn.weight.shape == (model.feature_dim, 64 * 32)


def test_stage_freezing_and_train_mode():
    model = tiny_fmn()
    model.train()
    assert all(p.requires_grad for p in model.grn.parameters())
    assert not any(p.requires_grad for p in model.lan.parameters())
    model.set_stage(2)
    model.train()
    assert not model.grn.training and not model.grn_head.training
    assert model.lan.training and model.mn.training
    assert not any(p.requires_grad for p in model.grn.parameters())
    assert all(p.requires_grad for p in model.mn.parameters())
    out = model(torch.randn(4, 3, H, W))
    assert not out["grn_feat"].requires_grad and out["lan_logits"].requires_grad


def test_lan_has_separate_parameters():
    model = tiny_fmn()
    grn_ptrs = {p.data_ptr() for p in model.grn.parameters()}
    assert not grn_ptrs & {p.data_ptr() for p in model.lan.parameters()}
    torch.testing.assert_close(model.lan.layer2[0].conv1.weight, model.grn.layer2[0].conv1.weight)
    with torch.no_grad():
        model.grn.layer2[0].conv1.weight.add_(1.0)
    assert not torch.equal(model.lan.layer2[0].conv1.weight, model.grn.layer2[0].conv1.weight)
    model.copy_grn_into_lan()
    torch.testing.assert_close(model.lan.layer2[0].conv1.weight, model.grn.layer2[0].conv1.weight)


def test_load_pretrained_reports_keys(tmp_path):
    src = build_resnet("resnet18", base_width=8)
    state = src.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer4.1.bn2.running_var"]
    path = tmp_path / "imagenet.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    dst = build_resnet("resnet18", base_width=8, num_classes=0)
    lines = []
    missing, unexpected = load_pretrained(dst, path, strict=False, log=lines.append)
    assert missing == ["layer4.1.bn2.running_var"] and unexpected == ["extra.weight"]
    assert "missing keys (1)" in lines[0] and "unexpected keys (1)" in lines[0]
    torch.testing.assert_close(dst.layer3[0].conv2.weight, src.layer3[0].conv2.weight)

    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    model = tiny_fmn(pretrained=str(path))
    torch.testing.assert_close(model.grn.conv1.weight, src.conv1.weight)
    torch.testing.assert_close(model.lan.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    with pytest.raises(FileNotFoundError, match="not found"):
        tiny_fmn(pretrained=str(tmp_path / "missing.pth"))


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="local_layer"):
        tiny_fmn(local_layer="res5")
    with pytest.raises(ValueError, match="backbone"):
        tiny_fmn(backbone="resnet152")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("nope", 3)


def _stage2_loss_and_grads(model, x, pid):
    model.set_stage(2)
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = cross_entropy(out["lan_logits"], pid) + ranking_loss(out["grn_logits"], out["lan_logits"], pid, 0.1)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def kernel_backends():
    names = []
    if kbackend.has_compiled_kernel("spatial_mask_mul", "cpu"):
        names.append(("cpu", "cpu"))
    if torch.cuda.is_available():
        if kbackend.has_compiled_kernel("spatial_mask_mul", "cuda"):
            names.append(("cuda", "cuda"))
        if kbackend.triton_available():
            names.append(("triton", "cuda"))
    return names or [pytest.param(None, None, marks=pytest.mark.skip(reason="no compiled or Triton kernel here"))]


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_fmn_reference_and_kernel_backends_agree(backend, device):
    torch.manual_seed(0)
    ref = tiny_fmn(backend="torch", mask_init_std=0.05).to(device, torch.float64)
    fast = copy.deepcopy(ref)
    fast.mn.backend = backend
    x = torch.randn(4, 3, H, W, device=device, dtype=torch.float64)
    pid = torch.tensor([0, 1, 2, 0], device=device)
    loss_ref, grads_ref = _stage2_loss_and_grads(ref, x, pid)
    loss_fast, grads_fast = _stage2_loss_and_grads(fast, x, pid)
    torch.testing.assert_close(loss_fast, loss_ref)
    assert set(grads_ref) == set(grads_fast)
    assert "mn.weight" in grads_ref and not any(n.startswith("grn.") for n in grads_ref)
    assert grads_ref["mn.weight"].abs().sum() > 0
    for name in grads_ref:
        torch.testing.assert_close(grads_fast[name], grads_ref[name], msg=name)


def test_ranking_loss_matches_formula():
    torch.manual_seed(0)
    g = torch.randn(5, 7)
    l = torch.randn(5, 7, requires_grad=True)
    t = torch.tensor([0, 3, 6, 2, 2])
    pg = torch.softmax(g, 1)[torch.arange(5), t]
    pl = torch.softmax(l, 1)[torch.arange(5), t]
    expected = torch.clamp(pg - pl + 0.2, min=0).mean()
    got = ranking_loss(g, l, t, margin=0.2)
    torch.testing.assert_close(got, expected)
    got.backward()
    assert l.grad.abs().sum() > 0
    # By hand, two classes, target 0, softmax of (ln 3, 0) = (0.75, 0.25), of (0, 0) = (0.5, 0.5):
    # p^G - p^L + 0.1 = 0.5 - 0.75 + 0.1 < 0 (clamped), 0.75 - 0.5 + 0.1 = 0.35, 0.25 - 0.75 + 0.1 < 0
    ln3 = torch.tensor(3.0).log().item()
    g = torch.tensor([[0.0, 0.0], [ln3, 0.0], [0.0, ln3]])
    l = torch.tensor([[ln3, 0.0], [0.0, 0.0], [ln3, 0.0]], requires_grad=True)
    got = ranking_loss(g, l, torch.tensor([0, 0, 0]), margin=0.1)
    assert float(got.detach()) == pytest.approx(0.35 / 3, rel=1e-6)           # computed in float32
    got.backward()
    # only the second sample's term is open: d(-p^L/3)/dl = -p(1-p)/3 = -1/12 on the target logit
    torch.testing.assert_close(l.grad, torch.tensor([[0.0, 0.0], [-1 / 12, 1 / 12], [0.0, 0.0]]))


def test_batch_hard_triplet():
    feats = torch.tensor([[0.0, 0.0], [0.0, 1.0], [5.0, 0.0], [5.0, 1.0]])
    pid = torch.tensor([0, 0, 1, 1])
    assert float(batch_hard_triplet(feats, pid, margin=0.3)) == pytest.approx(0.0)
    feats = torch.tensor([[0.0, 0.0], [3.0, 0.0], [1.0, 0.0], [4.0, 0.0]])
    # anchor 0: d_ap=3, d_an=1 -> 2.3; 1: 3 vs 1 -> 2.3; 2: 3 vs 1 -> 2.3; 3: 3 vs 1 -> 2.3
    assert float(batch_hard_triplet(feats, pid, margin=0.3)) == pytest.approx(2.3, abs=1e-5)
    smooth = cross_entropy(torch.zeros(2, 4), torch.tensor([0, 1]), label_smoothing=0.1)
    assert float(smooth) == pytest.approx(float(torch.log(torch.tensor(4.0))), abs=1e-6)
