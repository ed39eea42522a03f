"""optax chains from an optimizer config section (see configs/base.py `_optim`)."""
from __future__ import annotations

import optax


def schedule(o, total_steps: int):
  """The learning rate per step: `hold_steps` at 0, a linear warm-up over
  `warmup_steps`, then constant or a cosine decay to 0 at `total_steps`."""
  if o.learning_rate < 0:  # 0 freezes the network (e.g. a fixed discriminator)
    raise ValueError(f"optimizer learning_rate must be >= 0, got {o.learning_rate}")
  hold = int(o.get("hold_steps", 0))
  if hold < 0 or o.warmup_steps < 0:
    raise ValueError(f"optimizer hold_steps and warmup_steps must be >= 0, got {hold} "
                     f"and {o.warmup_steps}")
  if o.schedule == "constant":
    main = optax.constant_schedule(o.learning_rate)
  elif o.schedule == "cosine":
    main = optax.cosine_decay_schedule(o.learning_rate,
                                       max(1, total_steps - hold - o.warmup_steps))
  else:
    raise ValueError(f"optimizer schedule must be 'constant' or 'cosine', got {o.schedule!r}")
  if o.warmup_steps > 0:
    warm = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
    main = optax.join_schedules([warm, main], [o.warmup_steps])
  if hold > 0:
    return optax.join_schedules([optax.constant_schedule(0.0), main], [hold])
  return main


def make_optimizer(o, total_steps: int) -> optax.GradientTransformation:
  lr = schedule(o, total_steps)
  if o.name == "adamw":
    opt = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  elif o.name == "rmsprop":
    opt = optax.rmsprop(lr, decay=o.rms_decay, eps=o.eps)
  else:
    raise ValueError(f"optimizer name must be 'adamw' or 'rmsprop', got {o.name!r}")
  if o.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), opt)
  return opt
