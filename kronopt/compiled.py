r"""Optional ``torch.compile`` of the Newton–Schulz iteration and the elementwise tail (config key ``compile``).

With ``compile = true`` the optimizer steps a bucket inside :func:`scope`, and four
functions hand their work to a compiled twin: :func:`kronopt.linalg.newton_schulz`,
:func:`kronopt.linalg.adam_moments`, :func:`kronopt.linalg.adam_ratio` and
:meth:`kronopt.post.Post.apply_` (each opens with one line asking :func:`variant`).
Outside a scope, or while dynamo traces (the twin calls the eager function, whose
first line then answers ``None``), nothing changes.

No recompilation per step:

* every twin is compiled with ``dynamic=False``: one graph per shape, dtype and
  device (a bucket's shapes never change), and per value of the options that are
  constants of a config (betas, ε, the Newton–Schulz coefficients);
* what changes from step to step, the bias corrections of ``adam_ratio`` (from the
  step count) and ``lr`` / ``lr · weight_decay`` of the write, enters as 0-d tensors
  made on the data's device with ``torch.full`` (a fill, no host-to-device copy), so
  its value is data, not a guard;
* dynamo's per-function recompile limit (8 by default: one graph per bucket shape)
  is raised to :data:`RECOMPILE_LIMIT` inside the scope only.

Where compilation fails (no C++ compiler for inductor on CPU, an unsupported
platform) the first call warns once per function, with the reason, and that
function runs eagerly from then on. Only the compiler's own errors are taken so
(:func:`refused_to_compile`): an error of the compiled function while it runs (an
out-of-memory, say) is raised as it came, and compilation stays on, for the
compiled code may have written part of its results before it failed, which a
rerun would apply twice.
"""

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

#: graphs one compiled function may hold (dynamo's ``recompile_limit`` inside :func:`scope`)
RECOMPILE_LIMIT = 64

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("kronopt_compile", default=False)
#: whether an enclosing :func:`scope` has dynamo's recompile limit patched already (an inner one adds nothing)
_PATCHED: contextvars.ContextVar[bool] = contextvars.ContextVar("kronopt_compile_patched", default=False)
#: dynamo's config patch of :func:`scope`, by the limit it sets, made once and entered again at each outermost
#: scope: each ``config.patch`` call defines a class of its own, a reference cycle left to the cycle collector
_PATCHES: dict[int, Any] = {}


@contextlib.contextmanager
def scope(enabled: bool) -> Iterator[None]:
    """Run the block with the compiled twins (``enabled``) or without them; nests, restores on exit."""
    if not enabled and not _ACTIVE.get():
        yield
        return
    token = _ACTIVE.set(enabled)
    try:
        if enabled and not _PATCHED.get():
            import torch._dynamo

            limit = max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
            patch = _PATCHES.get(limit)
            if patch is None:
                patch = _PATCHES[limit] = torch._dynamo.config.patch(recompile_limit=limit)
            patched = _PATCHED.set(True)
            try:
                with patch:  # never entered twice at once: older torch releases refuse that
                    yield
            finally:
                _PATCHED.reset(patched)
        else:
            yield
    finally:
        _ACTIVE.reset(token)


def active() -> bool:
    """Whether the compiled twins are in use here (inside ``scope(True)``, not while dynamo traces)."""
    return _ACTIVE.get() and not torch.compiler.is_compiling()


def variant(name: str) -> Callable[..., Any] | None:
    """The compiled twin of ``name`` (``"newton_schulz"``, ``"adam_moments"``, ``"adam_ratio"``,
    ``"post_apply"``) inside ``scope(True)``; ``None`` otherwise (the caller runs its own body)."""
    if torch.compiler.is_compiling() or not _ACTIVE.get():
        return None
    return _twins()[name]


def compiler_errors() -> tuple[type[BaseException], ...]:
    """The exceptions by which ``torch.compile``'s compilers say that they could not compile a function: dynamo's
    (its backend's failures among them, inductor's wrapped in ``InductorError``, a missing C++ compiler so), its
    recompile limit where it is set to fail, and inductor's own that reach the caller unwrapped. A compiled
    function's run raises none of them: its errors are its operators' (``torch.OutOfMemoryError``, ...)."""
    import torch._dynamo.exc as dynamo
    import torch._inductor.exc as inductor

    names = ("OperatorIssue", "InvalidCxxCompiler", "CppCompileError", "CppWrapperCodegenError", "SubgraphLoweringException")
    found = (getattr(inductor, n, None) for n in names)  # some are missing from older releases
    return (dynamo.TorchDynamoException, dynamo.FailOnRecompileLimitHit, *(e for e in found if isinstance(e, type)))


def refused_to_compile(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a ``torch.compile``-d function, says that it was not compiled (then it did not
    run): a compiler's error (:func:`compiler_errors`), or torch's refusal to compile a function it holds no graph
    for under ``torch.compiler.set_stance("fail_on_recompile")``, a plain ``RuntimeError`` raised at the frame's
    entry, told apart by its message (torch gives it no class of its own)."""
    if isinstance(exc, compiler_errors()):
        return True
    return type(exc) is RuntimeError and "fail_on_recompile" in str(exc)


class Compiled:
    """``fn`` compiled with ``dynamic=False``; on the first failure to compile: one warning, then ``fn`` eagerly.

    Attributes:
        fn: the eager function (also what a failed compilation falls back to).
        name: how the warning names it.
        failed: compilation failed once; every later call runs ``fn``.
    """

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self.fn, self.name, self.failed = fn, name, False
        self._compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # fn is the public function whose first line asks variant(): wherever it runs eagerly (the fallback, or
        # dynamo running the frame itself: TORCH_COMPILE_DISABLE, its recompile limit reached) it must find no
        # twin, or it would call this twin again. The enclosing scope keeps dynamo's recompile limit patched.
        with scope(False):
            if not self.failed and self._compiled is None:
                try:
                    self._compiled = torch.compile(self.fn, dynamic=False)
                except Exception as exc:  # noqa: BLE001 - refused before anything ran (a platform torch.compile lacks)
                    self._fail(exc)
            if not self.failed:
                try:
                    return self._compiled(*args, **kwargs)
                except Exception as exc:
                    if not refused_to_compile(exc):
                        raise
                    self._fail(exc)  # raised while compiling, before the graph ran: nothing written
            return self.fn(*args, **kwargs)

    def _fail(self, exc: BaseException) -> None:
        self.failed = True
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        warnings.warn(
            f"kronopt: torch.compile of {self.name} failed ({type(exc).__name__}: {reason[:300]}); "
            "it runs eagerly from now on (compile = true has no effect on it)",
            RuntimeWarning,
            stacklevel=4,
        )


def _as_scalar(x: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``x`` (a number, or a one-entry tensor such as a scheduler's learning rate on the device) as a 0-d tensor of
    ``dtype`` on ``device``: a fill, or the tensor's own entry moved (no read on the host)."""
    if isinstance(x, Tensor):
        return x.reshape(()).to(dtype=dtype, device=device)
    return torch.full((), x, dtype=dtype, device=device)


def _scalar(x: float, like: Tensor) -> Tensor:
    """``x`` as a 0-d tensor of ``like``'s dtype on its device (a fill kernel: no copy, no synchronisation)."""
    return torch.full((), x, dtype=like.dtype, device=like.device)


# -- the twins' compiled kernels: what changes every step enters as a tensor ------------


def _ratio_before(m: Tensor, v: Tensor, eps: float) -> Tensor:
    return m / v.sqrt().add_(eps)


def _ratio_after(m: Tensor, v: Tensor, sqrt_c2: Tensor, eps: float) -> Tensor:
    return m / v.sqrt().div_(sqrt_c2).add_(eps)


def _moments(m: Tensor, v: Tensor, G: Tensor, betas: tuple[float, float]) -> tuple[Tensor, Tensor]:
    # (1 - β₂) G before the second G, as the eager kernel of ``addcmul`` multiplies: inductor's ``addcmul`` forms
    # G² first, which overflows float32 for |G| ≳ 1.8e19 (β₂ = 0.95) where the eager step's state stays finite
    beta1, beta2 = betas
    return torch.lerp(m, G, 1 - beta1), v * beta2 + G * (1 - beta2) * G


def _apply(params: list[Tensor], D: Tensor, ok: Tensor, lr: Tensor, lr_wd: Tensor, order: str, decay: bool) -> None:
    okf = ok.to(lr_wd.dtype)
    D = torch.where(ok.view(-1, 1, 1), D, torch.zeros((), dtype=D.dtype, device=D.device))
    factor = 1 - lr_wd * okf
    for i, p in enumerate(params):
        step = D[i].view(p.shape)
        if decay and order == "before":
            p.mul_(factor[i])
        p.sub_(step * lr)
        if decay and order == "after":
            p.mul_(factor[i])


_TWINS: dict[str, Callable[..., Any]] = {}


def _twins() -> dict[str, Callable[..., Any]]:
    """The compiled twins, built on first use (they import the modules that ask for them)."""
    if _TWINS:
        return _TWINS
    from . import linalg
    from .post import _factor_dtype as factor_dtype

    ratio_before = Compiled(_ratio_before, "the Adam ratio")
    ratio_after = Compiled(_ratio_after, "the Adam ratio")
    apply = Compiled(_apply, "the parameter write")

    def adam_ratio(
        m: Tensor, v: Tensor, *, step: int, betas: tuple[float, float], eps: float, eps_placement: str, bias_correction: bool
    ) -> tuple[Tensor, float]:
        """:func:`kronopt.linalg.adam_ratio` with the step count outside the graph."""
        beta1, beta2 = betas
        c1 = 1 - beta1**step if bias_correction else 1.0
        c2 = 1 - beta2**step if bias_correction else 1.0
        if eps_placement == "before_correction":
            return ratio_before(m, v, eps), c2**0.5 / c1
        if eps_placement == "after_correction":
            return ratio_after(m, v, _scalar(c2**0.5, v), eps), 1 / c1
        raise ValueError(f"eps_placement must be 'before_correction' or 'after_correction', got {eps_placement!r}")

    def post_apply(post: Any, params: Sequence[Tensor], D: Tensor, *, lr: float, weight_decay: float, ok: Tensor) -> None:
        """:meth:`kronopt.post.Post.apply_` with ``lr`` and ``lr · weight_decay`` as tensors."""
        dt = factor_dtype(D.dtype)  # as the eager form: in bfloat16 a small decay would round away
        lr_t, lr_wd = (_as_scalar(x, dt, D.device) for x in (lr, lr * weight_decay))
        decay = isinstance(weight_decay, Tensor) or bool(weight_decay)  # a tensor is not read (a synchronisation)
        apply(list(params), D, ok, lr_t, lr_wd, post.weight_decay_order, decay)

    _TWINS.update(
        newton_schulz=Compiled(linalg.newton_schulz, "Newton–Schulz"),
        adam_moments=Compiled(_moments, "the Adam moments"),
        adam_ratio=adam_ratio,
        post_apply=post_apply,
    )
    return _TWINS
