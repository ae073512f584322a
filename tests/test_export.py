"""fmn export: the ONNX model (fmn's ops as standard operators, run by onnxruntime) and the
torch.export archive (loaded by torch + fmn_kernels alone) give fmn.extract_features' descriptor
for FMN (both stages and stage 1 only), MMGA, MGRAN and PMM; bad input is one error."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fmn
from fmn.cli import main
from fmn.engine import export as fexport
from tests.test_cli_errors import one_error

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="onnx, onnxruntime and onnxscript are not installed")
needs_op = pytest.mark.skipif(not hasattr(torch.ops.fmn, "spatial_mask_mul"),
                              reason="the compiled extension (torch.ops.fmn.spatial_mask_mul) is not built")

TINY = ["--set", "model.base_width=8", "--set", "data.height=64", "--set", "data.width=32",
        "--set", "data.batch_size=8", "--set", "data.workers=0", "--set", "train.progress=false",
        "--set", "train.max_steps_per_epoch=2", "--set", "train.stage1.epochs=1", "--set", "eval.batch_size=16",
        "--set", "model.backbone=resnet18", "--set", "train.device=cpu", "--set", "data.name=synthetic"]
RUNS = {"fmn": ["--set", "train.stage2.epochs=1"], "fmn_stage1": ["--set", "train.stage2.epochs=0"],
        "mmga": ["--model", "mmga"], "mgran": ["--model", "mgran"], "pmm": ["--model", "pmm"]}
MODELS = list(RUNS)


@pytest.fixture(scope="module")
def checkpoints(data, tmp_path_factory):
    """{model: checkpoint} of tiny models trained on a tiny synthetic set."""
    root = data
    out = {}
    for name, extra in RUNS.items():
        folder = tmp_path_factory.mktemp(name)
        assert main(["train", *TINY, "--data-root", root, "--output", str(folder), *extra]) == 0
        out[name] = str(folder / "model.pt")
    return out


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory):
    """export(name) -> {"onnx": path, "pt2": path}, written by `fmn export` once per model (in
    the test that asks first, so that an export error fails that test)."""
    done = {}

    def export(name):
        if name not in done:
            folder = tmp_path_factory.mktemp(f"{name}_export")
            paths = {"pt2": str(folder / "model.pt2")}
            if HAS_ONNX:
                paths["onnx"] = str(folder / "model.onnx")
            try:
                fexport.run_export(checkpoints[name], **paths, log=lambda line: None)
                done[name] = paths
            except fexport.ExportError as exc:
                done[name] = exc
        if isinstance(done[name], Exception):
            raise done[name]
        return done[name]

    return export


def tolerance(want):
    """1e-4 (float32) for descriptors of entries up to 1, relative to the largest entry beyond
    (PMM's descriptor is not normalised: thousands in a tiny model, where float32 steps are 2e-4)."""
    return 1e-4 * max(1.0, float(want.abs().max()))


def fresh_images(n, seed):
    return torch.randn(n, 3, 64, 32, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ ONNX
@needs_onnx
@pytest.mark.parametrize("name", MODELS)
def test_onnx_gives_the_pytorch_descriptor(name, checkpoints, exports):
    import onnx
    import onnxruntime as ort

    path = exports(name)["onnx"]
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    model = fmn.load_model(checkpoints[name], device="cpu")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape, out.name) == ("images", ["batch", 3, 64, 32], "descriptor")
    for batch, seed in ((1, 11), (5, 12)):
        x = fresh_images(batch, seed)
        want = fmn.extract_features(model, x)
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.dtype == np.float32 and got.shape == tuple(want.shape)
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=tolerance(want))


@needs_onnx
def test_the_documented_preprocessing_with_onnxruntime_gives_the_rows_of_fmn_extract(checkpoints, exports, data,
                                                                                      tmp_path):
    """The README's deployment recipe: PIL, numpy and onnxruntime only."""
    import onnxruntime as ort
    from PIL import Image

    folder = os.path.join(data, "query")
    paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder))][:6]
    sess = ort.InferenceSession(exports("fmn")["onnx"], providers=["CPUExecutionProvider"])
    _, _, H, W = sess.get_inputs()[0].shape
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)

    def prep(p):
        x = np.asarray(Image.open(p).convert("RGB").resize((W, H), Image.BILINEAR), np.float32) / 255
        return ((x - mean) / std).transpose(2, 0, 1)

    got = sess.run(None, {"images": np.stack([prep(p) for p in paths])})[0]
    (tmp_path / "list.txt").write_text("\n".join(paths))
    assert main(["extract", "--checkpoint", checkpoints["fmn"], "--images", str(tmp_path / "list.txt"),
                 "--out", str(tmp_path / "f.npy")]) == 0
    np.testing.assert_allclose(got, np.load(tmp_path / "f.npy"), rtol=0, atol=1e-4)


@needs_onnx
@needs_op
def test_the_feature_mask_is_exported_as_its_decomposition(exports):
    import onnx

    ops = {n.op_type for n in onnx.load(exports("fmn")["onnx"]).graph.node}
    assert {"Exp", "Relu", "Mul"} <= ops and ops & {"Gemm", "MatMul"}
    stage1 = {n.op_type for n in onnx.load(exports("fmn_stage1")["onnx"]).graph.node}
    assert "Exp" not in stage1   # no mask: the GRN descriptor only


class _MaskOp(torch.nn.Module):
    def __init__(self, activation, max_logit):
        super().__init__()
        self.activation, self.max_logit = activation, max_logit

    def forward(self, f, logits, f_other):
        return torch.ops.fmn.spatial_mask_mul(f, logits, f_other, self.activation, self.max_logit)


class _MaskOpNoOther(_MaskOp):
    def forward(self, f, logits):
        return torch.ops.fmn.spatial_mask_mul(f, logits, None, self.activation, self.max_logit)


@needs_onnx
@needs_op
@pytest.mark.filterwarnings("ignore::FutureWarning")   # torch's own, from the exporter's pytree use
@pytest.mark.parametrize("activation,max_logit,mix", [("exp_relu", None, False), ("exp_relu", 0.3, False),
                                                     ("sigmoid", None, False), ("identity", None, True)])
def test_each_form_of_the_op_in_onnx_equals_the_reference(activation, max_logit, mix):
    import onnxruntime as ort
    from fmn_kernels import spatial_mask_mul_ref

    gen = torch.Generator().manual_seed(3)
    f, other = torch.randn(2, 4, 6, 5, generator=gen), torch.randn(2, 4, 6, 5, generator=gen)
    logits = torch.randn(2, 30, generator=gen)
    if mix:
        logits = logits.sigmoid()
    args = (f, logits, other) if mix else (f, logits)
    module = (_MaskOp if mix else _MaskOpNoOther)(activation, max_logit)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(module, args, dynamic_shapes=tuple({0: batch} for _ in args))
    assert any(n.target == torch.ops.fmn.spatial_mask_mul.default for n in program.graph.nodes)
    proto = torch.onnx.export(program, dynamo=True, custom_translation_table=fexport.onnx_translations(),
                              verbose=False).model_proto
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for b in (1, 3):   # fresh inputs of other batch sizes
        new = [torch.randn(b, *a.shape[1:], generator=gen) for a in args]
        if mix:
            new[1] = new[1].sigmoid()
        got = session.run(None, dict(zip(names, (a.numpy() for a in new))))[0]
        want = spatial_mask_mul_ref(new[0], new[1], activation, max_logit, new[2] if mix else None)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- torch.export
LOAD_PT2 = textwrap.dedent("""
    import sys
    import torch
    import fmn_kernels
    program = torch.export.load(sys.argv[1])
    out = [program.module()(x) for x in torch.load(sys.argv[2])]
    torch.save(out, sys.argv[3])
    loaded = sorted(m for m in sys.modules if m == "fmn" or m.startswith("fmn."))
    assert not loaded, loaded
""")


@pytest.mark.parametrize("name", MODELS)
def test_pt2_loads_with_torch_and_fmn_kernels_only(name, checkpoints, exports, tmp_path):
    path = exports(name)["pt2"]
    inputs = [fresh_images(1, 21), fresh_images(5, 22)]
    torch.save(inputs, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", LOAD_PT2, path, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": ROOT})
    outputs = torch.load(tmp_path / "y.pt", weights_only=True)
    model = fmn.load_model(checkpoints[name], device="cpu")
    for x, got in zip(inputs, outputs):
        want = fmn.extract_features(model, x)
        torch.testing.assert_close(got, want, rtol=0, atol=tolerance(want) / 10)


def test_pt2_holds_only_the_weights_the_descriptor_reads(checkpoints, exports):
    program = torch.export.load(exports("mmga")["pt2"])
    names = set(program.state_dict)
    assert names and not any(".heads." in n for n in names)   # the classifier heads (one is named `global`)
    model = fmn.load_model(checkpoints["mmga"], device="cpu")
    assert names < {"model." + k for k in model.state_dict()}


# ------------------------------------------------------------------------------------ command
def test_a_stage1_checkpoint_exports_the_grn_descriptor_and_says_so(checkpoints, tmp_path, capsys):
    assert main(["export", "--checkpoint", checkpoints["fmn_stage1"], "--pt2", str(tmp_path / "m.pt2")]) == 0
    out = capsys.readouterr().out
    assert "GRN descriptor" in out and "stage 1 only" in out
    model = fmn.load_model(checkpoints["fmn_stage1"], device="cpu")
    x = fresh_images(3, 31)
    got = torch.export.load(str(tmp_path / "m.pt2")).module()(x)
    torch.testing.assert_close(got, fmn.extract_features(model, x), rtol=0, atol=1e-5)
    assert got.shape[1] == model.feature_dim


def test_an_existing_output_is_refused_unless_force(checkpoints, tmp_path, capsys):
    target = tmp_path / "m.pt2"
    target.write_bytes(b"keep")
    assert main(["export", "--checkpoint", checkpoints["fmn_stage1"], "--pt2", str(target)]) == 2
    assert "exists; --force replaces it" in one_error(capsys, "export") and target.read_bytes() == b"keep"
    assert main(["export", "--checkpoint", checkpoints["fmn_stage1"], "--pt2", str(target), "--force"]) == 0
    assert torch.export.load(str(target)).module()(fresh_images(2, 41)).shape[0] == 2


def test_the_checkpoint_is_never_written_over(checkpoints, tmp_path, capsys):
    ck = tmp_path / "model.pt"
    ck.write_bytes(open(checkpoints["fmn_stage1"], "rb").read())
    before = ck.read_bytes()
    for flag in ("--pt2", "--onnx"):
        assert main(["export", "--checkpoint", str(ck), flag, str(ck), "--force"]) == 2
        assert "would write over the input" in one_error(capsys, "export")
    assert ck.read_bytes() == before


def test_no_output_or_a_missing_package_is_one_error(checkpoints, tmp_path, capsys, monkeypatch):
    assert main(["export", "--checkpoint", checkpoints["fmn"]]) == 2
    assert "--onnx FILE and/or --pt2 FILE" in one_error(capsys, "export")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxscript" else real(n, *a))
    assert main(["export", "--checkpoint", checkpoints["fmn"], "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "pip install 'fmn[export]'" in one_error(capsys, "export")
    assert not (tmp_path / "m.onnx").exists()
