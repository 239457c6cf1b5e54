"""The op boundary: torch.library registration, torch.compile, backend choice and dispatch, validation."""
import pytest
import torch

import cora_kernels
from cora_kernels.geometry import ACTIVATIONS
from cora_kernels.ops import Backend, default_backend, resolve_backend
from cora_kernels.reference import cora_conv2d_reference
from cora_kernels.testing import Case, random_layer
from tests.tolerances import assert_close_rel


def make_layer(c, device="cpu"):  # the op tests run on CPU (reference dispatch, or the interpreter)
    return random_layer(c, device=device)


def _op_args(c: Case, backend=None):
    """The op's positional arguments; int8 adapters add ``a_scale, b_scale`` at the end (the float
    schema's 18 arguments stay valid on their own)."""
    args, kw = make_layer(c)
    x, planes, scale, zero, a, b, bias = args
    scales = (kw["a_scale"], kw["b_scale"]) if "a_scale" in kw else ()
    return (x, planes, scale, zero, a, b, bias, c.bits, list(c.k), list(c.stride), list(c.padding),
            list(c.dilation), kw.get("out_scale"), kw.get("out_shift"), kw.get("residual"), c.relu, 1, backend,
            *scales)


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, cora_kernels; cora_kernels.cora_conv2d; cora_kernels.Backend; cora_kernels.resolve_backend; "
            "cora_kernels.save_tuning; cora_kernels.load_tuning; cora_kernels.explicit_padding; "
            "cora_kernels.cora_conv2d_reference; import cora_kernels.testing; "
            "assert 'triton' not in sys.modules, 'triton imported eagerly'; "
            "assert not sys.modules['torch'].cuda.is_initialized(), 'CUDA initialised at import'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]))


@pytest.mark.parametrize("case", [
    Case(N=2, C_in=3, C_out=4, H=5, W=5, rank="odd", bias=True, bn=True, res=True, relu=True),
    Case(N=1, C_in=4, C_out=3, H=5, W=4, k=(1, 1), padding=(0, 0), rank=0, channels_last=True),
    Case(N=2, C_in=3, C_out=4, H=5, W=5, bits=2, rank="odd", bias=True, bn=True, relu=True, adapter="int8"),
], ids=["full_epilogue", "rank0_cl", "int8_adapter"])
def test_opcheck(case, monkeypatch):
    monkeypatch.setenv("CORA_BACKEND", "reference")
    torch.library.opcheck(torch.ops.cora.conv2d.default, _op_args(case))
    monkeypatch.delenv("CORA_BACKEND")
    torch.library.opcheck(torch.ops.cora.conv2d.default, _op_args(case, backend="reference"))


def test_torch_compile_fullgraph_one_op(monkeypatch):
    monkeypatch.delenv("CORA_BACKEND", raising=False)
    c = Case(N=2, C_in=4, C_out=6, H=6, W=6, rank="odd", bias=True, relu=True)
    args, kw = make_layer(c)
    x, planes, scale, zero, a, b, bias = args

    class Layer(torch.nn.Module):
        def forward(self, inp):
            y = cora_kernels.cora_conv2d(inp, planes, scale, zero, a, b, bias, **kw)
            return y * 2.0

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    m = Layer()
    y_ref = m(x)
    y = torch.compile(m, backend=counting_backend, fullgraph=True)(x)
    torch.testing.assert_close(y, y_ref)
    assert len(graphs) == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    ours = [t for t in targets if t in (torch.ops.cora.conv2d, torch.ops.cora.conv2d.default)]
    assert len(ours) == 1, targets

    torch._dynamo.reset()
    y2 = torch.compile(m, fullgraph=True)(x)  # inductor, CPU, reference dispatch
    torch.testing.assert_close(y2, y_ref)


def test_backend_env_read_at_call_time(monkeypatch):
    import cora_kernels.conv_fused as cf

    c = Case(N=1, C_in=5, C_out=6, H=5, W=5, rank=1, bias=True)
    args, kw = make_layer(c)
    calls = []
    real = cf.cora_conv2d_triton

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(cf, "cora_conv2d_triton", spy)
    monkeypatch.delenv("CORA_BACKEND", raising=False)
    y_auto = cora_kernels.cora_conv2d(*args, **kw)
    assert calls == []  # CPU tensors -> reference
    if torch.cuda.is_available():  # no interpreter there: CPU tensors cannot run the kernel
        y_tri = y_auto
        calls.append(1)
    else:
        monkeypatch.setenv("CORA_BACKEND", "triton")
        y_tri = cora_kernels.cora_conv2d(*args, **kw)
    assert calls == [1]  # forced through the kernel (interpreter on CPU)
    monkeypatch.setenv("CORA_BACKEND", "reference")
    cora_kernels.cora_conv2d(*args, **kw)
    assert calls == [1]
    y64 = cora_conv2d_reference(*args, **kw, compute_dtype=torch.float64, out_dtype=torch.float64)
    assert_close_rel(y_auto, y64, torch.float32)
    assert_close_rel(y_tri, y64, torch.float32)
    monkeypatch.setenv("CORA_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="CORA_BACKEND"):
        cora_kernels.cora_conv2d(*args, **kw)


@pytest.mark.parametrize("groups, c_out", [(4, 8), (2, 4)], ids=["depthwise_mult2", "grouped"])
def test_groups_run_the_grouped_kernel(groups, c_out, monkeypatch):
    """groups > 1 on the Triton backend: the direct grouped kernel (never the fused one), matching the
    reference; on the reference backend neither kernel runs."""
    import cora_kernels.conv_depthwise as cd
    import cora_kernels.conv_fused as cf

    c = Case(N=1, C_in=4, C_out=c_out, H=6, W=5, groups=groups, rank=0, bias=True, bn=True, relu=True)
    args, kw = make_layer(c)
    calls = []
    real = cd.cora_conv2d_grouped_triton
    monkeypatch.setattr(cd, "cora_conv2d_grouped_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(cf, "cora_conv2d_triton", lambda *a, **k: pytest.fail("the fused kernel ran"))
    y64 = cora_conv2d_reference(*args, **kw, compute_dtype=torch.float64, out_dtype=torch.float64)
    monkeypatch.setenv("CORA_BACKEND", "reference")
    assert_close_rel(cora_kernels.cora_conv2d(*args, **kw), y64, torch.float32)
    assert calls == []
    if not torch.cuda.is_available():  # CPU tensors run the kernel through the interpreter
        monkeypatch.setenv("CORA_BACKEND", "triton")
        assert_close_rel(cora_kernels.cora_conv2d(*args, **kw), y64, torch.float32)
        assert calls == [1]


def test_groups_refuse_an_adapter():
    c = Case(N=1, C_in=4, C_out=4, H=5, W=5, groups=4, rank=0)
    args, kw = make_layer(c)
    a, b = torch.randn(2, c.K), torch.randn(c.C_out, 2)
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match="groups"):
            cora_kernels.cora_conv2d(*args[:4], a, b, None, **kw, backend=backend)


# --- the fused activation -------------------------------------------------------------------------
def test_schema_has_trailing_activation():
    args = torch.ops.cora.conv2d.default._schema.arguments
    assert [a.name for a in args[-3:]] == ["a_scale", "b_scale", "activation"]
    assert args[-1].has_default_value() and args[-1].default_value is None
    assert "relu" in [a.name for a in args]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_through_torch_ops(activation, monkeypatch):
    """The op called through torch.ops with the new trailing argument (reference backend, and the
    kernels through the interpreter on CPU), and opcheck with it."""
    monkeypatch.delenv("CORA_BACKEND", raising=False)
    c = Case(N=1, C_in=4, C_out=5, H=5, W=5, rank="odd", bias=True, bn=True, res=True)
    op_args = list(_op_args(c, backend="reference"))
    op_args[14] = op_args[14] * 4  # residual: a pre-activation over about [-12, 12]
    x, planes, scale, zero, a, b, bias = op_args[:7]
    kw = dict(bits=c.bits, kernel_size=c.k, stride=c.stride, padding=c.padding, dilation=c.dilation,
              out_scale=op_args[12], out_shift=op_args[13], residual=op_args[14])
    y64 = cora_conv2d_reference(*op_args[:7], **kw, activation=activation, compute_dtype=torch.float64,
                                out_dtype=torch.float64)
    y = torch.ops.cora.conv2d(*op_args, None, None, activation)
    assert_close_rel(y, y64, torch.float32)
    assert_close_rel(torch.ops.cora.conv2d(*op_args, activation=activation), y64, torch.float32)
    assert_close_rel(cora_kernels.cora_conv2d(*op_args[:7], **kw, activation=activation), y64, torch.float32)
    if not torch.cuda.is_available():
        op_args[17] = "triton"
        assert_close_rel(torch.ops.cora.conv2d(*op_args, activation=activation), y64, torch.float32)
        op_args[17] = "reference"
    if activation in ("relu", "gelu"):  # opcheck is slow: two are enough
        torch.library.opcheck(torch.ops.cora.conv2d.default, tuple(op_args), {"activation": activation})


def test_relu_flag_and_activation_agree_through_the_op(monkeypatch):
    """relu=True (the older schema, no activation) and activation="relu" are the same op call; the
    wrapper keeps ReLU as relu=True so graphs recorded before the new argument do not change."""
    monkeypatch.setenv("CORA_BACKEND", "reference")
    c = Case(N=1, C_in=4, C_out=5, H=5, W=5, rank=1, bias=True, res=True, relu=True)
    op_args = list(_op_args(c))
    y_old = torch.ops.cora.conv2d(*op_args)
    op_args[15] = False
    torch.testing.assert_close(torch.ops.cora.conv2d(*op_args, activation="relu"), y_old, rtol=0, atol=0)
    seen = []
    real = torch.ops.cora.conv2d

    class _Spy:
        def conv2d(self, *a):
            seen.append(a)
            return real(*a)

    monkeypatch.setattr(torch.ops, "cora", _Spy())
    args, kw = make_layer(c)
    kw.pop("relu")
    cora_kernels.cora_conv2d(*args, **kw, activation="relu")
    cora_kernels.cora_conv2d(*args, **kw, activation="silu")
    assert (seen[0][15], seen[0][-1]) == (True, None)
    assert (seen[1][15], seen[1][-1]) == (False, "silu")


def test_bad_activation(layer):
    args, kw = layer
    with pytest.raises(ValueError, match=r"activation.*relu.*relu6.*silu.*hardswish.*gelu"):
        _call(args, kw, activation="tanh")
    with pytest.raises(ValueError, match="activation"):
        _call(args, kw, activation="ReLU")
    with pytest.raises(ValueError, match="relu=True"):
        _call(args, kw, relu=True, activation="silu")
    assert _call(args, kw, relu=True, activation="relu").shape == (1, 6, 5, 5)
    op_args = (*args, kw["bits"], [3, 3], [1, 1], [1, 1], [1, 1], None, None, None, True, 1, "reference")
    with pytest.raises(ValueError, match="relu=True"):  # a direct torch.ops call is checked too
        torch.ops.cora.conv2d(*op_args, activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        torch.ops.cora.conv2d(*op_args, activation="swish")


# --- the backend choice ---------------------------------------------------------------------------
class _FakeCuda:  # resolve_backend only asks x.is_cuda
    is_cuda = True


@pytest.mark.parametrize("env, want", [(None, Backend.AUTO), ("", Backend.AUTO), ("  ", Backend.AUTO),
                                       ("auto", Backend.AUTO), ("triton", Backend.TRITON),
                                       (" Triton ", Backend.TRITON), ("REFERENCE", Backend.REFERENCE)])
def test_default_backend_from_env(monkeypatch, env, want):
    if env is None:
        monkeypatch.delenv("CORA_BACKEND", raising=False)
    else:
        monkeypatch.setenv("CORA_BACKEND", env)
    assert default_backend() is want


@pytest.mark.parametrize("env", ["cuda", "tritonn", "ref"])
def test_default_backend_bad_env(monkeypatch, env):
    monkeypatch.setenv("CORA_BACKEND", env)
    with pytest.raises(ValueError, match=r"CORA_BACKEND.*auto.*triton.*reference"):
        default_backend()
    with pytest.raises(ValueError, match="CORA_BACKEND"):
        resolve_backend(None, torch.randn(1, 2, 3, 3))


def test_resolve_backend_env_default(monkeypatch):
    x = torch.randn(1, 2, 3, 3)
    monkeypatch.delenv("CORA_BACKEND", raising=False)
    assert resolve_backend(None, x) is Backend.REFERENCE  # auto, CPU tensor
    assert resolve_backend(None, _FakeCuda()) is Backend.TRITON  # auto, CUDA tensor
    monkeypatch.setenv("CORA_BACKEND", "triton")
    assert resolve_backend(None, x) is Backend.TRITON
    monkeypatch.setenv("CORA_BACKEND", "reference")
    assert resolve_backend(None, _FakeCuda()) is Backend.REFERENCE


@pytest.mark.parametrize("backend, on_cpu, on_cuda", [
    (Backend.AUTO, Backend.REFERENCE, Backend.TRITON), ("auto", Backend.REFERENCE, Backend.TRITON),
    (Backend.TRITON, Backend.TRITON, Backend.TRITON), ("triton", Backend.TRITON, Backend.TRITON),
    ("Triton", Backend.TRITON, Backend.TRITON),
    (Backend.REFERENCE, Backend.REFERENCE, Backend.REFERENCE), ("reference", Backend.REFERENCE, Backend.REFERENCE),
])
def test_resolve_backend_explicit_wins_over_env(monkeypatch, backend, on_cpu, on_cuda):
    for env in ("triton", "reference", "not-even-valid"):  # an explicit choice does not read CORA_BACKEND
        monkeypatch.setenv("CORA_BACKEND", env)
        assert resolve_backend(backend, torch.randn(2, 3)) is on_cpu
        assert resolve_backend(backend, _FakeCuda()) is on_cuda


@pytest.mark.parametrize("backend", [None, Backend.AUTO, Backend.TRITON, "triton"])
def test_resolve_backend_grad_forces_reference_groups_do_not(monkeypatch, backend):
    monkeypatch.setenv("CORA_BACKEND", "triton")
    x = _FakeCuda()
    assert resolve_backend(backend, x) is Backend.TRITON
    assert resolve_backend(backend, x, needs_grad=True) is Backend.REFERENCE
    assert resolve_backend(backend, x, groups=2) is Backend.TRITON  # the grouped kernel
    assert resolve_backend(backend, x, groups=32, needs_grad=True) is Backend.REFERENCE
    assert resolve_backend(backend, x, groups=1, needs_grad=False) is Backend.TRITON


@pytest.mark.parametrize("bad", ["cuda", "", "triton-please", 3, object()])
def test_resolve_backend_bad_values(monkeypatch, bad):
    monkeypatch.delenv("CORA_BACKEND", raising=False)
    with pytest.raises(ValueError, match=r"auto.*triton.*reference"):
        resolve_backend(bad, torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"auto.*triton.*reference"):
        Backend(bad)


def test_backend_enum_from_strings():
    assert Backend("triton") is Backend.TRITON and Backend(" REFERENCE ") is Backend.REFERENCE
    assert Backend(Backend.AUTO) is Backend.AUTO and Backend.TRITON == "triton"


def test_backend_argument_of_the_wrapper(monkeypatch):
    import cora_kernels.conv_fused as cf

    c = Case(N=1, C_in=4, C_out=5, H=5, W=5, rank=1, bias=True)
    args, kw = make_layer(c)
    calls = []
    real = cf.cora_conv2d_triton
    monkeypatch.setattr(cf, "cora_conv2d_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("CORA_BACKEND", "triton")
    y_ref = cora_kernels.cora_conv2d(*args, **kw, backend=Backend.REFERENCE)
    y_ref2 = cora_kernels.cora_conv2d(*args, **kw, backend="reference")
    assert calls == []  # explicit reference beats CORA_BACKEND=triton
    y64 = cora_conv2d_reference(*args, **kw, compute_dtype=torch.float64, out_dtype=torch.float64)
    assert_close_rel(y_ref, y64, torch.float32)
    torch.testing.assert_close(y_ref, y_ref2, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"auto.*triton.*reference"):
        cora_kernels.cora_conv2d(*args, **kw, backend="gpu")
    if not torch.cuda.is_available():  # CPU tensors run the kernel through the interpreter
        monkeypatch.setenv("CORA_BACKEND", "reference")
        y_tri = cora_kernels.cora_conv2d(*args, **kw, backend="triton")
        assert calls == [1]
        assert_close_rel(y_tri, y64, torch.float32)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int8_adapters_through_the_op(bits, monkeypatch):
    """int8 adapters with their scales: the op (reference, and the kernel through the interpreter on CPU)
    against the fp64 reference; rank 0 drops the scales with the adapter."""
    monkeypatch.delenv("CORA_BACKEND", raising=False)
    c = Case(N=1, C_in=5, C_out=6, H=5, W=5, bits=bits, rank=2, bias=True, adapter="int8")
    args, kw = make_layer(c)
    y64 = cora_conv2d_reference(*args, **kw, compute_dtype=torch.float64, out_dtype=torch.float64)
    assert_close_rel(cora_kernels.cora_conv2d(*args, **kw, backend="reference"), y64, torch.float32)
    if not torch.cuda.is_available() and bits == 2:  # one interpreter run is enough here
        assert_close_rel(cora_kernels.cora_conv2d(*args, **kw, backend="triton"), y64, torch.float32)
    x, planes, scale, zero, a, b, bias = args
    y0 = cora_kernels.cora_conv2d(x, planes, scale, zero, a[:0], b[:, :0], bias, **dict(
        kw, a_scale=kw["a_scale"][:0]))
    torch.testing.assert_close(y0, cora_kernels.cora_conv2d(x, planes, scale, zero, None, None, bias, **{
        k: v for k, v in kw.items() if k not in ("a_scale", "b_scale")}), rtol=0, atol=0)


def test_torch_compile_explicit_backend_and_env_at_run_time(monkeypatch):
    """An explicit backend compiles to the same single op; CORA_BACKEND is read when the op runs,
    so changing it after compilation still takes effect."""
    import cora_kernels.conv_fused as cf

    c = Case(N=1, C_in=3, C_out=4, H=5, W=5, rank=1, relu=True)
    args, kw = make_layer(c)
    x, rest = args[0], args[1:]
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def explicit(inp):
        return (cora_kernels.cora_conv2d(inp, *rest, **kw, backend=Backend.REFERENCE)
                + cora_kernels.cora_conv2d(inp, *rest, **kw, backend=" Reference ")) * 0.5 + 1.0

    def default(inp):
        return cora_kernels.cora_conv2d(inp, *rest, **kw) + 1.0

    torch._dynamo.reset()
    monkeypatch.setenv("CORA_BACKEND", "reference")
    y = torch.compile(explicit, backend=counting_backend, fullgraph=True)(x)
    y64 = cora_conv2d_reference(*args, **kw, compute_dtype=torch.float64, out_dtype=torch.float64) + 1.0
    assert_close_rel(y, y64, torch.float32)
    compiled_default = torch.compile(default, backend=counting_backend, fullgraph=True)
    y2 = compiled_default(x)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    assert len(graphs) == 2
    for gm, n_ops in zip(graphs, (2, 1)):
        targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        assert sum(t in (torch.ops.cora.conv2d, torch.ops.cora.conv2d.default) for t in targets) == n_ops, targets
    if not torch.cuda.is_available():
        calls = []
        real = cf.cora_conv2d_triton
        monkeypatch.setattr(cf, "cora_conv2d_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
        monkeypatch.setenv("CORA_BACKEND", "triton")
        y3 = compiled_default(x)
        assert calls == [1] and len(graphs) == 2  # the same graph, the op read the new value
        assert_close_rel(y3, y64, torch.float32)
    torch._dynamo.reset()


# --- validation: clear errors before any launch --------------------------------------------------
@pytest.fixture
def layer():
    return make_layer(Case(N=1, C_in=5, C_out=6, H=5, W=5, rank=2, bias=True))


def _call(args, kw, **over):
    args = list(args)
    names = ["x", "qweight", "scale", "zero", "a", "b", "bias"]
    for k in list(over):
        if k in names:
            args[names.index(k)] = over.pop(k)
    return cora_kernels.cora_conv2d(*args, **{**kw, **over})


def test_valid_call_works(layer):
    args, kw = layer
    assert _call(args, kw).shape == (1, 6, 5, 5)


def test_wrong_device(layer):
    args, kw = layer
    with pytest.raises(ValueError, match="device"):
        _call(args, kw, scale=args[2].to("meta"))
    with pytest.raises(ValueError, match="device"):
        _call(args, kw, x=args[0].to("meta"))


def test_wrong_in_channels(layer):
    args, kw = layer
    x = args[0]
    with pytest.raises(ValueError, match="C_in|K="):
        _call(args, kw, x=torch.randn(1, 7, 5, 5))
    with pytest.raises(ValueError, match="input channels"):
        _call(args, kw, in_channels=4)
    assert x.shape[1] == 5


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.float8_e4m3fn])
def test_unsupported_dtype(layer, dtype):
    args, kw = layer
    with pytest.raises(TypeError, match="dtype"):
        _call(args, kw, x=args[0].to(dtype))


def test_bad_planes(layer):
    args, kw = layer
    planes = args[1]
    with pytest.raises(ValueError, match="plane"):
        _call(args, kw, qweight=[planes[0], planes[0]])
    with pytest.raises(ValueError, match="int32"):
        _call(args, kw, qweight=[planes[0].to(torch.int64)])
    with pytest.raises(ValueError, match="words"):
        _call(args, kw, qweight=[planes[0][:-1]])
    with pytest.raises(ValueError, match="C_out"):
        _call(args, kw, qweight=[planes[0][:, :-1]])
    with pytest.raises(ValueError, match="bit"):
        _call(args, kw, bits=5)


def test_bad_shapes(layer):
    args, kw = layer
    a, b = args[4], args[5]
    with pytest.raises(ValueError, match="both"):
        _call(args, kw, b=None)
    with pytest.raises(ValueError, match="b must be"):
        _call(args, kw, b=b[:, :1])
    with pytest.raises(ValueError, match="bias"):
        _call(args, kw, bias=torch.zeros(3))
    with pytest.raises(ValueError, match="residual"):
        _call(args, kw, residual=torch.zeros(1, 6, 4, 4))
    with pytest.raises(ValueError, match="out_scale"):
        _call(args, kw, out_scale=torch.ones(6))
    with pytest.raises(ValueError, match="empty"):
        _call(args, kw, kernel_size=9, x=torch.randn(1, 5, 3, 3), a=None, b=None)
    assert a.shape[0] == 2


def test_bad_int8_adapters(layer):
    """int8 adapters need both scales, of the right shapes; float adapters take none; no mixing."""
    args, kw = layer
    a, b = args[4], args[5]
    qa, qb = a.to(torch.int8), b.to(torch.int8)
    sa, sb = torch.rand(2) + 0.1, torch.rand(6) + 0.1
    assert _call(args, kw, a=qa, b=qb, a_scale=sa, b_scale=sb).shape == (1, 6, 5, 5)
    with pytest.raises(ValueError, match="a_scale"):
        _call(args, kw, a=qa, b=qb, b_scale=sb)
    with pytest.raises(ValueError, match="b_scale"):
        _call(args, kw, a=qa, b=qb, a_scale=sa, b_scale=sb[:3])
    with pytest.raises(ValueError, match="a_scale"):
        _call(args, kw, a=qa, b=qb, a_scale=sa.to(torch.int32), b_scale=sb)
    with pytest.raises(ValueError, match="only for int8"):
        _call(args, kw, a_scale=sa, b_scale=sb)
    with pytest.raises(TypeError, match="both be int8"):
        _call(args, kw, a=qa, a_scale=sa, b_scale=sb)
    with pytest.raises(ValueError, match="without an adapter"):
        _call(args, kw, a=None, b=None, a_scale=sa)
    with pytest.raises(TypeError, match="dtype"):
        _call(args, kw, a=a.to(torch.int16), b=b.to(torch.int16))
