"""What a genome may name: the allow-lists of the static check and of the run-time namespaces.

A genome (the source of one loss function) may only reach torch, ``torch.nn.functional`` (as
``F``) and ``math`` through the names listed here, spelled ``torch.X``, ``torch.linalg.X``,
``torch.special.X``, ``F.X`` or ``math.X``; the attributes it may read on its own values
(tensors, the results of reductions, ``torch.finfo``) are listed here too. Everything else is
refused: modules that torch re-exports (``torch.builtins``, ``torch.importlib``, ``F.np``),
autograd internals (``grad_fn``, ``grad``, ``data``), storage and serialisation, hooks,
process-wide settings and in-place methods.

The lists are plain data so that they can be read, reviewed and tested on their own:
``tests/engine/test_allowlist.py`` walks torch's own namespaces and checks that every name
here exists and is a function (or one of the few listed constants and value types), never a
module, so a torch upgrade cannot silently widen what a genome reaches. Names are added by
hand, after asking of each: does it touch files, the network, native code, other processes,
global state or the autograd graph, or return uninitialised memory (``torch.empty``)?
"""
from __future__ import annotations

#: ``torch.X`` functions: creation, elementwise maths, reductions, comparison, shape.
#: Not here on purpose: ``empty*`` (uninitialised memory), ``from_numpy``/``frombuffer``/
#: ``from_file``/``load``/``save`` (files and foreign memory), ``set_*``/``manual_seed``/
#: ``use_deterministic_algorithms`` (global state), ``as_strided`` (raw strides), ``compile``,
#: ``vmap``/``cond`` (higher-order functions), every submodule except the two below.
TORCH_FUNCTIONS: frozenset[str] = frozenset("""
    tensor as_tensor zeros ones full zeros_like ones_like full_like arange linspace logspace eye
    rand randn randint rand_like randn_like randint_like randperm bernoulli multinomial normal poisson

    abs absolute neg negative exp exp2 expm1 log log2 log10 log1p sqrt rsqrt square pow float_power
    sin cos tan asin acos atan atan2 arcsin arccos arctan arctan2 sinh cosh tanh asinh acosh atanh
    arcsinh arccosh arctanh sigmoid logit erf erfc erfinv lgamma digamma polygamma mvlgamma i0 sinc
    xlogy hypot sign sgn signbit copysign floor ceil round trunc frac fix clamp clip clamp_min
    clamp_max relu selu celu add sub subtract mul multiply div divide true_divide floor_divide
    remainder fmod reciprocal lerp logaddexp logaddexp2 maximum minimum fmax fmin nan_to_num
    heaviside softmax log_softmax addcmul addcdiv deg2rad rad2deg

    sum mean prod std var std_mean var_mean median nanmedian quantile nanquantile nanmean nansum
    max min amax amin aminmax argmax argmin logsumexp logcumsumexp cumsum cumprod cummax cummin
    norm dist count_nonzero all any kthvalue topk sort argsort msort unique bincount histc cov
    corrcoef trace diff

    eq ne lt le gt ge greater greater_equal less less_equal not_equal equal isclose allclose
    isfinite isinf isnan isneginf isposinf isreal where logical_and logical_or logical_not
    logical_xor

    stack cat concat concatenate hstack vstack dstack column_stack reshape flatten unflatten
    squeeze unsqueeze transpose permute movedim moveaxis swapaxes swapdims t flip fliplr flipud
    roll rot90 narrow split chunk tensor_split unbind gather scatter scatter_add scatter_reduce
    index_select masked_fill masked_select take take_along_dim tril triu diag diag_embed diagonal
    diagflat broadcast_to broadcast_tensors repeat_interleave tile meshgrid einsum matmul mm bmm
    mv dot vdot inner outer kron cross tensordot cdist atleast_1d atleast_2d atleast_3d ravel
    cartesian_prod combinations bucketize searchsorted clone detach numel is_tensor
    is_floating_point is_complex result_type promote_types can_cast
""".split())

#: ``torch.X`` values that are not functions: dtypes and float constants.
TORCH_CONSTANTS: frozenset[str] = frozenset("""
    float32 float64 float16 bfloat16 float double half int64 int32 int16 int8 uint8 long int
    short bool pi e inf nan
""".split())

#: ``torch.X`` classes whose instances a loss reads (``torch.finfo(x.dtype).eps``).
TORCH_TYPES: frozenset[str] = frozenset({"finfo", "iinfo"})

#: ``torch.linalg.X`` functions (no ``*_ex`` variants: their ``info`` tensors add nothing).
LINALG_FUNCTIONS: frozenset[str] = frozenset("""
    norm vector_norm matrix_norm det slogdet inv solve solve_triangular lstsq eigh eigvalsh eig
    eigvals svd svdvals cholesky qr pinv matrix_exp matrix_power matrix_rank cond cross vecdot
    multi_dot diagonal matmul
""".split())

#: ``torch.special.X`` functions.
SPECIAL_FUNCTIONS: frozenset[str] = frozenset("""
    expit logit erf erfc erfcx erfinv xlogy xlog1py log1p expm1 exp2 log_softmax softmax logsumexp
    gammaln gammainc gammaincc digamma psi polygamma multigammaln i0 i0e i1 i1e ndtr ndtri log_ndtr
    sinc entr round zeta
""".split())

#: ``F.X`` (``torch.nn.functional``) functions a loss may use. Some take ``inplace``; the
#: static check refuses that keyword, and the inputs a genome sees are copies anyway.
FUNCTIONAL_FUNCTIONS: frozenset[str] = frozenset("""
    logsigmoid softplus relu relu6 gelu silu elu selu celu leaky_relu mish hardtanh hardsigmoid
    hardswish hardshrink softshrink tanhshrink softsign threshold sigmoid tanh glu softmax softmin
    log_softmax gumbel_softmax normalize one_hot pad cosine_similarity pairwise_distance dropout
    cross_entropy nll_loss mse_loss l1_loss smooth_l1_loss huber_loss binary_cross_entropy
    binary_cross_entropy_with_logits kl_div poisson_nll_loss gaussian_nll_loss margin_ranking_loss
    soft_margin_loss hinge_embedding_loss multi_margin_loss multilabel_margin_loss
    multilabel_soft_margin_loss cosine_embedding_loss triplet_margin_loss
""".split())

#: ``math.X``: the float functions and constants. Not here: ``factorial``, ``comb``, ``perm``,
#: ``gcd``, ``lcm``, ``isqrt`` (exact integer arithmetic that can run for minutes in C).
MATH_NAMES: frozenset[str] = frozenset("""
    acos acosh asin asinh atan atan2 atanh cbrt ceil copysign cos cosh degrees dist erf erfc exp
    exp2 expm1 fabs floor fmod frexp fsum gamma hypot isclose isfinite isinf isnan ldexp lgamma log
    log10 log1p log2 modf nextafter pow prod radians remainder sin sinh sqrt tan tanh trunc ulp
    pi e tau inf nan
""".split())

#: The submodules that may be named, only as ``torch.<sub>.<function>``.
TORCH_SUBMODULES: dict[str, frozenset[str]] = {"linalg": LINALG_FUNCTIONS, "special": SPECIAL_FUNCTIONS}

#: The names a genome may read after ``torch.``, ``F.`` and ``math.``.
MODULE_MEMBERS: dict[str, frozenset[str]] = {
    "torch": TORCH_FUNCTIONS | TORCH_CONSTANTS | TORCH_TYPES,
    "F": FUNCTIONAL_FUNCTIONS,
    "math": MATH_NAMES,
}

#: Tensor methods and properties a loss needs (also read on the values reductions return,
#: such as ``x.max(dim=0).values``). Not here on purpose: every in-place method (a trailing
#: ``_``), autograd internals (``grad_fn``, ``grad``, ``data``, ``requires_grad``, ``is_leaf``,
#: ``backward``, ``retain_grad``, ``register_hook``, ``register_post_accumulate_grad_hook``),
#: storage and memory (``storage``, ``untyped_storage``, ``data_ptr``, ``as_strided``,
#: ``set_``, ``share_memory_``, ``pin_memory``, ``new_empty``), conversions that leave torch
#: (``numpy``, ``tofile``, ``__dlpack__``), ``type`` (it also takes class names as strings)
#: and device moves other than ``to``/``cpu``.
TENSOR_ATTRIBUTES: frozenset[str] = frozenset("""
    shape dtype device ndim T mT size dim ndimension numel nelement

    abs absolute neg negative exp exp2 expm1 log log2 log10 log1p sqrt rsqrt square pow
    float_power sin cos tan asin acos atan atan2 arcsin arccos arctan arctan2 sinh cosh tanh asinh
    acosh atanh arcsinh arccosh arctanh sigmoid logit erf erfc erfinv lgamma digamma polygamma i0
    sinc xlogy hypot sign sgn signbit copysign floor ceil round trunc frac fix clamp clip
    clamp_min clamp_max relu add sub subtract mul multiply div divide true_divide floor_divide
    remainder fmod reciprocal lerp logaddexp logaddexp2 maximum minimum fmax fmin nan_to_num
    softmax log_softmax addcmul addcdiv deg2rad rad2deg

    sum mean prod std var median nanmedian quantile nanquantile nanmean nansum max min amax amin
    aminmax argmax argmin logsumexp logcumsumexp cumsum cumprod cummax cummin norm dist
    count_nonzero all any kthvalue topk sort argsort msort unique diff trace values indices

    eq ne lt le gt ge greater greater_equal less less_equal not_equal equal isclose allclose
    isfinite isinf isnan isneginf isposinf where logical_and logical_or logical_not logical_xor

    reshape reshape_as view view_as flatten unflatten squeeze unsqueeze transpose permute movedim
    swapaxes swapdims t flip fliplr flipud roll rot90 narrow split chunk tensor_split unbind
    gather scatter scatter_add scatter_reduce index_select masked_fill masked_select take
    take_along_dim tril triu diag diag_embed diagonal broadcast_to expand expand_as repeat
    repeat_interleave tile matmul mm bmm mv dot inner outer contiguous clone detach

    to cpu float double half bfloat16 long int bool type_as new_zeros new_ones new_full
    new_tensor item tolist is_floating_point is_complex
""".split())

#: Fields of ``torch.finfo`` / ``torch.iinfo`` (``max`` and ``min`` are tensor methods too).
INFO_ATTRIBUTES: frozenset[str] = frozenset({"eps", "tiny", "smallest_normal", "resolution", "bits", "max", "min"})

#: Methods of the genome's own lists and dicts (defaults are immutable literals, so these
#: only ever change containers the genome built during the call).
CONTAINER_METHODS: frozenset[str] = frozenset({"append", "extend", "items", "keys", "values", "get"})

#: Everything a genome may read on a value that is not ``torch``, ``F``, ``math`` or ``self``.
VALUE_ATTRIBUTES: frozenset[str] = TENSOR_ATTRIBUTES | INFO_ATTRIBUTES | CONTAINER_METHODS

#: What a genome may read on ``self`` in the paper's form ``f(self, ...)``. At run time
#: ``self`` is a fresh record of the plug-in's plain hyper-parameters, never the plug-in's own
#: object (see :func:`engine.genome.compile_genome`).
SELF_ATTRIBUTES: frozenset[str] = frozenset({"beta", "label_smoothing"})

#: Builtins a loss function may call; everything else (``open``, ``exec``, ``getattr``,
#: ``type``, ``print``...) is absent from the namespace and refused by the static check.
SAFE_BUILTIN_NAMES: tuple[str, ...] = (
    "abs", "all", "any", "bool", "dict", "enumerate", "float", "int", "len", "list", "max", "min",
    "pow", "range", "reversed", "round", "sorted", "sum", "tuple", "zip", "isinstance",
    "ValueError", "RuntimeError", "ZeroDivisionError", "True", "False", "None",
)

#: Call keywords refused everywhere: both write into a tensor the genome did not create.
FORBIDDEN_KEYWORDS: frozenset[str] = frozenset({"out", "inplace"})
