"""The optimizers that ``benchmarks.compare`` compares, at unit learning rate.

Each method builds its optax chain at learning rate 1; the train step
(``benchmarks._train``) multiplies the update by the run's cosine-decayed
learning rate, so one compiled step serves every learning rate of a tuning
grid. SGS presets are unnormalised (exactly the branched networks' dynamics).
Every method has a baseline of its family: ``sgd`` for the SGD-family
methods and the branched networks, ``adamw`` for ``adamw+sgs``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import optax

import sgs_optax


@dataclasses.dataclass(frozen=True)
class Hyper:
  """The hyperparameters every method shares (the learning rate is apart)."""

  momentum: float = 0.9
  weight_decay: float = 5e-4  # coupled (add_decayed_weights), SGD family.
  adamw_weight_decay: float = 5e-2  # decoupled, AdamW family.


@dataclasses.dataclass(frozen=True)
class Method:
  """A compared method.

  Attributes:
    name: its name on the command line and in the results.
    build: the optax chain at unit learning rate.
    conv: "plain", or "acb"/"repvgg" for a model built with BranchedConv.
    learned: whether the learned SGS matrices are refreshed from data.
    family: "sgd" or "adamw": which default learning rate it starts from,
      and its baseline (the method of that name).
  """

  name: str
  build: Callable[[Hyper], optax.GradientTransformation]
  conv: str = "plain"
  learned: bool = False
  family: str = "sgd"

  @property
  def baseline(self) -> str:
    return self.family


def sgd_chain(h: Hyper, *first: optax.GradientTransformation
              ) -> optax.GradientTransformation:
  """``chain(*first, add_decayed_weights(wd), sgd(1, momentum))``.

  The SGD family as in the SGS paper: the gradient transforms first, then
  coupled weight decay, then heavy-ball momentum.
  """
  return optax.chain(*first, optax.add_decayed_weights(h.weight_decay),
                     optax.sgd(1.0, momentum=h.momentum))


def adamw(h: Hyper) -> optax.GradientTransformation:
  """``optax.adamw`` at unit learning rate (its decay is scaled by the lr)."""
  return optax.adamw(1.0, weight_decay=h.adamw_weight_decay)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("sgd", sgd_chain),
    Method("sgs-acb", lambda h: sgd_chain(h, sgs_optax.sgs("acb"))),
    Method("sgs-repvgg", lambda h: sgd_chain(h, sgs_optax.sgs("repvgg"))),
    Method("sgs-learned", lambda h: sgd_chain(h, sgs_optax.sgs()),
           learned=True),
    Method("cdg", lambda h: sgd_chain(h, sgs_optax.cdg())),
    Method("cdg+sgs-learned",
           lambda h: sgd_chain(h, sgs_optax.sgs(), sgs_optax.cdg()),
           learned=True),
    Method("acb-branched", sgd_chain, conv="acb"),
    Method("repvgg-branched", sgd_chain, conv="repvgg"),
    Method("adamw", adamw, family="adamw"),
    Method("adamw+sgs", lambda h: optax.chain(adamw(h), sgs_optax.sgs("acb")),
           family="adamw"),
]}


def with_baselines(names: Sequence[str]) -> list[str]:
  """``names`` with the baselines they need added in front (in order)."""
  needed = [b for b in ("sgd", "adamw")
            if any(METHODS[n].baseline == b for n in names) and b not in names]
  return needed + [n for n in names if n not in needed]
