"""Settings shared by the training commands: the observed-label sets and the loss knobs."""

from __future__ import annotations

from dataclasses import dataclass

from spl.data.prepared import PreparedDataset
from spl.data.sampling import observed_set_name
from spl.fit.losses import LossOptions


@dataclass
class LossSettings:
    """Which observed labels the losses see, and the constants the paper treats as knobs
    (its defaults); ``expected_positives`` None means the prepared dataset's k."""

    observed: str = observed_set_name(1, 0, 1200)
    observed_iu: str = observed_set_name(1, 1, 1200)
    label_smoothing: float = 0.1
    wan_gamma: float | None = None
    pseudo_negative_fraction: float = 0.5
    estimator_lr_multiplier: float = 10.0
    expected_positives: float | None = None

    def loss_options(self, prepared: PreparedDataset) -> LossOptions:
        k = self.expected_positives
        return LossOptions(
            expected_positives=prepared.expected_positives if k is None else k,
            label_smoothing=self.label_smoothing,
            wan_gamma=self.wan_gamma,
            pseudo_negative_fraction=self.pseudo_negative_fraction,
            estimator_lr_multiplier=self.estimator_lr_multiplier,
        )
