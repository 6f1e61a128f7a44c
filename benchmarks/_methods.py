"""The optimizers that ``benchmarks.compare`` compares, at unit learning rate.

Each method builds its optax chain at learning rate 1; the train step
(``benchmarks._train``) multiplies the update by the run's cosine-decayed
learning rate, so one compiled step serves every learning rate of a tuning
grid. SGS presets are unnormalised (exactly the branched networks' dynamics).
Every method has a baseline of its family: ``sgd`` for the SGD-family
methods and the branched networks, ``adamw`` for the ``adamw+sgs`` ones.
SGS goes where docs/placement.md puts it: before coupled decay and momentum
for SGD, after Adam's direction and before its decoupled decay for AdamW.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses

import jax.numpy as jnp
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
    default: whether it runs when ``--methods`` is not given (methods left
      out would push the main job past its time budget).
    tuned_as: the method it is exactly equivalent to (same family), whose
      learning-rate search it reuses, or None. Two exactly equivalent
      methods differ only by float rounding, which can tip a search; sharing
      one search keeps them on one learning rate (and saves the runs).
  """

  name: str
  build: Callable[[Hyper], optax.GradientTransformation]
  conv: str = "plain"
  learned: bool = False
  family: str = "sgd"
  default: bool = True
  tuned_as: str | None = None

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


def adamw_chain(h: Hyper, scaling: optax.GradientTransformation
                ) -> optax.GradientTransformation:
  """``optax.adamw`` with ``scaling`` after the direction, before the decay.

  The exact placement for a branched network (docs/placement.md): the
  direction times ``sum_k |alpha_k| mask_k``, then decoupled weight decay
  on the unscaled weights, then the (unit) learning rate.
  """
  return optax.chain(optax.scale_by_adam(), scaling,
                     optax.add_decayed_weights(h.adamw_weight_decay),
                     optax.scale_by_learning_rate(1.0))


def square_root_of(tx: optax.GradientTransformation
                   ) -> optax.GradientTransformationExtraArgs:
  """``tx`` (an ``sgs``) applying the square root of its matrices.

  The state stays ``sgs``'s, so ``refresh_scalings`` writes the learned
  matrices (an SGD multiplier ``S``) there as usual; each update reads
  ``sqrt(S)``, the multiplier of the same per-tap reparameterization after a
  scale-invariant direction (docs/placement.md, "Learned matrices").
  """

  def update_fn(updates, state, params=None, **extra_args):
    table = state.scalings
    rooted = table.replace({k: jnp.sqrt(v) for k, v in table.items()})
    updates, _ = tx.update(updates, state._replace(scalings=rooted), params,
                           **extra_args)
    return updates, state

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


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
    # Exactly the SGS methods' dynamics on the branched network.
    Method("acb-branched", sgd_chain, conv="acb", tuned_as="sgs-acb"),
    Method("repvgg-branched", sgd_chain, conv="repvgg",
           tuned_as="sgs-repvgg"),
    Method("adamw", adamw, family="adamw"),
    Method("adamw+sgs", lambda h: adamw_chain(h, sgs_optax.sgs("acb")),
           family="adamw"),
    # The learned matrices after Adam, read as is or square-rooted.
    Method("adamw+sgs-learned", lambda h: adamw_chain(h, sgs_optax.sgs()),
           learned=True, family="adamw", default=False),
    Method("adamw+sgs-learned-sqrt",
           lambda h: adamw_chain(h, square_root_of(sgs_optax.sgs())),
           learned=True, family="adamw", default=False),
]}

DEFAULT_METHODS = [name for name, m in METHODS.items() if m.default]


def tuning_source(method: Method) -> Method:
  """The method whose learning-rate search ``method`` uses (maybe itself).

  Raises:
    ValueError: if ``method.tuned_as`` names no method, one of another
      family (another default learning rate and grid), or one that is
      itself tuned as another.
  """
  if method.tuned_as is None:
    return method
  source = METHODS.get(method.tuned_as)
  if (source is None or source.family != method.family
      or source.tuned_as is not None):
    raise ValueError(
        f"{method.name}: tuned_as={method.tuned_as!r} must name a method of "
        f"family {method.family!r} that is tuned itself.")
  return source


def with_baselines(names: Sequence[str]) -> list[str]:
  """``names`` with the baselines they need added in front (in order)."""
  needed = [b for b in ("sgd", "adamw")
            if any(METHODS[n].baseline == b for n in names) and b not in names]
  return needed + [n for n in names if n not in needed]
