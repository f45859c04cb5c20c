"""The batched-hosts backend's knobs (:class:`HostsConfig`) and its named presets."""

from __future__ import annotations

from dataclasses import dataclass

from esper_soa.dynamics.data import DATASETS


@dataclass(frozen=True)
class HostsConfig:
    """Every knob of the batched-hosts backend."""

    channels: tuple[int, ...] = (8, 16, 32)  # widths of the host's conv blocks; slot i has width channels[i]
    norm_groups: int = 4  # GroupNorm groups in host blocks and seeds (each width must be divisible)
    minibatch_size: int = 32  # training images per env per minibatch
    minibatches_per_epoch: int = 16  # minibatches per host epoch (= per advance); cycles the split if larger
    val_size: int = 256  # validation images evaluated per epoch: a fixed prefix of the validation split
    val_chunk: int = 8192  # images x envs per validation chunk: bounds the working set (cache) and memory
    host_lr: float = 0.05  # SGD learning rate of the host parameters
    host_momentum: float = 0.9  # SGD momentum of the host parameters
    host_weight_decay: float = 0.0  # L2 weight decay of the host parameters
    seed_lr: float = 0.05  # SGD learning rate of seed (and gate) parameters
    seed_momentum: float = 0.9  # SGD momentum of seed parameters (buffers reset at germination)
    seed_weight_decay: float = 0.0  # L2 weight decay of seed parameters
    seed_init_scale: float = 0.1  # gain of a fresh seed's last layer (seeds start near the identity)
    grad_stride: int = 4  # gradient telemetry on every k-th minibatch of the epoch (minibatch 0 always)
    vanish_ratio: float = 0.01  # has_vanishing when the seed/host RMS-gradient ratio is below this
    explode_ratio: float = 10.0  # has_exploding when that ratio is above this (or non-finite)
    health_log10_span: float = 4.0  # gradient_health = 1 - |log10 ratio| / span, clamped to [0, 1]
    dataset: str = "digits"  # "digits" (sklearn, embedded) or "cifar10" (needs data_path)
    data_path: str | None = None  # directory with CIFAR-10's data_batch_1..5 and test_batch
    digits_val: int = 360  # size of the digits validation split (the rest trains)
    image_size: int = 8  # digits only: side the 8x8 images are resized to (>= 2 ** len(channels))

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"HostsConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        if len(self.channels) < 1 or any(not isinstance(c, int) or c < 1 for c in self.channels):
            raise bad("channels", "a non-empty tuple of positive ints")
        if self.norm_groups < 1 or any(c % self.norm_groups for c in self.channels):
            raise bad("norm_groups", f"a positive divisor of every width in {self.channels}")
        for name in ("minibatch_size", "minibatches_per_epoch", "val_size", "val_chunk", "grad_stride",
                     "digits_val"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "an int >= 1")
        for name in ("host_lr", "seed_lr", "seed_init_scale", "vanish_ratio", "explode_ratio",
                     "health_log10_span"):
            if not getattr(self, name) > 0.0:
                raise bad(name, "> 0")
        for name in ("host_momentum", "seed_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise bad(name, "a value in [0, 1)")
        for name in ("host_weight_decay", "seed_weight_decay"):
            if getattr(self, name) < 0.0:
                raise bad(name, ">= 0")
        if self.dataset not in DATASETS:
            raise bad("dataset", f"one of {DATASETS}")
        if self.image_size < 2 ** len(self.channels):
            raise bad("image_size", f">= 2 ** len(channels) = {2 ** len(self.channels)}")


# Named configurations (``esper-soa --dynamics hosts --preset NAME``). "calibrated" is the host the
# surrogate is fitted to (docs/CALIBRATION.md): channels 2/4/8 leave headroom on digits (alone ~82 %
# after 60 epochs of 4 minibatches) so that a good seed adds >= 1 pp (measured: +2.5 +- 0.7 pp for the
# best slot/blueprint, ``calibration.seed_headroom``), where the default 8/16/32 host reaches ~97 %
# alone and seeds barely matter. 4 minibatches per epoch keep an epoch cheap on a CPU.
HOSTS_PRESETS: dict[str, HostsConfig] = {
    "default": HostsConfig(),
    "calibrated": HostsConfig(channels=(2, 4, 8), norm_groups=2, minibatches_per_epoch=4),
}
