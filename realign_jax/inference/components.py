"""Run directories -> what decoding runs on: policies and value models as dera.Components, rewards.

Every load is sharded onto the mesh given (`loop.host_mesh()` for the batch
loop) with the logical-axis rules; call inside `jax.set_mesh(mesh)` and
`nn.logical_axis_rules(rules)`, except `load_lm_params`, which sets both.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.checkpoints import run_dir
from realign_jax.decoding import dera, transfer_q
from realign_jax.inference.method import DecodeMethod, reward_label
from realign_jax.models.api import LanguageModel
from realign_jax.parallel.abstract import sharded_abstract
from realign_jax.training import policy as policy_lib


def load_component(model_dir: str, mesh, rules) -> dera.Component:
  """Rebuilds the language model from model.json and loads its latest params, sharded.

  A policy trained with a value head (PPO's "lm+scalar") loads as its
  language model alone: decoding needs only the logits.
  """
  config, _ = run_dir.read_model_json(model_dir)
  lm = LanguageModel(config)
  target = sharded_abstract(lm, mesh, rules)
  return dera.Component(lm, policy_lib.load_init_params(model_dir, target, config=config,
                                                        what="checkpoint"))


def load_value_model(model_dir: str, mesh, rules) -> dera.Component:
  """A value model run directory (configs/value/) as a sharded Component.

  Its model.json's output_head decides the kind: 'scalar' (or 'lm+scalar') is
  V([s, z]) per prefix, 'lm' a Q-head whose logits are Q(s)[z].
  """
  config, head = run_dir.read_model_json(model_dir)
  lm = LanguageModel(config, head)
  return dera.Component(lm, ckpt_lib.load_params(model_dir, sharded_abstract(lm, mesh, rules)))


def load_lm_params(model_dir: str, lm: LanguageModel, mesh, rules):
  """A run directory's language-model params for `lm` (a value head dropped), sharded."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return policy_lib.load_init_params(model_dir, sharded_abstract(lm, mesh, rules),
                                       config=lm.config, what=model_dir)


def load_components(method: DecodeMethod, ref_checkpoint: str, mesh, rules) -> dict:
  """{'ref': the reference, and each of `method.components()`} as sharded Components."""
  comps = {"ref": load_component(ref_checkpoint, mesh, rules)}
  for name, (model_dir, kind) in method.components().items():
    load = load_value_model if kind == "value" else load_component
    comps[name] = load(model_dir, mesh, rules)
  return comps


def setup_rewards(method: DecodeMethod, mesh, rules, probe_inputs, tokens) -> dict:
  """`method.rewards()` set up on `mesh`; a reward that is NaN on a probe is refused.

  `probe_inputs` [B, input_length] are prompt ids; `tokens` the policy's special ids.
  """
  rewards = method.rewards()
  for key, r in rewards.items():
    r.setup(mesh, rules)
    probe = jax.jit(lambda p, x, y, n, r=r: r.score_tokens(p, x, y, n))
    transfer_q.check_reward_finite(
        lambda x, y, n, p=r.params(), probe=probe: probe(p, x, y, n),
        jnp.asarray(probe_inputs), what=f"{key} {reward_label(r)}", tokens=tokens)
  return rewards
