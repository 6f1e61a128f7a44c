r"""Per-device memory of the cdg update on kernels sharded by output channel.

For each kernel, mesh kind and solver (``None``, the platform's default,
``"fft"`` and ``"dense"``), compiles ``jax.jit(cdg(...).update)`` on a
gradient sharded along its output channels over the ``model`` axis of a
``(data=2, model=4)`` mesh, and reports the whole kernel's bytes, the compiled
per-device temporaries (``compiled.memory_analysis().temp_size_in_bytes``),
their ratio, and whether the compiled HLO holds an ``all-gather``. Beside it,
in the same run, the same transform after gathering the channel axis (what
cdg did before it swapped sharded axes): the baseline. The dense solver's
``O x O`` operator is a compile-time constant here (a concrete smoothing), so
it is not among the temporaries; its size is given beside them.

Run from the repository root, on 8 simulated CPU devices::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m benchmarks.cdg_sharding
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import itertools

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import optax

from benchmarks import _report
from sgs_optax import cdg

KERNELS = ((3, 3, 64, 256), (3, 3, 256, 512), (3, 3, 3, 64))
SOLVERS = (None, "fft", "dense")
MODES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
SPEC = P(None, None, None, "model")  # HWIO, output channels over `model`.


def gathered(tx: optax.GradientTransformation, mesh) -> Callable:
  """The baseline: ``tx.update`` with the channel axis gathered around it."""
  explicit = mesh.axis_types[0] == AxisType.Explicit
  place = jax.sharding.reshard if explicit else jax.lax.with_sharding_constraint

  def update(grads, state):
    whole = NamedSharding(mesh, P())
    updates, state = tx.update(jax.tree.map(lambda g: place(g, whole), grads),
                               state)
    back = NamedSharding(mesh, SPEC)
    return jax.tree.map(lambda u: place(u, back), updates), state

  return update


def measure(update: Callable, grads) -> dict[str, object]:
  compiled = jax.jit(update).lower(grads, optax.EmptyState()).compile()
  out = compiled(grads, optax.EmptyState())[0]["k"]
  return {
      "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
      "all_gather": "all-gather" in compiled.as_text(),
      "sharding_kept": out.sharding.is_equivalent_to(
          grads["k"].sharding, out.ndim
      ),
  }


def run(kernels: Sequence[tuple[int, ...]], boundaries: Sequence[str]):
  """One row per mesh kind, kernel and boundary, both variants measured."""
  rows = []
  for mode_name, mode in MODES.items():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(mode,) * 2)
    with jax.set_mesh(mesh):
      for shape in kernels:
        g = jnp.ones(shape, jnp.float32)
        grads = {"k": jax.device_put(g, NamedSharding(mesh, SPEC))}
        for boundary, solver in itertools.product(boundaries, SOLVERS):
          tx = cdg(boundary=boundary, solver=solver)
          rows.append({
              "mesh": mode_name, "kernel": list(shape), "boundary": boundary,
              "solver": solver, "kernel_bytes": g.nbytes,
              "operator_bytes": 4 * shape[-1]**2 if solver == "dense" else 0,
              "cdg": measure(tx.update, grads),
              "gathered": measure(gathered(tx, mesh), grads),
          })
  return rows


def table(rows) -> str:
  """A markdown table: temporaries as MiB and as a multiple of the kernel."""
  lines = [
      "| mesh | kernel (HWIO) | boundary | solver | whole kernel | cdg: "
      "temporaries per device | all-gather | gathered first: temporaries | "
      "all-gather |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  mib = lambda b: f"{b / 2**20:.3g} MiB"
  for r in rows:
    solver = r["solver"] or "default"
    if r["operator_bytes"]:
      solver += f" ({mib(r['operator_bytes'])} operator)"
    cells = [r["mesh"], "x".join(map(str, r["kernel"])), r["boundary"],
             solver, mib(r["kernel_bytes"])]
    for variant in ("cdg", "gathered"):
      m = r[variant]
      ratio = m["temp_bytes"] / r["kernel_bytes"]
      cells += [f"{mib(m['temp_bytes'])} ({ratio:.2f}x)",
                "yes" if m["all_gather"] else "no"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--kernels", nargs="+", default=None,
                      help="kernel shapes such as 3x3x64x256 (HWIO)")
  parser.add_argument("--boundaries", nargs="+",
                      default=("periodic", "neumann"))
  parser.add_argument("--out", default="results/cdg_sharding.json")
  args = parser.parse_args(argv)
  if jax.device_count() != 8:
    raise SystemExit(
        "needs 8 devices: run with "
        "XLA_FLAGS=--xla_force_host_platform_device_count=8"
    )
  kernels = KERNELS if args.kernels is None else [
      tuple(int(n) for n in k.split("x")) for k in args.kernels]
  rows = run(kernels, args.boundaries)
  print(table(rows))
  for r in rows:
    if not (r["cdg"]["sharding_kept"] and r["gathered"]["sharding_kept"]):
      raise SystemExit(f"sharding not kept: {r}")
  _report.write_json(args.out, {"environment": _report.environment(),
                                "rows": rows})


if __name__ == "__main__":
  main()
