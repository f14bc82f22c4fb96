"""The ``product_dtype`` option that factor estimators share: the precision of their Gram products."""

import attrs
import torch

from ..validators import in_, to_str

#: ``"compute"``: the compute dtype; ``"bfloat16"``: operands and results rounded to bfloat16, sums in at least
#: float32 (:class:`kronopt.linalg.NarrowProducts`)
PRODUCT_DTYPES = ("compute", "bfloat16")


def product_dtype_field() -> "attrs.Attribute[str]":
    """An estimator's ``product_dtype`` attribute, ``"compute"`` by default."""
    return attrs.field(default="compute", converter=to_str, validator=in_(PRODUCT_DTYPES))  # type: ignore[return-value]


def narrow_dtype(product_dtype: str) -> torch.dtype | None:
    """The products' dtype a ``product_dtype`` names where it narrows them, ``None`` for the compute dtype."""
    return None if product_dtype == "compute" else torch.bfloat16
