"""fmn.models against the papers and DESIGN.md: the ResNet backbones against torchvision's
architecture, checkpoint loading and its errors, FMN as a hand-written composition of its
submodules (hooks on MN and LAN, stage freezing), every kernel backend on a tiny model, MMGA /
MGRAN / PMM against their docstrings (Hard-Mix partners, salient block, Batch DropBlock), eval
determinism, channels_last, batch size 1, odd sizes and input errors."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fmn.checkpoint import CheckpointError
from fmn.data.parts import PART_CHANNELS
from fmn.losses import cross_entropy, ranking_loss
from fmn.models import LOCAL_LAYERS, build_model, build_resnet, load_pretrained
from fmn.models.pmm import attentive_hard_mix, negative_partners
from fmn_kernels import backend as kbackend

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 64, 32
STAGES = ("layer1", "layer2", "layer3", "layer4")


def tiny_fmn(local_layer="pool1", input_size=(H, W), **kw):
    kw.setdefault("base_width", 8)
    kw.setdefault("mask_init_std", 0.05)      # logits of a few tenths: exp(relu(u)) is not all ones
    return build_model("fmn", 5, backbone="resnet18", local_layer=local_layer, input_size=input_size, **kw)


def tiny_seed(name, **kw):
    opts = dict(backbone="resnet18", base_width=8, input_size=(H, W), bnneck=True)
    opts.update(kw)
    return build_model(name, 4, **opts)


# ---------------------------------------------------------------------------------------- ResNet
def _torchvision_spec(name):
    """{key: shape} of torchvision's resnet<depth>() state dict, written out from its published
    architecture (conv1 7x7/2 64, maxpool; stages of [2,2,2,2] / [3,4,6,3] / [3,4,23,3] blocks of
    widths 64..512; v1.5 bottleneck: 1x1, 3x3 (the stride), 1x1 x4; downsample.0/1; fc 1000)."""
    bottleneck = name in ("resnet50", "resnet101")
    blocks = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3], "resnet50": [3, 4, 6, 3],
              "resnet101": [3, 4, 23, 3]}[name]
    spec = {}

    def bn(prefix, c):
        for k in ("weight", "bias", "running_mean", "running_var"):
            spec[f"{prefix}.{k}"] = (c,)
        spec[f"{prefix}.num_batches_tracked"] = ()

    spec["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for s, n in enumerate(blocks):
        planes = 64 * 2 ** s
        out = planes * (4 if bottleneck else 1)
        for i in range(n):
            p = f"layer{s + 1}.{i}"
            if bottleneck:
                spec[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
                bn(f"{p}.bn1", planes)
                spec[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
                spec[f"{p}.conv3.weight"] = (out, planes, 1, 1)
                bn(f"{p}.bn3", out)
            else:
                spec[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
                bn(f"{p}.bn1", planes)
                spec[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
            if i == 0 and (s > 0 or inplanes != out):
                spec[f"{p}.downsample.0.weight"] = (out, inplanes, 1, 1)
                bn(f"{p}.downsample.1", out)
            inplanes = out
    spec["fc.weight"] = (1000, inplanes)
    spec["fc.bias"] = (1000,)
    return spec


@pytest.mark.parametrize("name,params,keys", [("resnet18", 11_689_512, 122), ("resnet34", 21_797_672, 218),
                                              ("resnet50", 25_557_032, 320), ("resnet101", 44_549_160, 626)])
def test_resnet_state_dict_is_torchvision_key_for_key(name, params, keys):
    net = build_resnet(name)
    sd = net.state_dict()
    assert list(sd) == list(_torchvision_spec(name))          # names and order
    assert {k: tuple(v.shape) for k, v in sd.items()} == _torchvision_spec(name)
    assert len(sd) == keys and sum(p.numel() for p in net.parameters()) == params
    # v1.5: the stride of a downsampling block sits on its 3x3 convolution (and the shortcut)
    first = net.layer2[0]
    assert first.downsample[0].stride == (2, 2)
    if name in ("resnet50", "resnet101"):
        assert (first.conv1.stride, first.conv2.stride) == ((1, 1), (2, 2))
    else:
        assert (first.conv1.stride, first.conv2.stride) == ((2, 2), (1, 1))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_matches_torchvision_model(name):
    tv = pytest.importorskip("torchvision.models")
    ref = getattr(tv, name)()
    net = build_resnet(name)
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    net.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(net.eval()(x), ref.eval()(x))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("size", [(64, 32), (65, 33)])
def test_resnet_stage_sizes_and_last_stride(name, size):
    x = torch.randn(1, 3, *size)
    sizes = {}
    for last_stride in (2, 1):
        net = build_resnet(name, base_width=8, num_classes=0, last_stride=last_stride).eval()
        f = net.stem(x)
        out = [tuple(f.shape[-2:])]
        for s in STAGES:
            f = getattr(net, s)(f)
            out.append(tuple(f.shape[-2:]))
        sizes[last_stride] = out
        assert net(x).shape == (1, net.feature_dim)
    up = lambda n, k: -(-n // 2 ** k)                          # ceil(n / 2^k)
    expect = [(up(size[0], k), up(size[1], k)) for k in (2, 2, 3, 4, 5)]
    assert sizes[2] == expect
    assert sizes[1] == expect[:4] + [expect[3]]                 # layer4 keeps layer3's size
    # last_stride changes no tensor: an ImageNet checkpoint loads either way
    a = build_resnet(name, base_width=8, last_stride=1).state_dict()
    b = build_resnet(name, base_width=8, last_stride=2).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    with pytest.raises(ValueError, match="last_stride"):
        build_resnet(name, last_stride=3)


# ---------------------------------------------------------------------------- checkpoint loading
def _flag_set(*_):
    _flag_set.called = True
    return {}


_flag_set.called = False


class _Sneaky:
    """Unpickling this calls _flag_set: only a loader without weights_only=True does that."""

    def __reduce__(self):
        return (_flag_set, ())


def _tv_state(base_width=8):
    torch.manual_seed(1)
    src = build_resnet("resnet18", base_width=base_width)       # torchvision-style, with a 1000-class fc
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return src.state_dict()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model+module", "no_num_batches_tracked"])
def test_load_pretrained_forms(tmp_path, wrap):
    state = _tv_state()
    saved = dict(state)
    if wrap == "no_num_batches_tracked":                        # torchvision's original 2017 files
        saved = {k: v for k, v in saved.items() if not k.endswith("num_batches_tracked")}
    obj = {"plain": saved, "state_dict": {"state_dict": saved, "epoch": 90},
           "model+module": {"model": {"module." + k: v for k, v in saved.items()}},
           "no_num_batches_tracked": saved}[wrap]
    path = tmp_path / "ck.pth"
    torch.save(obj, path)
    net = build_resnet("resnet18", base_width=8, num_classes=0)
    logs = []
    missing, unexpected = load_pretrained(net, path, log=logs.append)
    assert missing == [] and unexpected == []
    for k, v in net.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, state[k]), k
    assert "loaded" in logs[0] and str(path) in logs[0] and "classifier): 2 keys" in logs[0]


def test_load_pretrained_wrong_shape_names_the_key_and_loads_nothing(tmp_path):
    state = _tv_state()
    state["layer3.0.conv2.weight"] = torch.randn(32, 32, 1, 1)
    path = tmp_path / "ck.pth"
    torch.save(state, path)
    net = build_resnet("resnet18", base_width=8, num_classes=0)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(CheckpointError, match=r"layer3\.0\.conv2\.weight \(32, 32, 1, 1\) vs \(32, 32, 3, 3\)"):
        load_pretrained(net, path, log=None)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    # an ImageNet checkpoint for a width-reduced network: one error, not a silent no-op
    torch.save(_tv_state(base_width=16), path)
    with pytest.raises(CheckpointError, match="do not fit") as err:
        tiny_fmn(pretrained=str(path))
    assert str(path) in str(err.value) and "conv1.weight (16, 3, 7, 7) vs (8, 3, 7, 7)" in str(err.value)


def test_load_pretrained_rejects_a_checkpoint_of_another_model(tmp_path):
    # an FMN training state dict ("grn.conv1.weight", ...) fits no key of a bare backbone
    path = tmp_path / "fmn.pth"
    torch.save({"model": tiny_fmn().state_dict()}, path)
    with pytest.raises(CheckpointError, match="none of the checkpoint's"):
        load_pretrained(build_resnet("resnet18", base_width=8, num_classes=0), path, log=None)


@pytest.mark.parametrize("case", ["resnet34_into_resnet18", "resnet18_into_resnet34", "one_tensor_missing",
                                  "one_tensor_extra"])
def test_load_pretrained_refuses_a_partial_or_other_depth_checkpoint(tmp_path, case):
    # every tensor present fits its key, yet part of the network would stay at its random initialisation
    target = "resnet34" if case == "resnet18_into_resnet34" else "resnet18"
    source = {"resnet34_into_resnet18": "resnet34", "resnet18_into_resnet34": "resnet18"}.get(case, "resnet18")
    torch.manual_seed(1)
    state = build_resnet(source, base_width=8).state_dict()
    if case == "one_tensor_missing":
        del state["layer4.1.bn2.running_var"]
    elif case == "one_tensor_extra":
        state["layer4.2.conv1.weight"] = torch.randn(64, 64, 3, 3)
    path = tmp_path / "ck.pth"
    torch.save(state, path)
    torch.manual_seed(2)
    net = build_resnet(target, base_width=8, num_classes=0)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(CheckpointError, match="not a complete checkpoint") as err:
        load_pretrained(net, path, log=None)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    expected = {"resnet34_into_resnet18": "layer1.2.conv1.weight", "resnet18_into_resnet34": "layer1.2.conv1.weight",
                "one_tensor_missing": "layer4.1.bn2.running_var", "one_tensor_extra": "layer4.2.conv1.weight"}[case]
    assert expected in msg
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())   # nothing loaded
    if case == "one_tensor_missing":
        with pytest.raises(CheckpointError, match="not a complete checkpoint"):
            tiny_fmn(pretrained=str(path))
    # strict=False loads what fits and reports the rest
    missing, unexpected = load_pretrained(net, path, strict=False, log=None)
    assert expected in missing + unexpected
    assert torch.equal(net.conv1.weight, state["conv1.weight"])


@pytest.mark.parametrize("kind", ["text", "module", "list", "no_tensors", "sneaky", "truncated", "damaged"])
def test_non_checkpoint_files_give_one_clear_error(tmp_path, kind):
    path = tmp_path / "weights.pth"
    if kind == "text":
        path.write_text("resnet50 weights are at https://example.org\n")
    elif kind == "module":
        torch.save(build_resnet("resnet18", base_width=4), path)
    elif kind == "list":
        torch.save([torch.zeros(1)], path)
    elif kind == "no_tensors":
        torch.save({"epoch": 3, "arch": "resnet18"}, path)
    elif kind == "sneaky":
        torch.save({"state_dict": _tv_state(), "extra": _Sneaky()}, path)
    elif kind == "damaged":                                       # tensor bytes overwritten: torch.load passes
        state = _tv_state(base_width=4)
        torch.save(state, path)
        data = bytearray(path.read_bytes())
        at = bytes(data).index(state["layer2.0.conv1.weight"].numpy().tobytes()) + 64
        data[at:at + 8] = b"\x7f" * 8
        path.write_bytes(bytes(data))
        assert not torch.equal(torch.load(path, weights_only=True)["layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])
    else:
        torch.save(_tv_state(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    _flag_set.called = False
    net = build_resnet("resnet18", base_width=4, num_classes=0)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(net, path, log=None)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg and len(msg) < 600
    assert isinstance(err.value, ValueError)
    assert not _flag_set.called                                   # weights_only=True: no code ran
    if kind in ("module", "sneaky"):
        assert "state_dict" in msg


# ------------------------------------------------------------------------ FMN: the composition
def _hand_fmn(model, x):
    """FMN written out from its submodules: GRN stages -> g -> u = gW + b -> m = exp(relu(u)) ->
    o = local * m -> LAN stages -> l."""
    grn = model.grn
    f = grn.stem(x)
    local = f
    for i, s in enumerate(STAGES):
        f = getattr(grn, s)(f)
        if i + 1 == LOCAL_LAYERS[model.local_layer]:
            local = f
    g = f.mean((2, 3))
    u = g @ model.mn.weight + model.mn.bias
    m = torch.exp(torch.relu(u)).view(x.shape[0], *local.shape[-2:])
    y = local * m[:, None]
    mixed = y
    for s in STAGES[LOCAL_LAYERS[model.local_layer]:]:
        y = getattr(model.lan, s)(y)
    return {"local": local, "g": g, "mask": m, "mixed": mixed, "l": y.mean((2, 3))}


@pytest.mark.parametrize("local_layer", list(LOCAL_LAYERS))
def test_fmn_is_the_composition_of_its_submodules(local_layer):
    torch.manual_seed(0)
    size = (66, 34)                                               # odd sizes on the way down
    model = tiny_fmn(local_layer, input_size=size).eval()
    x = torch.randn(3, 3, *size)
    seen = {}
    model.mn.register_forward_hook(lambda m, inp, out: seen.update(mn_in=inp, mn_out=out))
    model.lan.register_forward_hook(lambda m, inp, out: seen.update(lan_in=inp[0]))
    with torch.no_grad():
        ref = _hand_fmn(model, x)
        out = model(x, return_mask=True)
    assert model.mask_hw == tuple(ref["local"].shape[-2:])
    assert out["mask"].shape == (3, *model.mask_hw) and bool((out["mask"] >= 1).all())
    assert bool((out["mask"] > 1).any()) and bool((out["mask"] == 1).any())
    torch.testing.assert_close(seen["mn_in"][0], ref["local"])    # MN masks the chosen local layer
    torch.testing.assert_close(seen["mn_in"][1], ref["g"])        # ... from the pooled global feature
    torch.testing.assert_close(seen["lan_in"], ref["mixed"])      # LAN consumes the masked map
    torch.testing.assert_close(out["mask"], ref["mask"])
    torch.testing.assert_close(out["grn"], ref["g"])
    torch.testing.assert_close(out["lan"], ref["l"])

    # training, stage 2: the same features and each branch's classifier on them
    model.set_stage(2).train()
    out = model(x)
    torch.testing.assert_close(out["grn_feat"], ref["g"])         # GRN frozen in eval mode
    hand = _hand_fmn(model, x)                                    # LAN BN in training mode, as the model
    torch.testing.assert_close(out["lan_feat"], hand["l"])
    torch.testing.assert_close(out["grn_logits"], model.grn_head(ref["g"]))
    torch.testing.assert_close(out["lan_logits"], model.lan_head(hand["l"]))


def _bn_stats(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def test_fmn_stage1_trains_grn_only_and_never_runs_the_lan():
    model = tiny_fmn().train()
    calls = []
    model.lan.register_forward_hook(lambda *a: calls.append("lan"))
    lan_stats = _bn_stats(model.lan)
    x, pid = torch.randn(4, 3, H, W), torch.tensor([0, 1, 2, 0])
    out = model(x, return_mask=True)
    assert set(out) == {"grn_logits", "grn_feat", "mask"} and out["mask"].shape == (4, *model.mn.mask_hw)
    assert not out["mask"].requires_grad
    cross_entropy(out["grn_logits"], pid).backward()
    assert calls == []                                           # the mask only, not the LAN
    after = _bn_stats(model.lan)
    assert all(torch.equal(after[k], lan_stats[k]) for k in lan_stats)
    for name, p in model.named_parameters():
        trains = name.startswith(("grn.", "grn_head."))
        assert (p.grad is not None) == trains, name
    assert model.grn.bn1.num_batches_tracked == 1


def test_fmn_stage2_freezes_grn_checked_with_hooks():
    model = tiny_fmn().set_stage(2)
    model.eval()
    model.train()                                                  # train() must keep GRN in eval
    records = []

    def hook(mod, inp, out):
        records.append((mod.training, out.requires_grad))

    for m in list(model.grn.modules()) + list(model.grn_head.modules()):
        if not list(m.children()):
            m.register_forward_hook(hook)
    grn_stats = _bn_stats(model.grn)
    lan_stats = _bn_stats(model.lan)
    x, pid = torch.randn(4, 3, H, W), torch.tensor([0, 1, 2, 0])
    out = model(x)
    loss = cross_entropy(out["lan_logits"], pid) + ranking_loss(out["grn_logits"], out["lan_logits"], pid, 0.1)
    loss.backward()
    assert len(records) > 20 and all(not training and not grad for training, grad in records)
    assert all(torch.equal(v, grn_stats[k]) for k, v in _bn_stats(model.grn).items())
    assert any(not torch.equal(v, lan_stats[k]) for k, v in _bn_stats(model.lan).items())
    for name, p in model.named_parameters():
        if name.startswith(("grn.", "grn_head.")):
            assert p.grad is None and not p.requires_grad, name
        else:
            assert p.grad is not None, name
    assert model.mn.weight.grad.abs().sum() > 0 and model.lan.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert model.lan.training and model.mn.training and model.lan_head.training


def _fmn_runs(model, x, pid):
    """Stage-1 outputs with the mask, stage-2 loss and gradients, eval outputs with the mask."""
    res = {}
    model.set_stage(1).train()
    res["s1_mask"] = model(x, return_mask=True)["mask"]
    model.set_stage(2).train()
    model.zero_grad(set_to_none=True)
    out = model(x, return_mask=True)
    loss = cross_entropy(out["lan_logits"], pid) + ranking_loss(out["grn_logits"], out["lan_logits"], pid, 0.1)
    loss.backward()
    res["s2_loss"], res["s2_mask"] = loss.detach(), out["mask"].detach()
    res.update({"grad " + n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    model.eval()
    with torch.no_grad():
        for fmt in (torch.contiguous_format, torch.channels_last):
            ev = model(x.to(memory_format=fmt), return_mask=True)
            res.update({f"eval {k} {fmt}": v for k, v in ev.items()})
    return res


def _all_backends():
    out = ["cpu"] if kbackend.has_compiled_kernel("spatial_mask_mul", "cpu") else []
    if kbackend.triton_runs_on("cpu"):
        out.append("triton")
    return out


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("local_layer", ["pool1", "res3"])
def test_fmn_every_backend_matches_the_reference(backend, local_layer):
    if backend not in _all_backends():
        pytest.skip(f"backend {backend} is not available here")
    torch.manual_seed(0)
    ref = tiny_fmn(local_layer, backend="torch").double()
    fast = copy.deepcopy(ref)
    fast.mn.backend = backend
    x = torch.randn(4, 3, H, W, dtype=torch.float64)
    pid = torch.tensor([0, 1, 2, 0])
    a, b = _fmn_runs(ref, x, pid), _fmn_runs(fast, x, pid)
    assert a.keys() == b.keys() and "grad mn.weight" in a and "grad lan.layer4.1.bn2.weight" in a
    assert a["grad mn.weight"].abs().sum() > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], msg=k)


# ------------------------------------------------------- all models: determinism, layouts, errors
MODELS = ("fmn", "mmga", "mgran", "pmm")


def _any_model(name):
    torch.manual_seed(0)
    if name == "fmn":
        return tiny_fmn()
    return tiny_seed(name, **({"batch_drop": True} if name == "pmm" else {}))


@pytest.mark.parametrize("name", MODELS)
def test_eval_is_deterministic_batch_independent_and_layout_free(name):
    model = _any_model(name).eval()
    x = torch.randn(3, 3, H, W)
    with torch.no_grad():
        a, b = model(x), model(x)
        one = model(x[1:2])
        cl = model(x.to(memory_format=torch.channels_last))
    assert a.keys() == b.keys() == one.keys() == cl.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k                               # bit-identical repeats
        torch.testing.assert_close(one[k], a[k][1:2], msg=k)            # batch size 1
        torch.testing.assert_close(cl[k], a[k], msg=k)                  # channels_last input
        assert torch.isfinite(a[k]).all(), k


def test_fmn_channels_last_training_gradients_match():
    torch.manual_seed(0)
    model = tiny_fmn().set_stage(2).train()
    x, pid = torch.randn(4, 3, H, W), torch.tensor([0, 1, 2, 0])
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        m = copy.deepcopy(model).to(memory_format=fmt)
        out = m(x.to(memory_format=fmt))
        cross_entropy(out["lan_logits"], pid).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("name", MODELS)
def test_wrong_input_shapes_are_clear_errors(name):
    model = _any_model(name).eval()
    for bad in (torch.randn(3, H, W), torch.randn(2, 1, H, W), torch.randn(2, 4, H, W), torch.randn(2, 3, H)):
        with pytest.raises(ValueError, match=rf"{name}: expected a batch of RGB images of shape \(B, 3, H, W\)"):
            model(bad)
    with pytest.raises(TypeError, match=f"{name}: expected floating-point"):
        model(torch.zeros(2, 3, H, W, dtype=torch.uint8))


def test_fmn_image_size_must_match_the_mask():
    model = tiny_fmn().eval()
    with pytest.raises(ValueError, match=r"built for input_size \(64, 32\).*70x32.*resize them to 64x32"):
        model(torch.randn(2, 3, 70, W))
    with pytest.raises(ValueError, match="input_size"):
        model.activation_maps(torch.randn(2, 3, H, 40))
    with torch.no_grad():
        assert model(torch.randn(2, 3, H - 1, W))["lan"].shape == (2, model.feature_dim)  # same 16x8 mask
    model.train()                                  # stage 1 without the mask: the GRN takes any size
    assert model(torch.randn(2, 3, 70, W))["grn_logits"].shape == (2, 5)
    with pytest.raises(ValueError, match="input_size"):
        model(torch.randn(2, 3, 70, W), return_mask=True)


# ------------------------------------------------------------------------------------- MMGA
def _random_parts(B, h=H, w=W):
    torch.manual_seed(5)
    return torch.rand(B, len(PART_CHANNELS), h, w)


def test_mmga_is_its_docstring():
    model = tiny_seed("mmga").eval()
    x = torch.randn(3, 3, H, W)
    with torch.no_grad():
        out = model(x)
        # hand-written: attention after each scale; parts pooled before the whole-body gate
        f = model.backbone.stem(x)
        parts = {"upper": [], "lower": []}
        for s in STAGES:
            f = getattr(model.backbone, s)(f)
            if s in model.scales:
                a = torch.sigmoid(model.attention[s](f))
                for k, c in (("upper", 1), ("lower", 2)):
                    parts[k].append((f * a[:, c:c + 1]).sum((2, 3)) / a[:, c].sum((1, 2))[:, None])
                f = f * a[:, 0:1]
        g = f.mean((2, 3))
        up = model.part_embed["upper"](torch.cat(parts["upper"], 1))
        lo = model.part_embed["lower"](torch.cat(parts["lower"], 1))
    torch.testing.assert_close(out["global"], g)
    torch.testing.assert_close(out["upper"], up)
    torch.testing.assert_close(out["lower"], lo)
    d = torch.cat([F.normalize(v, dim=1) for v in (g, up, lo)], 1) / 3 ** 0.5
    torch.testing.assert_close(out["descriptor"], d)
    maps = model.attention_maps(x)
    assert {k: tuple(v.shape) for k, v in maps.items()} == {"layer2": (3, 3, 8, 4), "layer3": (3, 3, 4, 2),
                                                            "layer4": (3, 3, 2, 1)}


def test_mmga_attention_is_supervised_by_the_matching_part_at_every_scale():
    model = tiny_seed("mmga", attention_weight=2.0).train()
    x = torch.randn(4, 3, H, W)
    batch = {"pid": torch.tensor([0, 1, 2, 3]), "parts": _random_parts(4)}
    out = model(x, batch=batch)
    assert set(out["attention"]) == {"layer2", "layer3", "layer4"}
    _, stats = model.loss(out, batch)
    targets = batch["parts"][:, [PART_CHANNELS.index(n) for n in ("body", "upper", "lower")]]
    per_scale = []
    for u in out["attention"].values():
        h, w = u.shape[-2:]
        area = F.avg_pool2d(targets, (H // h, W // w))            # the fraction of each cell covered
        p = torch.sigmoid(u.float())
        per_scale.append(-(area * torch.log(p) + (1 - area) * torch.log(1 - p)).mean())
    torch.testing.assert_close(stats["attention"], torch.stack(per_scale).mean().detach())
    ce = sum(stats[f"ce_{k}"] for k in ("global", "upper", "lower"))
    torch.testing.assert_close(stats["loss"], ce + 2.0 * stats["attention"])


# ------------------------------------------------------------------------------------ MGRAN
def test_mgran_eval_streams_are_the_image_under_predicted_binary_masks():
    model = tiny_seed("mgran").eval()
    with torch.no_grad():
        model.mask_predictor.out.bias.copy_(torch.tensor([0.3, -0.2, 0.0]))
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        out = model(x)
        v = model.mask_predictor(x)
        masks = (torch.sigmoid(v) >= 0.5).float()
        assert 0 < masks.mean() < 1
        feats = [model.backbone(x)] + [model.backbone(x * masks[:, r:r + 1]) for r in range(3)]
    for name, f in zip(("global", "body", "kp_upper", "kp_lower"), feats):
        torch.testing.assert_close(out[name], f, msg=name)
    d = torch.cat([F.normalize(f, dim=1) for f in feats], 1) / 2.0
    torch.testing.assert_close(out["descriptor"], d)


def test_mgran_training_uses_the_named_part_channels_binarised_at_half():
    model = tiny_seed("mgran").train()
    parts = torch.full((2, len(PART_CHANNELS), H, W), 0.2)
    names = ("body", "kp_upper", "kp_lower")
    for r, n in enumerate(names):                                  # a distinct band per region
        parts[:, PART_CHANNELS.index(n), 8 * r:8 * r + 8] = 0.5 if r == 0 else 0.9
    parts[:, PART_CHANNELS.index("upper")] = 1.0                   # channels the regions do not name
    masks = model.region_masks(torch.zeros(2, 3, H, W), {"parts": parts}, None)
    for r in range(3):
        expect = torch.zeros(H, W)
        expect[8 * r:8 * r + 8] = 1
        assert torch.equal(masks[0, r], expect), names[r]


# -------------------------------------------------------------------------------------- PMM
def test_hard_mix_partner_is_always_another_identity_and_uniform():
    pid = torch.tensor([3, 3, 3, 7, 7, 9])
    counts = torch.zeros(6, 6)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        partner, valid = negative_partners(pid, gen)
        assert valid.all()
        counts[torch.arange(6), partner] += 1
    same = pid[:, None] == pid[None, :]
    assert counts[same].sum() == 0                                 # never itself, never its identity
    # every sample of another identity is drawn, about uniformly (3 or 4 candidates each)
    expect = 300 / (~same).sum(1, keepdim=True).float()
    assert bool(((counts - expect).abs()[~same] < 0.45 * expect.expand(6, 6)[~same]).all()), counts
    # mix_prob = 0: nothing is mixed
    f = torch.randn(6, 4, 6, 4)
    out, mask, _ = attentive_hard_mix(f, pid, (2, 2), mix_prob=0.0)
    assert mask.sum() == 0 and torch.equal(out, f)
