"""Fixed classification heads: cosine similarity to frozen class prototypes.

Built once from the frozen base model and never trained, so that (1) the base model already
has a meaningful zero-shot accuracy (FWT and R[0][i] mean something), (2) only the LoRA learns
and merged adapters stay comparable across tasks, as CLIP's text heads do in the papers.
Prototypes are the L2-normalised mean of L2-normalised base features of each class; for CLIP
they are the class-prompt text embeddings.

Temperature: logits = scale · cos(feature, prototype). Cosines live in [-1, 1], so a scale of
10–30 lets the softmax become confident (scale 16, cosine gap 0.3 -> odds e^4.8 ≈ 120) while
the gradients at the start do not vanish; DEFAULT_SCALE = 16. CLIP uses its learned
`logit_scale.exp()` (100 in released models) instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapterdb.errors import AdbError, MismatchError

DEFAULT_SCALE = 16.0


class PrototypeHead(nn.Module):
    """logits = scale · normalize(features) @ prototypesᵀ; prototypes are frozen unit buffers."""

    def __init__(self, prototypes: torch.Tensor, scale: float = DEFAULT_SCALE) -> None:
        super().__init__()
        if prototypes.dim() != 2 or prototypes.shape[0] == 0:
            raise MismatchError(
                f"prototypes of shape {tuple(prototypes.shape)}; pass (num_classes, feature_dim)"
            )
        self.register_buffer("prototypes", F.normalize(prototypes.detach().float(), dim=1))
        self.register_buffer("scale", torch.tensor(float(scale)))

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) features -> (B, num_classes) float32 logits, whatever the feature dtype."""
        if features.dim() != 2 or features.shape[1] != self.prototypes.shape[1]:
            raise MismatchError(
                f"features of shape {tuple(features.shape)} for prototypes of dim "
                f"{self.prototypes.shape[1]}; pass (batch, {self.prototypes.shape[1]})"
            )
        return self.scale * F.normalize(features.float(), dim=1) @ self.prototypes.T

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features)


def class_prototypes(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """(num_classes, D) mean of the L2-normalised features of each class (not re-normalised).

    Normalising each feature first keeps a few large-norm examples from dominating a class.
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise MismatchError(
            f"features {tuple(features.shape)} and labels {tuple(labels.shape)}; "
            "pass (N, D) features and (N,) labels"
        )
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise AdbError(f"labels must lie in 0..{num_classes - 1}; relabel the data")
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise AdbError(f"classes {missing} have no examples; give every class at least one")
    unit = F.normalize(features.float(), dim=1)
    sums = unit.new_zeros(num_classes, unit.shape[1]).index_add_(0, labels, unit)
    return sums / counts.unsqueeze(1).to(sums)


def build_prototype_head(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, scale: float = DEFAULT_SCALE
) -> PrototypeHead:
    """A head whose prototypes are the class means of frozen base `features`."""
    return PrototypeHead(class_prototypes(features, labels, num_classes), scale)
