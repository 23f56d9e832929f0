"""How a rank is chosen for one layer from its singular values (data-free policies)."""

from __future__ import annotations

from dataclasses import dataclass

from dwsep_compiler.initialization.lowrank import ChannelSVD, rank_for_energy

DEFAULT_ENERGY = 0.95


@dataclass(frozen=True)
class RankPolicy:
    """``rank``: a fixed depth multiplier (an int, or ``"full"`` for the exact rewrite);
    otherwise ``energy``: the smallest r keeping that fraction of the squared singular values.

    With neither given the default is ``energy = 0.95``. A layer where the chosen rank would
    not cut multiply-accumulates is skipped, unless ``force`` (e.g. the exact ``rank="full"``
    rewrite, which never cuts MACs, for checking or measuring). ``off``: no layer is rewritten
    (``--no-factorize``: the model is compiled as given, each conv reported).
    """

    rank: int | str | None = None
    energy: float | None = None
    force: bool = False
    off: bool = False

    def __post_init__(self):
        if self.off and (self.rank is not None or self.energy is not None):
            raise ValueError("no rank or energy with the factorization off")
        if self.rank is not None and self.energy is not None:
            raise ValueError("give a rank or an energy, not both")
        if isinstance(self.rank, str) and self.rank != "full":
            raise ValueError(f"rank must be a positive integer or 'full', got {self.rank!r}")
        if isinstance(self.rank, int) and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")

    def choose(self, svd: ChannelSVD) -> int:
        if self.rank == "full":
            return svd.max_rank
        if self.rank is not None:
            return min(int(self.rank), svd.max_rank)
        return rank_for_energy(svd, DEFAULT_ENERGY if self.energy is None else self.energy)

    def describe(self) -> str:
        if self.off:
            return "off (compiled as given)"
        text = (f"rank={self.rank}" if self.rank is not None
                else f"energy={DEFAULT_ENERGY if self.energy is None else self.energy}")
        return text + (", force" if self.force else "")
